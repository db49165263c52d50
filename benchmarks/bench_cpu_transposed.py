"""Transposed (column-major) vs contiguous logits on the CPU kernel, one run.

    python benchmarks/bench_cpu_transposed.py [--json PATH] [--rounds N]

Times rk.score and rk.select (k = 10%) on the same values laid out row-major and column-major
(``x.t().contiguous().t()``), at [8192, 32000] and [1048576, 10], fp32 and bf16; reports the ratio
of the medians.  The two layouts run in turn, ``--rounds`` times over (3 calls each per round).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import rho_kernels as rk


def timed(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    rows = []
    for n, v in [(8192, 32000), (1048576, 10)]:
        for dtype in (torch.float32, torch.bfloat16):
            g = torch.Generator().manual_seed(0)
            x = (torch.randn(n, v, generator=g) * 3).to(dtype)
            xt = x.t().contiguous().t()
            y = torch.randint(0, v, (n,), generator=g)
            il = torch.rand(n, generator=g)
            k = n // 10
            row = {"N": n, "V": v, "dtype": str(dtype).replace("torch.", "")}
            for op, fn in (("score", lambda z: rk.score(z, y, il, backend="cpu")),
                           ("select", lambda z: rk.select(z, y, il, k, backend="cpu"))):
                # The layouts in turn, round after round (a change of load hits both alike).
                times = {"contiguous": [], "transposed": []}
                for _ in range(args.rounds):
                    times["contiguous"].append(timed(lambda: fn(x)))
                    times["transposed"].append(timed(lambda: fn(xt)))
                for layout, t in times.items():
                    row[f"{op}_{layout}_ms"] = statistics.median(t)
                row[f"{op}_ratio"] = row[f"{op}_transposed_ms"] / row[f"{op}_contiguous_ms"]
            print(row, flush=True)
            rows.append(row)
            del x, xt
    if args.json:
        env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_isa": torch.ops.rho_kernels.cpu_isa()}
        with open(args.json, "w") as f:
            json.dump({"environment": env, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
