"""Check this installation on this machine in seconds: ``python -m rho_kernels selftest``.

Every backend that runs on the device, and for the Triton backend every launch path (the
planner's own choice, then each path forced by the planner's overrides, as the tests force
them), against the reference under the test suite's accuracy rule: a backend's max error against
float64 truth is at most 2x that of the eager PyTorch reference in the same dtype, plus a floor
of 1e-5 x the largest true score; non-finite values must match exactly; a selection must follow
the ordering rule exactly on the backend's own scores (``Selection.scores`` bit-identical to
``score()[indices]``) and agree with the reference wherever true scores are separated by more
than the tolerance.  Covered: every method on every path in float32, bfloat16 and float16 on
every path (the method rotating, so every method meets every dtype), rows with +-inf / NaN
logits, NaN / +-inf irreducible losses, ignored targets, ties and -0, k = 0,
1 and N, soft-capped and scaled logits (and the logit sum of label smoothing), the
cross-entropy gradient kernels (``ce_grad_rows``) and the linear ops (hidden states + LM head:
scores, selection, selective loss and its gradients).

Prints a table (backend x path: pass / FAIL with the worst error / not run and why; ``--json
PATH`` writes it as JSON) and exits 1 if any check failed.  On CPU the Triton kernels run only
under the interpreter, whose switch must be set before triton is imported: unless this process
already has ``TRITON_INTERPRET=1``, the Triton rows run in a child process that has it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Optional

import torch

from . import api, linear, reference, tokens
from ._contract import lse_dtype, prepare
from . import backends
from ._version import __version__

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
METHODS = api.METHODS
# Triton launch paths: the planner's own choice ("plan"), then each path forced by the
# planner's overrides (triton_select._override).  V = 37 in the cases below, so block_v 8/16
# means 5/3 chunks.
TRITON_PATHS: dict[str, dict] = {
    "plan": {},
    "fused_one_program": dict(fused=True, one_program=True),
    "fused_ticket": dict(fused=True, one_program=False, block_r=4),
    "fused_chunked_v": dict(fused=True, one_program=False, block_r=2, block_v=16),
    "two_stage": dict(fused=False, cand=False),
    "two_stage_candidates": dict(fused=False, cand=True, cand_block=16),
    "whole_row": dict(fused=False, cand=False, block_r=1, block_v=64),
    "chunked_v": dict(fused=False, cand=False, block_r=1, block_v=16),
    "split_v": dict(fused=False, cand=True, cand_block=16, block_r=1, block_v=8, split=3),
    "tile_split_v": dict(fused=False, cand=False, block_r=8, block_v=8, split=3),
}


class Row:
    """One table row: a backend on one path, the checks it ran and the worst of them."""

    def __init__(self, backend: str, path: str) -> None:
        self.backend, self.path = backend, path
        self.checks = 0
        self.worst = 0.0  # max error / tolerance over the checks (<= 1 passes)
        self.failures: list[str] = []
        self.not_run: Optional[str] = None
        self.seconds = 0.0

    def check(self, what: str, fn: Callable[[], Optional[float]]) -> None:
        self.checks += 1
        try:
            ratio = fn()
        except Exception as exc:  # noqa: BLE001 - a crash is a failure of that check, reported
            self.failures.append(f"{what}: {type(exc).__name__}: {str(exc).strip()[:300]}")
            return
        if ratio is not None:
            self.worst = max(self.worst, ratio)

    @property
    def status(self) -> str:
        return "not run" if self.not_run else ("FAIL" if self.failures else "pass")

    def as_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "path": self.path, "status": self.status, "checks": self.checks,
                "worst_error_over_tolerance": round(self.worst, 4), "failures": self.failures,
                "not_run": self.not_run, "seconds": round(self.seconds, 2)}


# --------------------------------------------------------------------------------- the rule


class CheckFailed(AssertionError):
    pass


def _nonfinite_equal(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    got, want = got.detach().cpu().double().reshape(-1), want.detach().cpu().double().reshape(-1)
    if not torch.equal(got.isnan(), want.isnan()):
        bad = (got.isnan() != want.isnan()).nonzero()[:3].reshape(-1).tolist()
        raise CheckFailed(f"{what}: NaN pattern differs at rows {bad}")
    if not torch.equal(got.isinf(), want.isinf()) or not torch.equal(got[got.isinf()], want[want.isinf()]):
        raise CheckFailed(f"{what}: +-inf pattern differs")


def accuracy(got: torch.Tensor, eager: torch.Tensor, truth: torch.Tensor, what: str) -> tuple[float, float]:
    """(error / tolerance, tolerance) under the suite's rule; raises CheckFailed beyond it."""
    got, eager, truth = (x.detach().cpu().double().reshape(-1) for x in (got, eager, truth))
    _nonfinite_equal(got, truth, what)
    fin = torch.isfinite(truth)
    if not bool(fin.any()):
        return 0.0, 0.0
    tol = 2.0 * (eager[fin] - truth[fin]).abs().max().item() + 1e-5 * max(1.0, truth[fin].abs().max().item())
    err = (got[fin] - truth[fin]).abs().max().item()
    if err > tol:
        raise CheckFailed(f"{what}: max error {err:.3g} > tolerance {tol:.3g} (2x eager + floor)")
    return err / tol, tol


def _selection_ok(sel, scores: torch.Tensor, p, truth: torch.Tensor, tol: float, k: int, what: str) -> None:
    idx = sel.indices.cpu()
    if sel.indices.shape != (k,) or sel.scores.dtype != torch.float32 or sel.valid.dtype != torch.bool:
        raise CheckFailed(f"{what}: selection shapes/dtypes {tuple(sel.indices.shape)}, {sel.scores.dtype}")
    flat = scores.detach().reshape(-1).cpu()
    eligible = reference.eligible_rows(p, scores.detach().reshape(-1)).cpu()
    want = reference.order_rows(flat, eligible)[:k]
    if not torch.equal(idx, want):
        raise CheckFailed(f"{what}: order {idx.tolist()[:8]} differs from the rule on its own scores {want.tolist()[:8]}")
    got_s = sel.scores.detach().cpu()
    if not torch.equal(got_s.view(torch.int32), flat[idx].view(torch.int32)):
        raise CheckFailed(f"{what}: Selection.scores is not bit-identical to score()[indices]")
    if not torch.equal(sel.valid.cpu(), eligible[idx]):
        raise CheckFailed(f"{what}: valid flags differ")
    ref_idx = reference.order_rows(truth.reshape(-1).float().cpu(), reference.eligible_rows(p, truth.reshape(-1).float()).cpu())[:k]
    t = truth.reshape(-1).cpu()
    a, b = t[idx], t[ref_idx]
    ok = (a == b) | (a.isnan() & b.isnan()) | ((a - b).abs() <= tol)
    if not bool(ok.all()):
        raise CheckFailed(f"{what}: rank {int((~ok).nonzero()[0, 0])} picks a row whose true score differs from "
                          f"the reference's pick by more than {tol:.3g}")


# --------------------------------------------------------------------------------- the cases


def special_case(n: int, v: int, dtype: torch.dtype, device: torch.device, seed: int):
    """Random rows, and in the first 14 every special case of the contract (n >= 14, v >= 12)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=g) * 3
    y = torch.randint(0, v, (n,), generator=g)
    il = torch.rand(n, generator=g) * 2
    il[0] = -math.inf  # reducible +inf
    x[1, 5] = math.nan  # NaN logit
    x[2] = -math.inf  # all -inf
    x[3, 2] = math.inf  # +inf logit
    y[3] = 7
    x[4, : v - 7] = -math.inf  # mostly impossible classes (whole chunks of -inf)
    y[4] = v - 4
    x[5, 11] = -math.inf  # target logit -inf: CE +inf
    y[5] = 11
    y[6] = -100  # ignored
    x[7], y[7], il[7] = x[8], y[8], il[8]  # tie: the lower index first
    x[9, 3] = 40.0  # confidently right
    y[9] = 3
    il[10] = math.nan  # never-scored example
    il[11] = math.inf
    x[12] = 0.0  # uniform row; with row 13, -0 and +0 scores tie under "irreducible"
    il[12], il[13] = 0.0, -0.0
    return x.to(dtype).to(device), y.to(device), il.to(device)


def _op_check(backend: str, logits, targets, il, method: str, ks: tuple[int, ...], what: str,
              softcap: Optional[float] = None, logit_scale: float = 1.0) -> float:
    """score() and select() of ``backend`` against the reference; returns error / tolerance."""
    kw = dict(method=method, softcap=softcap, logit_scale=logit_scale)
    got = api.score(logits, targets, il, backend=backend, **kw)
    eager = api.score(logits, targets, il, backend="reference", **kw)
    p64 = prepare(logits.double(), targets, il, method, -100, softcap=softcap, logit_scale=logit_scale)
    truth = reference.score_rows(p64)[0].double()
    ratio, tol = accuracy(got, eager, truth, f"{what} scores")
    p = prepare(logits, targets, il, method, -100, softcap=softcap, logit_scale=logit_scale)
    for k in ks:
        _selection_ok(api.select(logits, targets, il, k, backend=backend, **kw), got, p, truth, tol, k,
                      f"{what} select k={k}")
    return ratio


def _forced(backend: str, path: str):
    if backend != "triton" or not TRITON_PATHS[path]:
        return _null()
    from .backends import triton_select

    return triton_select._override(**TRITON_PATHS[path])


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def run_path(row: Row, device: torch.device) -> None:
    """Every method (float32), the half dtypes (the method rotating over paths), k edges and a
    3-D / column-major layout, on one backend and path."""
    b, path = row.backend, row.path
    turn = list(TRITON_PATHS).index(path) if path in TRITON_PATHS else 0
    # 14 rows (the interpreter runs one program after another: rows per program matter on CPU)
    with _forced(b, path):
        for method in METHODS:
            x, y, il = special_case(14, 37, torch.float32, device, seed=1)
            row.check(f"{method} float32", lambda: _op_check(b, x, y, il, method, (5,), f"{method} float32"))
        for j, dtype in enumerate(DTYPES[1:]):
            method = METHODS[(turn + 2 * j) % len(METHODS)]
            x, y, il = special_case(14, 37, dtype, device, seed=2 + j)
            row.check(f"{method} {dtype}", lambda: _op_check(b, x, y, il, method, (6,), f"{method} {dtype}"))
        x, y, il = special_case(14, 37, torch.float32, device, seed=4)
        row.check("k = 0, 1, N", lambda: _op_check(b, x, y, il, "reducible", (0, 1, 14), "k edges"))
        x3, y3, il3 = (t.reshape(2, 7, *t.shape[1:]) for t in (x, y, il))
        row.check("[B, T, V]", lambda: _op_check(b, x3, y3, il3, "gradnorm", (4,), "[B, T, V]"))
        if path == "plan":  # column-major logits: the planner's column tiles (>= 16 rows)
            x, y, il = special_case(20, 37, torch.float32, device, seed=5)
            xt = x.t().contiguous().t()
            row.check("column-major", lambda: _op_check(b, xt, y, il, "loss", (3,), "column-major"))


# (softcap, logit_scale): Gemma 2's cap, a cap that saturates tanh, a Cohere-like scale, a
# negative scale under a cap.
TRANSFORMS = ((30.0, 1.0), (0.5, 1.0), (None, 0.0625), (2.0, -1.5))


def run_transform(row: Row, device: torch.device) -> None:
    """Soft-capped and scaled logits (every method sees z'), the dtype and method rotating, and the
    zsum output (label smoothing's sum) of score_rows."""
    impl = backends.get(row.backend)
    for j, (softcap, scale) in enumerate(TRANSFORMS):
        dtype, method = DTYPES[j % len(DTYPES)], METHODS[j % len(METHODS)]
        what = f"{method} {dtype} softcap={softcap} logit_scale={scale}"
        x, y, il = special_case(14, 37, dtype, device, seed=30 + j)
        row.check(what, lambda: _op_check(row.backend, x, y, il, method, (5,), what, softcap, scale))

        def zsum(x=x, y=y, softcap=softcap, scale=scale, dtype=dtype) -> float:
            x, y = x[6:], y[6:]  # finite rows
            p = prepare(x, y, None, "loss", -100, softcap=softcap, logit_scale=scale)
            got = impl.score_rows(p, with_zsum=True)[2]
            truth = reference.row_zsum(prepare(x.double(), y, None, "loss", -100, softcap=softcap,
                                               logit_scale=scale))
            return accuracy(got, reference.score_rows(p, with_zsum=True)[2], truth, f"zsum {dtype}")[0]
        row.check(f"zsum {dtype} softcap={softcap} logit_scale={scale}", zsum)


def run_ce_grad(row: Row, device: torch.device) -> None:
    """``ce_grad_rows`` = row_scale * (softmax - onehot) from a saved lse, per dtype."""
    impl = backends.get(row.backend)
    for j, dtype in enumerate(DTYPES):
        def one(dtype=dtype, j=j) -> float:
            x, y, _ = special_case(20, 37, dtype, device, seed=10 + j)
            x, y = x[6:], y[6:].clone()  # an ignored target, finite logits
            y[5] = x.shape[1] + 2  # out of range: zeros
            acc = lse_dtype(dtype)
            lse = torch.logsumexp(x.to(acc), -1)
            scale = torch.rand(y.shape[0], generator=torch.Generator().manual_seed(j)).to(acc).to(device)
            scale[3] = 0.0
            x64 = x.double()
            live = ((y != -100) & (y >= 0) & (y < x.shape[1]) & (scale != 0))[:, None]
            onehot = torch.zeros_like(x64).scatter_(1, torch.where(live[:, 0], y, 0)[:, None], 1.0)
            truth = torch.where(live, (torch.exp(x64 - torch.logsumexp(x64, -1, keepdim=True)) - onehot)
                                * scale.double()[:, None], 0.0)
            eager = reference.ce_grad_rows(x, y, lse, scale, -100)
            got = impl.ce_grad_rows(x, y, lse, scale, -100)
            if got.dtype != dtype or got.shape != x.shape:
                raise CheckFailed(f"ce_grad {dtype}: got {got.dtype} {tuple(got.shape)}")
            return accuracy(got, eager, truth, f"ce_grad {dtype}")[0]
        row.check(f"ce_grad {dtype}", one)


def run_linear(row: Row, device: torch.device) -> None:
    """linear_score / linear_select / selective_linear_cross_entropy (loss and gradients) against
    the same on the materialised logits in float64."""
    b = row.backend
    for j, dtype in enumerate(DTYPES):
        def one(dtype=dtype, j=j) -> float:
            g = torch.Generator().manual_seed(20 + j)
            n, d, v = 20, 16, 37
            h = (torch.randn(n, d, generator=g)).to(dtype).to(device)
            w = (torch.randn(v, d, generator=g) / 2).to(dtype).to(device)
            y = torch.randint(0, v, (n,), generator=g).to(device)
            y[3] = -100
            il = torch.rand(n, generator=g).to(device)
            logits = torch.nn.functional.linear(h, w)
            truth_logits = torch.nn.functional.linear(h.double(), w.double())
            truth = reference.score_rows(prepare(truth_logits, y, il, "reducible", -100))[0]
            eager = api.score(logits, y, il, backend="reference")
            got = linear.linear_score(h, w, y, il, chunk_size=7, backend=b)
            ratio, tol = accuracy(got, eager, truth, f"linear_score {dtype}")
            p = prepare(logits, y, il, "reducible", -100)
            _selection_ok(linear.linear_select(h, w, y, il, 6, chunk_size=7, backend=b), got, p, truth, tol, 6,
                          f"linear_select {dtype}")
            out = []
            for hh, ww, bk in ((h, w, b), (h, w, "reference"), (h.double(), w.double(), "reference")):
                hh, ww = hh.detach().requires_grad_(), ww.detach().requires_grad_()
                if bk == b:
                    loss = linear.selective_linear_cross_entropy(hh, ww, y, il, 0.5, chunk_size=7, backend=bk)
                else:  # the materialised logits, the reference op
                    loss = tokens.selective_cross_entropy(torch.nn.functional.linear(hh, ww), y, il, 0.5, backend=bk)
                loss.backward()
                out.append((loss.detach(), hh.grad, ww.grad))
            for i, name in enumerate(("loss", "d hidden", "d weight")):
                ratio = max(ratio, accuracy(out[0][i], out[1][i], out[2][i], f"selective linear CE {name} {dtype}")[0])
            return ratio
        row.check(f"linear {dtype}", one)


# --------------------------------------------------------------------------------- the driver


def _paths_of(name: str) -> list[str]:
    return (list(TRITON_PATHS) if name == "triton" else ["plan"]) + ["transform", "ce_grad", "linear"]


def run(device: torch.device, names: Optional[list[str]] = None) -> list[Row]:
    rows: list[Row] = []
    for name in names or list(backends.NAMES):
        reason = backends.unavailable_reason(name, device)
        for path in _paths_of(name):
            row = Row(name, path)
            rows.append(row)
            if reason is not None:
                row.not_run = reason
                continue
            if path == "ce_grad":
                why = backends.grad_unavailable_reason(name, device) if name in backends.GRAD_NAMES else \
                    "no ce_grad_rows kernel of its own (its backward runs the Triton kernel, checked there)"
                if why is not None:
                    row.not_run = why
                    continue
            t0 = time.perf_counter()
            {"transform": run_transform, "ce_grad": run_ce_grad, "linear": run_linear}.get(path, run_path)(row, device)
            row.seconds = time.perf_counter() - t0
    return rows


def _triton_in_child(device: torch.device) -> Optional[list[dict]]:
    """The Triton rows on CPU from a child process with TRITON_INTERPRET=1 (None: triton absent)."""
    try:
        import importlib.util

        if importlib.util.find_spec("triton") is None:
            return None
    except (ImportError, ValueError):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "triton.json")
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        proc = subprocess.run([sys.executable, "-m", "rho_kernels", "selftest", "--device", str(device),
                               "--backends", "triton", "--json", out], env=env, capture_output=True, text=True)
        if not os.path.exists(out):
            return [Row("triton", "plan").as_dict() | {
                "status": "FAIL", "failures": [f"the interpreted child process failed (rc={proc.returncode}): "
                                               f"{(proc.stderr or proc.stdout)[-600:]}"]}]
        with open(out) as f:
            return json.load(f)["rows"]


def format_table(rows: list[dict], header: str) -> str:
    lines = [header, "", f"{'backend':<10} {'path':<21} {'result':<8} {'checks':>6} {'worst err/tol':>13} {'s':>6}  note"]
    for r in rows:
        note = r["not_run"] or (r["failures"][0] if r["failures"] else "")
        worst = "-" if r["status"] == "not run" else f"{r['worst_error_over_tolerance']:.3f}"
        lines.append(f"{r['backend']:<10} {r['path']:<21} {r['status']:<8} {r['checks']:>6} {worst:>13} "
                     f"{r['seconds']:>6.1f}  {note[:110]}")
    failed = [(r, f) for r in rows for f in r["failures"]]
    if failed:
        lines += ["", "failures:"] + [f"  {r['backend']}/{r['path']}: {f}" for r, f in failed]
    return "\n".join(lines)


def _environment(device: torch.device) -> dict[str, Any]:
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = None
    dev = "cpu"
    if device.type == "cuda" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(device)
        dev = f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    return {"rho_kernels": __version__, "torch": str(torch.__version__), "triton": tv, "device": dev,
            "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1"}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rho_kernels selftest", description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="device to check (default: cuda where available, else cpu)")
    ap.add_argument("--json", help="also write the results here as JSON")
    ap.add_argument("--backends", help="comma-separated backends to check (default: all)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("selftest: --device cuda, but no CUDA device is available", file=sys.stderr)
        return 2
    names = args.backends.split(",") if args.backends else list(backends.NAMES)
    for name in names:
        if name not in backends.NAMES:
            ap.error(f"unknown backend {name!r}; expected some of {list(backends.NAMES)}")
    t0 = time.perf_counter()
    child = None
    if device.type == "cpu" and "triton" in names and os.environ.get("TRITON_INTERPRET", "0") != "1":
        names = [n for n in names if n != "triton"]
        child = _triton_in_child(device)
    rows = [r.as_dict() for r in run(device, names)]
    if child is not None:
        at = next((i for i, r in enumerate(rows) if r["backend"] == "cuda"), len(rows))
        rows[at:at] = child
    elif "triton" in (args.backends or ",".join(backends.NAMES)).split(",") and not any(
            r["backend"] == "triton" for r in rows):
        rows.append(Row("triton", "plan").as_dict() | {"status": "not run", "not_run": "triton is not installed"})
    env = _environment(device)
    failed = any(r["status"] == "FAIL" for r in rows)
    wall = time.perf_counter() - t0
    header = (f"rho_kernels {env['rho_kernels']} selftest on {env['device']}: torch {env['torch']}, triton "
              f"{env['triton'] or 'not installed'}" + (" (interpreted on CPU)" if device.type == "cpu" else "")
              + f"; {sum(r['checks'] for r in rows)} checks in {wall:.1f} s: "
              + ("FAILED" if failed else "all passed"))
    print(format_table(rows, header))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "seconds": round(wall, 1), "passed": not failed, "rows": rows}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
