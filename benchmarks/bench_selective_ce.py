"""Benchmark: selective cross-entropy (Rho-1) forward + backward vs the unfused reference.

For each case it times, on the same inputs (logits a leaf tensor, gradient taken with
``torch.autograd.grad`` so nothing is accumulated):

* ``reference (autograd)``  -- selection by the reference scorer, then F.cross_entropy on the
  float32 (float64) logits and autograd (what one writes without this library);
* ``plain CE (all tokens)`` -- F.cross_entropy on every token, autograd: the cost of training
  without selection (eager; ``--compiled`` adds the torch.compile'd version, fused by Inductor);
* ``rk <backend>``          -- rk.selective_cross_entropy (forward = that backend's score_rows,
  backward = its ce_grad_rows kernel); ``auto`` plus every available backend given in
  ``--backends``;
* ``rk <backend> in-place`` -- the same with ``inplace_backward=True`` (gradient written over
  the logits).

* ``backward only: ce_grad_rows <impl>`` -- the backward kernel alone from a saved lse (what
  every rk variant runs after its forward), out of place and in place.

Columns: forward ms, forward+backward ms (median; for the backward-only rows the op's ms), peak
extra memory during forward+backward (bytes above the inputs; on CPU the process's resident-set
growth, on CUDA the allocator peak) and that peak in units of the logits' size.  ``x ref`` is the
speed-up over the reference, ``/plainCE`` the time relative to all-token CE.

    python benchmarks/bench_selective_ce.py                      # CPU: [8, 1024, 32000] fp32
    python benchmarks/bench_selective_ce.py --device cuda        # + [8, 4096, 128256] bf16
    python benchmarks/bench_selective_ce.py --shapes 2x128x1000 --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from rho_kernels import backends as registry, tokens  # noqa: E402
from rho_kernels.benchmark import environment, peak_extra_memory  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_CASES = {"cpu": ["8x1024x32000:float32"], "cuda": ["8x1024x32000:float32", "8x4096x128256:bfloat16"]}


def parse_case(text: str) -> tuple[tuple[int, int, int], torch.dtype]:
    shape_s, _, dtype_s = text.partition(":")
    try:
        b, t, v = (int(x) for x in shape_s.lower().split("x"))
    except ValueError:
        raise ValueError(f"bad case {text!r}; expected BxTxV[:dtype], e.g. 8x1024x32000:float32") from None
    dtype_s = dtype_s or "float32"
    if dtype_s not in DTYPES:
        raise ValueError(f"bad dtype {dtype_s!r} in case {text!r}; expected one of {list(DTYPES)}")
    return (b, t, v), DTYPES[dtype_s]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


def _peak_extra(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    gc.collect()
    return peak_extra_memory(fn, device)


def measure(loss_fn: Callable[[torch.Tensor], torch.Tensor], logits: torch.Tensor, device: torch.device,
            repeats: int, warmup: int, inplace: bool = False) -> dict:
    """Forward ms, forward+backward ms (medians) and peak extra memory of one fwd+bwd."""

    def inputs() -> torch.Tensor:
        leaf = logits.detach().requires_grad_()
        # The in-place backward needs non-leaf logits: a view of the leaf costs no memory.
        return leaf.view_as(leaf) if inplace else leaf

    def fwd() -> None:
        with torch.no_grad():
            loss_fn(logits)

    def fwd_bwd() -> None:
        x = inputs()
        loss = loss_fn(x)
        (g,) = torch.autograd.grad(loss, x)
        del g, loss

    saved = logits.detach().clone() if inplace else None
    for _ in range(warmup):
        fwd_bwd()
        if inplace:
            logits.copy_(saved)
    fwd_ms, total_ms = [], []
    for _ in range(repeats):
        fwd_ms.append(_time_ms(fwd, device))
        total_ms.append(_time_ms(fwd_bwd, device))
        if inplace:
            logits.copy_(saved)
    peak = _peak_extra(fwd_bwd, device)
    if inplace:
        logits.copy_(saved)
    del saved
    fwd_ms.sort()
    total_ms.sort()
    return {"forward_ms": fwd_ms[len(fwd_ms) // 2], "fwd_bwd_ms": total_ms[len(total_ms) // 2],
            "fwd_bwd_best_ms": total_ms[0], "peak_extra_bytes": peak}


def measure_op(fn: Callable[[], object], logits: torch.Tensor, device: torch.device, repeats: int, warmup: int,
               inplace: bool) -> dict:
    """Median ms and peak extra memory of one op call (restoring the logits after in-place runs)."""
    saved = logits.detach().clone() if inplace else None
    times = []
    for i in range(warmup + repeats):
        ms = _time_ms(fn, device)
        if i >= warmup:
            times.append(ms)
        if inplace:
            logits.copy_(saved)
    peak = _peak_extra(fn, device)
    if inplace:
        logits.copy_(saved)
    times.sort()
    return {"forward_ms": None, "fwd_bwd_ms": times[len(times) // 2], "fwd_bwd_best_ms": times[0],
            "peak_extra_bytes": peak}


def bench_case(shape, dtype, device, backends, ratio, repeats, warmup, compiled: bool) -> list[dict]:
    b, t, v = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = (torch.randn(b, t, v, generator=g, dtype=torch.float32) * 2).to(dtype).to(device)
    targets = torch.randint(0, v, (b, t), generator=g).to(device)
    targets[:, :16] = -100  # a padded prefix, as in packed LM batches
    ref_loss = (torch.rand(b, t, generator=g) * 4).to(device)
    logits_bytes = logits.numel() * logits.element_size()

    variants: list[tuple[str, Callable, bool]] = [
        ("reference (autograd)",
         lambda x: tokens.selective_cross_entropy_autograd(x, targets, ref_loss, ratio), False),
        ("plain CE (all tokens)", lambda x: F.cross_entropy(x.reshape(-1, v), targets.reshape(-1)), False),
    ]
    if compiled:
        ce_c = torch.compile(lambda x: F.cross_entropy(x.reshape(-1, v), targets.reshape(-1)))
        variants.append(("plain CE compiled", ce_c, False))
    for name in backends:
        if name != "auto" and registry.unavailable_reason(name, device) is not None:
            continue
        fwd_name, grad_name = tokens.resolve_names(name, device)
        label = f"rk {name} [{fwd_name} fwd, {grad_name} bwd]"
        variants.append((label, lambda x, n=name: tokens.selective_cross_entropy(x, targets, ref_loss, ratio,
                                                                               backend=n), False))
        if name == "auto":
            variants.append((label + " in-place",
                             lambda x, n=name: tokens.selective_cross_entropy(x, targets, ref_loss, ratio, backend=n,
                                                                           inplace_backward=True), True))
    rows = []
    # The backward kernels alone, from a saved lse (what the fused forward hands them): time and
    # peak extra memory (the gradient itself, or nothing in place).
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    with torch.no_grad():
        lse = torch.logsumexp(logits.reshape(-1, v).to(acc), -1)
        mask = tokens.select_mask(logits, targets, ref_loss, ratio, backend="reference").reshape(-1)
        row_scale = mask.to(acc) / mask.sum().to(acc)
    flat_t = targets.reshape(-1)
    for impl in registry.GRAD_NAMES:
        if registry.grad_unavailable_reason(impl, device) is not None:
            continue
        for inplace in (False, True):
            if inplace and impl == "reference":
                continue  # the torch fallback has no real in-place path (it copies)

            def bwd(impl=impl, inplace=inplace):
                return registry.get(impl).ce_grad_rows(logits, flat_t, lse, row_scale, -100, inplace)

            res = measure_op(bwd, logits, device, repeats, warmup, inplace)
            label = f"backward only: ce_grad_rows {impl}" + (" in-place" if inplace else "")
            res.update({"shape": [b, t, v], "dtype": str(dtype).replace("torch.", ""), "variant": label,
                        "ratio": ratio, "logits_bytes": logits_bytes})
            res["peak_extra_vs_logits"] = None if res["peak_extra_bytes"] is None else \
                res["peak_extra_bytes"] / logits_bytes
            rows.append(res)
    del lse, mask, row_scale
    for label, fn, inplace in variants:
        res = measure(fn, logits, device, repeats, warmup, inplace)
        res.update({"shape": [b, t, v], "dtype": str(dtype).replace("torch.", ""), "variant": label,
                    "ratio": ratio, "logits_bytes": logits_bytes})
        peak = res["peak_extra_bytes"]
        res["peak_extra_vs_logits"] = None if peak is None else peak / logits_bytes
        rows.append(res)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ref_ms = next(r["fwd_bwd_ms"] for r in rows if r["variant"] == "reference (autograd)")
    plain_ms = next(r["fwd_bwd_ms"] for r in rows if r["variant"] == "plain CE (all tokens)")
    for r in rows:
        r["speedup_vs_reference"] = ref_ms / r["fwd_bwd_ms"]
        r["time_vs_plain_ce"] = r["fwd_bwd_ms"] / plain_ms
    return rows


def print_table(rows: list[dict], out=sys.stdout) -> None:
    head = (f"{'shape':>16} {'dtype':>8} {'variant':>52} {'fwd ms':>9} {'fwd+bwd ms':>11} {'x ref':>6} "
            f"{'/plainCE':>8} {'peak extra':>11} {'xlogits':>7}")
    print(head, file=out)
    print("-" * len(head), file=out)
    for r in rows:
        peak = r["peak_extra_bytes"]
        peak_s = "-" if peak is None else f"{peak / 2**20:.0f} MiB"
        ratio_s = "-" if r["peak_extra_vs_logits"] is None else f"{r['peak_extra_vs_logits']:.2f}"
        fwd_s = "-" if r["forward_ms"] is None else f"{r['forward_ms']:.1f}"
        print(f"{'x'.join(map(str, r['shape'])):>16} {r['dtype']:>8} {r['variant']:>52} {fwd_s:>9} "
              f"{r['fwd_bwd_ms']:11.1f} {r['speedup_vs_reference']:6.2f} {r['time_vs_plain_ce']:8.2f} "
              f"{peak_s:>11} {ratio_s:>7}", file=out)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cases", help="comma-separated BxTxV[:dtype] (default: per device, see above)")
    ap.add_argument("--backends", default="auto,reference,cpu,triton",
                    help="rk backends to run (unavailable ones are left out)")
    ap.add_argument("--ratio", type=float, default=0.6)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--compiled", action="store_true", help="also time torch.compile'd plain CE")
    ap.add_argument("--json", help="write results + environment here")
    ap.add_argument("--note", help="free text stored in the JSON (e.g. how the extension was built)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cases = [parse_case(c) for c in (args.cases.split(",") if args.cases else DEFAULT_CASES[device.type])]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    rows = []
    for shape, dtype in cases:
        rows += bench_case(shape, dtype, device, backends, args.ratio, args.repeats, args.warmup, args.compiled)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            env = environment(device)
            env["THP_MEM_ALLOC_ENABLE"] = os.environ.get("THP_MEM_ALLOC_ENABLE")
            json.dump({"environment": env, "note": args.note, "results": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
