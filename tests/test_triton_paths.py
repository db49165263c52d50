"""Every launch path of the Triton backend against the reference.

The path choice depends on shapes only, so the small shapes the CPU interpreter can afford would
all take the same path; ``triton_select._override`` forces each one (single-launch select with
one program or with the ticket merge, two-stage with and without per-block candidates, split-V,
chunked V).  Runs on CPU under ``TRITON_INTERPRET=1`` and on CUDA
(``RHO_KERNELS_TEST_DEVICE=cuda``).
"""

from __future__ import annotations

import math

import pytest
import torch

import rho_kernels as rk
from rho_kernels import _contract, backends, reference
from rho_kernels.selftest import TRITON_PATHS

from conftest import DEVICE

_REASON = backends.unavailable_reason("triton", DEVICE)
if _REASON is not None:
    pytest.skip(f"triton backend cannot run on {DEVICE}: {_REASON}", allow_module_level=True)

from rho_kernels.backends import triton_select as ts  # noqa: E402  (imports triton)

# On a GPU every new constexpr combination is a Triton compile (~0.5 s on a cold cache): the
# dtype and layout matrices are thinned there (the conformance suite covers dtypes x methods).
ON_GPU = DEVICE.type == "cuda"

INF = math.inf
NAN = math.nan

# name -> plan overrides: the table `python -m rho_kernels selftest` runs (less its "plan" row,
# the planner's own choice).  V = 37 below, so block_v 8/16 means 5/3 chunks.
PATHS = {name: kw for name, kw in TRITON_PATHS.items() if kw}


def special_case(n: int = 24, v: int = 37, dtype=torch.float32, seed: int = 0):
    """Random rows plus every special case of the contract, in the first rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=g) * 3
    y = torch.randint(0, v, (n,), generator=g)
    il = torch.rand(n, generator=g) * 2
    x[1, 5] = NAN  # NaN logit -> NaN lse, ineligible
    x[2] = -INF  # all -inf -> lse -inf, CE NaN
    x[3, 2] = INF  # +inf logit -> lse +inf
    y[3] = 7
    x[4, :30] = -INF  # mostly impossible classes, including whole chunks of -inf
    y[4] = 33
    x[5, 11] = -INF  # target logit -inf -> CE +inf
    y[5] = 11
    y[6] = -100  # ignored -> -inf, ineligible
    x[8] = x[9]  # identical rows: tie, lower index first
    y[8] = y[9]
    il[8] = il[9]
    x[10, 3] = 40.0  # confidently right: gradnorm tiny, no cancellation
    y[10] = 3
    il[12] = NAN  # NaN IL -> NaN score for IL methods
    return x.to(dtype).to(DEVICE), y.to(DEVICE), il.to(DEVICE)


def run_both(logits, targets, il, method, k, ignore_index=-100, problem=None, **override):
    p = problem or _contract.prepare(logits, targets, il, method, ignore_index)
    before = p.logits.clone()
    with ts._override(**override):
        score, lse = ts.score_rows(p)
        sel = ts.select_rows(p, k)
    assert torch.equal(p.logits, before) or torch.equal(p.logits.isnan(), before.isnan()), "logits written"
    return p, (score, lse), sel


def assert_nonfinite_equal(got, want, what):
    got, want = got.double().cpu(), want.double().cpu()
    assert torch.equal(got.isnan(), want.isnan()), f"{what}: NaN pattern {got} vs {want}"
    assert torch.equal(got.isinf(), want.isinf()), f"{what}: inf pattern {got} vs {want}"
    assert torch.equal(got[got.isinf()], want[want.isinf()]), f"{what}: inf signs"


def check(logits, targets, il, method, k, ignore_index=-100, problem=None, rtol=2e-5, atol=2e-5, **override):
    """Scores and lse close to the reference (non-finite identical); selection follows the
    ordering rule exactly on the backend's own scores and equals the reference's selection."""
    p, (score, lse), (idx, sc, valid) = run_both(
        logits, targets, il, method, k, ignore_index, problem, **override)
    want_score, want_lse = reference.score_rows(p)
    assert score.dtype == torch.float32 and score.shape == (p.num_rows,)
    assert lse.dtype == want_lse.dtype
    assert_nonfinite_equal(score, want_score, "score")
    assert_nonfinite_equal(lse, want_lse, "lse")
    fin = torch.isfinite(want_score)
    torch.testing.assert_close(score[fin], want_score[fin], rtol=rtol, atol=atol)
    fin = torch.isfinite(want_lse)
    torch.testing.assert_close(lse[fin], want_lse[fin], rtol=rtol, atol=atol)

    assert idx.dtype == torch.int64 and sc.dtype == torch.float32 and valid.dtype == torch.bool
    assert idx.shape == sc.shape == valid.shape == (k,)
    eligible = reference.eligible_rows(p, score)
    own_order = reference.order_rows(score, eligible)[:k]
    assert torch.equal(idx, own_order), f"order {idx.tolist()} != {own_order.tolist()}"
    assert torch.equal(sc.view(torch.int32), score[idx].view(torch.int32))
    assert torch.equal(valid, eligible[idx])
    ref_idx, _, ref_valid = reference.select_rows(p, k)
    assert torch.equal(idx, ref_idx), f"selection {idx.tolist()} != reference {ref_idx.tolist()}"
    assert torch.equal(valid, ref_valid)
    return score, lse, idx


@pytest.mark.parametrize("method", rk.METHODS)
@pytest.mark.parametrize("path", list(PATHS))
def test_paths_all_methods_special_values(path, method):
    x, y, il = special_case()
    check(x, y, il, method, 17, **PATHS[path])


@pytest.mark.parametrize("method", rk.METHODS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("path", ["split_v"] if ON_GPU else ["fused_ticket", "split_v", "two_stage_candidates"])
def test_dtypes(path, dtype, method):
    x, y, il = special_case(n=20, dtype=dtype, seed=1)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    score, lse, _ = check(x, y, il, method, 9, rtol=tol, atol=tol, **PATHS[path])
    if method != "irreducible":
        assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


def _layouts(n_b=2, n_t=3, v=37):
    g = torch.Generator().manual_seed(2)
    base = torch.randn(v, n_t, n_b, generator=g) * 2
    yield "3d_v_stride", base.permute(2, 1, 0)  # [B, T, V] with stride_v = B*T
    wide = torch.randn(n_b * n_t, v + 13, generator=g)
    yield "row_stride", wide[:, 5:5 + v]  # rows longer than V, offset start
    yield "transposed", torch.randn(v, n_b * n_t, generator=g).t()  # stride_v = N
    yield "3d_t_slice", torch.randn(n_b, 2 * n_t, v, generator=g)[:, ::2]  # stride_t = 2V
    yield "expanded", torch.randn(1, v, generator=g).expand(n_b * n_t, v)  # stride_b = 0: all ties
    # rows adjacent in memory, V-stride = N (>= 16 rows): the column-tile geometry
    yield "column_major", torch.randn(v, 40, generator=g).t()
    yield "3d_column_major", torch.randn(v, 4, 5, generator=g).permute(1, 2, 0)  # strides (5, 1, 20)


@pytest.mark.parametrize("path", ["fused_ticket", "split_v", "tile_split_v"] if ON_GPU else
                         ["fused_one_program", "fused_ticket", "split_v", "tile_split_v", "chunked_v"])
@pytest.mark.parametrize("method", ["reducible", "gradnorm", "entropy"])
def test_layouts(path, method):
    for name, logits in _layouts():
        logits = logits.to(DEVICE)
        assert not logits.is_contiguous()
        g = torch.Generator().manual_seed(3)
        targets = torch.randint(0, logits.shape[-1], logits.shape[:-1], generator=g).to(DEVICE)
        il = (torch.rand(logits.shape[:-1], generator=g)).to(DEVICE)
        if name == "expanded":
            il = torch.zeros_like(il)
        check(logits, targets, il, method, 5, **PATHS[path])


@pytest.mark.parametrize("path", ["fused_one_program", "fused_ticket", "two_stage", "two_stage_candidates"])
def test_ties_and_signed_zero(path):
    n = 32
    x = torch.zeros(n, 5, device=DEVICE)  # every row identical: all scores tie
    y = torch.zeros(n, dtype=torch.int64, device=DEVICE)
    il = torch.zeros(n, device=DEVICE)
    il[1::2] = -0.0  # irreducible = -il: +0 and -0 must tie
    il[7] = -1.0  # the only positive score
    _, _, idx = check(x, y, il, "irreducible", n, **PATHS[path])
    assert idx.tolist() == [7] + [i for i in range(n) if i != 7]
    _, _, idx = check(x, y, il, "reducible", n, **PATHS[path])
    assert idx[:3].tolist() == [7, 0, 1]


@pytest.mark.parametrize("path", ["fused_one_program", "fused_ticket", "two_stage", "two_stage_candidates"])
def test_k_edges_and_ineligible(path):
    x, y, il = special_case(n=24)
    for k in (0, 1, 24):
        check(x, y, il, "reducible", k, **PATHS[path])
    y_all_ignored = torch.full_like(y, 5)
    _, _, idx = check(x, y_all_ignored, il, "loss", 24, ignore_index=5, **PATHS[path])
    assert idx.tolist() == list(range(24))  # all ineligible: by index
    check(x[:1], y[:1], il[:1], "entropy", 1, **PATHS[path])


@pytest.mark.parametrize("path", ["fused_ticket", "two_stage", "two_stage_candidates", "split_v"])
def test_large_k_and_many_blocks(path):
    n, v = (96, 37) if path == "split_v" else (1000, 37)  # split_v: one row per program
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(n, v, generator=g) * 3).to(DEVICE)
    y = torch.randint(0, v, (n,), generator=g).to(DEVICE)
    y[::17] = -100
    il = (torch.rand(n, generator=g)).to(DEVICE)
    ov = dict(PATHS[path])
    if path == "fused_ticket":
        ov["block_r"] = 64  # 16 row blocks, the last one to finish sorts 1024 keys
    if path == "two_stage_candidates":
        ov["cand_block"] = 64  # 16 blocks, k = 50 candidates each
    for k in (n // 20, n // 10, n):
        if path == "two_stage_candidates" and k > 64:
            ov["cand_block"] = 128
        check(x, y, il, "reducible", k, **ov)


@pytest.mark.parametrize("path", ["fused_ticket", "two_stage", "split_v"])
def test_out_of_range_target_scores_nan_without_reading(path):
    """The range check runs only on CPU eagerly; a backend must still give NaN, not read OOB."""
    x, y, il = special_case(n=16)
    y = y.clone()
    y[2], y[3] = 37, -5  # V = 37
    p = _contract.RowProblem(x, y, il, _contract.METHOD_IDS["reducible"], -100,
                             x.shape[:-1], 16, 37)
    score, _, _ = check(x, y, il, "reducible", 16, problem=p, **PATHS[path])
    assert torch.isnan(score[2]) and torch.isnan(score[3])


def test_default_plan_heuristics(monkeypatch):
    """Shape classes of the default plan (block sizes by V, split for few rows, fused select)."""
    def plan(n, v, dtype):
        t = torch.empty((0,), dtype=dtype, device="meta").as_strided((n, v), (v, 1))
        with ts._override(sms=132):
            return ts._plan(t, n, v), ts._use_fused(t, n, 0)

    p, fused = plan(256, 10, torch.float32)
    assert (p.block_r, p.block_v, p.split, fused) == (32, 16, 1, True)
    assert 256 * 10 <= ts.ONE_PROGRAM_MAX_ELEMS  # [256, 10]: one program, one launch
    assert not plan(256, 10, torch.float64)[1]  # float64: two stages
    p, fused = plan(256, 1000, torch.float32)
    assert (p.block_r, p.block_v, p.split, fused) == (4, 1024, 1, True)
    p, fused = plan(1000, 1000, torch.float32)  # beyond FUSED_MAX_ROWS: two stages
    assert (p.block_r, p.block_v, p.split, fused) == (4, 1024, 1, False)
    p, fused = plan(3200, 1000, torch.float32)  # beyond FUSED_MAX_ROWS: two stages
    assert (p.block_r, p.block_v, p.split, fused) == (4, 1024, 1, False)
    p, fused = plan(4096, 4096, torch.bfloat16)
    assert (p.block_r, p.block_v, p.split) == (1, 4096, 1)
    p, fused = plan(16384, 128256, torch.bfloat16)
    assert (p.block_r, p.block_v, p.split, fused) == (1, 8192, 1, False)
    p, fused = plan(4, 128256, torch.bfloat16)
    assert p.split > 1 and not fused and p.split * p.v_per_split >= 128256
    assert (p.split - 1) * p.v_per_split < 128256  # no empty split


def test_unavailable_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET" in ts.unavailable_reason(torch.device("cpu"))
    assert ts.unavailable_reason(torch.device("meta")) is not None
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ts.unavailable_reason(torch.device("cpu")) is None


_TRANSFORMS = [(0.5, 1.0), (3.0, -1.5), (0.0, 4.0)]  # a saturating cap, cap with a negative scale, scale only


@pytest.mark.parametrize("path", list(PATHS))
def test_paths_transform_and_zsum(path):
    """softcap / logit_scale on every launch path (the masked lanes of a tile must stay out of a
    cap's -softcap), and zsum = sum_j z'_j through the split-V workspace."""
    x, y, il = special_case(n=14, seed=2)
    i = list(PATHS).index(path)
    softcap, scale = _TRANSFORMS[i % len(_TRANSFORMS)]
    for method in [("reducible", "gradnorm", "entropy")[i % 3]]:  # (the interpreter's time)
        p = _contract.prepare(x, y, il, method, -100, softcap=softcap or None, logit_scale=scale)
        check(x, y, il, method, 9, problem=p, **PATHS[path])
        with ts._override(**PATHS[path]):
            score, lse, zsum = ts.score_rows(p, with_zsum=True)
        want = reference.score_rows(p, with_zsum=True)[2]
        assert_nonfinite_equal(zsum, want, "zsum")
        fin = torch.isfinite(want)
        torch.testing.assert_close(zsum[fin], want[fin], rtol=2e-5, atol=2e-5)


def test_opcheck():
    # opcheck compares outputs without equal_nan: finite data, and for irreducible (lse is all
    # NaN by contract) skip the output comparison of the AOT-dispatch test.
    g = torch.Generator().manual_seed(6)
    x = torch.randn(20, 37, generator=g).to(DEVICE)
    y = torch.randint(0, 37, (20,), generator=g).to(DEVICE)
    il = torch.rand(20, generator=g).to(DEVICE)
    for method in range(5):
        il_arg = il if method in (0, 2) else None
        utils = ("test_schema", "test_autograd_registration", "test_faketensor")
        torch.library.opcheck(torch.ops.rho_kernels.triton_score_rows.default,
                              (x, y, il_arg, method, -100),
                              **({"test_utils": utils} if method == 2 else {}))
        torch.library.opcheck(torch.ops.rho_kernels.triton_select_rows.default, (x, y, il_arg, 6, method, -100))
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.rho_kernels.triton_score_rows.default, (x, y, il, 0, -100, 2.0, 0.5, True))
    torch.library.opcheck(torch.ops.rho_kernels.triton_select_rows.default, (x, y, il, 6, 3, -100, 2.0, -0.5))


@pytest.mark.parametrize("method", ["reducible", "entropy"])
def test_torch_compile_fullgraph(method, monkeypatch):
    """rk.select / rk.score under torch.compile(fullgraph=True).  Under the interpreter the ops are
    opaque custom ops (Inductor cannot run interpreted kernels), so aot_eager is used there."""
    # Replace the lazy import by a constant: the test is about the op, not the import.
    monkeypatch.setattr(backends, "_triton", lambda: ts)
    x, y, il = special_case(n=40)
    y = torch.where(y < 0, torch.zeros_like(y), y)

    def fn(x, y, il):
        s = rk.select(x, y, il, 9, method=method, backend="triton")
        return s.indices, s.scores, s.valid, rk.score(x, y, il, method=method, backend="triton")

    torch._dynamo.reset()
    backend = "inductor" if DEVICE.type == "cuda" else "aot_eager"
    got = torch.compile(fn, fullgraph=True, backend=backend)(x, y, il)
    want = fn(x, y, il)
    for a, b in zip(got, want):
        assert torch.equal(a, b) or torch.equal(a.isnan(), b.isnan()) and torch.equal(a[~a.isnan()], b[~b.isnan()])


@pytest.mark.skipif(DEVICE.type != "cuda", reason="N*V > 2^31 logits need a GPU with >= 12 GB free")
def test_int64_offsets():
    free, _ = torch.cuda.mem_get_info()
    n, v = 17, 2**27  # 2.28e9 elements > 2^31, 4.6 GB in bf16
    if free < 12 * 2**30:
        pytest.skip(f"only {free / 2**30:.1f} GB free")
    g = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(n, v, device="cuda", generator=g, dtype=torch.bfloat16)
    y = torch.randint(0, v, (n,), device="cuda", generator=g)
    il = torch.rand(n, device="cuda", generator=g)
    score = rk.score(x, y, il, backend="triton")
    tail = slice(n - 2, n)  # rows whose offsets are beyond 2^31
    want = rk.score(x[tail], y[tail], il[tail], backend="reference")
    torch.testing.assert_close(score[tail], want, rtol=1e-4, atol=1e-4)
    sel = rk.select(x, y, il, 5, backend="triton")
    assert torch.equal(sel.indices, reference.order_rows(score, torch.ones_like(y, dtype=torch.bool))[:5])


@pytest.mark.parametrize("method", ["loss", "gradnorm", "entropy"])
@pytest.mark.parametrize("path", ["fused_chunked_v", "chunked_v", "split_v", "fused_one_program"])
def test_rows_spanning_more_than_float_max(path, method):
    """The running max jumps by more than FLT_MAX between chunks (or splits): the old partial
    is rescaled by exp(-inf) = 0 and must contribute 0, not 0 * -inf = NaN (rho::acc_rescale).
    Expected values worked by hand from the softmax relative to the row max."""
    x = torch.full((4, 37), -INF)  # -inf: impossible classes, no effect on the scores
    x[0, [0, 20, 36]] = torch.tensor([-3e38, 3e38, 0.0])  # p = (0, 1, 0)
    x[1, [0, 17, 33]] = torch.tensor([-3.4e38, 3.4e38, 3.4e38])  # p = (0, 1/2, 1/2)
    x[2] = -3e38  # p = 1/37 everywhere
    x[3] = torch.randn(37, generator=torch.Generator().manual_seed(7))
    y = torch.tensor([36, 0, 5, 3])
    il = torch.tensor([0.5, 0.25, 1.0, 2.0])
    score, _, _ = check(x.to(DEVICE), y.to(DEVICE), il.to(DEVICE), method, 4, **PATHS[path])
    want = {
        "entropy": [0.0, math.log(2), math.log(37)],
        "gradnorm": [math.sqrt(2), math.sqrt(1 + 0.5), math.sqrt(36 / 37**2 + (36 / 37) ** 2)],
        # (m - z_y) + log d: 3e38 - 0; 3.4e38 + 3.4e38 overflows; row 2 keeps its log 37 (lse - z_y would
        # lose it to lse's rounding at 3e38)
        "loss": [3e38, INF, math.log(37)],
    }[method]
    got = score.cpu()[:3].tolist()
    assert got == pytest.approx(want, rel=1e-6, abs=1e-6), got
