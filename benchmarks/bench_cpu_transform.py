"""What a soft-capped or scaled head costs the CPU kernel, one run.

    python benchmarks/bench_cpu_transform.py [--shapes 8192x32000,131072x100] [--dtypes float32,bfloat16]
        [--plain-only] [--json PATH]

Per shape and dtype, in one process, rk.score and rk.select (cpu backend, k = 10%) on:
plain logits; Gemma-2's cap (softcap=30); a Cohere-like scale (logit_scale=0.0625); plain logits
with label smoothing's sum (score with zsum, as selective_cross_entropy(label_smoothing=...)
asks for it); and the cap done the way a backend without it in the kernel does it: z' materialised
in torch (cap * tanh(z / cap), an N x V float32 temporary), then the plain kernel.  Times are
ratios to plain in the same run.  ``--plain-only`` times the plain variants alone (what an older
build of the package can run, for before/after comparisons between builds).

The variants run in turn, ``--rounds`` times over (``--repeats`` calls each per round), and each
time is the median of all its calls: on a shared machine a change of load then hits every variant
alike instead of whichever ran during it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import rho_kernels as rk
from rho_kernels import backends
from rho_kernels._contract import prepare
from rho_kernels.benchmark import DTYPES, environment, parse_shapes

CAP, SCALE = 30.0, 0.0625


def variants(logits, targets, il, k, plain_only: bool) -> dict:
    kw = dict(method="reducible", backend="cpu")
    out = {
        "score plain": lambda: rk.score(logits, targets, il, **kw),
        "select plain": lambda: rk.select(logits, targets, il, k, **kw),
    }
    if plain_only:
        return out
    cpu = backends.get("cpu")
    p_zsum = prepare(logits, targets, il, "reducible", -100)
    out.update({
        "score softcap": lambda: rk.score(logits, targets, il, softcap=CAP, **kw),
        "score scale": lambda: rk.score(logits, targets, il, logit_scale=SCALE, **kw),
        "score plain + zsum": lambda: cpu.score_rows(p_zsum, with_zsum=True),
        "score softcap materialised": lambda: rk.score(torch.tanh(logits.float() / CAP) * CAP, targets, il, **kw),
        "select softcap": lambda: rk.select(logits, targets, il, k, softcap=CAP, **kw),
    })
    return out


def run_case(n: int, v: int, dtype: torch.dtype, rounds: int, repeats: int, plain_only: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(n, v, generator=g) * 3).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    il = torch.rand(n, generator=g) * 2
    k = max(1, n // 10)
    fns = variants(logits, targets, il, k, plain_only)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
    ms = {name: statistics.median(t) for name, t in times.items()}
    ratio = {name: ms[name] / ms[("select" if name.startswith("select") else "score") + " plain"] for name in ms}
    return {"N": n, "V": v, "dtype": str(dtype).replace("torch.", ""), "k": k, "ms": ms, "ratio_to_plain": ratio}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="8192x32000,131072x100")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--plain-only", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    results = []
    for n, v in parse_shapes(args.shapes):
        for name in args.dtypes.split(","):
            r = run_case(n, v, DTYPES[name], args.rounds, args.repeats, args.plain_only)
            results.append(r)
            cells = "  ".join(f"{k} {r['ms'][k]:.2f} ms ({r['ratio_to_plain'][k]:.2f}x)" for k in r["ms"])
            print(f"{n}x{v} {name}: {cells}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment(torch.device("cpu")), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
