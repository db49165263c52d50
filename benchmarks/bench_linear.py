"""Benchmark: selection and the selective loss from hidden states + LM head, logits never materialised.

Per dtype, on ``hidden [N, D]``, ``weight [V, D]`` (no bias, as LM heads):

selection (k = 10% of N, method "reducible"):

* ``rk.linear_select``                     -- chunked matmul + the fused scorer, default chunk;
* ``F.linear + rk.select``                 -- materialise the logits, then the fused op;
* ``F.linear + reference select``          -- materialise, then the eager PyTorch reference;

loss, forward + backward (gradients to hidden and weight; Rho-1 ratio 0.6):

* ``rk.selective_linear_cross_entropy``    -- chunked; the backward recomputes selected rows only;
* ``F.linear + rk.selective_cross_entropy`` -- materialised logits, the fused loss;
* ``F.linear + F.cross_entropy``           -- materialised logits, plain CE over every token.

Every variant runs in a fresh process: its peak extra memory is the growth of the process's
peak resident set (VmHWM, reset before the call) above the resident set after the inputs were
made, on the first call; then time = median of ``--repeats`` calls.  Numbers are ratios within
one run on a machine that may be shared.  With ``--rounds R`` the variants of a task run in
turn, R times over (a fresh process each time): a load change on a shared machine then hits
every variant alike; time = median over all rounds' calls, memory = median of the rounds' peaks.

The loss's peak includes the gradients it returns (``hidden``'s ``[N, D]`` and ``weight``'s
``[V, D]``, in the inputs' dtype), which every variant must produce and which the goal allows
on top of one ``[chunk, V]`` block; ``peak_extra_beyond_gradients`` is the peak minus those
outputs, and its ratio to the baseline's is reported next to the plain one.  (For half-precision
inputs the fused loss's backward runs one vocabulary slice at a time and holds a float32
``[selected rows, D]`` sum of hidden's gradient: that is counted in the part beyond the outputs.)

    python benchmarks/bench_linear.py --rounds 3 --repeats 1 --json benchmarks/results/linear_cpu.json
    python benchmarks/bench_linear.py --n 1024 --dtypes float32     # quick
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

VARIANTS = {
    "select": ["rk.linear_select", "F.linear + rk.select", "F.linear + reference select"],
    "loss": ["rk.selective_linear_cross_entropy", "F.linear + rk.selective_cross_entropy",
             "F.linear + F.cross_entropy"],
}
DTYPES = ("float32", "bfloat16")


def run_variant(task: str, variant: str, n: int, d: int, v: int, dtype_name: str, repeats: int, ratio: float,
                k_ratio: float, device_name: str = "cpu") -> dict:
    """Runs in the child process."""
    import torch
    import torch.nn.functional as F

    import rho_kernels as rk
    from rho_kernels.benchmark import _sync, peak_extra_memory

    dtype = getattr(torch, dtype_name)
    device = torch.device(device_name)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=g).to(dtype).to(device)
    weight = (torch.randn(v, d, generator=g) / d ** 0.5).to(dtype).to(device)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[:16] = -100
    targets = targets.to(device)
    il = (torch.rand(n, generator=g) * 4).to(device)
    k = max(1, int(k_ratio * n))

    if task == "select":
        fns = {
            "rk.linear_select": lambda: rk.linear_select(hidden, weight, targets, il, k),
            "F.linear + rk.select": lambda: rk.select(F.linear(hidden, weight), targets, il, k),
            "F.linear + reference select": lambda: rk.select(F.linear(hidden, weight), targets, il, k,
                                                             backend="reference"),
        }
        fn = fns[variant]
    else:
        h = hidden.requires_grad_()
        w = weight.requires_grad_()
        losses = {
            "rk.selective_linear_cross_entropy": lambda: rk.selective_linear_cross_entropy(h, w, targets, il, ratio),
            "F.linear + rk.selective_cross_entropy": lambda: rk.selective_cross_entropy(F.linear(h, w), targets, il,
                                                                                        ratio),
            "F.linear + F.cross_entropy": lambda: F.cross_entropy(F.linear(h, w).float(), targets),
        }
        loss_fn = losses[variant]

        def fn():
            loss = loss_fn()
            gh, gw = torch.autograd.grad(loss, (h, w))
            del gh, gw, loss

    # First call: peak extra memory (CPU: VmHWM growth; CUDA: the caching allocator's peak).
    t0 = time.perf_counter()
    peak = peak_extra_memory(fn, device)
    first_ms = (time.perf_counter() - t0) * 1e3
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    size = torch.empty((), dtype=dtype).element_size()
    grad_bytes = (n * d + v * d) * size if task == "loss" else 0  # the returned gradients
    return {"task": task, "variant": variant, "dtype": dtype_name, "n": n, "d": d, "v": v,
            "ms": times[len(times) // 2] if times else first_ms, "first_ms": first_ms, "all_ms": times,
            "device": device_name, "peak_extra_bytes": peak, "gradient_output_bytes": grad_bytes,
            "peak_extra_beyond_gradients": None if peak is None else max(0, peak - grad_bytes),
            "logits_bytes": n * v * size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES))
    ap.add_argument("--tasks", nargs="+", default=list(VARIANTS))
    ap.add_argument("--only", nargs="+", default=None, help="run only these variants (ratios need the baseline)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per process (after the first)")
    ap.add_argument("--rounds", type=int, default=1, help="fresh processes per variant, interleaved")
    ap.add_argument("--ratio", type=float, default=0.6, help="Rho-1 keep ratio of the loss")
    ap.add_argument("--k-ratio", type=float, default=0.1, help="k / N of the selection")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        task, rest = args.child
        variant, dtype_name = rest.rsplit("|", 1)
        print(json.dumps(run_variant(task, variant, args.n, args.d, args.v, dtype_name, args.repeats, args.ratio,
                                     args.k_ratio, args.device)))
        return

    import torch

    from rho_kernels.benchmark import environment

    def child(task: str, variant: str, dtype_name: str) -> dict:
        cmd = [sys.executable, os.path.abspath(__file__), "--n", str(args.n), "--d", str(args.d), "--v",
               str(args.v), "--repeats", str(args.repeats), "--ratio", str(args.ratio), "--k-ratio",
               str(args.k_ratio), "--device", args.device, "--child", task, f"{variant}|{dtype_name}"]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
        if out.returncode != 0:
            print(out.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"variant {variant} ({dtype_name}) failed")
        return json.loads(out.stdout.strip().splitlines()[-1])

    def median(xs: list) -> float:
        xs = sorted(xs)
        return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2

    rows = []
    for dtype_name in args.dtypes:
        for task in args.tasks:
            variants = [v for v in VARIANTS[task] if not args.only or v in args.only]
            runs: dict[str, list] = {v: [] for v in variants}
            for rnd in range(args.rounds):
                for variant in variants:  # in turn: the rounds interleave the variants
                    r = child(task, variant, dtype_name)
                    runs[variant].append(r)
                    print(f"{dtype_name:9s} {task:6s} {variant:40s} round {rnd + 1}: {r['ms']:9.0f} ms  "
                          f"peak extra {r['peak_extra_bytes'] / 2**20:8.0f} MiB", flush=True)
            for variant in variants:
                rs = runs[variant]
                row = dict(rs[0])
                row["all_ms"] = [t for r in rs for t in (r["all_ms"] or [r["first_ms"]])]
                row["ms"] = median(row["all_ms"])
                row["first_ms"] = [r["first_ms"] for r in rs]
                row["round_peaks"] = [r["peak_extra_bytes"] for r in rs]
                row["peak_extra_bytes"] = median(row["round_peaks"])
                row["peak_extra_beyond_gradients"] = max(0, row["peak_extra_bytes"] - row["gradient_output_bytes"])
                rows.append(row)
    # Ratios against the materialised path with the fused op (the second variant of each task).
    for row in rows:
        base = next((r for r in rows if r["dtype"] == row["dtype"] and r["task"] == row["task"]
                     and r["variant"] == VARIANTS[row["task"]][1]), None)
        if base is None:
            row["time_vs_materialised"] = row["memory_vs_materialised"] = math.nan
            row["memory_beyond_gradients_vs_materialised"] = math.nan
            continue
        row["time_vs_materialised"] = row["ms"] / base["ms"]
        row["memory_vs_materialised"] = (row["peak_extra_bytes"] / base["peak_extra_bytes"]
                                         if base["peak_extra_bytes"] else math.nan)
        row["memory_beyond_gradients_vs_materialised"] = (
            row["peak_extra_beyond_gradients"] / base["peak_extra_beyond_gradients"]
            if base["peak_extra_beyond_gradients"] else math.nan)
    print()
    print(f"{'dtype':9s} {'task':6s} {'variant':40s} {'time/mat':>9s} {'mem/mat':>8s} {'beyond grads':>12s}")
    for row in rows:
        print(f"{row['dtype']:9s} {row['task']:6s} {row['variant']:40s} {row['time_vs_materialised']:9.2f} "
              f"{row['memory_vs_materialised']:8.3f} {row['memory_beyond_gradients_vs_materialised']:12.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment(torch.device(args.device)),
                       "config": {"n": args.n, "d": args.d, "v": args.v, "ratio": args.ratio,
                                  "k_ratio": args.k_ratio, "repeats": args.repeats, "rounds": args.rounds,
                                  "peak_memory": ("VmHWM growth of a fresh process over its first call" if args.device == "cpu"
                                                  else "CUDA caching allocator's peak over the first call, "
                                                       "beyond what was allocated before"),
                                  "beyond_gradients": "peak minus the returned gradients' bytes, (N*D + V*D) "
                                                      "in the inputs' dtype (loss only)",
                                  "baseline_variant": {t: VARIANTS[t][1] for t in VARIANTS}},
                       "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
