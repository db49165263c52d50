"""The CPU kernel at the classification shapes of RHO-LOSS (small V, many rows), one run.

    python benchmarks/bench_cpu_small_vocab.py [--shapes 1048576x10,...] [--dtypes float32,bfloat16] [--json PATH]

Per shape and dtype, in one process: rk.score (cpu) against torch.compile(reference score), and
rk.select (cpu, k = 10%) against the same compiled score followed by torch.topk; plus the read
floor (logits.sum()).  One compile per case (the compiled score is reused for select).

The variants run in turn, ``--rounds`` times over (``--repeats`` calls each per round), and each
time is the median of all its calls: on a shared machine a change of load then hits every
variant alike instead of whichever ran during it.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

import rho_kernels as rk
from rho_kernels.benchmark import DTYPES, environment, measure, parse_shapes, reference_score


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="1048576x10,131072x100,16384x1000")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = torch.device("cpu")
    rows = []
    for n, v in parse_shapes(args.shapes):
        for d in args.dtypes.split(","):
            g = torch.Generator().manual_seed(0)
            x = (torch.randn(n, v, generator=g) * 3).to(DTYPES[d])
            y = torch.randint(0, v, (n,), generator=g)
            il = torch.rand(n, generator=g) * 2
            k = n // 10
            compiled = torch.compile(reference_score, dynamic=False)
            fns = {
                "read_floor": lambda: x.sum(),
                "cpu_score": lambda: rk.score(x, y, il, backend="cpu"),
                "compiled_score": lambda: compiled(x, y, il, "reducible"),
                "cpu_select": lambda: rk.select(x, y, il, k, backend="cpu"),
                "compiled_score_plus_topk": lambda: torch.topk(compiled(x, y, il, "reducible"), k),
            }
            for fn in fns.values():  # warm-up (and the compile)
                fn()
                fn()
            times = {key: [] for key in fns}
            for _ in range(args.rounds):
                for key, fn in fns.items():
                    times[key].append(measure(fn, dev, args.repeats, 0)["ms"])
            row = {"N": n, "V": v, "dtype": d, "k": k, "rounds": args.rounds, "repeats": args.repeats,
                   **{f"{key}_ms": statistics.median(t) for key, t in times.items()},
                   **{f"{key}_round_ms": t for key, t in times.items()}}
            row["score_speedup_vs_compiled"] = row["compiled_score_ms"] / row["cpu_score_ms"]
            row["select_speedup_vs_compiled_topk"] = row["compiled_score_plus_topk_ms"] / row["cpu_select_ms"]
            row["score_pct_of_read_floor"] = 100 * row["read_floor_ms"] / row["cpu_score_ms"]
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment(dev), "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
