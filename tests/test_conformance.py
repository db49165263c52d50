"""The conformance suite: every backend against the reference.

Parametrized over backend x method x dtype x irregular shapes, plus 3-D / non-contiguous
inputs, ignore_index, +-inf and NaN, ties, k = 0 / 1 / N, bad input, opcheck and
torch.compile.  Accuracy rule (after flash-attention): a backend's max error against an fp64
reference is at most 2x that of the eager PyTorch reference in the same input dtype, plus a
small absolute floor; non-finite values must match exactly.  Selections must follow the
ordering rule exactly on the backend's own scores and agree with the reference wherever the
true scores are separated by more than the tolerance.
"""

from __future__ import annotations

import functools
import math
import os

import numpy as np
import pytest
import torch

import rho_kernels as rk
from rho_kernels import _contract, reference
from rho_kernels import backends

from conftest import DEVICE, INTERPRETED, is_slow_backend

METHODS = rk.METHODS
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# V not a multiple of any block size; N = 1, 3, 1000 (and 257 for the tile paths).
# (5000, 7) reaches the large-N (multi-stage) top-k paths of the GPU kernels.
SHAPES = [(1, 1), (3, 7), (1000, 7), (3, 1000), (257, 1000), (1, 32001), (3, 32001), (1000, 32001), (5000, 7)]
INTERPRETER_MAX_ELEMENTS = 300_000


def _skip_if_too_big(backend: str, numel: int) -> None:
    if is_slow_backend(backend) and numel > INTERPRETER_MAX_ELEMENTS:
        pytest.skip(f"{numel} logits is too slow for the Triton CPU interpreter (covered on GPU)")


def make_inputs(n: int, v: int, dtype: torch.dtype, seed: int = 0, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed * 1_000_003 + n * 7919 + v)
    logits = (torch.randn(n, v, generator=g) * scale).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    il = torch.rand(n, generator=g) * 2.0
    return logits.to(DEVICE), targets.to(DEVICE), il.to(DEVICE)


@functools.lru_cache(maxsize=None)
def cached_case(n: int, v: int, dtype: torch.dtype, method: str):
    """Inputs, fp64 truth and eager-reference scores, shared by every backend's test."""
    logits, targets, il = make_inputs(n, v, dtype)
    return logits, targets, il, truth_scores(logits, targets, il, method), eager_scores(logits, targets, il, method)


@functools.lru_cache(maxsize=None)
def cached_reference_selection(n: int, v: int, dtype: torch.dtype, method: str, k: int):
    """The reference's selection of cached_case(n, v, dtype, method) (read-only, shared)."""
    logits, targets, il, _, _ = cached_case(n, v, dtype, method)
    return rk.select(logits, targets, il, k, method=method, backend="reference")


def truth_scores(logits, targets, il, method, ignore_index=-100):
    """Scores from the reference computed in float64 (the ground truth)."""
    p = _contract.prepare(logits.double(), targets, il, method, ignore_index)
    return reference.score_rows(p)[0].double()


def eager_scores(logits, targets, il, method, ignore_index=-100):
    return rk.score(logits, targets, il, method=method, ignore_index=ignore_index, backend="reference").double()


def assert_same_nonfinite(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    got, want = got.cpu().double(), want.cpu().double()
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{what}: NaN pattern differs"
    inf_g, inf_w = torch.isinf(got), torch.isinf(want)
    assert torch.equal(inf_g, inf_w), f"{what}: inf pattern differs"
    assert torch.equal(got[inf_g], want[inf_w]), f"{what}: inf signs differ"


def tolerance(eager, truth) -> float:
    finite = torch.isfinite(truth)
    if not bool(finite.any()):
        return 0.0
    err_eager = (eager[finite] - truth[finite]).abs().max().item()
    floor = 1e-5 * max(1.0, truth[finite].abs().max().item())
    return 2.0 * err_eager + floor


def assert_accurate(got, eager, truth, what: str) -> float:
    got, eager, truth = (x.reshape(-1).cpu().double() for x in (got, eager, truth))
    assert_same_nonfinite(got, truth, what)
    assert_same_nonfinite(eager, truth, what + " (eager reference)")
    finite = torch.isfinite(truth)
    tol = tolerance(eager, truth)
    if bool(finite.any()):
        err = (got[finite] - truth[finite]).abs().max().item()
        assert err <= tol, f"{what}: max error {err:.3g} > tolerance {tol:.3g} (2x eager + floor)"
    return tol


def assert_selection_consistent(sel: rk.Selection, own_scores, eligible, k: int, what: str) -> None:
    """The selection is exactly the contract's order applied to the backend's own scores."""
    n = own_scores.numel()
    assert sel.indices.dtype == torch.int64 and sel.scores.dtype == torch.float32 and sel.valid.dtype == torch.bool
    assert sel.indices.shape == (k,) and sel.scores.shape == (k,) and sel.valid.shape == (k,), what
    assert sel.indices.device == own_scores.device, what
    idx = sel.indices.cpu()
    if k:
        assert int(idx.min()) >= 0 and int(idx.max()) < n, f"{what}: index out of range"
    assert idx.unique().numel() == k, f"{what}: duplicate indices"
    flat, elig = own_scores.reshape(-1).cpu(), eligible.reshape(-1).cpu()
    want = reference.order_rows(flat, elig)[:k]
    assert torch.equal(idx, want), f"{what}: order differs from the rule on the backend's own scores"
    got_scores = sel.scores.cpu()
    assert torch.equal(torch.isnan(got_scores), torch.isnan(flat[idx])), what
    same = ~torch.isnan(got_scores)
    assert torch.equal(got_scores[same], flat[idx][same]), f"{what}: Selection.scores != score()[indices]"
    assert torch.equal(sel.valid.cpu(), elig[idx]), f"{what}: valid flags differ"


def assert_selection_matches_reference(sel, ref_sel, truth, tol: float, what: str) -> None:
    """Rank by rank, the backend and the reference pick rows whose true scores agree within tol
    (so index sets are identical wherever scores are separated by more than the tolerance)."""
    assert torch.equal(sel.valid.cpu(), ref_sel.valid.cpu()), f"{what}: valid flags differ from reference"
    t = truth.reshape(-1).cpu()
    a, b = t[sel.indices.cpu()], t[ref_sel.indices.cpu()]
    both_nan = torch.isnan(a) & torch.isnan(b)
    same = (a == b) | both_nan
    close = (a - b).abs() <= tol
    ok = same | close
    assert bool(ok.all()), (
        f"{what}: rank {int((~ok).nonzero()[0, 0])} picks a row whose true score differs from the "
        f"reference's pick by more than {tol:.3g}"
    )


def eligible_of(targets, scores, v, ignore_index=-100):
    t = targets.reshape(-1)
    return (t != ignore_index) & (t >= 0) & (t < v) & ~torch.isnan(scores.reshape(-1))


# --------------------------------------------------------------------------- scores + select


@pytest.mark.parametrize("shape", SHAPES, ids=[f"{n}x{v}" for n, v in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", METHODS)
def test_scores_and_selection(backend, method, dtype, shape):
    n, v = shape
    _skip_if_too_big(backend, n * v)
    logits, targets, il, truth, eager = cached_case(n, v, dtype, method)
    got = rk.score(logits, targets, il, method=method, backend=backend)
    assert got.dtype == torch.float32 and got.shape == targets.shape and got.device == logits.device
    tol = assert_accurate(got, eager, truth, f"{backend}/{method}/{dtype}/{shape}")
    for k in sorted({0, 1, max(1, n // 10), n}):
        sel = rk.select(logits, targets, il, k, method=method, backend=backend)
        what = f"{backend}/{method}/{dtype}/{shape}/k={k}"
        assert_selection_consistent(sel, got, eligible_of(targets, got, v), k, what)
        ref_sel = cached_reference_selection(n, v, dtype, method, k)
        assert_selection_matches_reference(sel, ref_sel, truth, tol, what)


@pytest.mark.parametrize("method", METHODS)
def test_float64_logits(backend, method):
    logits, targets, il = make_inputs(50, 301, torch.float64)
    truth = truth_scores(logits, targets, il, method)
    got = rk.score(logits, targets, il, method=method, backend=backend)
    assert got.dtype == torch.float32
    assert_same_nonfinite(got, truth, method)
    assert torch.allclose(got.double(), truth, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- layouts


def _layouts(dtype):
    """(name, logits, targets, il) for 3-D and non-contiguous inputs."""
    g = torch.Generator().manual_seed(1)
    b, t, v = 3, 17, 203
    base = (torch.randn(b, t, v, generator=g) * 2).to(dtype).to(DEVICE)
    tg = torch.randint(0, v, (b, t), generator=g).to(DEVICE)
    il = torch.rand(b, t, generator=g).to(DEVICE)
    wide = (torch.randn(40, v + 37, generator=g) * 2).to(dtype).to(DEVICE)
    tall = (torch.randn(v, 40, generator=g) * 2).to(dtype).to(DEVICE)
    t40 = torch.randint(0, v, (40,), generator=g).to(DEVICE)
    # V > 2048 column-major: the CUDA kernel splits such rows over several column tiles and merges
    tall_long = (torch.randn(4500, 40, generator=g) * 2).to(dtype).to(DEVICE)
    t40_long = torch.randint(0, 4500, (40,), generator=g).to(DEVICE)
    il40 = torch.rand(40, generator=g).to(DEVICE)
    return [
        ("3d", base, tg, il),
        ("3d_transposed_bt", base.transpose(0, 1), tg.transpose(0, 1), il.transpose(0, 1)),
        ("row_stride_padded", wide[:, :v], t40, il40),  # row stride != V
        ("column_stride", tall.t(), t40, il40),  # V stride != 1
        ("column_stride_long", tall_long.t(), t40_long, il40),
        ("every_other_row", wide[::2, 5 : 5 + v], t40[::2], il40[::2]),
        ("3d_sliced_vocab", torch.cat([base, base], -1)[..., 3 : 3 + v], tg, il),
        ("targets_int32", base, tg.to(torch.int32), il.to(torch.float16)),
        # V the slowest axis, rows adjacent: [B, T, V] with strides (T, 1, B*T)
        ("3d_vocab_major", (torch.randn(v, b, t, generator=g) * 2).to(dtype).to(DEVICE).permute(1, 2, 0), tg, il),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("method", METHODS)
def test_layouts(backend, method, dtype):
    for name, logits, targets, il in _layouts(dtype):
        before = logits.clone()
        truth = truth_scores(logits, targets, il, method)
        eager = eager_scores(logits, targets, il, method)
        got = rk.score(logits, targets, il, method=method, backend=backend)
        assert got.shape == targets.shape, name
        tol = assert_accurate(got, eager, truth, f"{backend}/{method}/{name}")
        k = targets.numel() // 3
        sel = rk.select(logits, targets, il, k, method=method, backend=backend)
        assert_selection_consistent(sel, got, eligible_of(targets, got, logits.shape[-1]), k, name)
        ref_sel = rk.select(logits, targets, il, k, method=method, backend="reference")
        assert_selection_matches_reference(sel, ref_sel, truth, tol, name)
        assert torch.equal(logits, before), f"{name}: logits were written"


# --------------------------------------------------------------------------- ignore_index


@pytest.mark.parametrize("method", METHODS)
def test_ignore_index(backend, method):
    logits, targets, il = make_inputs(300, 97, torch.float32, seed=3)
    g = torch.Generator().manual_seed(5)
    for ignore_index in (-100, 0, 96):
        t = targets.clone()
        t[torch.rand(300, generator=g).to(DEVICE) < 0.3] = ignore_index
        truth = truth_scores(logits, t, il, method, ignore_index)
        got = rk.score(logits, t, il, method=method, ignore_index=ignore_index, backend=backend)
        ignored = (t == ignore_index).cpu()
        assert bool((got.cpu()[ignored] == -math.inf).all()), "ignored rows must score -inf"
        tol = assert_accurate(got, eager_scores(logits, t, il, method, ignore_index), truth, str(ignore_index))
        n_ok = int((~ignored).sum())
        for k in (n_ok, min(300, n_ok + 5), 300):
            sel = rk.select(logits, t, il, k, method=method, ignore_index=ignore_index, backend=backend)
            assert_selection_consistent(sel, got, eligible_of(t, got, 97, ignore_index), k, f"ii={ignore_index}")
            assert int(sel.valid.sum()) == min(k, n_ok)
            ref = rk.select(logits, t, il, k, method=method, ignore_index=ignore_index, backend="reference")
            assert_selection_matches_reference(sel, ref, truth, tol, f"ii={ignore_index} k={k}")
    # Every row ignored: nothing is valid, and the order is by row index.
    t = torch.full_like(targets, -100)
    sel = rk.select(logits, t, il, 10, method=method, backend=backend)
    assert not bool(sel.valid.any())
    assert sel.indices.cpu().tolist() == list(range(10))


# --------------------------------------------------------------------------- special values


def _special_inputs(dtype):
    v = 37
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(12, v, generator=g) * 2
    targets = torch.randint(1, v, (12,), generator=g)
    il = torch.rand(12, generator=g)
    logits[0, 5] = math.inf  # +inf logit elsewhere -> CE +inf? lse=+inf, z_y finite -> +inf
    logits[1, targets[1]] = math.inf  # +inf at the target -> inf - inf = NaN
    logits[2, :] = -math.inf  # all -inf -> NaN
    logits[3, ::2] = -math.inf  # masked vocabulary (impossible classes)
    logits[3, targets[3]] = 1.0
    logits[4, targets[4]] = -math.inf  # impossible target -> CE +inf
    logits[5, 7] = math.nan  # NaN logit -> NaN
    il[6] = math.nan  # never-scored example: NaN IL
    il[7] = math.inf  # IL +inf -> reducible -inf (still eligible)
    il[8] = -math.inf  # IL -inf -> reducible +inf
    logits[9, :] = 0.0  # uniform row
    logits[10, :] = -1e4  # very negative but finite
    logits[10, 0] = 1e4
    return logits.to(dtype).to(DEVICE), targets.to(DEVICE), il.to(DEVICE)


def _nan_inf_rows(v: int, dtype):
    """Rows whose NaN a max that drops NaN (one pass, then another) could miss: a NaN beside
    -inf only, beside +inf, first, last, in the ragged tail, in a late block of a long row, at
    the target; and +inf / all -inf rows without one."""
    g = torch.Generator().manual_seed(v)
    n = 12
    logits = torch.randn(n, v, generator=g) * 2
    targets = torch.randint(0, v, (n,), generator=g)
    targets[8] = v - 1
    logits[0, :] = -math.inf
    logits[0, v // 2] = math.nan  # NaN among -inf only
    logits[1, 0] = math.nan  # first column
    logits[2, v - 1] = math.nan  # last column (the ragged tail where V is not a vector multiple)
    logits[3, (3 * v) // 4] = math.nan  # a late block of a long row
    logits[3, v // 5] = math.inf  # ... next to +inf
    logits[4, v // 3] = math.inf  # +inf, no NaN
    logits[5, :] = -math.inf  # all -inf, no NaN
    logits[6, targets[6]] = math.nan  # NaN at the target
    logits[7, -1] = math.nan
    logits[7, :-1] = -math.inf  # -inf then NaN last
    logits[8, targets[8]] = math.inf  # +inf at the (last) target
    logits[9, 0] = math.inf
    logits[9, v - 1] = math.nan  # +inf first, NaN last
    return logits.to(dtype).to(DEVICE), targets.to(DEVICE), torch.rand(n, generator=g).to(DEVICE)


@pytest.mark.parametrize("v", [2, 10, 37, 100, 600, 5000], ids=lambda v: f"V{v}")
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("method", ["reducible", "loss", "gradnorm", "entropy"])
def test_nan_anywhere_in_a_row(backend, method, dtype, v):
    """NaN anywhere makes the row NaN (ineligible), +inf / all -inf rows follow IEEE: short rows
    (tiles), rows of one block and rows of several blocks."""
    if is_slow_backend(backend) and v > 100:
        pytest.skip("long rows are too slow for the Triton CPU interpreter (covered on GPU)")
    logits, targets, il = _nan_inf_rows(v, dtype)
    truth = truth_scores(logits, targets, il, method)
    got = rk.score(logits, targets, il, method=method, backend=backend)
    assert_accurate(got, eager_scores(logits, targets, il, method), truth, f"{method}/{dtype}/V={v}")
    for r in (0, 1, 2, 3, 6, 7, 9):
        assert math.isnan(got[r].item()), f"row {r}: {got[r].item()} is not NaN"
    sel = rk.select(logits, targets, il, 12, method=method, backend=backend)
    assert_selection_consistent(sel, got, eligible_of(targets, got, v), 12, f"{method}/{dtype}/V={v}")


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("method", ["reducible", "gradnorm", "entropy"])
def test_column_major_many_rows(backend, method, dtype):
    """Column-major logits with rows for several groups of tiles and several column blocks
    (the CPU kernel walks such tiles block by block, taking turns): _nan_inf_rows' special rows
    spread over the tiles, ignored rows, a ragged last tile."""
    n, v = 2125, 130
    _skip_if_too_big(backend, n * v)
    if is_slow_backend(backend) and (method, dtype) != ("reducible", torch.float32):
        pytest.skip("one case is enough for the Triton CPU interpreter (the groups are the CPU kernel's)")
    g = torch.Generator().manual_seed(21)
    logits = torch.randn(n, v, generator=g) * 3
    targets = torch.randint(0, v, (n,), generator=g)
    il = torch.rand(n, generator=g)
    special, special_t, _ = _nan_inf_rows(v, torch.float32)
    rows = torch.linspace(0, n - 1, special.shape[0]).round().long()  # first and last row included
    logits[rows] = special.cpu()
    targets[rows] = special_t.cpu()
    ignored = torch.rand(n, generator=g) < 0.05
    ignored[rows] = False
    targets[ignored] = -100
    logits = logits.to(dtype).t().contiguous().t().to(DEVICE)
    targets, il = targets.to(DEVICE), il.to(DEVICE)
    truth = truth_scores(logits, targets, il, method)
    got = rk.score(logits, targets, il, method=method, backend=backend)
    tol = assert_accurate(got, eager_scores(logits, targets, il, method), truth, f"{method}/{dtype}")
    for r in (0, 1, 2, 3, 6, 7, 9):
        assert math.isnan(got[rows[r]].item()), f"row {int(rows[r])}: {got[rows[r]].item()} is not NaN"
    k = n // 10
    sel = rk.select(logits, targets, il, k, method=method, backend=backend)
    assert_selection_consistent(sel, got, eligible_of(targets, got, v), k, f"{method}/{dtype}")
    ref_sel = rk.select(logits, targets, il, k, method=method, backend="reference")
    assert_selection_matches_reference(sel, ref_sel, truth, tol, f"{method}/{dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", METHODS)
def test_special_values(backend, method, dtype):
    logits, targets, il = _special_inputs(dtype)
    truth = truth_scores(logits, targets, il, method)
    got = rk.score(logits, targets, il, method=method, backend=backend)
    tol = assert_accurate(got, eager_scores(logits, targets, il, method), truth, f"{method}/{dtype}")
    for k in (0, 1, 6, 12):
        sel = rk.select(logits, targets, il, k, method=method, backend=backend)
        assert_selection_consistent(sel, got, eligible_of(targets, got, 37), k, f"k={k}")
        ref = rk.select(logits, targets, il, k, method=method, backend="reference")
        assert_selection_matches_reference(sel, ref, truth, tol, f"k={k}")


def test_special_values_semantics():
    """Pin the documented special-value rules on the reference itself."""
    logits, targets, il = _special_inputs(torch.float32)
    s = {m: rk.score(logits, targets, il, method=m, backend="reference").cpu() for m in METHODS}
    assert s["loss"][0] == math.inf and math.isnan(s["loss"][1]) and math.isnan(s["loss"][2])
    assert math.isfinite(s["loss"][3]) and s["loss"][4] == math.inf and math.isnan(s["loss"][5])
    assert math.isnan(s["reducible"][6]) and s["reducible"][7] == -math.inf and s["reducible"][8] == math.inf
    assert math.isnan(s["irreducible"][6])
    for m in ("gradnorm", "entropy"):
        assert math.isnan(s[m][0]) and math.isnan(s[m][2]) and math.isnan(s[m][5]) and math.isfinite(s[m][3])
    assert abs(s["entropy"][9] - math.log(37)) < 1e-5
    # The masked row behaves like the row restricted to its possible classes.
    row = logits[3][torch.isfinite(logits[3])]
    want = torch.logsumexp(row, 0) - logits[3, targets[3]]
    assert abs(s["loss"][3] - want.item()) < 1e-5


# Finite rows whose logits span more than the float max: z - m overflows to -inf for the small
# logits (their e = 0 and they contribute 0 to every sum, also to the entropy's e * (z - m)),
# and lse's rounding absorbs log d.  Expected scores worked by hand from the softmax relative
# to the row max (p below).
EXTREME_ROWS = [  # (logits, target, il)
    ([3e38, -3e38, 0.0, 1.0], 2, 0.5),  # p = (1, 0, 0, 0)
    ([3.4e38, 3.4e38, -3.4e38, 0.0], 3, 0.25),  # p = (1/2, 1/2, 0, 0)
    ([-3e38] * 4, 1, 1.0),  # p = (1/4, 1/4, 1/4, 1/4)
    ([-3e38, 1.0, 0.0, 3e38], 3, 2.0),  # p = (0, 0, 0, 1); the max comes last (a rescale)
]
EXTREME_EXPECTED = {
    "entropy": [0.0, math.log(2), math.log(4), 0.0],
    # ||p - onehot(y)||
    "gradnorm": [math.sqrt(1 + 1), math.sqrt(0.25 + 0.25 + 1), math.sqrt(3 / 16 + 9 / 16), 0.0],
    # CE = lse - z_y.  Row 2: the exact CE is log 4, but lse = -3e38 + log 4 rounds to -3e38 in
    # fp32 and fp64 alike, so CE = lse - z_y gives 0 on every backend: compared with the truth.
    "loss": [3e38 - 0.0, 3.4e38 - 0.0, None, 3e38 - 3e38],
}
EXTREME_EXPECTED["reducible"] = [
    None if ce is None else ce - il for ce, (_, _, il) in zip(EXTREME_EXPECTED["loss"], EXTREME_ROWS)]
SPREAD_V = 4 * 4096 + 1  # spread: the four logits in different blocks / chunks / splits
SPREAD_COLS = [0, 4100, 8200, SPREAD_V - 1]


def _extreme_inputs(dtype, spread: bool):
    rows = torch.tensor([r for r, _, _ in EXTREME_ROWS], dtype=torch.float64)
    targets = torch.tensor([t for _, t, _ in EXTREME_ROWS])
    il = torch.tensor([i for _, _, i in EXTREME_ROWS])
    if spread:  # the other columns are -inf: impossible classes, same scores
        wide = torch.full((len(EXTREME_ROWS), SPREAD_V), -math.inf, dtype=torch.float64)
        wide[:, SPREAD_COLS] = rows
        rows, targets = wide, torch.tensor(SPREAD_COLS)[targets]
    return rows.to(dtype).to(DEVICE), targets.to(DEVICE), il.to(DEVICE)


@pytest.mark.parametrize("spread", [False, True], ids=["v4", "spread"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("method", ["reducible", "loss", "gradnorm", "entropy"])
def test_rows_spanning_more_than_float_max(backend, method, dtype, spread):
    logits, targets, il = _extreme_inputs(dtype, spread)
    truth = truth_scores(logits, targets, il, method).cpu()
    got = rk.score(logits, targets, il, method=method, backend=backend).cpu().double()
    for i, want in enumerate(EXTREME_EXPECTED[method]):
        want = truth[i].item() if want is None else want
        # the reference (in fp64, the suite's truth) is the definition: it must be right too
        assert truth[i].item() == pytest.approx(want, rel=1e-6, abs=1e-6), f"truth, row {i}"
        assert got[i].item() == pytest.approx(want, rel=1e-6, abs=1e-6), f"{backend}, row {i}: {got[i]}"
    sel = rk.select(logits, targets, il, 4, method=method, backend=backend)
    assert_selection_consistent(sel, got.float(), eligible_of(targets, got, logits.shape[-1]), 4, method)


# The lse of these rows is ~3e38, where lse = m + log d rounds log d away: CE must be taken as
# (m - z_y) + log d.  (logits, target, exact CE); the spread variant puts the row on the row path.
CE_AT_FLOAT_MAX_ROWS = [
    ([3.4e38, 3.4e38, -math.inf, 0.0], 0, math.log(2)),
    ([3e38, 3e38, 3e38, -3e38], 2, math.log(3)),
    ([-3e38] * 4, 1, math.log(4)),
    ([-math.inf, 3e38, 1.0, 3e38], 3, math.log(2)),
]


@pytest.mark.parametrize("spread", [False, True], ids=["v4", "spread"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("method", ["reducible", "loss"])
def test_ce_keeps_log_d_at_float_max(backend, method, dtype, spread):
    rows = torch.tensor([r for r, _, _ in CE_AT_FLOAT_MAX_ROWS], dtype=torch.float64)
    targets = torch.tensor([t for _, t, _ in CE_AT_FLOAT_MAX_ROWS])
    il = torch.tensor([0.25, 0.5, 1.0, 0.0])
    if spread:
        wide = torch.full((len(CE_AT_FLOAT_MAX_ROWS), SPREAD_V), -math.inf, dtype=torch.float64)
        wide[:, SPREAD_COLS] = rows
        rows, targets = wide, torch.tensor(SPREAD_COLS)[targets]
    logits = rows.to(dtype).to(DEVICE)
    targets, il = targets.to(DEVICE), il.to(DEVICE)
    got = rk.score(logits, targets, il, method=method, backend=backend).cpu().double()
    truth = truth_scores(logits, targets, il, method).cpu()
    for i, (_, _, ce) in enumerate(CE_AT_FLOAT_MAX_ROWS):
        want = ce - il[i].item() if method == "reducible" else ce
        assert truth[i].item() == pytest.approx(want, rel=1e-6, abs=1e-6), f"truth, row {i}"
        assert got[i].item() == pytest.approx(want, rel=1e-6, abs=1e-6), f"{backend}, row {i}: {got[i]}"


# Short rows are scored a tile of rows at a time (one row per SIMD lane; 8 to 64 rows per tile
# on the CPU, gathered by hardware where rows are evenly spaced) and finalised a vector of rows at
# a time: every V up to past the CPU's column block, row counts that end tiles anywhere, special
# rows and ignored targets in the middle of a tile, and row strides other than V.
TILE_VS = list(range(1, 71))  # contiguous rows
TILE_VS_FEW = [1, 2, 3, 10, 16, 33, 64, 65, 70]  # the other layouts
TILE_VS_SLOW = [1, 10, 65]  # the Triton interpreter: a few, contiguous layout only


def _tile_case(n: int, v: int, dtype, layout: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, v + 3, generator=g) * 3
    targets = torch.randint(0, v, (n,), generator=g)
    il = torch.rand(n, generator=g) * 2
    for r in range(5, n, 29):  # specials spread over the tiles, different lanes
        kind = (r // 29) % 5
        if kind == 0:
            base[r, (r * 7) % v] = math.nan
        elif kind == 1:
            base[r, :v] = -math.inf
        elif kind == 2:
            base[r, (r * 3) % v] = math.inf
        elif kind == 3:
            targets[r] = -100
        else:
            base[r, :v] = -math.inf
            base[r, (r * 5) % v] = 2.0  # one possible class
    targets[n - 1] = -100
    if layout == "padded":  # rows V + 3 apart
        logits = base.to(dtype)[:, :v]
    elif layout == "btv":  # [B, T, V], evenly spaced rows
        logits = base[:, :v].contiguous().to(dtype).view(1, n, v)
        targets, il = targets.view(1, n), il.view(1, n)
    else:
        logits = base[:, :v].contiguous().to(dtype)
    return logits.to(DEVICE), targets.to(DEVICE), il.to(DEVICE)


@functools.lru_cache(maxsize=None)
def _tile_expected(n: int, v: int, dtype, layout: str, method: str):
    """Inputs, fp64 truth and eager-reference scores, shared by every backend's test."""
    logits, targets, il = _tile_case(n, v, dtype, layout, seed=v)
    return logits, targets, il, truth_scores(logits, targets, il, method), eager_scores(logits, targets, il, method)


@pytest.mark.parametrize("layout", ["contiguous", "padded", "btv"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", ["reducible", "loss", "gradnorm", "entropy"])
def test_short_rows_every_v(backend, method, dtype, layout):
    if is_slow_backend(backend) and layout != "contiguous":
        pytest.skip("the Triton interpreter runs the contiguous layout only (its strides are covered by test_layouts)")
    vs = TILE_VS_SLOW if is_slow_backend(backend) else TILE_VS if layout == "contiguous" else TILE_VS_FEW
    for v in vs:
        n = 61 + 3 * v if v != 10 else 128  # 128: every tile full
        logits, targets, il, truth, eager = _tile_expected(n, v, dtype, layout, method)
        got = rk.score(logits, targets, il, method=method, backend=backend)
        assert_accurate(got, eager, truth, f"V={v} N={n}")
        if v % 9 == 1:
            k = n // 3
            sel = rk.select(logits, targets, il, k, method=method, backend=backend)
            flat = got.reshape(-1)
            assert_selection_consistent(sel, flat, eligible_of(targets, flat, v), k, f"V={v} k={k}")


# --------------------------------------------------------------------------- ties


@pytest.mark.parametrize("method", METHODS)
def test_ties_break_to_lower_index(backend, method):
    n, v = 200, 64
    g = torch.Generator().manual_seed(2)
    # Constant rows give bit-identical scores whatever the summation order (sums of equal
    # powers of two), and IL from a tiny set (with -0.0) makes reducible/irreducible tie too.
    consts = torch.tensor([0.0, 1.0, -2.0])[torch.randint(0, 3, (n,), generator=g)]
    logits = consts[:, None].expand(n, v).contiguous().to(DEVICE)
    targets = torch.randint(0, v, (n,), generator=g).to(DEVICE)
    il = torch.tensor([0.0, -0.0, 1.0, 0.5])[torch.randint(0, 4, (n,), generator=g)].to(DEVICE)
    got = rk.score(logits, targets, il, method=method, backend=backend)
    ref = rk.score(logits, targets, il, method=method, backend="reference")
    assert got.cpu().unique().numel() <= 8, "tied rows must score identically"
    for k in (1, 17, n // 2, n):
        sel = rk.select(logits, targets, il, k, method=method, backend=backend)
        ref_sel = rk.select(logits, targets, il, k, method=method, backend="reference")
        assert_selection_consistent(sel, got, eligible_of(targets, got, v), k, f"k={k}")
        if torch.equal(got.cpu(), ref.cpu()):
            assert torch.equal(sel.indices.cpu(), ref_sel.indices.cpu()), f"k={k}: tie order differs"


def test_negative_zero_ties_positive_zero(backend):
    il = torch.tensor([0.0, -0.0, 0.0, -0.0, 1.0]).to(DEVICE)
    logits = torch.zeros(5, 3).to(DEVICE)
    targets = torch.zeros(5, dtype=torch.long).to(DEVICE)
    sel = rk.select(logits, targets, il, 5, method="irreducible", backend=backend)
    assert sel.indices.cpu().tolist() == [0, 1, 2, 3, 4]


# --------------------------------------------------------------------------- k edge cases


def test_k_edges_and_empty(backend):
    logits, targets, il = make_inputs(5, 9, torch.float32)
    sel = rk.select(logits, targets, il, 0, backend=backend)
    assert sel.indices.shape == (0,) and sel.indices.dtype == torch.int64
    assert sel.scores.dtype == torch.float32 and sel.valid.dtype == torch.bool
    empty = rk.select(logits[:0], targets[:0], il[:0], 0, backend=backend)
    assert empty.indices.numel() == 0
    assert rk.score(logits[:0], targets[:0], il[:0], backend=backend).shape == (0,)
    sel = rk.select(logits, targets, il, 5, backend=backend)
    assert sorted(sel.indices.cpu().tolist()) == list(range(5))
    b3 = make_inputs(6, 9, torch.float32)[0].view(2, 3, 9)
    t3 = targets.new_zeros(2, 3)
    assert rk.score(b3, t3, il.new_zeros(2, 3), backend=backend).shape == (2, 3)


# --------------------------------------------------------------------------- bad input


def _bad_calls():
    x = torch.randn(4, 5, device=DEVICE)
    t = torch.tensor([0, 1, 2, 3], device=DEVICE)
    il = torch.rand(4, device=DEVICE)
    meta_t = torch.zeros(4, dtype=torch.long, device="meta")
    return [
        ("rank 1", lambda: rk.score(x[0], t[0], il[0]), ValueError, "rank 1"),
        ("rank 4", lambda: rk.score(x.view(1, 1, 4, 5), t.view(1, 1, 4), il.view(1, 1, 4)), ValueError, "(1, 1, 4, 5)"),
        ("shape mismatch", lambda: rk.score(x, t[:3], il[:3]), ValueError, "(3,)"),
        ("IL shape", lambda: rk.score(x, t, il[:2]), ValueError, "(2,)"),
        ("int logits", lambda: rk.score(x.long(), t, il), TypeError, "torch.int64"),
        ("float targets", lambda: rk.score(x, t.float(), il), TypeError, "torch.float32"),
        ("bool targets", lambda: rk.score(x, t.bool(), il), TypeError, "torch.bool"),
        ("int IL", lambda: rk.score(x, t, t), TypeError, "torch.int64"),
        ("k negative", lambda: rk.select(x, t, il, -1), ValueError, "k = -1"),
        ("k too large", lambda: rk.select(x, t, il, 5), ValueError, "k = 5"),
        ("k float", lambda: rk.select(x, t, il, 2.0), TypeError, "2.0"),
        ("k bool", lambda: rk.select(x, t, il, True), TypeError, "True"),
        ("k bool tensor", lambda: rk.select(x, t, il, torch.tensor(True)), TypeError, "bool"),
        ("k float tensor", lambda: rk.select(x, t, il, torch.tensor(2.0)), TypeError, "2."),
        ("k 1-dim tensor", lambda: rk.select(x, t, il, torch.tensor([2])), TypeError, "(1,)"),
        ("k numpy too large", lambda: rk.select(x, t, il, np.int64(5)), ValueError, "k = 5"),
        ("unknown method", lambda: rk.score(x, t, il, method="rho"), ValueError, "'rho'"),
        ("unknown backend", lambda: rk.score(x, t, il, backend="tpu"), ValueError, "'tpu'"),
        ("IL missing", lambda: rk.score(x, t, None), ValueError, "irreducible_loss"),
        ("IL missing irreducible", lambda: rk.select(x, t, None, 1, method="irreducible"), ValueError, "'irreducible'"),
        ("devices differ", lambda: rk.score(x, meta_t, il), ValueError, "meta"),
        ("no classes", lambda: rk.score(x[:, :0], t, il), ValueError, "V = 0"),
        ("not a tensor", lambda: rk.score(x.tolist(), t, il), TypeError, "list"),
        ("ignore_index float", lambda: rk.score(x, t, il, ignore_index=1.5), TypeError, "1.5"),
        ("k missing", lambda: rk.select(x, t, il), TypeError, "'k'"),
        ("k in the IL slot", lambda: rk.select(x, t, 2, method="loss"), TypeError, "k=2"),
        ("np k in the IL slot", lambda: rk.select(x, t, np.int64(2), method="loss"), TypeError, "pass the count by keyword"),
        ("targets None, not entropy", lambda: rk.score(x, None, method="loss"), TypeError, "'entropy'"),
        ("softcap 0", lambda: rk.score(x, t, il, softcap=0.0), ValueError, "softcap must be > 0"),
        ("softcap negative", lambda: rk.select(x, t, il, 1, softcap=-2.0), ValueError, "-2.0"),
        ("softcap inf", lambda: rk.score(x, t, il, softcap=math.inf), ValueError, "inf"),
        ("softcap nan", lambda: rk.score(x, t, il, softcap=math.nan), ValueError, "nan"),
        ("softcap str", lambda: rk.score(x, t, il, softcap="30"), TypeError, "'30'"),
        ("softcap bool", lambda: rk.score(x, t, il, softcap=True), TypeError, "True"),
        ("logit_scale 0", lambda: rk.score(x, t, il, logit_scale=0), ValueError, "non-zero"),
        ("logit_scale inf", lambda: rk.select(x, t, il, 1, logit_scale=-math.inf), ValueError, "-inf"),
        ("logit_scale tensor", lambda: rk.score(x, t, il, logit_scale=torch.tensor(2.0)), TypeError, "Tensor"),
    ]


def test_optional_il_and_label_free_targets(backend):
    """The IL argument may be omitted where the method reads none (k by keyword), and entropy
    takes targets=None (no row masked)."""
    logits, targets, il = make_inputs(12, 9, torch.float32)
    for method in ("loss", "gradnorm", "entropy"):
        want = rk.select(logits, targets, None, 4, method=method, backend=backend)
        got = rk.select(logits, targets, k=4, method=method, backend=backend)
        assert torch.equal(got.indices, want.indices) and torch.equal(got.scores, want.scores), method
    free = rk.score(logits, method="entropy", backend=backend)
    assert torch.equal(free, rk.score(logits, targets, method="entropy", backend=backend))
    for ignore_index in (0, -100):  # no row is masked, whatever ignore_index says
        sel = rk.select(logits, None, k=12, method="entropy", ignore_index=ignore_index, backend=backend)
        assert bool(sel.valid.all()) and torch.equal(sel.scores, free[sel.indices])


def test_k_accepts_integer_like_values(backend):
    logits, targets, il = make_inputs(12, 9, torch.float32)
    want = rk.select(logits, targets, il, 4, backend=backend)
    for k in (np.int64(4), np.int32(4), np.uint8(4), torch.tensor(4), torch.tensor(4, dtype=torch.int32)):
        got = rk.select(logits, targets, il, k, backend=backend)
        assert torch.equal(got.indices, want.indices), type(k)


@pytest.mark.parametrize("method", rk.METHODS)
def test_meta_tensors_give_shapes(method):
    """Shape inference on the meta device: every op returns the right shapes and dtypes."""
    x = torch.empty(2, 5, 7, device="meta")
    y = torch.empty(2, 5, dtype=torch.long, device="meta")
    il = torch.empty(2, 5, device="meta")
    assert rk.score(x, y, il, method=method).shape == (2, 5)
    sel = rk.select(x, y, il, 3, method=method)
    assert [t.shape for t in sel] == [(3,)] * 3 and sel.indices.dtype == torch.int64 and sel.valid.dtype == torch.bool
    assert rk.select_mask(x, y, il, 0.5, method=method).shape == (2, 5)
    assert rk.select_sequences(x, y, il, 1, method=method).indices.shape == (1,)
    assert rk.selective_cross_entropy(x, y, il, 0.5).shape == ()


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input_raises_clear_error(case):
    name, call, exc, needle = _bad_calls()[case]
    with pytest.raises(exc) as info:
        call()
    assert needle in str(info.value), f"{name}: message {str(info.value)!r} does not name {needle!r}"


def test_unavailable_backend_is_a_clear_error():
    x, t, il = torch.randn(4, 5), torch.zeros(4, dtype=torch.long), torch.rand(4)
    unavailable = [b for b in rk.BACKENDS if b not in rk.available_backends("cpu")]
    for name in unavailable:
        with pytest.raises(ValueError, match=name):
            rk.score(x, t, il, backend=name)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the eager range check runs on CPU tensors only")
def test_target_out_of_range_is_named(backend):
    x = torch.randn(4, 5)
    for bad in (5, -1, 1000):
        t = torch.tensor([0, 1, bad, 3])
        with pytest.raises(ValueError, match=rf"target {bad} at flat row 2 is outside \[0, 5\)"):
            rk.select(x, t, torch.rand(4), 2, backend=backend)


def test_target_out_of_range_without_check_is_nan_not_oob(backend):
    """Where the check cannot run (GPU, compile), an out-of-range target scores NaN."""
    x, t, il = make_inputs(6, 5, torch.float32)
    t = t.clone()
    t[1], t[4] = 5, -7
    p = _contract.RowProblem(x, t, il, 0, -100, t.shape, 6, 5)
    score, _ = backends.resolve(backend, x.device).score_rows(p)
    assert torch.isnan(score.cpu()[[1, 4]]).all() and torch.isfinite(score.cpu()[[0, 2, 3, 5]]).all()
    idx, _, valid = backends.resolve(backend, x.device).select_rows(p, 6)
    assert idx.cpu().tolist()[-2:] == [1, 4] and valid.cpu().tolist()[-2:] == [False, False]


@pytest.mark.parametrize("dtype", DTYPES)
def test_score_rows_without_lse(backend, dtype):
    """with_lse=False (what rk.score asks for): the same scores, bit for bit, and an empty lse
    of the lse's dtype -- on the tile and the row paths, every method, an ignored row."""
    impl = backends.resolve(backend, DEVICE)
    for n, v in ((37, 10), (5, 700)):
        x, t, il = make_inputs(n, v, dtype)
        t = t.clone()
        t[1] = -100
        for method in METHODS:
            p = _contract.prepare(x, t, il, method, -100)
            s1, lse1 = impl.score_rows(p)
            s0, lse0 = impl.score_rows(p, with_lse=False)
            what = f"{backend} {dtype} [{n}, {v}] {method}"
            assert lse1.shape == (n,) and lse0.shape == (0,) and lse0.dtype == lse1.dtype, what
            assert lse0.device == lse1.device == x.device, what
            assert torch.equal(s0.isnan(), s1.isnan()), what
            assert torch.equal(s0[~s0.isnan()], s1[~s1.isnan()]), what
            assert bool(torch.isneginf(s0[1])), what


# --------------------------------------------------------------------------- ops, compile


# irreducible's lse is NaN by contract and opcheck's eager-vs-AOT comparison has no equal_nan:
# that one check is left out for it (schema, autograd registration and fake tensors still run).
OPCHECK_ALL = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
OPCHECK_NO_AOT = ("test_schema", "test_autograd_registration", "test_faketensor")


def test_opcheck_extension_ops():
    if DEVICE.type == "cpu" and "cpu" not in rk.available_backends("cpu"):
        pytest.skip("the extension's CPU kernel is not built")
    if DEVICE.type == "cuda" and "cuda" not in rk.available_backends("cuda"):
        pytest.skip("the extension's CUDA kernel is not built")
    for dtype in DTYPES:
        logits, targets, il = make_inputs(33, 70, dtype)
        for method in range(len(METHODS)):
            utils = OPCHECK_NO_AOT if METHODS[method] == "irreducible" else OPCHECK_ALL
            for with_lse in (True, False):
                torch.library.opcheck(
                    torch.ops.rho_kernels.score_rows.default, (logits, targets, il, method, -100, with_lse),
                    test_utils=utils,
                )
            torch.library.opcheck(torch.ops.rho_kernels.select_rows.default, (logits, targets, il, 7, method, -100))
        torch.library.opcheck(torch.ops.rho_kernels.select_rows.default, (logits, targets, None, 7, 1, -100))
    if DEVICE.type == "cpu":  # the transform's arguments of the CPU-only ops
        logits, targets, _ = make_inputs(9, 70, torch.bfloat16)
        lse, scale = torch.rand(9) + 5, torch.randn(9)
        for args in ((30.0, 1.0, 0.0, 0.0), (0.5, -2.0, 0.1, 1e-3), (0.0, 0.25, 0.0, 1e-4)):
            torch.library.opcheck(torch.ops.rho_kernels.ce_grad_rows.default, (logits, targets, lse, scale, -100, *args))
            torch.library.opcheck(torch.ops.rho_kernels.partial_rows.default,
                                  (logits.float(), targets, None, 0, 4, -100, *args[:2]))


@pytest.mark.parametrize("method", ["reducible", "entropy"])
def test_torch_compile_fullgraph(backend, method):
    logits, targets, il = make_inputs(64, 50, torch.float32)

    def fn(logits, targets, il):
        sel = rk.select(logits, targets, il, 8, method=method, backend=backend)
        return sel.indices, sel.scores, sel.valid, rk.score(logits, targets, il, method=method, backend=backend)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(logits, targets, il), fn(logits, targets, il)):
        assert torch.equal(got, want)


# --------------------------------------------------------------------------- gradients
#
# Truth: autograd through the reference's formulas (reference.score_rows, plain torch) in float64.
# Rule as for the scores: a backend's max error is at most 2x that of the same autograd in the
# input dtype ("eager"), plus a small floor.  The IL gradient is exactly -g (0 on masked rows).

GRAD_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
GRAD_SHAPES = [(1, 1), (3, 7), (37, 70), (5, 1000)]


def autograd_reference(logits, targets, il, method, g, ignore_index=-100, dtype=None):
    """d(sum g * score)/d(logits, il) by autograd through reference.score_rows (logits cast to
    ``dtype`` first, e.g. float64 for the truth)."""
    z = logits.detach().to(dtype or logits.dtype).requires_grad_()
    l = il.detach().double().requires_grad_()
    p = _contract.prepare(z, targets, l, method, ignore_index)
    score = reference.score_rows(p)[0]
    gz, gl = torch.autograd.grad(score, (z, l), g.reshape(-1), allow_unused=True)
    gz = torch.zeros_like(z) if gz is None else gz
    gl = torch.zeros_like(l) if gl is None else gl
    return gz, gl


def backend_grads(logits, targets, il, method, g, backend, ignore_index=-100):
    z = logits.detach().clone().requires_grad_()
    l = il.detach().clone().requires_grad_()
    score = rk.score(z, targets, l, method=method, ignore_index=ignore_index, backend=backend)
    assert score.requires_grad
    gz, gl = torch.autograd.grad(score, (z, l), g, allow_unused=True)
    return (torch.zeros_like(z) if gz is None else gz), (torch.zeros_like(l) if gl is None else gl)


def assert_grads_accurate(got, eager, truth, what):
    dtype = got.dtype if got.dtype.is_floating_point else torch.float32
    got, eager, truth = (x.detach().cpu().double() for x in (got, eager, truth))
    assert torch.isfinite(got).all(), f"{what}: non-finite gradient"
    err_eager = (eager - truth).abs().max().item() if truth.numel() else 0.0
    scale = max(1.0, truth.abs().max().item()) if truth.numel() else 1.0
    # floor: one ulp of the gradient's dtype (the Triton interpreter truncates where torch rounds
    # to nearest) plus float32 accumulation.
    tol = 2.0 * err_eager + (torch.finfo(dtype).eps + 4 * torch.finfo(torch.float32).eps) * scale
    err = (got - truth).abs().max().item() if truth.numel() else 0.0
    assert err <= tol, f"{what}: gradient max error {err:.3g} > tolerance {tol:.3g} (2x eager + floor)"


def _grad_case(n, v, dtype, ignored=True, seed=5):
    logits, targets, il = make_inputs(n, v, dtype, seed=seed)
    targets = targets.clone()
    if ignored and n > 1:
        targets[1] = -100  # an ignored row: zero gradient, whatever g says
    g = torch.randn(n, generator=torch.Generator().manual_seed(n + v)).to(DEVICE)
    return logits, targets, il, g


@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=[f"{n}x{v}" for n, v in GRAD_SHAPES])
@pytest.mark.parametrize("dtype", GRAD_DTYPES, ids=str)
@pytest.mark.parametrize("method", METHODS)
def test_score_gradients(backend, method, dtype, shape):
    n, v = shape
    _skip_if_too_big(backend, n * v * 20)
    logits, targets, il, g = _grad_case(n, v, dtype)
    gz, gl = backend_grads(logits, targets, il, method, g, backend)
    assert gz.dtype == logits.dtype and gz.shape == logits.shape and gl.shape == il.shape
    tz, tl = autograd_reference(logits, targets, il, method, g, dtype=torch.float64)
    ez, _ = autograd_reference(logits, targets, il, method, g)
    assert_grads_accurate(gz, ez, tz, f"{backend}/{method}/{dtype}/{n}x{v} d/dlogits")
    live = targets != -100
    want_il = torch.where(live, -g, 0.0) if method in ("reducible", "irreducible") else torch.zeros_like(g)
    assert torch.equal(gl, want_il), f"{backend}/{method}: d/dIL must be -g on live rows, 0 elsewhere"
    if n > 1:
        assert not bool(gz[1].any()), "ignored row must get an exact zero gradient"
    if method == "irreducible":
        assert not bool(gz.any())


@pytest.mark.parametrize("method", METHODS)
def test_score_gradients_layouts(backend, method):
    """3-D, transposed and strided logits: the gradient has the logits' shape and is right."""
    for name, logits, targets, il in _layouts(torch.float32)[:5]:
        if is_slow_backend(backend) and logits.numel() > 5000:
            logits, targets, il = logits[..., :3, :], targets[..., :3], il[..., :3]
        g = torch.randn(targets.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
        gz, gl = backend_grads(logits, targets, il, method, g, backend)
        tz, _ = autograd_reference(logits, targets, il, method, g, dtype=torch.float64)
        ez, _ = autograd_reference(logits, targets, il, method, g)
        assert gz.shape == logits.shape, name
        assert_grads_accurate(gz, ez, tz, f"{backend}/{method}/{name}")


@pytest.mark.parametrize("method", METHODS)
def test_score_gradcheck_float64(backend, method):
    """Finite differences in float64.  Scores are float32 by contract, so the step is 1e-3
    (float32 rounding / 2e-3 ~ 1e-4 of the score) and the tolerances match."""
    n, v = 4, 6
    logits, targets, il, _ = _grad_case(n, v, torch.float64)
    z = logits.detach().clone().requires_grad_()
    l = il.detach().double().clone().requires_grad_()
    live = targets != -100

    def fn(z, l):  # an ignored row scores -inf: keep it out of the finite differences
        return torch.where(live, rk.score(z, targets, l, method=method, backend=backend), 0.0)

    assert torch.autograd.gradcheck(fn, (z, l), eps=1e-3, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("method", METHODS)
def test_impossible_class_has_zero_gradient(backend, method):
    """A -inf logit changes neither the score nor the other classes' gradients, and gets 0."""
    logits, targets, il, g = _grad_case(6, 9, torch.float32, ignored=False)
    wider = torch.cat([logits, torch.full((6, 1), -math.inf, device=DEVICE)], 1)
    gz, _ = backend_grads(logits, targets, il, method, g, backend)
    gw, _ = backend_grads(wider, targets, il, method, g, backend)
    assert torch.isfinite(gw).all()
    assert not bool(gw[:, -1].any())
    assert torch.allclose(gw[:, :-1], gz, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", METHODS)
def test_selection_scores_are_a_differentiable_gather(backend, method):
    logits, targets, il, _ = _grad_case(40, 30, torch.float32)
    z = logits.clone().requires_grad_()
    l = il.clone().requires_grad_()
    sel = rk.select(z, targets, l, 10, method=method, backend=backend)
    assert torch.equal(sel.indices, rk.select(logits, targets, il, 10, method=method, backend=backend).indices)
    w = torch.arange(1.0, 11.0, device=DEVICE)
    gz, gl = torch.autograd.grad(sel.scores, (z, l), w, allow_unused=True)
    full = torch.zeros(40, device=DEVICE).index_add_(0, sel.indices, w)  # d/dscore of sum(w * scores)
    tz, tl = autograd_reference(logits, targets, il, method, full, dtype=torch.float64)
    ez, _ = autograd_reference(logits, targets, il, method, full)
    assert_grads_accurate(torch.zeros_like(z) if gz is None else gz, ez, tz, f"{backend}/{method} select")
    if method in ("reducible", "irreducible"):
        assert torch.equal(gl, torch.where(targets != -100, -full, 0.0))


def test_no_autograd_fallback_warning_and_model_gets_gradients(backend):
    """Backprop through the op: real gradients on the model, and no "autograd kernel was not
    registered" warning (which means torch silently treats the op as constant)."""
    import warnings

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 11).to(DEVICE)
    x = torch.randn(16, 8, device=DEVICE)
    y = torch.randint(0, 11, (16,), device=DEVICE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (rk.score(model(x), y, method="loss", backend=backend).mean()
         + rk.select(model(x), y, k=4, method="loss", backend=backend).scores.sum()).backward()
    assert not [w for w in caught if "autograd kernel was not registered" in str(w.message)]
    got = model.weight.grad.clone()
    model.weight.grad = None
    ce = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
    (ce.mean() + ce.topk(4).values.sum()).backward()
    assert torch.allclose(got, model.weight.grad, rtol=1e-4, atol=1e-6)


def test_double_backward_is_a_clear_error():
    logits, targets, il, g = _grad_case(5, 7, torch.float64)
    z = logits.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="first-order only"):
        torch.autograd.grad(rk.score(z, targets, il, method="loss"), z, g, create_graph=True)


def test_no_grad_saves_nothing():
    logits, targets, il, _ = _grad_case(5, 7, torch.float32)
    z = logits.clone().requires_grad_()
    with torch.no_grad():
        assert not rk.score(z, targets, il).requires_grad
        assert not rk.select(z, targets, il, 3).scores.requires_grad
    assert not rk.score(logits, targets, il).requires_grad


def test_torch_compile_fullgraph_backward(backend):
    # float32 logits on purpose: with a same-dtype .to() in reference.score_rows, torch 2.11
    # compiled this backward to all-zero gradients (pytorch/pytorch#180642).
    if is_slow_backend(backend):
        pytest.skip("tracing Triton kernels needs a GPU")
    logits, targets, il, g = _grad_case(24, 13, torch.float32)

    def fn(z, l):  # the CE kernel + d/dIL, and the torch gradient of the probability methods
        total = 0.0
        for method in ("reducible", "gradnorm"):
            s = rk.score(z, targets, l, method=method, backend=backend)
            total = total + torch.where(targets != -100, s * g, 0.0).sum()
            total = total + rk.select(z, targets, l, 5, method=method, backend=backend).scores.sum()
        return total

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    grads = []
    for f in (compiled, fn):
        z, l = logits.clone().requires_grad_(), il.clone().requires_grad_()
        f(z, l).backward()
        grads.append((z.grad, l.grad))
    assert torch.allclose(grads[0][0], grads[1][0], rtol=1e-6, atol=1e-7)
    assert torch.equal(grads[0][1], grads[1][1])


# --------------------------------------------------------------------------- GPU-only contract


@pytest.mark.skipif(DEVICE.type != "cuda", reason="host-sync and CUDA-graph checks need a GPU")
def test_no_host_sync_and_cuda_graphs(backend):
    logits, targets, il = make_inputs(2048, 5000, torch.bfloat16)
    rk.select(logits, targets, il, 100, backend=backend)  # warm up (compiles / autotunes)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        rk.select(logits, targets, il, 100, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    if backend == "reference":
        return
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        rk.select(logits, targets, il, 100, backend=backend)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = rk.select(logits, targets, il, 100, backend=backend)
    logits.mul_(-1)
    graph.replay()
    torch.cuda.synchronize()
    want = rk.select(logits, targets, il, 100, backend=backend)
    assert torch.equal(out.indices, want.indices)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="allocation accounting needs a GPU")
def test_no_allocation_proportional_to_logits(backend):
    if backend == "reference":
        pytest.skip("the reference materialises N x V temporaries by design")
    logits, targets, il = make_inputs(4096, 32000, torch.bfloat16)
    rk.select(logits, targets, il, 400, backend=backend)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    rk.select(logits, targets, il, 400, backend=backend)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 0.05 * logits.numel() * logits.element_size(), f"{extra} bytes extra"


def test_expected_backends_present():
    """Where the build or the environment promises a backend, it must not be silently skipped."""
    avail = rk.available_backends(DEVICE)
    if os.environ.get("RHO_KERNELS_REQUIRE_EXT") == "1" and DEVICE.type == "cpu":
        assert "cpu" in avail, f"the CPU kernel must be built here; available: {avail}"
    if INTERPRETED:
        assert "triton" in avail, f"TRITON_INTERPRET=1 but triton is not available: {avail}"
    if DEVICE.type == "cuda":
        assert "triton" in avail, avail


# --------------------------------------------------------------------------- logit transform
#
# z' = softcap * tanh(logit_scale * z / softcap) (or logit_scale * z): every method, score,
# selection and gradient is that of z'.  Truth: the reference in float64, itself checked against
# Hugging Face's formula written out independently (log_softmax of the transformed logits).
# Caps as small as 0.5 saturate tanh for logits ~ 3; scales below and above 1, and negative.

TRANSFORMS = [(None, 0.25), (None, 4.0), (0.5, 1.0), (30.0, 1.0), (2.0, -1.5)]
TRANSFORM_IDS = [f"cap{c}-scale{s}" for c, s in TRANSFORMS]
TRANSFORM_SHAPES = [(37, 7), (5, 1000)]


def hf_logits(logits, softcap, logit_scale):
    """The logits as Hugging Face's models compute them (Gemma 2, Cohere), in float64."""
    z = logits.double() * logit_scale
    if softcap is not None:
        z = z / softcap
        z = torch.tanh(z)
        z = z * softcap
    return z


def hf_scores(logits, targets, il, method, softcap, logit_scale):
    z = hf_logits(logits, softcap, logit_scale)
    logp = torch.log_softmax(z, -1)
    p = logp.exp()
    live = targets != -100
    safe = torch.where(live, targets, 0)
    ce = -logp.gather(1, safe[:, None]).squeeze(1)
    onehot = torch.nn.functional.one_hot(safe, z.shape[-1]).double()
    score = {"reducible": ce - il.double(), "loss": ce, "irreducible": -il.double(),
             "gradnorm": torch.linalg.vector_norm(p - onehot, dim=-1), "entropy": -(p * logp).sum(-1)}[method]
    return torch.where(live, score, -math.inf)


def transformed_truth(logits, targets, il, method, softcap, logit_scale):
    p = _contract.prepare(logits.double(), targets, il, method, -100, softcap=softcap, logit_scale=logit_scale)
    return reference.score_rows(p)[0].double()


def test_check_transform():
    assert _contract.check_transform(None, 1.0) == (0.0, 1.0)
    assert _contract.check_transform(30, np.float32(0.5)) == (30.0, 0.5)
    assert _contract.RowProblem(*([None] * 8)).softcap == 0.0  # fields at the end, with defaults
    assert not _contract.has_transform(0.0, 1.0) and _contract.has_transform(0.0, -1.0)


@pytest.mark.parametrize("transform", TRANSFORMS, ids=TRANSFORM_IDS)
def test_transform_reference_matches_hf(transform):
    softcap, scale = transform
    logits, targets, il = make_inputs(40, 300, torch.float64)
    targets[3] = -100
    for method in METHODS:
        want = hf_scores(logits.cpu(), targets.cpu(), il.cpu(), method, softcap, scale)
        got = transformed_truth(logits, targets, il, method, softcap, scale).cpu()
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=method)  # float32 scores
        eager = rk.score(logits.float(), targets, il, method=method, softcap=softcap, logit_scale=scale,
                         backend="reference").double().cpu()
        torch.testing.assert_close(eager, want, rtol=1e-5, atol=1e-5, msg=method)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("transform", TRANSFORMS, ids=TRANSFORM_IDS)
def test_transformed_scores_and_selection(backend, transform, dtype):
    softcap, scale = transform
    kw = dict(softcap=softcap, logit_scale=scale)
    for n, v in TRANSFORM_SHAPES:
        logits, targets, il = make_inputs(n, v, dtype, seed=3)
        targets[n // 2] = -100
        for method in METHODS:
            what = f"{backend}/{method}/{n}x{v}"
            truth = transformed_truth(logits, targets, il, method, softcap, scale)
            eager = rk.score(logits, targets, il, method=method, backend="reference", **kw).double()
            got = rk.score(logits, targets, il, method=method, backend=backend, **kw)
            tol = assert_accurate(got, eager, truth, what)
            k = n // 3
            sel = rk.select(logits, targets, il, k, method=method, backend=backend, **kw)
            assert_selection_consistent(sel, got, eligible_of(targets, got, v), k, what)
            ref = rk.select(logits, targets, il, k, method=method, backend="reference", **kw)
            assert_selection_matches_reference(sel, ref, truth, tol, what)


def _transform_special_inputs(dtype):
    logits, targets, il = _special_inputs(torch.float32)
    logits = logits.cpu()
    logits[11, :] = 1e30  # saturates every cap: a uniform row of z' = softcap
    logits[11, 3] = -1e30
    return logits.to(dtype).to(DEVICE), targets, il


@pytest.mark.parametrize("transform", [(0.5, 1.0), (None, -1.0), (3.0, 100.0)], ids=["cap0.5", "neg", "cap3-scale100"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_transformed_special_values(backend, transform, dtype):
    """+-inf and NaN logits through the transform: a cap maps +-inf to +-softcap (finite), a
    negative scale swaps +inf and -inf, NaN stays NaN (the rules of rho_math.h, for z')."""
    softcap, scale = transform
    logits, targets, il = _transform_special_inputs(dtype)
    for method in METHODS:
        truth = transformed_truth(logits, targets, il, method, softcap, scale)
        kw = dict(method=method, softcap=softcap, logit_scale=scale)
        got = rk.score(logits, targets, il, backend=backend, **kw)
        assert_accurate(got, rk.score(logits, targets, il, backend="reference", **kw), truth, method)
        sel = rk.select(logits, targets, il, 6, backend=backend, **kw)
        assert_selection_consistent(sel, got, eligible_of(targets, got, 37), 6, method)


def _layout_cases(dtype):
    """Few long rows (the CPU kernel splits them along V), rows strided along V (a transposed
    matrix) and [B, T, V] rows that are not evenly spaced (a slice of T)."""
    g = torch.Generator().manual_seed(8)
    long = (torch.randn(3, 20000, generator=g) * 3).to(dtype)
    transposed = (torch.randn(300, 64, generator=g) * 3).to(dtype).t()
    sliced = (torch.randn(4, 6, 520, generator=g) * 3).to(dtype)[:, :5, :]
    for name, x in (("long", long), ("transposed", transposed), ("sliced", sliced)):
        y = torch.randint(0, x.shape[-1], x.shape[:-1], generator=g)
        y.view(-1)[1] = -100
        il = torch.rand(x.shape[:-1], generator=g)
        yield name, x.to(DEVICE), y.to(DEVICE), il.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("transform", [(30.0, 1.0), (None, 0.25)], ids=["cap30", "scale0.25"])
def test_transformed_layouts(backend, transform, dtype):
    """The transform on every row layout: scores against the float64 truth, selection consistent,
    zsum too (label smoothing's sum)."""
    softcap, scale = transform
    impl = backends.get(backend)
    for name, logits, targets, il in _layout_cases(dtype):
        v = logits.shape[-1]
        for method in ("reducible", "gradnorm", "entropy"):
            what = f"{backend}/{method}/{name}"
            kw = dict(method=method, softcap=softcap, logit_scale=scale)
            truth = transformed_truth(logits.reshape(-1, v), targets.reshape(-1), il.reshape(-1), method, softcap,
                                      scale)
            got = rk.score(logits, targets, il, backend=backend, **kw)
            assert_accurate(got, rk.score(logits, targets, il, backend="reference", **kw), truth, what)
            k = min(5, targets.numel())
            sel = rk.select(logits, targets, il, k, backend=backend, **kw)
            assert_selection_consistent(sel, got.reshape(-1), eligible_of(targets, got, v), k, what)
        p = _contract.prepare(logits, targets, il, "loss", -100, softcap=softcap, logit_scale=scale)
        zsum = impl.score_rows(p, with_zsum=True)[2]
        truth = hf_logits(logits.reshape(-1, v), softcap, scale).sum(-1)
        assert_accurate(zsum, reference.score_rows(p, with_zsum=True)[2].double(), truth, f"{backend}/{name} zsum")


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_score_rows_with_zsum(backend, dtype):
    """``score_rows(p, with_zsum=True)`` adds sum_j z'_j per row (label smoothing's sum)."""
    impl = backends.get(backend)
    for (n, v), transform in zip(TRANSFORM_SHAPES + [(3, 1)], [(0.5, 1.0), (None, 1.0), (2.0, -1.5)]):
        logits, targets, il = make_inputs(n, v, dtype, seed=4)
        softcap, scale = transform
        p = _contract.prepare(logits, targets, il, "loss", -100, softcap=softcap, logit_scale=scale)
        score, lse, zsum = impl.score_rows(p, with_zsum=True)
        assert zsum.dtype == _contract.lse_dtype(dtype) and zsum.shape == (n,)
        s2, l2 = impl.score_rows(p)
        assert torch.equal(score, s2) and torch.equal(lse, l2)
        truth = hf_logits(logits, softcap, scale).sum(-1)
        eager = reference.score_rows(p, with_zsum=True)[2].double()
        assert_accurate(zsum, eager, truth, f"{backend}/{n}x{v} zsum")


def _grad_impl(backend):
    name = backends.grad_backend_for(backend, backend, DEVICE)
    if name != backend and backend != "cuda":
        pytest.skip(f"{backend} runs its backward on {name}")
    return name


def hf_loss_grad(logits, targets, row_scale, softcap, logit_scale, eps, z_loss):
    """d/dz of sum_r s_r [(1-eps)(lse - z'_y) + eps(lse - mean z') + z_loss lse^2] by autograd in
    float64, and the float64 lse of z' (the truth for ce_grad_rows)."""
    z = logits.detach().double().requires_grad_()
    zt = hf_logits(z, softcap, logit_scale)
    lse = torch.logsumexp(zt, -1)
    live = (targets != -100) & (row_scale != 0)
    safe = torch.where(live, targets, 0)
    ce = lse - zt.gather(1, safe[:, None]).squeeze(1)
    loss_r = (1 - eps) * ce + eps * (lse - zt.mean(-1)) + z_loss * lse * lse
    loss = torch.where(live, row_scale.double() * loss_r, 0.0).sum()
    return torch.autograd.grad(loss, z)[0], lse.detach()


CE_GRAD_CASES = [(None, 1.0, 0.0, 0.0), (None, 1.0, 0.1, 1e-3), (0.5, 1.0, 0.0, 0.0), (30.0, 0.7, 0.2, 1e-4),
                 (None, 4.0, 0.0, 0.01), (2.0, -1.5, 0.1, 0.0)]


@pytest.mark.parametrize("dtype", GRAD_DTYPES, ids=str)
@pytest.mark.parametrize("case", CE_GRAD_CASES, ids=[f"cap{c}-s{s}-eps{e}-z{z}" for c, s, e, z in CE_GRAD_CASES])
def test_ce_grad_rows_generalized(backend, case, dtype):
    """Every backend's ce_grad_rows with softcap / logit_scale / label_smoothing / z_loss against
    autograd of the loss in float64; exact zeros on ignored and zero-scale rows."""
    softcap, scale, eps, z_loss = case
    impl = backends.get(_grad_impl(backend))
    acc = _contract.lse_dtype(dtype)
    for n, v in [(37, 7), (5, 1000)]:
        logits, targets, _ = make_inputs(n, v, dtype, seed=6)
        targets[1] = -100
        row_scale = torch.randn(n, generator=torch.Generator().manual_seed(v)).to(DEVICE, acc)
        row_scale[2] = 0.0
        truth, lse = hf_loss_grad(logits, targets, row_scale, softcap, scale, eps, z_loss)
        lse = lse.to(acc)
        kw = dict(softcap=0.0 if softcap is None else softcap, logit_scale=scale, label_smoothing=eps, z_loss=z_loss)
        got = impl.ce_grad_rows(logits, targets, lse, row_scale, -100, False, **kw)
        eager = reference.ce_grad_rows(logits, targets, lse, row_scale, -100, False, **kw)
        assert got.dtype == dtype and got.shape == logits.shape
        assert_grads_accurate(got, eager, truth, f"{backend}/{n}x{v}")
        assert not bool(got[1].any()) and not bool(got[2].any()), "masked rows must be exact zeros"
        again = logits.clone()
        out = impl.ce_grad_rows(again, targets, lse, row_scale, -100, True, **kw)
        assert out.data_ptr() == again.data_ptr() and torch.equal(again, got), "in-place differs"


@pytest.mark.parametrize("transform", [(0.5, 1.0), (3.0, -0.7), (None, 2.5)], ids=["cap0.5", "cap3-neg", "scale2.5"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_transformed_score_gradients(backend, transform, dtype):
    softcap, scale = transform
    kw = dict(softcap=softcap, logit_scale=scale)
    for method in METHODS:
        logits, targets, il, g = _grad_case(5, 70, dtype)
        z = logits.detach().clone().requires_grad_()
        l = il.detach().clone().requires_grad_()
        score = rk.score(z, targets, l, method=method, backend=backend, **kw)
        gz, gl = torch.autograd.grad(score, (z, l), g, allow_unused=True)
        gz = torch.zeros_like(z) if gz is None else gz

        def ref_grad(x_dtype):
            x = logits.detach().to(x_dtype).requires_grad_()
            p = _contract.prepare(x, targets, il, method, -100, softcap=softcap, logit_scale=scale)
            s = reference.score_rows(p)[0]
            if not s.requires_grad:  # irreducible: no logit is read
                return torch.zeros_like(x)
            out = torch.autograd.grad(s, x, g, allow_unused=True)[0]
            return torch.zeros_like(x) if out is None else out

        assert_grads_accurate(gz, ref_grad(dtype), ref_grad(torch.float64), f"{backend}/{method}")
        assert not bool(gz[1].any()), "ignored row must get an exact zero gradient"


@pytest.mark.parametrize("method", ["reducible", "gradnorm", "entropy"])
def test_transformed_score_gradcheck_float64(backend, method):
    logits, targets, il, _ = _grad_case(4, 6, torch.float64)
    z = logits.detach().clone().requires_grad_()
    live = targets != -100

    def fn(z):
        return torch.where(live, rk.score(z, targets, il, method=method, backend=backend, softcap=2.0,
                                          logit_scale=0.8), 0.0)

    assert torch.autograd.gradcheck(fn, (z,), eps=1e-3, atol=2e-3, rtol=2e-3)


def test_ce_grad_rows_gradcheck_float64():
    """The reference's generalized ce_grad_rows is the gradient of its loss (finite differences)."""
    logits, targets, _ = make_inputs(4, 6, torch.float64, seed=8)
    targets[1] = -100
    row_scale = torch.tensor([0.5, 2.0, -1.0, 1.5], dtype=torch.float64, device=DEVICE)
    kw = dict(softcap=2.0, logit_scale=0.8, label_smoothing=0.1, z_loss=0.01)

    class Loss(torch.autograd.Function):
        @staticmethod
        def forward(ctx, z):
            zt = reference.transform(z, 2.0, 0.8)
            lse = torch.logsumexp(zt, -1)
            ctx.save_for_backward(z, lse)
            live = targets != -100
            ce = lse - zt.gather(1, torch.where(live, targets, 0)[:, None]).squeeze(1)
            loss_r = 0.9 * ce + 0.1 * (lse - zt.mean(-1)) + 0.01 * lse * lse
            return torch.where(live, row_scale * loss_r, 0.0).sum()

        @staticmethod
        def backward(ctx, g):
            z, lse = ctx.saved_tensors
            return g * reference.ce_grad_rows(z, targets, lse, row_scale, -100, **kw)

    z = logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(Loss.apply, (z,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["loss", "gradnorm", "entropy"])
def test_partial_rows_transform_and_zsum(backend, method):
    """The CPU kernel's vocabulary-slice partials ([n, 8]: m, d, t, dx, s2x, z'_y, owned, zsum)
    honour the transform, and merge to the full rows' scores and sum_j z'_j."""
    if backend != "cpu":
        pytest.skip("partial_rows is the cpu backend's")
    from rho_kernels import vocab_parallel

    impl = backends.get("cpu")
    for dtype in (torch.float32, torch.bfloat16):
        logits, targets, il = make_inputs(19, 300, dtype, seed=9)
        targets[4] = -100
        for softcap, scale in [(None, 1.0), (0.5, 1.0), (3.0, -2.0)]:
            cap = 0.0 if softcap is None else softcap
            part = None
            for v0, v1 in [(0, 128), (128, 257), (257, 300)]:
                part = impl.partial_rows(logits[:, v0:v1], targets, part, v0, METHODS.index(method), -100,
                                         softcap=cap, logit_scale=scale)
            assert part.shape == (19, 8) and part.dtype == torch.float32
            f = vocab_parallel.merge_and_finalize(part[None], targets, il, METHODS.index(method), -100)
            truth = transformed_truth(logits, targets, il, method, softcap, scale)
            eager = rk.score(logits, targets, il, method=method, backend="reference", softcap=softcap,
                             logit_scale=scale)
            assert_accurate(f.score, eager, truth, f"{method}/{dtype}/{softcap}")
            p = _contract.prepare(logits, targets, il, method, -100, softcap=softcap, logit_scale=scale)
            assert_accurate(part[:, 7], reference.score_rows(p, with_zsum=True)[2],
                            hf_logits(logits, softcap, scale).sum(-1), "zsum")
