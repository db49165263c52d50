"""``backend="auto"`` falls back when the Triton backend cannot compile or launch a launch
configuration; ``backend="triton"`` raises.  The failure is injected (no GPU needed): the Triton
backend's one launch point (``triton_select._launch``, ``triton_ce_grad``'s launcher) raises what
Triton raises on a smaller GPU, and "auto" is made to pick Triton on the CPU (under the
interpreter, where the Triton backend runs on CPU tensors).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import rho_kernels as rk
from rho_kernels import backends, reference
from rho_kernels._contract import prepare

from conftest import INTERPRETED

pytestmark = pytest.mark.skipif(not INTERPRETED, reason="needs the Triton backend on CPU (TRITON_INTERPRET=1)")

if INTERPRETED:
    from triton.runtime.errors import OutOfResources

    from rho_kernels.backends import triton_ce_grad, triton_select


def _problem(n: int = 6, v: int = 11, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=g)
    targets = torch.randint(0, v, (n,), generator=g)
    il = torch.rand(n, generator=g)
    return logits, targets, il


@pytest.fixture
def guard(monkeypatch):
    """A fresh fallback guard that "auto" resolves to on the CPU, and a launcher that fails on
    float32 logits (out of shared memory) while float64 launches still run."""
    fresh = backends._Fallback(backends._triton)
    monkeypatch.setattr(backends, "_FALLBACK", fresh)
    monkeypatch.setattr(backends, "auto_name", lambda device: "triton")
    calls = {"n": 0}
    real = triton_select._launch

    def failing(kernel, grid, device, *args, **kwargs):
        calls["n"] += 1
        if any(isinstance(a, torch.Tensor) and a.dtype == torch.float32 and a.dim() == 2 for a in args[:1]):
            raise OutOfResources(232448, 101376, "shared memory")
        return real(kernel, grid, device, *args, **kwargs)

    monkeypatch.setattr(triton_select, "_launch", failing)
    fresh.calls = calls
    return fresh


def test_auto_falls_back_warns_once_and_remembers(guard) -> None:
    logits, targets, il = _problem()
    with pytest.warns(RuntimeWarning) as got:
        sel = rk.select(logits, targets, il, k=3)
    msg = str(got[0].message)
    for part in ("OutOfResources", "shared memory", "cpu", "select_rows", "RHO_KERNELS_BACKEND=reference",
                 "backend='reference'", "backend='triton' raises"):
        assert part in msg, (part, msg)
    ref = reference.select_rows(prepare(logits, targets, il, "reducible", -100), 3)
    assert torch.equal(sel.indices, ref[0]) and torch.equal(sel.scores, ref[1])
    assert len(guard.failed) == 1
    tried = guard.calls["n"]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="rho_kernels")  # once per process: no second warning
        again = rk.select(logits, targets, il, k=3)
        s = rk.score(logits, targets, il)  # another configuration: fails, falls back, silently
    assert torch.equal(again.indices, sel.indices)
    assert torch.allclose(s, reference.score_rows(prepare(logits, targets, il, "reducible", -100))[0])
    assert guard.calls["n"] == tried + 1  # the remembered select did not try Triton again; score did
    assert len(guard.failed) == 2


def test_other_configurations_still_run_on_triton(guard) -> None:
    logits, targets, il = _problem()
    with pytest.warns(RuntimeWarning):
        rk.select(logits, targets, il, k=2)
    before = guard.calls["n"]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="rho_kernels")
        sel = rk.select(logits.double(), targets, il, k=2)  # float64: the launcher runs it
    assert guard.calls["n"] > before and len(guard.failed) == 1
    ref = reference.select_rows(prepare(logits.double(), targets, il, "reducible", -100), 2)
    assert torch.equal(sel.indices, ref[0])


def test_explicit_triton_raises(guard) -> None:
    logits, targets, il = _problem()
    with pytest.raises(OutOfResources):
        rk.select(logits, targets, il, k=3, backend="triton")
    with pytest.raises(OutOfResources):
        rk.score(logits, targets, il, backend="triton")
    assert not guard.failed


def test_ce_grad_falls_back(guard, monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise OutOfResources(300000, 232448, "shared memory")

    monkeypatch.setattr(triton_ce_grad, "_launch", boom)
    logits, targets, _ = _problem(5, 9)
    lse = torch.logsumexp(logits, -1)
    scale = torch.rand(5)
    with pytest.warns(RuntimeWarning, match="ce_grad_rows"):
        got = backends.get(backends.FALLBACK_PREFIX + "triton").ce_grad_rows(logits, targets, lse, scale, -100)
    assert torch.allclose(got, reference.ce_grad_rows(logits, targets, lse, scale, -100))
    with pytest.raises(OutOfResources):
        backends.get("triton").ce_grad_rows(logits, targets, lse, scale, -100)


def test_only_launch_failures_fall_back(guard, monkeypatch) -> None:
    logits, targets, il = _problem()
    for exc in (ValueError("a bug, not a launch failure"), torch.OutOfMemoryError("CUDA out of memory")):
        def raising(*args, _exc=exc, **kwargs):
            raise _exc

        monkeypatch.setattr(triton_select, "_launch", raising)
        with pytest.raises(type(exc)):
            rk.select(logits, targets, il, k=3)
    assert not guard.failed
    # A RuntimeError raised from inside the triton package (an MLIR pass, the launcher) counts.
    ns = {"__name__": "triton.compiler.fake"}
    exec("def run(*a, **k):\n    raise RuntimeError('PassManager::run failed')", ns)
    monkeypatch.setattr(triton_select, "_launch", ns["run"])
    with pytest.warns(RuntimeWarning, match="PassManager"):
        rk.select(logits, targets, il, k=3)
    assert len(guard.failed) == 1


def test_traced_calls_go_straight_to_triton(guard, monkeypatch) -> None:
    # Under torch.compile the guard adds nothing to the graph: the Triton op is called directly.
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    logits, targets, il = _problem()
    with pytest.raises(OutOfResources):
        guard.select_rows(prepare(logits, targets, il, "reducible", -100), 3)
    assert not guard.failed


def test_resolved_names() -> None:
    cpu = torch.device("cpu")
    assert backends.resolve("triton", cpu) is backends.get("triton")
    assert backends.grad_unavailable_reason(backends.FALLBACK_PREFIX + "triton", cpu) is None
    guard = backends.get(backends.FALLBACK_PREFIX + "triton")
    assert guard.NAME == "auto:triton" and guard.unavailable_reason(cpu) is None  # the module's interface
