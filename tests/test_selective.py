"""Rho-1 token selection and the selective cross-entropy.

* select_mask / select_sequences follow rk.select's order exactly (checked against rk.select
  and against a brute-force Python sort of the same scores), keep k = max(1, floor(ratio * n + 0.5)) (the package's one rounding rule);
* selective_cross_entropy: loss and gradients match autograd through the reference (CE +
  selection) for every backward kernel (reference torch, CPU extension, Triton -- interpreted on
  CPU), every dtype, rank 2/3 and non-contiguous logits, every reduction; exact zeros off the
  selection; gradcheck in float64; the in-place backward; the ce_grad_rows op itself (opcheck,
  special values); torch.compile(fullgraph=True);
* the demo's --quick mode runs and its selection avoids the corrupted tokens.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

import rho_kernels as rk
from rho_kernels import backends, reference, tokens

from conftest import DEVICE, INTERPRETED, is_slow_backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# Per-element gradient tolerance against autograd through the reference: one ulp of the output
# dtype at the gradient's magnitude (both round once; the Triton interpreter truncates instead of
# rounding to nearest) plus the accumulation dtype's math.
MATH_ATOL = {torch.float32: 2e-6, torch.bfloat16: 2e-6, torch.float16: 2e-6, torch.float64: 1e-12}


def grad_tol(want: torch.Tensor, dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps * max(1.0, want.abs().max().item()) + MATH_ATOL[dtype]


def _grad_impl_or_skip(name: str) -> str:
    reason = backends.grad_unavailable_reason(name, DEVICE)
    if reason is not None:
        pytest.skip(f"backward kernel {name!r} cannot run on {DEVICE}: {reason}")
    return name


@pytest.fixture(params=backends.GRAD_NAMES)
def grad_impl(request) -> str:
    return _grad_impl_or_skip(request.param)


def make_lm_batch(b: int, t: int, v: int, dtype=torch.float32, seed: int = 0, n_ignored: int = 3):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, t, v, generator=g) * 2.0).to(dtype)
    targets = torch.randint(0, v, (b, t), generator=g)
    flat = targets.view(-1)
    flat[torch.randperm(flat.numel(), generator=g)[:n_ignored]] = -100
    ref_loss = torch.rand(b, t, generator=g) * 3.0
    return logits.to(DEVICE), targets.to(DEVICE), ref_loss.to(DEVICE)


def rule_order(scores: torch.Tensor, eligible: torch.Tensor) -> list[int]:
    """The ordering rule by brute force: score descending (-0 == +0), lower index first,
    ineligible rows last by index."""
    s, e = scores.reshape(-1).cpu().tolist(), eligible.reshape(-1).cpu().tolist()
    good = sorted((i for i in range(len(s)) if e[i]), key=lambda i: (-(s[i] + 0.0), i))
    return good + [i for i in range(len(s)) if not e[i]]


# --------------------------------------------------------------------------- ordering key


def test_ordering_key_matches_the_rule():
    special = [0.0, -0.0, 1.0, 1.0, -1.0, math.inf, -math.inf, 1e-45, -1e-45, 3.4e38, -3.4e38, 2.5, 2.5]
    g = torch.Generator().manual_seed(3)
    scores = torch.tensor(special + torch.randn(200, generator=g).round(decimals=1).tolist(), dtype=torch.float32)
    scores[[5, 40]] = math.nan
    eligible = ~torch.isnan(scores)
    eligible[[2, 17, 100]] = False
    key = tokens.ordering_key(scores, eligible)
    got = torch.sort(key, descending=True).indices.tolist()
    assert got == rule_order(scores, eligible)
    assert got == reference.order_rows(scores, eligible).tolist()


# --------------------------------------------------------------------------- select_mask


def _backend_scores(logits, targets, ref_loss, method, backend):
    return rk.score(logits, targets, ref_loss, method=method, backend=backend)


@pytest.mark.parametrize("ratio", [1e-9, 0.1, 0.37, 0.5, 1.0])
@pytest.mark.parametrize("method", ["reducible", "loss", "entropy"])
def test_select_mask_follows_select(backend, method, ratio):
    logits, targets, ref_loss = make_lm_batch(3, 23, 41, n_ignored=7)
    mask = tokens.select_mask(logits, targets, ref_loss, ratio, method=method, backend=backend)
    assert mask.dtype == torch.bool and mask.shape == targets.shape and mask.device == logits.device
    n = int((targets != -100).sum())
    k = max(1, math.floor(ratio * n + 0.5))  # nearest, halves up, at least 1
    assert int(mask.sum()) == k
    # Exactly rk.select's top k (same backend, so the same scores).
    sel = rk.select(logits, targets, ref_loss, k, method=method, backend=backend)
    want = torch.zeros(targets.numel(), dtype=torch.bool)
    want[sel.indices.cpu()] = True
    assert torch.equal(mask.reshape(-1).cpu(), want)
    # And the rule by brute force on the backend's own scores.
    scores = _backend_scores(logits, targets, ref_loss, method, backend)
    eligible = (targets != -100) & ~torch.isnan(scores)
    assert sorted(mask.reshape(-1).nonzero().view(-1).tolist()) == sorted(rule_order(scores, eligible)[:k])
    assert not bool((mask & (targets == -100)).any())


def test_select_mask_ties_nan_and_too_few_eligible():
    v = 5
    logits = torch.zeros(2, 6, v, device=DEVICE)  # CE = log 5 everywhere: ties broken by index
    targets = torch.zeros(2, 6, dtype=torch.int64, device=DEVICE)
    targets[0, 0] = -100
    ref_loss = torch.zeros(2, 6, device=DEVICE)
    ref_loss[0, 3] = math.nan  # NaN score: ineligible, but still counted in n
    ref_loss[1, 5] = -1.0  # the single best row
    mask = tokens.select_mask(logits, targets, ref_loss, 0.4, backend="reference")  # n = 11 -> k = 4
    assert mask.reshape(-1).nonzero().view(-1).tolist() == [1, 2, 4, 11]
    # All tokens ignored: nothing selected (k = 1, but no row is eligible).
    none = tokens.select_mask(logits, torch.full_like(targets, -100), ref_loss, 0.5, backend="reference")
    assert not bool(none.any())
    # Keep everything: all eligible rows.
    full = tokens.select_mask(logits, targets, ref_loss, 1.0, backend="reference")
    assert int(full.sum()) == 10 and not bool(full[0, 0]) and not bool(full[0, 3])


def test_select_mask_two_dimensional_and_custom_ignore_index():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(50, 9, generator=g).to(DEVICE)
    targets = torch.randint(0, 9, (50,), generator=g).to(DEVICE)
    targets[:10] = 0  # ignore_index=0 hides these 10 rows (and the random other zeros)
    ref_loss = torch.rand(50, generator=g).to(DEVICE)
    mask = tokens.select_mask(logits, targets, ref_loss, 0.25, ignore_index=0, backend="reference")
    n = int((targets != 0).sum())
    assert mask.shape == (50,) and int(mask.sum()) == max(1, math.floor(0.25 * n + 0.5))
    assert not bool(mask[targets == 0].any())


# --------------------------------------------------------------------------- select_sequences


def test_select_sequences_brute_force(backend):
    logits, targets, ref_loss = make_lm_batch(9, 13, 37, n_ignored=20)
    targets[4] = -100  # an all-ignored sequence: ineligible
    ref_loss[6, 2] = math.nan  # a NaN token: the whole sequence is ineligible
    for k in (0, 1, 4, 9):
        sel = tokens.select_sequences(logits, targets, ref_loss, k, backend=backend)
        assert sel.indices.shape == (k,) and sel.indices.dtype == torch.int64
        assert sel.scores.dtype == torch.float32 and sel.valid.dtype == torch.bool
        scores = rk.score(logits, targets, ref_loss, backend=backend).double().cpu()
        keep = (targets != -100).cpu()
        means, elig = [], []
        for b in range(9):
            vals = scores[b][keep[b]]
            m = vals.mean().item() if vals.numel() else math.nan
            means.append(m)
            elig.append(vals.numel() > 0 and not math.isnan(m))
        want = rule_order(torch.tensor(means, dtype=torch.float32), torch.tensor(elig))[:k]
        assert sel.indices.cpu().tolist() == want
        assert sel.valid.cpu().tolist() == [elig[i] for i in want]
        got_means = sel.scores.cpu().double()
        for j, i in enumerate(want):
            if elig[i]:
                assert abs(got_means[j].item() - means[i]) <= 1e-6 * max(1.0, abs(means[i]))
    assert 4 not in tokens.select_sequences(logits, targets, ref_loss, 7, backend=backend).indices.tolist()


# --------------------------------------------------------------------------- bad input


def test_bad_input():
    logits, targets, ref_loss = make_lm_batch(2, 5, 7)
    for bad in (0, 0.0, -0.5, 1.5, math.nan):
        with pytest.raises(ValueError, match="ratio"):
            tokens.select_mask(logits, targets, ref_loss, bad)
        with pytest.raises(ValueError, match="ratio"):
            tokens.selective_cross_entropy(logits, targets, ref_loss, bad)
    for bad in (True, "0.5", torch.tensor(0.5), None):
        with pytest.raises(TypeError, match="ratio"):
            tokens.select_mask(logits, targets, ref_loss, bad)
    with pytest.raises(ValueError, match="reduction"):
        tokens.selective_cross_entropy(logits, targets, ref_loss, 0.5, reduction="avg")
    with pytest.raises(ValueError, match="needs reference_loss"):
        tokens.selective_cross_entropy(logits, targets, None, 0.5)
    with pytest.raises(ValueError, match="needs reference_loss"):
        tokens.select_mask(logits, targets, None, 0.5)
    with pytest.raises(ValueError, match="needs reference_loss"):
        tokens.select_sequences(logits, targets, None, 1)
    assert tokens.select_mask(logits, targets, None, 0.5, method="loss").shape == targets.shape  # not needed there
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        tokens.select_mask(logits.tolist(), targets, ref_loss, 0.5)
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        tokens.selective_cross_entropy(logits.tolist(), targets, ref_loss, 0.5)
    with pytest.raises(ValueError, match="reference_loss shape"):
        tokens.selective_cross_entropy(logits, targets, ref_loss[:, :3], 0.5)
    with pytest.raises(ValueError, match=r"\[B, T, V\]"):
        tokens.select_sequences(logits.reshape(10, 7), targets.reshape(10), ref_loss.reshape(10), 1)
    with pytest.raises(ValueError, match="k = 3"):
        tokens.select_sequences(logits, targets, ref_loss, 3)
    with pytest.raises(ValueError, match="unknown backend"):
        tokens.selective_cross_entropy(logits, targets, ref_loss, 0.5, backend="fast")
    with pytest.raises(TypeError, match="inplace_backward"):
        tokens.selective_cross_entropy(logits, targets, ref_loss, 0.5, inplace_backward=1)
    leaf = logits.clone().requires_grad_()
    with pytest.raises(ValueError, match="leaf"):
        tokens.selective_cross_entropy(leaf, targets, ref_loss, 0.5, inplace_backward=True)
    if DEVICE.type == "cpu":
        bad_t = targets.clone()
        bad_t[0, 0] = 7
        with pytest.raises(ValueError, match="target 7"):
            tokens.selective_cross_entropy(logits, bad_t, ref_loss, 0.5)


# --------------------------------------------------------------------------- selective CE


def run_selective(logits, targets, ref_loss, ratio, grad_name, reduction="mean", inplace=False, softcap=None,
                  logit_scale=1.0, label_smoothing=0.0, z_loss=0.0, weights=None):
    """selective_cross_entropy with the reference forward and a chosen backward kernel."""
    config = tokens.loss_config(softcap, logit_scale, label_smoothing, z_loss, weights, targets)
    return tokens._SelectiveCE.apply(logits, targets, ref_loss, weights, tokens.check_ratio(ratio), -100, reduction,
                                     "reference", grad_name, inplace, config)


def _upstream_weights(shape, dtype, seed=11):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype).to(DEVICE)


def _compare(loss_fn, logits, targets, ref_loss, ratio, reduction, what):
    """Loss and gradient of loss_fn vs autograd through the reference (CE + selection)."""
    x = logits.detach().clone().requires_grad_()
    got = loss_fn(x)
    want_x = logits.detach().clone().requires_grad_()
    want = tokens.selective_cross_entropy_autograd(want_x, targets, ref_loss, ratio, reduction=reduction)
    assert got.dtype == want.dtype and got.shape == want.shape, what
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6), f"{what}: loss {got} != {want}"
    w = _upstream_weights(got.shape, got.dtype) if reduction == "none" else torch.ones((), dtype=got.dtype,
                                                                                        device=DEVICE) * 0.7
    (gx,) = torch.autograd.grad((got * w).sum(), x)
    (gw,) = torch.autograd.grad((want * w).sum(), want_x)
    assert gx.dtype == logits.dtype and gx.shape == logits.shape, what
    err = (gx.double() - gw.double()).abs().max().item()
    tol = grad_tol(gw.double(), logits.dtype)
    assert err <= tol, f"{what}: max grad error {err:.3g} > {tol:.3g}"
    return gx


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradients_match_reference(grad_impl, dtype, reduction):
    logits, targets, ref_loss = make_lm_batch(3, 29, 1500 if not is_slow_backend(grad_impl) else 300, dtype)
    for ratio in (0.2, 1.0):
        what = f"{grad_impl}/{dtype}/{reduction}/ratio={ratio}"
        gx = _compare(lambda x: run_selective(x, targets, ref_loss, ratio, grad_impl, reduction), logits, targets,
                      ref_loss, ratio, reduction, what)
        # Exact zeros on every row outside the selection.
        mask = tokens.select_mask(logits, targets, ref_loss, ratio, backend="reference")
        assert bool((gx[~mask] == 0).all()), what
        assert bool((gx[mask] != 0).any(dim=-1).all()), what


def _layouts(dtype):
    g = torch.Generator().manual_seed(2)
    b, t, v = 3, 7, 203
    base = (torch.randn(b, t, v, generator=g) * 2).to(dtype).to(DEVICE)
    tg = torch.randint(0, v, (b, t), generator=g).to(DEVICE)
    tg[0, 1] = -100
    il = torch.rand(b, t, generator=g).to(DEVICE)
    wide = (torch.randn(20, v + 37, generator=g) * 2).to(dtype).to(DEVICE)
    tall = (torch.randn(v, 20, generator=g) * 2).to(dtype).to(DEVICE)
    t20 = torch.randint(0, v, (20,), generator=g).to(DEVICE)
    il20 = torch.rand(20, generator=g).to(DEVICE)
    return [
        ("2d", wide[:, :v].contiguous(), t20, il20),
        ("3d_transposed_bt", base.transpose(0, 1), tg.transpose(0, 1), il.transpose(0, 1)),
        ("row_stride_padded", wide[:, :v], t20, il20),
        ("column_stride", tall.t(), t20, il20),
        ("3d_sliced_vocab", torch.cat([base, base], -1)[..., 3: 3 + v], tg, il),
        ("targets_int32", base, tg.to(torch.int32), il.to(torch.float16)),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gradients_layouts(grad_impl, dtype):
    for name, logits, targets, il in _layouts(dtype):
        before = logits.clone()
        _compare(lambda x: run_selective(x, targets, il, 0.3, grad_impl), logits, targets, il, 0.3, "mean",
                 f"{grad_impl}/{dtype}/{name}")
        assert torch.equal(logits, before), f"{name}: logits were written"


def test_public_api_matches_reference(backend):
    """rk.selective_cross_entropy on each backend of the conformance suite."""
    v = 300 if is_slow_backend(backend) else 1200
    for dtype in (torch.float32, torch.bfloat16):
        logits, targets, ref_loss = make_lm_batch(2, 31, v, dtype)
        for reduction in ("mean", "none"):
            _compare(lambda x: tokens.selective_cross_entropy(x, targets, ref_loss, 0.25, reduction=reduction,
                                                          backend=backend),
                     logits, targets, ref_loss, 0.25, reduction, f"{backend}/{dtype}/{reduction}")


def test_loss_is_mean_ce_of_selected_tokens():
    logits, targets, ref_loss = make_lm_batch(2, 17, 19, torch.float64)
    ratio = 0.3
    mask = tokens.select_mask(logits, targets, ref_loss, ratio, backend="reference")
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 19), targets.reshape(-1), reduction="none",
                                           ignore_index=-100).view(2, 17)
    excess = ce - ref_loss.double()
    # The selected tokens are the top-k excess losses.
    k = int(mask.sum())
    assert k == max(1, math.floor(ratio * int((targets != -100).sum()) + 0.5))
    assert excess[mask].min() >= excess[~mask & (targets != -100)].max()
    loss = tokens.selective_cross_entropy(logits, targets, ref_loss, ratio)
    assert torch.allclose(loss, ce[mask].mean(), rtol=1e-12, atol=0)
    total = tokens.selective_cross_entropy(logits, targets, ref_loss, ratio, reduction="sum")
    assert torch.allclose(total, ce[mask].sum(), rtol=1e-12, atol=0)
    # ratio = 1 is plain cross-entropy.
    plain = tokens.selective_cross_entropy(logits, targets, ref_loss, 1.0)
    assert torch.allclose(plain, ce[targets != -100].mean(), rtol=1e-12, atol=0)


def test_nothing_selected_gives_zero_loss_and_grad(grad_impl):
    logits, targets, ref_loss = make_lm_batch(1, 4, 9)
    x = logits.clone().requires_grad_()
    loss = run_selective(x, torch.full_like(targets, -100), ref_loss, 0.5, grad_impl)
    loss.backward()
    assert loss.item() == 0.0 and bool((x.grad == 0).all())


def test_unselected_nonfinite_rows_give_exact_zeros(grad_impl):
    """NaN / inf logits in ignored rows never reach the loss or the gradient; -inf logits in a
    selected row get exactly zero gradient."""
    logits, targets, ref_loss = make_lm_batch(2, 6, 11, n_ignored=0)
    logits[0, 0] = math.nan
    logits[0, 1, 3] = math.inf
    targets[0, :2] = -100
    logits[1, 2, 4] = -math.inf
    targets[1, 2] = 5
    ref_loss[1, 2] = -10.0  # make row (1, 2) the best one
    x = logits.clone().requires_grad_()
    loss = run_selective(x, targets, ref_loss, 0.5, grad_impl)
    loss.backward()
    assert torch.isfinite(loss)
    assert bool((x.grad[0, :2] == 0).all()) and x.grad[1, 2, 4].item() == 0.0
    assert bool(torch.isfinite(x.grad).all())


def test_gradcheck_float64(grad_impl):
    logits, targets, ref_loss = make_lm_batch(2, 5, 7, torch.float64, n_ignored=2)
    for reduction in ("mean", "sum", "none"):
        x = logits.clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda z: run_selective(z, targets, ref_loss, 0.4, grad_impl, reduction),
                                        (x,), eps=1e-6, atol=1e-7)
    x = logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda z: tokens.selective_cross_entropy(z, targets, ref_loss, 0.4, backend="auto"), (x,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inplace_backward(grad_impl, dtype):
    logits, targets, ref_loss = make_lm_batch(2, 9, 133, dtype)
    w = torch.randn(133, dtype=dtype, device=DEVICE)
    leaf = logits.clone().requires_grad_()
    x = leaf * 1.0  # a non-leaf, like an LM head's output
    loss = run_selective(x, targets, ref_loss, 0.3, grad_impl, inplace=True)
    version = x._version
    (g_inplace,) = torch.autograd.grad(loss, leaf)
    assert x._version > version  # autograd sees the write (a saved x elsewhere would then raise)
    leaf2 = logits.clone().requires_grad_()
    (g_plain,) = torch.autograd.grad(run_selective(leaf2 * 1.0, targets, ref_loss, 0.3, grad_impl), leaf2)
    assert torch.equal(g_inplace, g_plain)
    assert torch.equal(x.detach(), g_plain)  # the gradient lives in the logits' storage
    # A saved copy of the logits elsewhere in the graph is caught, not silently corrupted.
    y = (leaf * 1.0).tanh()  # tanh saves its output y
    loss = run_selective(y, targets, ref_loss, 0.3, grad_impl, inplace=True) + (y * w).sum()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# --------------------------------------------------------------------------- the op itself


def _op_inputs(n, v, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, v, generator=g) * 3).to(dtype)
    t = torch.randint(0, v, (n,), generator=g)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    lse = torch.logsumexp(z.to(acc), -1)
    scale = torch.rand(n, generator=g).to(acc)
    return z.to(DEVICE), t.to(DEVICE), lse.to(DEVICE), scale.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ce_grad_rows_op(grad_impl, dtype):
    """The row kernel alone: V spanning several CPU tiles, the target in any tile, special rows."""
    v = 2500 if not is_slow_backend(grad_impl) else 600
    z, t, lse, scale = _op_inputs(13, v, dtype)
    t[0], t[1], t[2] = 0, v - 1, 1030 % v
    t[3] = -100  # ignored
    t[4] = v  # out of range: zeros, never read
    scale[5] = 0.0
    z[5] = math.nan  # scale 0: zeros without reading the row
    z[6, 7] = -math.inf
    got = backends.get(grad_impl).ce_grad_rows(z, t, lse, scale, -100, inplace=False)
    acc = lse.dtype
    p = torch.exp(z.to(acc) - lse[:, None])
    live = (t >= 0) & (t < v) & (scale != 0)
    onehot = torch.zeros_like(p)
    onehot[live] = torch.nn.functional.one_hot(t[live], v).to(acc)
    want = torch.where(live[:, None], (p - onehot) * scale[:, None], 0.0)
    err = (got.double() - want.double()).abs().max().item()
    tol = grad_tol(want.double(), dtype)
    assert err <= tol, f"{grad_impl}/{dtype}: max error {err:.3g} > {tol:.3g}"
    assert bool((got[3:6] == 0).all()) and got[6, 7].item() == 0.0
    assert got.dtype == dtype and got.is_contiguous()


def test_ce_grad_rows_opcheck():
    if backends.grad_unavailable_reason("cpu", torch.device("cpu")) is not None:
        pytest.skip("the extension's CPU ce_grad_rows kernel is not built")
    for dtype in DTYPES:
        z, t, lse, scale = (x.cpu() for x in _op_inputs(9, 70, dtype))
        t[2] = -100
        torch.library.opcheck(torch.ops.rho_kernels.ce_grad_rows.default, (z, t, lse, scale, -100))
        torch.library.opcheck(torch.ops.rho_kernels.ce_grad_rows_.default, (z.clone(), t, lse, scale, -100))
    with pytest.raises(RuntimeError, match="row_scale"):
        torch.ops.rho_kernels.ce_grad_rows(z, t, lse, scale.float(), -100)


def test_optional_reference_loss_and_positional_misuse():
    logits, targets, ref_loss = make_lm_batch(2, 9, 11)
    want = tokens.select_mask(logits, targets, None, 0.5, method="loss")
    assert torch.equal(rk.select_mask(logits, targets, ratio=0.5, method="loss"), want)
    seq = rk.select_sequences(logits, targets, k=1, method="gradnorm")
    assert torch.equal(seq.indices, rk.select_sequences(logits, targets, None, 1, method="gradnorm").indices)
    with pytest.raises(TypeError, match=r"pass the count by keyword: rk.select_mask\(logits, targets, ratio=0.5"):
        rk.select_mask(logits, targets, 0.5, method="loss")
    with pytest.raises(TypeError, match=r"k=1"):
        rk.select_sequences(logits, targets, 1, method="loss")
    with pytest.raises(TypeError, match="'ratio'"):
        rk.select_mask(logits, targets, ref_loss)
    # entropy is label-free: targets=None counts every token
    free = rk.select_mask(logits, None, ratio=0.5, method="entropy")
    assert int(free.sum()) == 9
    no_ignored = torch.where(targets == -100, 0, targets)
    assert torch.equal(free, rk.select_mask(logits, no_ignored, ratio=0.5, method="entropy"))
    with pytest.raises(TypeError, match="entropy"):
        rk.select_mask(logits, None, ratio=0.5, method="loss")


# --------------------------------------------------------------------------- torch.compile


def test_torch_compile_fullgraph(backend):
    if is_slow_backend(backend):
        pytest.skip("tracing Triton kernels needs a GPU")
    logits, targets, ref_loss = make_lm_batch(2, 16, 40)

    def fn(logits, targets, ref_loss):
        mask = tokens.select_mask(logits, targets, ref_loss, 0.3, backend=backend)
        seq = tokens.select_sequences(logits, targets, ref_loss, 1, backend=backend)
        loss = tokens.selective_cross_entropy(logits, targets, ref_loss, 0.3, backend=backend)
        return mask, seq.indices, loss

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    x, y = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    got, want = compiled(x, targets, ref_loss), fn(y, targets, ref_loss)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    # The backward traced by AOTAutograd (the ce_grad_rows op through its fake) gives the same grads.
    got[-1].backward()
    want[-1].backward()
    assert torch.equal(x.grad, y.grad)


def test_torch_compile_inductor_training_step():
    """Forward + backward through Inductor (the backward op runs inside the compiled graph)."""
    logits, targets, ref_loss = make_lm_batch(2, 16, 40)
    w = torch.randn(40, 40, device=DEVICE)

    def step(h, w):
        out = h @ w
        return tokens.selective_cross_entropy(out, targets, ref_loss, 0.3)

    h = logits.clone().requires_grad_()
    w1 = w.clone().requires_grad_()
    loss = torch.compile(step, fullgraph=True)(h, w1)
    loss.backward()
    h2 = logits.clone().requires_grad_()
    w2 = w.clone().requires_grad_()
    step(h2, w2).backward()
    assert torch.allclose(loss, step(logits, w), rtol=1e-5, atol=1e-6)
    assert torch.allclose(h.grad, h2.grad, rtol=1e-4, atol=1e-6)
    assert torch.allclose(w1.grad, w2.grad, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- demo


def test_demo_quick(tmp_path):
    out = tmp_path / "demo.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "python", "rho1_demo.py"), "--quick", "--json",
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    for run in ("all_tokens", "rho1"):
        r = data["runs"][run]
        assert math.isfinite(r["clean_eval_loss"]) and r["clean_eval_loss"] > 0
    sel = data["runs"]["rho1"]["selection"]
    # The clean reference model gives corrupted targets a high loss, so their excess loss is low
    # and Rho-1 must pick them clearly less often than their share of the batch (all-token and
    # random-subset training take them at exactly that share).  Measured: 18% vs 30%.
    assert sel["noisy_fraction_of_selected"] < 0.8 * data["config"]["noise"]
    # Equal steps: report, and check the direction the method exists for.
    assert data["runs"]["rho1"]["clean_eval_loss"] < data["runs"]["all_tokens"]["clean_eval_loss"]


# --------------------------------------------------------------------------- packaging, GPU


def test_works_without_the_extension():
    """Without rho_kernels._C (RHO_KERNELS_NO_EXT=1 builds), everything runs on the torch paths.
    Simulated by hiding _C from the import system."""
    code = """
import sys, importlib.abc
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "rho_kernels._C":
            raise ImportError("hidden for the test")
sys.meta_path.insert(0, Hide())
import torch
from rho_kernels import tokens
from rho_kernels.backends import _extension as _ext
assert _ext.LOAD_ERROR is not None
assert tokens.resolve_names("auto", torch.device("cpu")) == ("reference", "reference")
x = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
t = torch.randint(0, 7, (2, 5)); il = torch.rand(2, 5)
assert torch.autograd.gradcheck(lambda z: tokens.selective_cross_entropy(z, t, il, 0.5), (x,))
assert int(tokens.select_mask(x, t, il, 0.5).sum()) == 5
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TRITON_INTERPRET="0"))
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


@pytest.mark.skipif(DEVICE.type != "cuda", reason="host-sync checks need a GPU")
def test_no_host_sync_on_gpu(backend):
    logits, targets, ref_loss = make_lm_batch(4, 512, 5000, torch.bfloat16)
    x = logits.requires_grad_()

    def step():
        tokens.select_mask(logits, targets, ref_loss, 0.3, backend=backend)
        tokens.select_sequences(logits, targets, ref_loss, 2, backend=backend)
        loss = tokens.selective_cross_entropy(x, targets, ref_loss, 0.3, backend=backend)
        torch.autograd.grad(loss, x)

    step()  # warm up (compiles / autotunes)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# --------------------------------------------------------------------------- divergence (NaN) rule


@pytest.fixture
def fresh_nan_warning(monkeypatch):
    """The nothing-eligible warning is once per process: re-arm it for one test."""
    monkeypatch.setattr(tokens, "_STARVED_WARNED", False)
    monkeypatch.setattr(tokens, "_PENDING", [])


def test_divergence_makes_the_loss_nan(backend, fresh_nan_warning):
    """The model's own non-finite logits on a counted token make the loss NaN (as F.cross_entropy);
    a NaN reference loss only keeps its token out of the selection; counted tokens but none
    selectable: NaN and one warning naming why."""
    logits, targets, ref_loss = make_lm_batch(2, 9, 40 if is_slow_backend(backend) else 300, n_ignored=2)
    counted = targets != -100
    r, c = counted.nonzero()[0].tolist()
    run = lambda z, il, ratio, red="mean": tokens.selective_cross_entropy(  # noqa: E731
        z, targets, il, ratio, reduction=red, backend=backend)
    for bad in (math.nan, math.inf):
        z = logits.clone()
        z[r, c, 5] = bad
        assert torch.isnan(F_ce(z, targets)), "the premise: F.cross_entropy is NaN"
        for ratio in (1.0, 0.3):
            x = z.clone().requires_grad_()
            assert torch.isnan(run(x, ref_loss, ratio)), f"{backend}: {bad} logit, ratio {ratio}"
            assert torch.isnan(run(z, ref_loss, ratio, "sum"))
            per_token = run(z, ref_loss, ratio, "none")
            assert torch.isnan(per_token[r, c]) and not bool(torch.isnan(per_token).sum() > 1)
        if math.isnan(bad):  # unselectable (NaN score): the other tokens' gradients stay usable
            run(x, ref_loss, 0.3).backward()
            assert bool(torch.isfinite(x.grad).all()) and bool((x.grad[r, c] == 0).all())
    z = torch.full_like(logits, math.nan)  # a fully diverged model: NaN, not 0
    with pytest.warns(RuntimeWarning, match=r"none of the 16 counted tokens .*16 have non-finite logits"):
        assert torch.isnan(run(z, ref_loss, 1.0)) and torch.isnan(run(z, ref_loss, 0.5, "sum"))
    tokens._STARVED_WARNED = False  # re-arm (the fixture restores it)
    # A diverged token that is ignored does not count.
    z, t_ign = logits.clone(), targets.clone()
    z[r, c] = math.nan
    t_ign[r, c] = -100
    assert torch.isfinite(tokens.selective_cross_entropy(z, t_ign, ref_loss, 0.5, backend=backend))

    # NaN reference loss: ineligible, the loss stays that of the others (ratio 1: plain CE of them).
    il = ref_loss.clone()
    il[r, c] = math.nan
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="selective cross-entropy")
        got = run(logits, il, 1.0)
    t_rest = targets.clone()
    t_rest[r, c] = -100
    assert torch.allclose(got, F_ce(logits, t_rest), rtol=1e-5), backend
    # Every reference loss NaN: no token to train on.  NaN and one warning, once per process.
    with pytest.warns(RuntimeWarning, match=r"none of the 16 counted tokens .*16 have a NaN reference loss"):
        assert torch.isnan(run(logits, torch.full_like(il, math.nan), 0.5))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="selective cross-entropy")
        assert torch.isnan(run(logits, torch.full_like(il, math.nan), 0.5, "sum"))
    # Nothing counted (every target ignored): still 0, no warning.
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="selective cross-entropy")
        assert tokens.selective_cross_entropy(logits, torch.full_like(targets, -100), il, 0.5,
                                              backend=backend).item() == 0.0


def F_ce(logits, targets):
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


# --------------------------------------------------------------------------- soft-cap, scale, smoothing, z-loss, weights

# (softcap, logit_scale): none; a cap small enough that tanh saturates (|z| ~ 6 against 1.5); a
# scale < 1 (Granite's 1 / logits_scaling); a scale > 1 with a cap (Cohere-like scale, Gemma cap).
TRANSFORMS = [(None, 1.0), (1.5, 1.0), (None, 0.25), (4.0, 1.7)]


def transformed(logits, softcap, logit_scale):
    """z' in float64, written out independently of the package: softcap * tanh(scale * z / softcap)."""
    z = logits.double() * logit_scale
    return softcap * torch.tanh(z / softcap) if softcap is not None else z


def definition_loss(logits, targets, ref_loss, ratio, softcap=None, logit_scale=1.0, label_smoothing=0.0, z_loss=0.0,
                    weights=None, reduction="mean"):
    """The issue's formula in float64 torch, differentiable by autograd: selection by the plain
    excess CE(z') - ref (select_mask of the materialised z', reference backend); per kept token
    F.cross_entropy(z', label_smoothing) + z_loss * lse(z')^2, weighted, over the kept weight."""
    v = logits.shape[-1]
    zt = transformed(logits, softcap, logit_scale)
    with torch.no_grad():
        mask = tokens.select_mask(zt, targets, ref_loss, ratio, backend="reference").reshape(-1)
    flat_t = targets.reshape(-1).to(torch.int64)
    z2 = zt.reshape(-1, v)
    per = torch.nn.functional.cross_entropy(z2, torch.where(mask, flat_t, -100), reduction="none",
                                            label_smoothing=label_smoothing)
    per = per + z_loss * torch.logsumexp(z2, -1) ** 2
    w = mask.double() if weights is None else torch.where(mask, weights.reshape(-1).double(), 0.0)
    per = torch.where(mask, per, 0.0) * w
    if reduction == "none":
        return per.view(targets.shape)
    if reduction == "sum":
        return per.sum()
    return per.sum() / torch.where(w.sum() > 0, w.sum(), 1.0)


def _token_weights(shape, seed=3):
    w = torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2
    w.view(-1)[::4] = 0.0  # zeros
    return w.to(DEVICE)


@pytest.mark.parametrize("transform", TRANSFORMS, ids=str)
def test_loss_options_against_the_formula(backend, transform):
    """softcap / logit_scale / label_smoothing / z_loss / weights, each reduction, against the
    float64 formula: loss and the gradient w.r.t. the raw logits (autograd through the formula)."""
    softcap, logit_scale = transform
    v = 37 if is_slow_backend(backend) else 301
    logits, targets, ref_loss = make_lm_batch(2, 13, v, torch.float32, n_ignored=4)
    logits = logits * 3  # |z| ~ 6: the cap saturates
    weights = _token_weights(targets.shape)
    cases = [dict(label_smoothing=0.1), dict(z_loss=1e-2), dict(weights=weights),
             dict(label_smoothing=0.2, z_loss=1e-3, weights=weights)]
    for i, opts in enumerate(cases):
        for ratio, reduction in ((0.4, ("mean", "sum", "none")[i % 3]), (1.0, "mean")):
            what = f"{backend}/{transform}/{opts.keys()}/{ratio}/{reduction}"
            x = logits.clone().requires_grad_()
            got = tokens.selective_cross_entropy(x, targets, ref_loss, ratio, reduction=reduction, backend=backend,
                                                 softcap=softcap, logit_scale=logit_scale, **opts)
            xd = logits.double().requires_grad_()
            want = definition_loss(xd, targets, ref_loss, ratio, softcap, logit_scale, reduction=reduction, **opts)
            assert got.dtype == torch.float32 and got.shape == want.shape, what
            assert torch.allclose(got.double(), want, rtol=2e-5, atol=2e-5), f"{what}: {got} vs {want}"
            up = torch.rand(got.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64).to(DEVICE)
            (g,) = torch.autograd.grad((got * up.float()).sum(), x)
            (gw,) = torch.autograd.grad((want * up).sum(), xd)
            err = (g.double() - gw).abs().max().item()
            assert err <= 1e-5 * max(1.0, gw.abs().max().item()), f"{what}: grad error {err:.3g}"


def test_smoothing_matches_f_cross_entropy_and_weighted_ce():
    """ratio = 1: label smoothing with ignore_index is F.cross_entropy's; weights make a plain
    weighted cross-entropy (sum w l / sum w)."""
    logits, targets, ref_loss = make_lm_batch(3, 11, 50, torch.float64, n_ignored=5)
    for eps in (0.05, 0.3, 1.0):
        got = tokens.selective_cross_entropy(logits, targets, ref_loss, 1.0, label_smoothing=eps)
        want = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), targets.reshape(-1), label_smoothing=eps)
        assert torch.allclose(got, want, rtol=1e-12), eps
    w = _token_weights(targets.shape)
    per = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), targets.reshape(-1), reduction="none")
    counted = targets.reshape(-1) != -100
    want = (per * w.reshape(-1))[counted].sum() / w.reshape(-1)[counted].sum()
    got = tokens.selective_cross_entropy(logits, targets, ref_loss, 1.0, weights=w)
    assert torch.allclose(got, want, rtol=1e-12)
    # All kept weights zero: 0 (nothing to learn from), not 0 / 0.
    zero = tokens.selective_cross_entropy(logits, targets, ref_loss, 1.0, weights=torch.zeros_like(w))
    assert zero.item() == 0.0


def test_loss_options_gradcheck_float64(grad_impl):
    logits, targets, ref_loss = make_lm_batch(2, 5, 7, torch.float64, n_ignored=2)
    w = _token_weights(targets.shape)
    for reduction in ("mean", "none"):
        x = logits.clone().requires_grad_()
        assert torch.autograd.gradcheck(
            lambda z: run_selective(z, targets, ref_loss, 0.6, grad_impl, reduction, softcap=2.0, logit_scale=0.7,
                                    label_smoothing=0.15, z_loss=0.05, weights=w), (x,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("transform", TRANSFORMS[1:], ids=str)
def test_selection_ops_with_a_transform(backend, transform):
    """select_mask / select_sequences with softcap / logit_scale = the plain ops on the
    materialised z' (the order of z' is not the order of z: a cap changes the selection)."""
    softcap, logit_scale = transform
    v = 37 if is_slow_backend(backend) else 500
    logits, targets, ref_loss = make_lm_batch(4, 9, v, torch.float32)
    logits = logits * 3
    zt = transformed(logits, softcap, logit_scale).float()
    for method in ("reducible", "loss", "entropy"):
        got = tokens.select_mask(logits, targets, ref_loss, 0.3, method=method, backend=backend, softcap=softcap,
                                 logit_scale=logit_scale)
        want = tokens.select_mask(zt, targets, ref_loss, 0.3, method=method, backend="reference")
        assert torch.equal(got, want), f"{backend}/{method}"
        seq = tokens.select_sequences(logits, targets, ref_loss, 2, method=method, backend=backend, softcap=softcap,
                                      logit_scale=logit_scale)
        ref_seq = tokens.select_sequences(zt, targets, ref_loss, 2, method=method, backend="reference")
        assert torch.equal(seq.indices, ref_seq.indices), f"{backend}/{method}"
    if softcap is not None:
        plain = tokens.select_mask(logits, targets, ref_loss, 0.3, backend=backend)
        assert not torch.equal(plain, got), "the cap should change this selection (else the test shows nothing)"


def test_loss_option_errors():
    logits, targets, ref_loss = make_lm_batch(1, 4, 9)
    run = lambda **kw: tokens.selective_cross_entropy(logits, targets, ref_loss, 0.5, **kw)  # noqa: E731
    bad_w = torch.ones(targets.shape)
    bad_w[0, 2] = -0.5
    nan_w = torch.ones(targets.shape)
    nan_w[0, 1] = math.nan
    for kw, err, msg in [
        (dict(label_smoothing=1.5), ValueError, r"label_smoothing must be in \[0, 1\].*1.5"),
        (dict(label_smoothing="0.1"), TypeError, "label_smoothing must be a float"),
        (dict(z_loss=-1e-4), ValueError, "z_loss must be a finite float >= 0, got -0.0001"),
        (dict(z_loss=math.inf), ValueError, "z_loss must be a finite"),
        (dict(weights=torch.ones(4)), ValueError, r"weights shape \(4,\) does not match the targets' shape \(1, 4\)"),
        (dict(weights=torch.ones(1, 4, dtype=torch.int64)), TypeError, "weights must be a float tensor"),
        (dict(weights=[1.0] * 4), TypeError, "weights must be a torch.Tensor or None"),
        (dict(weights=bad_w), ValueError, r"weights must be finite and >= 0, got -0.5 at flat index 2"),
        (dict(weights=nan_w), ValueError, r"got nan at flat index 1"),
        (dict(softcap=0.0), ValueError, "softcap must be > 0"),
        (dict(softcap=-3.0), ValueError, "softcap must be > 0"),
        (dict(softcap=math.inf), ValueError, "softcap must be finite"),
        (dict(logit_scale=0.0), ValueError, "logit_scale must be non-zero"),
        (dict(logit_scale=math.nan), ValueError, "logit_scale must be finite"),
    ]:
        with pytest.raises(err, match=msg):
            run(**kw)
    with pytest.raises(ValueError, match="softcap must be > 0"):
        tokens.select_mask(logits, targets, ref_loss, 0.5, softcap=0)
