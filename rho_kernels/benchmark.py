"""Microbenchmark of the fused select op against the reference (``python -m rho_kernels bench``).

For every shape x dtype it times ``rk.select`` on each backend, the eager reference and
``torch.compile(reference)``, and a plain read of the logits (``logits.sum()``), the floor of
a memory-bound op.  It reports ms, GB/s from the bytes the op must move (logits once, plus
targets, IL and the outputs), the fraction of the measured read bandwidth, speedups over the
eager and compiled reference (ratios measured in the same run), and peak extra memory.

``--op score`` times the score op alone (no top-k).  ``--grid`` sweeps the vocabulary size V at a
fixed logits size (``--grid-mb``, N = bytes / (V * element size)) and plots GB/s against V for
the fused kernel, the eager and compiled reference and the read floor: a roofline-style picture
of where the op stops being memory-bound.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Optional

import torch

import rho_kernels as rk
from rho_kernels import backends, info
from rho_kernels.tokens import kept_count


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_SHAPES = {
    "cpu": "8192x32000",
    "cuda": "16384x128256,4096x32000,320x10,3200x1000",
}
DEFAULT_DTYPES = {"cpu": "float32,bfloat16", "cuda": "bfloat16,float32"}
GRID_VOCABS = (2, 10, 100, 1000, 10_000, 32_000, 128_256)


PEERS = ("reference", "compiled", "liger")  # --backends names beyond rk.BACKENDS


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """"NxV,NxV,..." -> [(N, V), ...]; ValueError naming the bad item (N >= 0, V >= 1)."""
    shapes = []
    for item in text.split(","):
        try:
            n, v = (int(x) for x in item.lower().split("x"))
        except ValueError:
            raise ValueError(f"bad shape {item!r}: expected NxV, e.g. 8192x32000") from None
        if n < 0 or v < 1:
            raise ValueError(f"bad shape {item!r}: need N >= 0 rows and V >= 1 classes")
        shapes.append((n, v))
    return shapes


def reference_select(logits, targets, il, k: int, method: str, softcap: Optional[float] = None):
    """The eager reference end to end (validation + reference score + full sort)."""
    return rk.select(logits, targets, il, k, method=method, backend="reference", softcap=softcap)


def reference_score(logits, targets, il, method: str, softcap: Optional[float] = None):
    """The eager reference score op (validation + reference score)."""
    return rk.score(logits, targets, il, method=method, backend="reference", softcap=softcap)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CpuPeakMemory:
    """Peak resident-memory growth of this process over a block (Linux: VmHWM after
    resetting it through /proc/self/clear_refs).  None where that is not available."""

    @staticmethod
    def _read(field: str) -> Optional[int]:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = self._read("VmRSS")
        except OSError:
            self.base = None
        self.peak = None
        return self

    def __exit__(self, *exc):
        hwm = self._read("VmHWM")
        if self.base is not None and hwm is not None:
            self.peak = max(0, hwm - self.base)


def measure(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> dict:
    """Median and best wall time of fn() in ms, and its peak extra memory in bytes."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"ms": statistics.median(times), "best_ms": min(times), "peak_extra_bytes": peak_extra_memory(fn, device)}


def peak_extra_memory(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Bytes fn() allocates at its peak beyond what was allocated before (None if unknown)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with CpuPeakMemory() as mem:
        fn()
    return mem.peak


def liger_peer(method: str) -> Optional[Callable]:
    """Liger-Kernel's fused cross-entropy (``reduction="none"``) + ``torch.topk``: the closest
    published peer of a fused select (CE methods only).  None when liger_kernel does not import.
    Timed last: Liger's forward may write the gradient into the logits in place."""
    if method not in ("reducible", "loss"):
        return None
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except Exception:  # noqa: BLE001 - absent or broken install: no peer column
        return None
    ce = LigerCrossEntropyLoss(reduction="none")

    def select(logits, targets, il, k):
        score = ce(logits, targets).float()
        if method == "reducible":
            score = score - il
        return torch.topk(score, k)

    return select


def bench_case(n: int, v: int, dtype: torch.dtype, device: torch.device, backends: list[str],
               method: str, k_ratio: float, repeats: int, warmup: int, op: str = "select",
               softcap: Optional[float] = None) -> list[dict]:
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = (torch.randn(n, v, generator=g, dtype=torch.float32) * 3).to(dtype).to(device)
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    il = (torch.rand(n, generator=g) * 2).to(device)
    k = min(n, kept_count(n, k_ratio))  # capped as OnlineBatchSelector caps it: 0 of N = 0
    if op == "score":
        moved = logits.numel() * logits.element_size() + n * (8 + 4) + n * (4 + 4)
    else:
        moved = logits.numel() * logits.element_size() + n * (8 + 4) + k * (8 + 4 + 1)

    rows = []
    floor = measure(lambda: logits.sum(), device, repeats, warmup)
    read_gbps = logits.numel() * logits.element_size() / (floor["ms"] * 1e6)
    rows.append({"backend": "read floor (logits.sum)", **floor, "gbps": read_gbps})

    compiled = None
    fns: dict[str, Callable[[], object]] = {}
    for name in backends:
        if op == "score":
            if name == "reference":
                fns[name] = lambda: reference_score(logits, targets, il, method, softcap)
            elif name == "compiled":
                compiled = torch.compile(reference_score, dynamic=False)
                fns[name] = lambda: compiled(logits, targets, il, method, softcap)
            else:
                fns[name] = (lambda b: lambda: rk.score(logits, targets, il, method=method, backend=b,
                                                        softcap=softcap))(name)
        elif name == "reference":
            fns[name] = lambda: reference_select(logits, targets, il, k, method, softcap)
        elif name == "compiled":
            compiled = torch.compile(reference_select, dynamic=False)
            fns[name] = lambda: compiled(logits, targets, il, k, method, softcap)
        elif name == "liger":  # main() checked that it imports
            peer = liger_peer(method)
            fns[name] = lambda: peer(logits, targets, il, k)
        else:
            fns[name] = (lambda b: lambda: rk.select(logits, targets, il, k, method=method, backend=b,
                                                     softcap=softcap))(name)
    results = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        try:
            r = measure(fn, device, repeats, warmup + (1 if name == "compiled" else 0))
        except Exception as exc:  # report and go on: one broken backend must not hide the rest
            rows.append({"backend": name, "error": f"{type(exc).__name__}: {exc}"})
            continue
        r["wall_s_incl_warmup"] = time.perf_counter() - t0
        r["gbps"] = moved / (r["ms"] * 1e6)
        r["pct_of_read_bw"] = 100.0 * floor["ms"] / r["ms"]
        results[name] = r
    for name, r in results.items():
        if "reference" in results:
            r["speedup_vs_eager"] = results["reference"]["ms"] / r["ms"]
        if "compiled" in results:
            r["speedup_vs_compiled"] = results["compiled"]["ms"] / r["ms"]
        rows.append({"backend": name, **r})
    for row in rows:
        row.update({"N": n, "V": v, "dtype": str(dtype).replace("torch.", ""), "k": k, "method": method, "op": op,
                    "softcap": softcap, "logits_bytes": logits.numel() * logits.element_size()})
    return rows


# (header, width): every line of the table right-aligns its cells to these widths.
COLUMNS = (("shape", 15), ("dtype", 8), ("backend", 24), ("ms", 9), ("GB/s", 7), ("%read", 6),
           ("x eager", 8), ("x compiled", 10), ("peak extra", 11))


def _line(cells: list[str]) -> str:
    return " ".join(f"{cell:>{width}}" for cell, (_, width) in zip(cells, COLUMNS))


def _num(x: Optional[float], spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_table(rows: list[dict], out=None) -> None:
    out = out or sys.stdout  # looked up per call: a default bound at import outlives a redirected stdout
    head = _line([name for name, _ in COLUMNS])
    print(head, file=out)
    print("-" * len(head), file=out)
    for r in rows:
        cells = [f"{r['N']}x{r['V']}", r["dtype"], r["backend"]]
        if "error" in r:
            print(f"{_line(cells)}  ERROR {r['error']}", file=out)
            continue
        peak = r.get("peak_extra_bytes")
        cells += [_num(r["ms"], ".3f"), _num(r["gbps"], ".1f"), _num(r.get("pct_of_read_bw"), ".1f"),
                  _num(r.get("speedup_vs_eager"), ".2f"), _num(r.get("speedup_vs_compiled"), ".2f"),
                  "-" if peak is None else f"{peak / 2**20:.1f} MiB"]
        print(_line(cells), file=out)


def environment(device: torch.device) -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "rho_kernels": rk.__version__,
        "device": str(device),
        "cpu_threads": torch.get_num_threads(),
        "cpu_capability": getattr(torch.backends.cpu, "get_cpu_capability", lambda: None)(),
        "available_backends": rk.available_backends(device),
        "cpu_isa": _cpu_isa(),
        "machine": platform.machine(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    env["info"] = info.collect()  # the `python -m rho_kernels info` report: build, ISA, backends
    try:
        env["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        env["git_commit"] = None
    return env


def _cpu_isa() -> Optional[str]:
    """The instruction set the CPU kernel runs with (None without the extension)."""
    try:
        return torch.ops.rho_kernels.cpu_isa()
    except (AttributeError, RuntimeError):
        return None


def plot_grid(rows: list[dict], path: str) -> None:
    """GB/s (logits bytes / time) against V, one line per backend and dtype."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        for name in dict.fromkeys(r["backend"] for r in rows):
            pts = sorted((r["V"], r["logits_bytes"] / (r["ms"] * 1e6)) for r in rows
                         if r["dtype"] == dtype and r["backend"] == name and "ms" in r)
            if pts:
                style = "--" if name.startswith("read floor") else "-"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=f"{name} ({dtype})")
    ax.set_xscale("log")
    ax.set_xlabel("V (classes per row); N = logits bytes / (V * element size)")
    ax.set_ylabel("GB/s (logits bytes / time)")
    op = rows[0].get("op", "select") if rows else "select"
    ax.set_title(f"rho_kernels {op} at {rows[0]['logits_bytes'] / 2**20:.0f} MiB of logits" if rows else "")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted({(r["N"], r["V"], r["dtype"]) for r in rows})
    names = [b for b in dict.fromkeys(r["backend"] for r in rows) if b]
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(cases)), 4))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        ys = []
        for case in cases:
            match = [r for r in rows if (r["N"], r["V"], r["dtype"]) == case and r["backend"] == name and "gbps" in r]
            ys.append(match[0]["gbps"] if match else 0.0)
        ax.bar([c + i * width for c in range(len(cases))], ys, width, label=name)
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(cases))])
    ax.set_xticklabels([f"{n}x{v}\n{d}" for n, v, d in cases])
    ax.set_ylabel("GB/s (bytes the op must move / time)")
    ax.set_title("rho_kernels select: throughput by backend")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Optional[list[str]] = None) -> int:
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    ap = argparse.ArgumentParser(prog="python -m rho_kernels bench", description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=default_device, help=f"cpu or cuda (default {default_device})")
    ap.add_argument("--shapes", default=None, help="comma-separated NxV (default depends on device)")
    ap.add_argument("--dtypes", default=None, help="comma-separated from float32,bfloat16,float16")
    ap.add_argument("--backends", default=None,
                    help="comma-separated; 'reference' = eager reference, 'compiled' = torch.compile(reference), "
                         "'liger' = Liger-Kernel CE + torch.topk; default: reference, compiled, every available "
                         "backend, and liger when it imports")
    ap.add_argument("--method", default="reducible", choices=rk.METHODS)
    ap.add_argument("--k-ratio", type=float, default=0.1, help="k = ratio * N (default 0.1)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--softcap", type=float, default=None,
                    help="soft-capped logits (softcap * tanh(z / softcap), e.g. Gemma 2's 30) for every "
                         "backend and the reference; the Liger peer is left out (no selection with a cap there)")
    ap.add_argument("--op", default=None, choices=("select", "score"),
                    help="time the fused select or the score op alone (default: select; score with --grid)")
    ap.add_argument("--grid", action="store_true",
                    help=f"sweep V over {list(GRID_VOCABS)} at a fixed logits size (--grid-mb); "
                         "plots GB/s against V; default op: score")
    ap.add_argument("--grid-mb", type=float, default=256.0, help="logits size of each grid point in MiB")
    ap.add_argument("--json", default=None, help="write results (and the environment) to this JSON file")
    ap.add_argument("--plot", default=None, help="write a GB/s bar chart to this PNG file")
    args = ap.parse_args(argv)
    # Every argument is checked before anything runs: a bad one is a usage error (exit 2) that
    # names it, not a table of ERROR rows.
    device, cases, backend_names = _checked(ap, args)
    # torch.compile of the reference loads torch's C++-extension tooling, whose CUDA probe logs
    # "No CUDA runtime is found" on GPU-less machines: build-tool noise, not a benchmark result.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    op = args.op or ("score" if args.grid else "select")

    env = environment(device)
    print(f"rho_kernels bench on {device} ({env.get('gpu') or env['cpu_capability']}, "
          f"{env['cpu_threads']} threads, kernel ISA {env['cpu_isa']}), torch {env['torch']}, op={op}, "
          f"method={args.method}" + (f", k={args.k_ratio}*N" if op == "select" else "")
          + (f", softcap={args.softcap}" if args.softcap is not None else ""), flush=True)
    rows: list[dict] = []
    for n, v, d in cases:
        case_rows = bench_case(n, v, DTYPES[d], device, backend_names, args.method, args.k_ratio,
                               args.repeats, args.warmup, op=op, softcap=args.softcap)
        print_table(case_rows)
        print(flush=True)
        rows.extend(case_rows)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"environment": env, "results": rows}, f, indent=2)
        print(f"wrote {args.json}")
    if args.plot:
        (plot_grid if args.grid else plot)(rows, args.plot)
        print(f"wrote {args.plot}")
    failed = [r for r in rows if "error" in r]
    if failed:
        print(f"bench: {len(failed)} of {len(rows)} rows failed (ERROR above)", file=sys.stderr)
        return 1
    return 0


def _checked(ap: argparse.ArgumentParser, args) -> tuple[torch.device, list[tuple[int, int, str]], list[str]]:
    """The device, the (N, V, dtype) cases and the backend names of ``args``; ``ap.error`` (exit 2)
    on the first bad one."""
    try:
        device = torch.device(args.device)
    except RuntimeError:
        ap.error(f"--device {args.device!r}: expected cpu or cuda")
    if device.type not in ("cpu", "cuda"):
        ap.error(f"--device {args.device!r}: expected cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device!r}: no CUDA device is available (torch.cuda.is_available() is False)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        ap.error(f"--device {args.device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if not 0 < args.k_ratio <= 1:
        ap.error(f"--k-ratio {args.k_ratio}: need 0 < ratio <= 1 (k = ratio * N rows)")
    if args.repeats < 1 or args.warmup < 0:
        ap.error(f"--repeats {args.repeats} / --warmup {args.warmup}: need repeats >= 1 and warmup >= 0")
    if args.grid and not args.grid_mb > 0:
        ap.error(f"--grid-mb {args.grid_mb}: need a size > 0")
    if args.softcap is not None and not (math.isfinite(args.softcap) and args.softcap > 0):
        ap.error(f"--softcap {args.softcap}: need a finite cap > 0")

    dtype_names = (args.dtypes or ("float32" if args.grid else DEFAULT_DTYPES.get(device.type, "float32"))).split(",")
    for d in dtype_names:
        if d not in DTYPES:
            ap.error(f"--dtypes: unknown dtype {d!r}; expected one of {list(DTYPES)}")
    if args.grid:
        size = int(args.grid_mb * 2**20)
        cases = [(max(1, size // (v * DTYPES[d].itemsize)), v, d) for d in dtype_names for v in GRID_VOCABS]
    else:
        try:
            shapes = parse_shapes(args.shapes or DEFAULT_SHAPES.get(device.type, DEFAULT_SHAPES["cpu"]))
        except ValueError as exc:
            ap.error(f"--shapes: {exc}")
        cases = [(n, v, d) for n, v in shapes for d in dtype_names]

    if not args.backends:
        names = ["reference", "compiled"] + [b for b in rk.available_backends(device) if b != "reference"]
        liger = liger_peer(args.method) is not None and args.softcap is None
        return device, cases, names + (["liger"] if liger else [])
    names = args.backends.split(",")
    for name in names:
        if name not in PEERS and name not in rk.BACKENDS:
            known = list(PEERS) + [b for b in rk.BACKENDS if b not in PEERS]
            ap.error(f"--backends: unknown backend {name!r}; expected some of {known}")
        if name in rk.BACKENDS:
            reason = backends.unavailable_reason(name, device)
            if reason is not None:
                ap.error(f"--backends: {name!r} cannot run on {device}: {reason}")
        if name == "liger" and args.softcap is not None:
            ap.error("--backends: 'liger' cannot run with --softcap (its fused CE + torch.topk peer is plain logits)")
        if name == "liger" and liger_peer(args.method) is None:
            why = ("liger_kernel does not import here" if args.method in ("reducible", "loss")
                   else f"it computes CE scores only (methods reducible, loss), not {args.method!r}")
            ap.error(f"--backends: 'liger' cannot run: {why}")
    return device, cases, names
