"""The linear ops (scores, selection and the selective CE from hidden states and the LM head).

Each op is checked against the logits op applied to the materialised logits ``F.linear(h, w, b)``:

* inputs are small multiples of 1/4 (hidden, weight) and 1/16 (bias) with D = 16, so every logit
  is exact in every dtype and the chunked matmul gives bit-identical logits: the comparison tests
  this package's code, not the BLAS's summation order (one test uses Gaussian data with a
  tolerance for that order);
* scores under the conformance suite's accuracy rule, selections by the ordering rule on the
  op's own scores and against the reference's picks; shapes with V not a multiple of the chunk,
  N = 1, a chunk of one row, [B, T, D] inputs, bias / no bias, every dtype, every method,
  ignore_index, ties, NaN / inf;
* the loss and its gradients to hidden, weight and bias against autograd through the
  materialised reference, every backward kernel and reduction; exact zeros off the selection;
  gradcheck in float64; torch.compile(fullgraph=True).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import rho_kernels as rk
from rho_kernels import backends, linear, tokens
from rho_kernels._contract import METHOD_IDS

from conftest import DEVICE, is_slow_backend
from test_conformance import (
    assert_accurate,
    assert_same_nonfinite,
    assert_selection_consistent,
    assert_selection_matches_reference,
    eligible_of,
    truth_scores,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
D = 16
# (N, V, chunk, bias): V not a multiple of the chunk's anything, N = 1, one-row chunks, N not a
# multiple of the chunk, a single chunk (chunk > N); with and without bias.
SHAPES = [(1, 1, None, True), (1, 50, 1, False), (37, 50, 7, True), (37, 50, 100, False), (120, 1001, 64, True),
          (5, 32001, 2, False)]
INTERPRETER_MAX_ELEMENTS = 60_000


def _skip_if_too_big(backend: str, numel: int) -> None:
    if is_slow_backend(backend) and numel > INTERPRETER_MAX_ELEMENTS:
        pytest.skip(f"{numel} logits is too slow for the Triton CPU interpreter (covered on GPU)")


def exact_inputs(lead: tuple, v: int, dtype: torch.dtype, seed: int = 0, bias: bool = True):
    """hidden, weight, bias whose logits are exact in ``dtype`` (|logit| <= 10, multiples of 1/16)."""
    g = torch.Generator().manual_seed(seed * 7919 + v)
    h = (torch.randint(-3, 4, (*lead, D), generator=g) / 4).to(dtype)
    w = (torch.randint(-3, 4, (v, D), generator=g) / 4).to(dtype)
    b = (torch.randint(-16, 17, (v,), generator=g) / 16).to(dtype) if bias else None
    targets = torch.randint(0, v, lead, generator=g)
    il = torch.rand(lead, generator=g) * 2.0
    to = lambda x: None if x is None else x.to(DEVICE)  # noqa: E731
    return to(h), to(w), to(b), to(targets), to(il)


def materialise(h, w, b):
    return F.linear(h, w, b)


# --------------------------------------------------------------------------- scores + select


@pytest.mark.parametrize("shape", SHAPES, ids=[f"{n}x{v}/c{c}/{'bias' if b else 'no_bias'}" for n, v, c, b in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", rk.METHODS)
def test_scores_and_selection(backend, method, dtype, shape):
    n, v, chunk, with_bias = shape
    _skip_if_too_big(backend, n * v)
    h, w, b, targets, il = exact_inputs((n,), v, dtype, bias=with_bias)
    if n > 3:
        targets[2] = -100
    logits = materialise(h, w, b)
    assert torch.equal(torch.cat([materialise(h[i:i + 1], w, b) for i in range(n)]), logits)  # exact inputs
    truth = truth_scores(logits, targets, il, method)
    eager = rk.score(logits, targets, il, method=method, backend="reference").double()
    got = rk.linear_score(h, w, targets, il, bias=b, method=method, chunk_size=chunk, backend=backend)
    assert got.dtype == torch.float32 and got.shape == targets.shape and got.device == h.device
    what = f"{backend}/{method}/{dtype}/{shape}/bias={with_bias}"
    tol = assert_accurate(got, eager, truth, what)
    for k in sorted({0, 1, max(1, n // 10), n}):
        sel = rk.linear_select(h, w, targets, il, k, bias=b, method=method, chunk_size=chunk, backend=backend)
        assert_selection_consistent(sel, got, eligible_of(targets, got, v), k, f"{what}/k={k}")
        ref_sel = rk.select(logits, targets, il, k, method=method, backend="reference")
        assert_selection_matches_reference(sel, ref_sel, truth, tol, f"{what}/k={k}")


def test_default_chunk_from_budget(backend, monkeypatch):
    """chunk_size=None takes the chunk from the budget; a budget of a few rows still gives the
    same answer as one block."""
    h, w, b, targets, il = exact_inputs((40,), 300, torch.float32)
    assert linear.chunk_rows(40, 300, torch.float32, h.device, None) == 40  # 64 MiB: one block
    one_block = rk.linear_score(h, w, targets, il, bias=b, backend=backend)
    monkeypatch.setitem(linear.CHUNK_BUDGET_BYTES, DEVICE.type, 3 * 300 * 4)
    monkeypatch.setattr(linear, "_TILE_ROWS", 3)  # 3 full rows fill the budget: row chunks (cpu tiles: below)
    assert linear.chunk_rows(40, 300, torch.float32, h.device, None) == 3
    assert linear.chunk_rows(40, 300, torch.bfloat16, h.device, None) == 6
    assert torch.equal(rk.linear_score(h, w, targets, il, bias=b, backend=backend), one_block)
    sel = rk.linear_select(h, w, targets, il, 7, bias=b, backend=backend)
    assert torch.equal(sel.indices, rk.linear_select(h, w, targets, il, 7, bias=b, chunk_size=40,
                                                     backend=backend).indices)


def test_gaussian_inputs(backend):
    """Realistic data: the chunked matmul may round differently from the full one; scores agree
    with the materialised op within the matmul's own rounding."""
    g = torch.Generator().manual_seed(5)
    n, d, v = 50, 64, 700
    h, w = torch.randn(n, d, generator=g).to(DEVICE), (torch.randn(v, d, generator=g) / 8).to(DEVICE)
    targets, il = torch.randint(0, v, (n,), generator=g).to(DEVICE), torch.rand(n, generator=g).to(DEVICE)
    for method in rk.METHODS:
        got = rk.linear_score(h, w, targets, il, method=method, chunk_size=9, backend=backend)
        want = rk.score(materialise(h, w, None), targets, il, method=method, backend=backend)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), method


def test_three_dimensional_and_sequences(backend):
    bsz, t, v = 4, 9, 120
    h, w, b, targets, il = exact_inputs((bsz, t), v, torch.float32, seed=3)
    targets[1, :] = -100  # a sequence with nothing to score: ineligible
    targets[2, 3] = -100
    h[0] = h[3]  # sequences 0 and 3 tie: the lower index first
    targets[0] = targets[3]
    il[0] = il[3]
    logits = materialise(h, w, b)
    got = rk.linear_score(h, w, targets, il, bias=b, chunk_size=5, backend=backend)
    assert got.shape == (bsz, t)
    assert_accurate(got, rk.score(logits, targets, il, backend="reference").double(),
                    truth_scores(logits, targets, il, "reducible"), backend)
    seq = rk.linear_select_sequences(h, w, targets, il, bsz, bias=b, chunk_size=5, backend=backend)
    want = rk.select_sequences(logits, targets, il, bsz, backend=backend)
    assert torch.equal(seq.indices, want.indices) and torch.equal(seq.valid, want.valid)
    assert torch.allclose(seq.scores, want.scores, rtol=1e-6, atol=1e-6, equal_nan=True)
    assert seq.indices.tolist().index(0) < seq.indices.tolist().index(3)
    assert seq.indices[-1].item() == 1 and not seq.valid[-1].item()
    sel = rk.linear_select(h, w, targets, il, 10, bias=b, chunk_size=5, backend=backend)
    assert_selection_consistent(sel, got, eligible_of(targets, got, v), 10, backend)


def test_ignore_index_ties_and_special_values(backend):
    n, v = 24, 60
    h, w, b, targets, il = exact_inputs((n,), v, torch.float32, seed=4)
    targets[[1, 5]] = 7  # a custom ignore_index
    h[10] = h[3]  # tie with a lower-index row
    targets[10], il[10] = targets[3], il[3]
    h[12, 4] = math.nan  # NaN hidden state: NaN score, ineligible
    b[11] = -math.inf  # an impossible class
    targets[targets == 11] = 12
    for method in rk.METHODS:
        logits = materialise(h, w, b)
        got = rk.linear_score(h, w, targets, il, bias=b, method=method, ignore_index=7, chunk_size=5,
                              backend=backend)
        truth = truth_scores(logits, targets, il, method, ignore_index=7)
        eager = rk.score(logits, targets, il, method=method, ignore_index=7, backend="reference").double()
        assert_accurate(got, eager, truth, f"{backend}/{method}")
        assert got[1].item() == -math.inf and got[5].item() == -math.inf
        if method != "irreducible":
            assert math.isnan(got[12].item())
        sel = rk.linear_select(h, w, targets, il, n, bias=b, method=method, ignore_index=7, chunk_size=5,
                               backend=backend)
        eligible = eligible_of(targets, got, v, ignore_index=7)
        assert_selection_consistent(sel, got, eligible, n, f"{backend}/{method}")
        order = sel.indices.tolist()
        assert order.index(3) < order.index(10)
    # +inf bias: lse = +inf, CE = inf - finite = inf (or NaN on the target column), as on logits.
    b2 = b.clone()
    b2[0] = math.inf
    got = rk.linear_score(h, w, targets, il, bias=b2, method="loss", ignore_index=7, chunk_size=5, backend=backend)
    want = truth_scores(materialise(h, w, b2), targets, il, "loss", ignore_index=7)
    assert_same_nonfinite(got, want, "inf bias")


def test_transposed_weight_is_named():
    """A [D, V] weight (an LM head passed as hidden @ W rather than nn.Linear's [V, D]) says so."""
    h, w, b, targets, il = exact_inputs((6,), 10, torch.float32)  # w: [10, 16]
    with pytest.raises(ValueError, match=r"\(16, 10\) but hidden has D = 16 .*looks transposed.*weight\.T"):
        rk.linear_score(h, w.T, targets, il)
    with pytest.raises(ValueError, match=r"hidden has D = 5 \(shape \(6, 5\)\)$"):  # not merely transposed
        rk.linear_score(h[:, :5], w, targets, il)


def test_bad_input():
    h, w, b, targets, il = exact_inputs((6,), 10, torch.float32)
    with pytest.raises(TypeError, match="hidden must be a torch.Tensor"):
        rk.linear_score(h.tolist(), w, targets, il)
    with pytest.raises(ValueError, match=r"weight is \[V, D\] = \(10, 16\) but hidden has D = 5"):
        rk.linear_score(h[:, :5], w, targets, il)
    with pytest.raises(ValueError, match="weight must be"):
        rk.linear_score(h, w[0], targets, il)
    with pytest.raises(ValueError, match="hidden must be"):
        rk.linear_score(h[0], w, targets[0], il[0])
    with pytest.raises(TypeError, match="weight dtype torch.float64 differs"):
        rk.linear_score(h, w.double(), targets, il)
    with pytest.raises(TypeError, match="hidden must be float32"):
        rk.linear_score(h.to(torch.int32), w.to(torch.int32), targets, il)
    with pytest.raises(ValueError, match=r"bias must be \[V\] = \[10\]"):
        rk.linear_score(h, w, targets, il, bias=b[:3])
    with pytest.raises(TypeError, match="bias dtype"):
        rk.linear_score(h, w, targets, il, bias=b.double())
    with pytest.raises(ValueError, match=r"targets shape \(5,\) does not match the leading dims \(6,\)"):
        rk.linear_score(h, w, targets[:5], il)
    with pytest.raises(ValueError, match="irreducible_loss shape"):
        rk.linear_score(h, w, targets, il[:5])
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        rk.linear_score(h, w, targets, il, chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size must be a positive int"):
        rk.linear_score(h, w, targets, il, chunk_size=2.0)
    with pytest.raises(ValueError, match="target 10 at flat row 0 is outside"):
        t2 = targets.clone()
        t2[0] = 10
        rk.linear_score(h, w, t2, il)
    with pytest.raises(ValueError, match="k = 7 is out of range"):
        rk.linear_select(h, w, targets, il, 7)
    with pytest.raises(ValueError, match=r"needs \[B, T, D\] hidden"):
        rk.linear_select_sequences(h, w, targets, il, 1)
    with pytest.raises(ValueError, match="ratio must be in"):
        rk.selective_linear_cross_entropy(h, w, targets, il, 1.5)
    with pytest.raises(ValueError, match="reduction must be"):
        rk.selective_linear_cross_entropy(h, w, targets, il, 0.5, reduction="avg")
    with pytest.raises(ValueError, match="needs reference_loss"):
        rk.selective_linear_cross_entropy(h, w, targets, None, 0.5)
    with pytest.raises(ValueError, match="unknown backend"):
        rk.linear_score(h, w, targets, il, backend="nope")


# --------------------------------------------------------------------------- selective CE


def _grad_impl_or_skip(name: str) -> str:
    reason = backends.grad_unavailable_reason(name, DEVICE)
    if reason is not None:
        pytest.skip(f"backward kernel {name!r} cannot run on {DEVICE}: {reason}")
    return name


@pytest.fixture(params=backends.GRAD_NAMES)
def grad_impl(request) -> str:
    return _grad_impl_or_skip(request.param)


def grad_tol(want: torch.Tensor, dtype: torch.dtype, terms: int) -> float:
    # Both sides round the logits' gradient to the input dtype once and sum ``terms`` products in
    # float32 (the weight gradient's chunks add in float32 here, in one matmul there).
    eps = torch.finfo(dtype).eps
    acc_eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    return (2 * eps + terms * acc_eps) * max(1.0, want.abs().max().item()) + (1e-12 if dtype == torch.float64 else 2e-6)


def _loss_case(dtype, bias=True, lead=(3, 29), v=300, seed=0):
    h, w, b, targets, il = exact_inputs(lead, v, dtype, seed=seed, bias=bias)
    flat = targets.view(-1)
    flat[[1, 7, 20]] = -100
    return h, w, b, targets, il


def _leaves(*xs):
    return [None if x is None else x.detach().clone().requires_grad_() for x in xs]


def _compare_loss(h, w, b, targets, il, ratio, reduction, backend, chunk, what):
    dtype = h.dtype
    got_in, want_in = _leaves(h, w, b), _leaves(h, w, b)
    got = rk.selective_linear_cross_entropy(got_in[0], got_in[1], targets, il, ratio, bias=got_in[2],
                                            reduction=reduction, chunk_size=chunk, backend=backend)
    want = tokens.selective_cross_entropy_autograd(materialise(*want_in), targets, il, ratio, reduction=reduction)
    assert got.dtype == want.dtype and got.shape == want.shape, what
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6), f"{what}: loss {got} != {want}"
    g = torch.Generator().manual_seed(1)
    up = (torch.rand(got.shape, generator=g, dtype=torch.float64).to(got.dtype).to(DEVICE) + 0.5)
    grads = torch.autograd.grad((got * up).sum(), [x for x in got_in if x is not None])
    wants = torch.autograd.grad((want * up).sum(), [x for x in want_in if x is not None])
    n = targets.numel()
    for name, gx, gw, terms in zip(("hidden", "weight", "bias"), grads, wants, (w.shape[0], n, n)):
        assert gx.dtype == dtype and gx.shape == gw.shape, f"{what}/{name}"
        err = (gx.double() - gw.double()).abs().max().item()
        tol = grad_tol(gw.double(), dtype, terms)
        assert err <= tol, f"{what}/{name}: max grad error {err:.3g} > {tol:.3g}"
    return grads


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_loss_and_gradients_match_materialised(grad_impl, dtype, reduction):
    v = 120 if is_slow_backend(grad_impl) else 1001
    h, w, b, targets, il = _loss_case(dtype, v=v)
    for ratio, chunk in ((0.2, 10), (1.0, None)):
        what = f"{grad_impl}/{dtype}/{reduction}/ratio={ratio}"
        gh, gw, gb = _compare_loss(h, w, b, targets, il, ratio, reduction, grad_impl, chunk, what)
        mask = tokens.select_mask(materialise(h, w, b), targets, il, ratio, backend="reference")
        assert bool((gh[~mask] == 0).all()), f"{what}: unselected rows of hidden's gradient are not exact zeros"
        assert bool((gh[mask] != 0).any(dim=-1).all()), what


@pytest.mark.parametrize("lead", [(1,), (37,), (2, 19)], ids=str)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_loss_shapes_and_bias(grad_impl, lead, with_bias):
    v = 50 if is_slow_backend(grad_impl) else 257
    h, w, b, targets, il = exact_inputs(lead, v, torch.float32, seed=2, bias=with_bias)
    for chunk in (1, 7, None):
        _compare_loss(h, w, b, targets, il, 0.3, "mean", grad_impl, chunk, f"{grad_impl}/{lead}/c{chunk}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_row_path_float32_weight_sum(dtype, monkeypatch):
    """More candidate rows than classes: the row path, its float32 weight-gradient sum updated a
    vocabulary slice at a time."""
    monkeypatch.setattr(linear, "_W_SLICE", 7)
    sliced = []
    monkeypatch.setattr(linear, "_backward_by_vocab_slice", lambda *a: sliced.append(1))
    h, w, b, targets, il = _loss_case(dtype, v=40)  # 45 candidate rows > 40 classes
    _compare_loss(h, w, b, targets, il, 0.5, "sum", "cpu" if backends.grad_unavailable_reason("cpu", DEVICE) is None
                  else "reference", 4, f"{dtype}/rows")
    assert not sliced


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_backward_by_vocabulary_slice(dtype, with_bias, monkeypatch):
    """Several chunks, half precision: the backward runs one vocabulary slice of the head at a
    time over all candidate rows (no float32 [V, D] sum).  Gradients as autograd through the
    materialised logits; exact zeros for unselected rows, even next to a NaN hidden state."""
    seen = []
    real = linear._vocab_slices
    monkeypatch.setattr(linear, "_vocab_slices", lambda *a: seen.append(real(*a)) or seen[-1])
    h, w, b, targets, il = _loss_case(dtype, v=203, bias=with_bias)
    backend = "cpu" if backends.grad_unavailable_reason("cpu", DEVICE) is None else "reference"
    for reduction in ("mean", "none"):
        gh = _compare_loss(h, w, b, targets, il, 0.4, reduction, backend, 6, f"{dtype}/{reduction}")[0]
        mask = tokens.select_mask(materialise(h, w, b), targets, il, 0.4, backend="reference")
        assert bool((gh[~mask] == 0).all()) and bool((gh[mask] != 0).any(dim=-1).all())
    assert seen and all(sl is not None and len(sl) > 3 for sl in seen), seen
    # Widths chosen from the block: 36 candidate rows x width x (2 * 2 + 4) bytes <= 6 x 203 x 2 / 2.
    assert seen[0][0] == (0, 4) and seen[0][-1][1] == 203

    # A NaN hidden state makes its row ineligible; it stays a zero row of hidden's gradient and
    # adds nothing to the weight's.  Same for an unselected candidate row.
    h2 = h.clone()
    h2[0, 5, 3] = math.nan
    hh, ww, bb = _leaves(h2, w, b)
    loss = rk.selective_linear_cross_entropy(hh, ww, targets, il, 0.4, bias=bb, chunk_size=6, backend=backend)
    loss.backward()
    assert torch.isnan(loss) and torch.isfinite(ww.grad).all()  # a diverged token: NaN, as F.cross_entropy
    assert bool((hh.grad[0, 5] == 0).all())
    mask = tokens.select_mask(materialise(h2, w, b), targets, il, 0.4, backend="reference")
    assert bool((hh.grad[~mask] == 0).all())

    # torch.compile(fullgraph=True) of the sliced backward: the eager gradients, bit for bit
    # (one case: compiling is slow).
    if dtype != torch.bfloat16 or not with_bias:
        return
    monkeypatch.setattr(linear, "_vocab_slices", real)

    def fn(h, w, b):
        return rk.selective_linear_cross_entropy(h, w, targets, il, 0.4, bias=b, chunk_size=6, backend=backend)

    got_in, want_in = _leaves(h, w, b), _leaves(h, w, b)
    torch.compile(fn, fullgraph=True, backend="aot_eager")(*got_in).backward()
    fn(*want_in).backward()
    for a, c in zip(got_in, want_in):
        if a is not None:
            assert torch.equal(a.grad, c.grad)


def test_only_selected_rows_reach_the_weight(grad_impl):
    """A NaN hidden state (ineligible, never selected) leaves every gradient finite, and the
    weight / bias gradients are those of the selected rows alone."""
    h, w, b, targets, il = _loss_case(torch.float32, v=60)
    h[0, 5, 3] = math.nan
    hh, ww, bb = _leaves(h, w, b)
    loss = rk.selective_linear_cross_entropy(hh, ww, targets, il, 0.5, bias=bb, chunk_size=8, backend=grad_impl)
    loss.backward()
    # The counted NaN row makes the loss NaN (as F.cross_entropy); the gradients stay finite.
    assert torch.isnan(loss) and torch.isfinite(ww.grad).all() and torch.isfinite(bb.grad).all()
    assert bool((hh.grad[0, 5] == 0).all())
    # Same selection with the NaN row's target ignored instead: identical weight / bias gradients.
    mask = tokens.select_mask(materialise(h, w, b), targets, il, 0.5, backend="reference")
    t2 = torch.where(mask, targets, torch.full_like(targets, -100))
    hh2, ww2, bb2 = _leaves(torch.nan_to_num(h), w, b)
    loss2 = rk.selective_linear_cross_entropy(hh2, ww2, t2, il, 1.0, bias=bb2, chunk_size=8, backend=grad_impl)
    loss2.backward()
    assert int(mask.sum()) == int((t2 != -100).sum())
    assert torch.isfinite(loss2)
    assert torch.allclose(ww.grad, ww2.grad, rtol=1e-5, atol=1e-7)
    assert torch.allclose(bb.grad, bb2.grad, rtol=1e-5, atol=1e-7)


def test_nothing_selected(grad_impl):
    h, w, b, targets, il = exact_inputs((5,), 30, torch.float32)
    targets[:] = -100
    hh, ww, bb = _leaves(h, w, b)
    loss = rk.selective_linear_cross_entropy(hh, ww, targets, il, 0.5, bias=bb, chunk_size=2, backend=grad_impl)
    loss.backward()
    assert loss.item() == 0.0
    assert bool((hh.grad == 0).all() and (ww.grad == 0).all() and (bb.grad == 0).all())


def test_gradcheck_float64(grad_impl):
    g = torch.Generator().manual_seed(6)
    h, w, b = (torch.randn(shape, generator=g, dtype=torch.float64).to(DEVICE) for shape in ((2, 5, 4), (11, 4), (11,)))
    targets = torch.randint(0, 11, (2, 5), generator=g).to(DEVICE)
    il = torch.rand(2, 5, generator=g, dtype=torch.float64).to(DEVICE)
    targets[0, 1] = -100
    h, w, b = _leaves(h, w, b)

    def fn(h, w, b):
        return rk.selective_linear_cross_entropy(h, w, targets, il, 0.5, bias=b, chunk_size=3, backend=grad_impl,
                                                 reduction="none")

    # fast_mode (random projections of the Jacobian): the interpreted Triton kernel is slow.
    assert torch.autograd.gradcheck(fn, (h, w, b), fast_mode=is_slow_backend(grad_impl))

    # Every loss option at once: transform, smoothing, z-loss, weights (with zeros).
    from test_selective import _token_weights

    weights = _token_weights(targets.shape)

    def with_options(h, w, b):
        return rk.selective_linear_cross_entropy(h, w, targets, il, 0.6, bias=b, chunk_size=3, backend=grad_impl,
                                                 weights=weights, **LOSS_OPTIONS)

    assert torch.autograd.gradcheck(with_options, (h, w, b), fast_mode=is_slow_backend(grad_impl))


# --------------------------------------------------------------------------- torch.compile


def test_torch_compile_fullgraph(backend):
    if is_slow_backend(backend):
        pytest.skip("tracing Triton kernels needs a GPU")
    h, w, b, targets, il = _loss_case(torch.float32, v=40, lead=(2, 16))

    def fn(h, w, b):
        s = rk.linear_score(h, w, targets, il, bias=b, chunk_size=5, backend=backend)
        sel = rk.linear_select(h, w, targets, il, 6, bias=b, chunk_size=5, backend=backend)
        seq = rk.linear_select_sequences(h, w, targets, il, 1, bias=b, chunk_size=5, backend=backend)
        loss = rk.selective_linear_cross_entropy(h, w, targets, il, 0.3, bias=b, chunk_size=5, backend=backend)
        return s, sel.indices, sel.valid, seq.indices, loss

    got_in, want_in = _leaves(h, w, b), _leaves(h, w, b)
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(*got_in)
    want = fn(*want_in)
    for a, c in zip(got, want):
        assert torch.equal(a, c)
    got[-1].backward()
    want[-1].backward()
    for a, c in zip(got_in, want_in):
        assert torch.equal(a.grad, c.grad)


def test_torch_compile_inductor_training_step():
    h, w, b, targets, il = _loss_case(torch.float32, v=40, lead=(2, 16))

    def step(h, w, b):
        return rk.selective_linear_cross_entropy(torch.tanh(h), w, targets, il, 0.3, bias=b, chunk_size=8)

    got_in, want_in = _leaves(h, w, b), _leaves(h, w, b)
    loss = torch.compile(step, fullgraph=True)(*got_in)
    loss.backward()
    want = step(*want_in)
    want.backward()
    assert torch.allclose(loss, want, rtol=1e-5, atol=1e-6)
    for a, c in zip(got_in, want_in):
        assert torch.allclose(a.grad, c.grad, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- cpu tiled forward
# With chunk_size=None on the cpu backend, rows wider than the budget allows in tall blocks are
# scored from [rows, width] tiles folded by the partial_rows kernel (linear._score_tiles).  The
# budget is shrunk here so that small shapes take that path with uneven tiles.

# (N, V, rows, width, bias): N and V not multiples of the tile, one-row tiles, a single row block.
TILE_SHAPES = [(37, 50, 8, 7, True), (5, 1001, 2, 300, False), (120, 301, 64, 32, True), (1, 77, 1, 10, True)]


def _tiled_backend(backend: str) -> None:
    if backend.partition("-")[0] != "cpu":
        pytest.skip("the tiled forward is the cpu backend's")
    reason = backends.get("cpu").partials_unavailable_reason(torch.device("cpu"))
    if reason is not None:
        pytest.skip(reason)


def _force_tiles(monkeypatch, rows: int, width: int, dtype: torch.dtype) -> list:
    """Shrink the budget to [rows, width] tiles of ``dtype``; returns the list of plans used."""
    monkeypatch.setattr(linear, "_TILE_ROWS", rows)
    monkeypatch.setitem(linear.CHUNK_BUDGET_BYTES, "cpu", rows * width * torch.empty((), dtype=dtype).element_size())
    used, real = [], linear._score_tiles
    monkeypatch.setattr(linear, "_score_tiles", lambda p, h, w, b, plan: used.append(plan) or real(p, h, w, b, plan))
    return used


@pytest.mark.parametrize("shape", TILE_SHAPES, ids=[f"{n}x{v}/t{r}x{c}/{'bias' if b else 'no_bias'}"
                                                     for n, v, r, c, b in TILE_SHAPES])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("method", rk.METHODS)
def test_tiled_forward_scores_and_selection(backend, method, dtype, shape, monkeypatch):
    _tiled_backend(backend)
    n, v, rows, width, with_bias = shape
    h, w, b, targets, il = exact_inputs((n,), v, dtype, seed=6, bias=with_bias)
    if n > 3:
        targets[2] = -100
        targets[3] = v - 1  # the last (ragged) slice
    used = _force_tiles(monkeypatch, rows, width, dtype)
    logits = materialise(h, w, b)
    truth = truth_scores(logits, targets, il, method)
    eager = rk.score(logits, targets, il, method=method, backend="reference").double()
    got = rk.linear_score(h, w, targets, il, bias=b, method=method, backend=backend)
    assert used == ([] if method == "irreducible" else [(rows, width)]), used
    assert got.dtype == torch.float32 and got.shape == targets.shape
    what = f"tiles/{backend}/{method}/{dtype}/{shape}"
    tol = assert_accurate(got, eager, truth, what)
    for k in sorted({0, 1, max(1, n // 10), n}):
        sel = rk.linear_select(h, w, targets, il, k, bias=b, method=method, backend=backend)
        assert_selection_consistent(sel, got, eligible_of(targets, got, v), k, f"{what}/k={k}")
        assert_selection_matches_reference(sel, rk.select(logits, targets, il, k, method=method, backend="reference"),
                                           truth, tol, f"{what}/k={k}")


def test_tiled_forward_special_values_and_sequences(backend, monkeypatch):
    """NaN / +inf / -inf in one vocabulary slice only, a custom ignore_index, ties, targets in the
    first and the last slice, [B, T, D] inputs and sequence selection: as on the logits."""
    _tiled_backend(backend)
    bsz, t, v = 4, 9, 60
    h, w, b, targets, il = exact_inputs((bsz, t), v, torch.float32, seed=7)
    used = _force_tiles(monkeypatch, 5, 13, torch.float32)
    targets[1, :2] = 7  # ignore_index below
    targets[0, 0], targets[0, 1] = 0, v - 1
    h[2, 4] = h[0, 5]  # a tie with a lower flat row
    targets[2, 4], il[2, 4] = targets[0, 5], il[0, 5]
    h[3, 2, 4] = math.nan  # one NaN row
    b[40] = -math.inf  # an impossible class in the fourth slice
    targets[targets == 40] = 41
    b2, b3 = b.clone(), b.clone()
    b2[50] = math.inf  # +inf in the last slice only
    b3[20] = math.nan  # NaN in the second slice only
    for bias in (b, b2, b3):
        logits = materialise(h, w, bias)
        for method in rk.METHODS:
            got = rk.linear_score(h, w, targets, il, bias=bias, method=method, ignore_index=7, backend=backend)
            truth = truth_scores(logits, targets, il, method, ignore_index=7)
            eager = rk.score(logits, targets, il, method=method, ignore_index=7, backend="reference").double()
            assert_accurate(got, eager, truth, f"tiles/{method}")
            assert_same_nonfinite(got.view(-1), truth.view(-1), f"tiles/{method}")
            sel = rk.linear_select(h, w, targets, il, bsz * t, bias=bias, method=method, ignore_index=7,
                                   backend=backend)
            assert_selection_consistent(sel, got.view(-1), eligible_of(targets.view(-1), got.view(-1), v, ignore_index=7),
                                        bsz * t, f"tiles/{method}")
        seq = rk.linear_select_sequences(h, w, targets, il, bsz, bias=bias, ignore_index=7, backend=backend)
        want = rk.select_sequences(logits, targets, il, bsz, ignore_index=7, backend="reference")
        assert torch.equal(seq.indices, want.indices) and torch.equal(seq.valid, want.valid)
    assert used and all(plan == (5, 13) for plan in used)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_tiled_forward_loss_and_gradients(backend, dtype, reduction, monkeypatch):
    _tiled_backend(backend)
    h, w, b, targets, il = _loss_case(dtype, v=301)
    used = _force_tiles(monkeypatch, 16, 40, dtype)
    _compare_loss(h, w, b, targets, il, 0.3, reduction, backend, None, f"tiles/{dtype}/{reduction}")
    assert used == [(16, 40)]


def test_partial_rows_kernel_against_torch_partials(backend):
    """The kernel's folded partials of consecutive slices equal vocab_parallel's torch partials
    of each slice merged: same scores after finalisation, every method; bad input is refused."""
    _tiled_backend(backend)
    from rho_kernels import vocab_parallel as vp
    g = torch.Generator().manual_seed(8)
    n, v = 23, 157
    for dtype in DTYPES + [torch.float64]:
        z = (torch.randn(n, v, generator=g) * 4).to(dtype)
        z[3, 100] = math.nan
        z[4] = -math.inf
        z[5, 17] = math.inf
        targets = torch.randint(0, v, (n,), generator=g)
        targets[6] = -100
        il = torch.rand(n, generator=g)
        for method in ("reducible", "loss", "gradnorm", "entropy"):
            mid = METHOD_IDS[method]
            part, torch_parts = None, []
            for v0, v1 in ((0, 40), (40, 41), (41, 157)):
                zs = z[:, v0:v1]
                part = backends.get("cpu").partial_rows(zs.t().contiguous().t() if v0 == 41 else zs, targets, part,
                                                        v0, mid, -100)
                torch_parts.append(vp.local_stats(zs, targets, v0, mid, -100))
            got = vp.merge_and_finalize(part[None], targets, il, mid, -100)
            want = vp.merge_and_finalize(torch.stack(torch_parts), targets, il, mid, -100)
            truth = truth_scores(z, targets, il, method)
            eager = rk.score(z, targets, il, method=method, backend="reference").double()
            assert_accurate(got.score, eager, truth, f"partial_rows/{dtype}/{method}")
            assert torch.equal(got.eligible, want.eligible)
            assert torch.allclose(got.lse, want.lse, rtol=1e-5, equal_nan=True), f"{dtype}/{method}"
    z = torch.zeros(4, 5)
    t = torch.zeros(4, dtype=torch.long)
    with pytest.raises(RuntimeError, match=r"partials must be a contiguous Float \[4, 8\] CPU tensor, got Float \[4, 6\]"):
        backends.get("cpu").partial_rows(z, t, torch.zeros(4, 6), 0, 0, -100)
    with pytest.raises(RuntimeError, match="vocab_start must be >= 0, got -1"):
        backends.get("cpu").partial_rows(z, t, None, -1, 0, -100)
    with pytest.raises(RuntimeError, match=r"takes \[n, V_slice\] logits"):
        backends.get("cpu").partial_rows(z[None], t, None, 0, 0, -100)
    torch.library.opcheck(torch.ops.rho_kernels.partial_rows.default, (z.normal_(), t, None, 0, 1, -100))
    torch.library.opcheck(torch.ops.rho_kernels.partial_rows.default,
                          (z, t, torch.ops.rho_kernels.partial_rows(z, t, None, 5, 3, -100), 0, 3, -100))


def test_tiled_forward_under_torch_compile(monkeypatch):
    reason = backends.get("cpu").partials_unavailable_reason(torch.device("cpu"))
    if reason is not None or DEVICE.type != "cpu":
        pytest.skip(reason or "cpu tensors only")
    h, w, b, targets, il = exact_inputs((30,), 70, torch.float32, seed=9)
    used = _force_tiles(monkeypatch, 8, 16, torch.float32)
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="eager")
    def f(h, w, b):
        return (rk.linear_score(h, w, targets, il, bias=b, backend="cpu"),
                rk.linear_select(h, w, targets, il, 6, bias=b, backend="cpu").indices)

    s, idx = f(h, w, b)
    assert torch.allclose(s, rk.linear_score(h, w, targets, il, bias=b, chunk_size=30, backend="cpu"), rtol=1e-6,
                          atol=1e-6)
    assert torch.equal(idx, rk.linear_select(h, w, targets, il, 6, bias=b, chunk_size=30, backend="cpu").indices)
    assert used


# --------------------------------------------------------------------------- divergence (NaN) rule


@pytest.mark.parametrize("tiled", [False, True], ids=["chunks", "tiles"])
def test_divergence_makes_the_loss_nan(backend, tiled, monkeypatch):
    """NaN in the hidden state of a counted token, or in the head, makes the loss NaN (as
    F.cross_entropy on the materialised logits); all reference losses NaN: NaN and one warning."""
    if tiled:
        _tiled_backend(backend)
        used = _force_tiles(monkeypatch, 8, 16, torch.float32)
    monkeypatch.setattr(tokens, "_STARVED_WARNED", False)
    h, w, b, targets, il = _loss_case(torch.float32, lead=(2, 11), v=40)
    chunk = None if tiled else 4
    run = lambda h, w, il, ratio=0.5, red="mean": rk.selective_linear_cross_entropy(  # noqa: E731
        h, w, targets, il, ratio, bias=b, reduction=red, chunk_size=chunk, backend=backend)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="selective cross-entropy")
        assert torch.isfinite(run(h, w, il))
        h2 = h.clone()
        h2[0, 0, 3] = math.nan  # a counted token (targets' flat 0 is not ignored)
        assert torch.isnan(F.cross_entropy(materialise(h2, w, b).reshape(-1, 40), targets.reshape(-1)))
        for ratio in (1.0, 0.3):
            assert torch.isnan(run(h2, w, il, ratio)) and torch.isnan(run(h2, w, il, ratio, "sum"))
            per_token = run(h2, w, il, ratio, "none")
            assert torch.isnan(per_token[0, 0]) and int(torch.isnan(per_token).sum()) == 1
        w2 = w.clone()
        w2[7, 0] = math.inf  # a diverged head: every row
        assert torch.isnan(run(h, w2, il, 1.0))
        il2 = il.clone()
        il2[0, 0] = math.nan  # NaN reference loss: that token is left out, the loss stays finite
        assert torch.isfinite(run(h, w, il2, 1.0))
    with pytest.warns(RuntimeWarning, match=r"none of the 19 counted tokens .*19 have a NaN reference loss"):
        assert torch.isnan(run(h, w, torch.full_like(il, math.nan)))
    assert used if tiled else True, "the tiled forward did not run"


# --------------------------------------------------------------------------- soft-cap, scale, smoothing, z-loss, weights

LOSS_OPTIONS = dict(softcap=1.5, logit_scale=1.7, label_smoothing=0.1, z_loss=1e-3)


@pytest.mark.parametrize("path", ["chunks", "tiles", "vocab_slices"])
def test_loss_options_match_the_materialised_formula(backend, path, monkeypatch):
    """softcap / logit_scale / label_smoothing / z_loss / weights from hidden states: loss and the
    gradients of hidden, weight and bias against the float64 formula on the materialised logits,
    through each forward / backward layout (row chunks, the cpu backend's tiles, the half-precision
    backward by vocabulary slice)."""
    from test_selective import _token_weights, definition_loss

    dtype, chunk, v = torch.float32, 5, 60
    if path == "tiles":
        _tiled_backend(backend)
        used = _force_tiles(monkeypatch, 8, 16, dtype)
        chunk = None
    if path == "vocab_slices":
        if backend.partition("-")[0] not in ("reference", "cpu"):
            pytest.skip("the sliced backward is backend-independent torch; two backends suffice")
        dtype = torch.bfloat16
        sliced = []
        real = linear._vocab_slices
        monkeypatch.setattr(linear, "_vocab_slices", lambda *a: sliced.append(1) or real(*a))
    h, w, b, targets, il = _loss_case(dtype, lead=(2, 13), v=v)
    h = h * 4  # |z| up to ~40: the cap saturates
    weights = _token_weights(targets.shape)
    for ratio, reduction in ((0.5, "mean"), (1.0, "sum"), (0.3, "none")):
        what = f"{backend}/{path}/{ratio}/{reduction}"
        got_in, want_in = _leaves(h, w, b), _leaves(h.double(), w.double(), b.double())
        got = rk.selective_linear_cross_entropy(got_in[0], got_in[1], targets, il, ratio, bias=got_in[2],
                                                reduction=reduction, chunk_size=chunk, backend=backend,
                                                weights=weights, **LOSS_OPTIONS)
        want = definition_loss(materialise(*want_in), targets, il, ratio, weights=weights, reduction=reduction,
                               **LOSS_OPTIONS)
        tol = 2e-5 if dtype == torch.float32 else 2e-2
        assert torch.allclose(got.double(), want, rtol=tol, atol=tol), f"{what}: {got} vs {want}"
        up = torch.rand(got.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(DEVICE)
        grads = torch.autograd.grad((got * up.to(got.dtype)).sum(), got_in)
        wants = torch.autograd.grad((want * up).sum(), want_in)
        for name, gx, gw in zip(("hidden", "weight", "bias"), grads, wants):
            err = (gx.double() - gw).abs().max().item()
            assert err <= tol * max(1.0, gw.abs().max().item()), f"{what}/{name}: grad error {err:.3g}"
    if path == "tiles":
        assert used
    if path == "vocab_slices":
        assert sliced


def test_linear_selection_with_a_transform(backend):
    """linear_score / linear_select / linear_select_sequences with softcap / logit_scale = the
    logits ops with the same transform on the materialised logits, and the float64 formula."""
    from test_selective import transformed

    h, w, b, targets, il = exact_inputs((3, 8), 50, torch.float32, seed=5)
    logits = materialise(h, w, b)
    slow = is_slow_backend(backend)  # the Triton interpreter: one case
    for softcap, scale in ((3.0, 2.5),) if slow else ((2.0, 1.0), (None, 0.3), (3.0, 2.5)):
        kw = dict(softcap=softcap, logit_scale=scale)
        for method in ("reducible",) if slow else ("reducible", "loss", "entropy"):
            got = rk.linear_score(h, w, targets, il, bias=b, method=method, chunk_size=7, backend=backend, **kw)
            truth = truth_scores(transformed(logits, softcap, scale), targets, il, method)
            eager = rk.score(transformed(logits, softcap, scale).float(), targets, il, method=method,
                             backend="reference").double()
            assert_accurate(got, eager, truth, f"{backend}/{method}/{kw}")
            sel = rk.linear_select(h, w, targets, il, 9, bias=b, method=method, chunk_size=7, backend=backend, **kw)
            ref = rk.select(logits, targets, il, 9, method=method, backend=backend, **kw)
            assert torch.equal(sel.indices, ref.indices), f"{backend}/{method}/{kw}"
            seq = rk.linear_select_sequences(h, w, targets, il, 2, bias=b, method=method, chunk_size=7,
                                             backend=backend, **kw)
            ref_seq = rk.select_sequences(logits, targets, il, 2, method=method, backend=backend, **kw)
            assert torch.equal(seq.indices, ref_seq.indices), f"{backend}/{method}/{kw}"
    with pytest.raises(ValueError, match="softcap must be > 0"):
        rk.linear_score(h, w, targets, il, softcap=-1.0)
    with pytest.raises(ValueError, match="logit_scale must be non-zero"):
        rk.selective_linear_cross_entropy(h, w, targets, il, 0.5, logit_scale=0.0)

