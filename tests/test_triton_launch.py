"""Launch parameters of the Triton backend, checked without a GPU (and without running kernels).

* Bit-exactness: the launch that scores the rows on every select path uses the score kernel's
  plan (BLOCK_R, BLOCK_V, num_warps, split, geometry) for the same problem, so a row is reduced
  in the same order and ``Selection.scores`` equals ``score()[indices]`` bit for bit.  The
  plans are compared on meta tensors for a table of shapes that reaches every path; the
  layouts of the compiled kernels (TTGIR for sm_90, compiled ahead of time) are compared too.
* Every launch runs under a guard that makes the logits' CUDA device current.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from rho_kernels.backends import triton_select as ts  # noqa: E402
from rho_kernels.backends import triton_ce_grad as tce  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import _triton_launches as tl_rec  # noqa: E402

# What fixes the order of a row's sums: the tile, the warps, the split, the row geometry.
ROW_PARAMS = ("METHOD", "IS_F64", "BLOCK_R", "BLOCK_V", "N", "V", "T", "stride_b", "stride_t", "stride_v")


def _row_params(launch: tl_rec.Launch) -> dict:
    both = {**launch.args, **launch.constexprs}
    return {k: both[k] for k in ROW_PARAMS} | {"num_warps": launch.num_warps}


def _path(select: list[tl_rec.Launch]) -> str:
    names = [x.name for x in select]
    if names == ["_fused_select_kernel"]:
        return "fused_one_program" if select[0].constexprs["ONE_PROGRAM"] else "fused_ticket"
    split = select[0].constexprs["SPLIT"] > 1
    cand = "_block_topk_kernel" in names
    return ("split_v" if split else "two_stage") + ("_candidates" if cand else "")


@pytest.mark.parametrize("case", tl_rec.CASES, ids=[f"{n}x{v}-{str(d)[6:]}-{lay}" for n, v, d, lay in tl_rec.CASES])
@pytest.mark.parametrize("method", [0, 2, 4])
def test_select_paths_launch_like_score(monkeypatch, case, method):
    n, v, dtype, layout = case
    logits, targets, il, _, ii = tl_rec.problem(n, v, dtype, layout, method)
    score = tl_rec.record(ts, monkeypatch.setattr, ts._score_rows_impl, logits, targets, il, method, ii)
    assert score[0].name == "_score_kernel"
    for k in sorted({1, tl_rec.case_k(n), n}):
        select = tl_rec.record(ts, monkeypatch.setattr, ts._select_rows_impl, logits, targets, il, k, method, ii)
        if _path(select).startswith("fused"):
            # one launch scores and selects: same row parameters as the (unsplit) score kernel
            assert len(score) == 1 and score[0].constexprs["SPLIT"] == 1
            assert _row_params(select[0]) == _row_params(score[0]), f"k={k}"
        else:
            # the same launches as score(), then the top-k stage
            scoring = [x for x in select if x.name != "_block_topk_kernel"]
            assert [(x.name, x.grid, x.constexprs, x.num_warps) for x in scoring] == \
                   [(x.name, x.grid, x.constexprs, x.num_warps) for x in score], f"k={k}"
            assert [_row_params(x) if x.name == "_score_kernel" else None for x in scoring] == \
                   [_row_params(x) if x.name == "_score_kernel" else None for x in score]


def test_case_table_reaches_every_path(monkeypatch):
    seen = set()
    for n, v, dtype, layout in tl_rec.CASES:
        logits, targets, il, method, ii = tl_rec.problem(n, v, dtype, layout)
        select = tl_rec.record(ts, monkeypatch.setattr, ts._select_rows_impl, logits, targets, il,
                               tl_rec.case_k(n), method, ii)
        seen.add(_path(select))
        geometry = {k: select[0].args[k] for k in ("T", "stride_b", "stride_t")}
        if layout == "transposed" and n >= ts.COLUMN_MIN_ROWS:
            assert geometry == {"T": 1, "stride_b": 1, "stride_t": 0}, (n, v)  # rows = fast axis
            seen.add("column_" + _path(select))
    assert seen >= {"fused_one_program", "fused_ticket", "two_stage", "two_stage_candidates", "split_v",
                    "column_fused_one_program", "column_fused_ticket", "column_two_stage", "column_split_v"}, seen


def test_gradnorm_and_entropy_never_take_the_fused_select(monkeypatch):
    """Their fused-select variants spilled on some targets (the six-target AOT run): the planner
    sends them to two stages, for shapes where the CE methods take the fused kernel."""
    fused_cases = 0
    for n, v, dtype, layout in tl_rec.CASES:
        paths = {}
        for method in (0, 3, 4):
            logits, targets, il, _, ii = tl_rec.problem(n, v, dtype, layout, method)
            paths[method] = _path(tl_rec.record(ts, monkeypatch.setattr, ts._select_rows_impl, logits, targets, il,
                                                tl_rec.case_k(n), method, ii))
        fused_cases += paths[0].startswith("fused")
        assert not paths[3].startswith("fused") and not paths[4].startswith("fused"), (n, v, dtype, layout, paths)
    assert fused_cases > 0


def test_plan_does_not_depend_on_the_gpu(monkeypatch):
    """The plan reads no device property: a row's bits do not depend on the GPU model."""
    def boom(*a, **k):
        raise AssertionError("the plan queried the device")

    monkeypatch.setattr(torch.cuda, "get_device_properties", boom)
    monkeypatch.setattr(torch.cuda, "current_device", boom)
    for n, v, dtype, layout in tl_rec.CASES:
        logits = tl_rec.logits_for(n, v, dtype, layout)
        ts._plan(logits, n, v)


def test_fused_select_stays_small():
    """The fused select sorts all keys on chip in one program: at most FUSED_MAX_ROWS."""
    assert ts.FUSED_MAX_ROWS <= 1024
    t = torch.empty((ts.FUSED_MAX_ROWS + 1, 100), device="meta")
    assert not ts._use_fused(t, ts.FUSED_MAX_ROWS + 1, 0)
    assert ts._use_fused(t[:-1], ts.FUSED_MAX_ROWS, 0)


# ------------------------------------------------------------------------ device guard


def test_device_guard_enters_the_tensors_cuda_device(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def fake_device(d):
        entered.append(d)
        yield

    monkeypatch.setattr(torch.cuda, "device", fake_device)
    with ts._device_guard(torch.device("cuda", 1)):
        pass
    assert entered == [torch.device("cuda", 1)]
    with ts._device_guard(torch.device("cpu")):
        pass
    assert entered == [torch.device("cuda", 1)], "no CUDA device switch for CPU tensors"


@pytest.fixture
def guarded_launches(monkeypatch):
    """Replaces the guard and wrap_triton: records (kernel, device the guard holds) per launch."""
    current = []
    launched = []

    @contextlib.contextmanager
    def fake_guard(device):
        current.append(device)
        try:
            yield
        finally:
            current.pop()

    class FakeWrapped:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                launched.append((self.kernel.__name__ if hasattr(self.kernel, "__name__") else self.kernel.fn.__name__,
                                 current[-1] if current else None))
            return run

    for mod in (ts, tce):
        monkeypatch.setattr(mod, "_device_guard", fake_guard)
        monkeypatch.setattr(mod, "wrap_triton", FakeWrapped)
    return launched


def test_every_launch_runs_on_the_logits_device(guarded_launches):
    for n, v, dtype, layout in tl_rec.CASES:
        logits, targets, il, method, ii = tl_rec.problem(n, v, dtype, layout)
        ts._score_rows_impl(logits, targets, il, method, ii)
        ts._select_rows_impl(logits, targets, il, tl_rec.case_k(n), method, ii)
    lse = torch.zeros(8, device="meta")
    tce._launch(torch.empty(8, 50, device="meta"), torch.empty(8, 50, device="meta"),
                torch.zeros(8, dtype=torch.int64, device="meta"), lse, lse, -100)
    names = {name for name, _ in guarded_launches}
    assert names == {"_score_kernel", "_split_merge_kernel", "_fused_select_kernel", "_block_topk_kernel",
                     "_ce_grad_rows_kernel"}, names
    assert all(dev == torch.device("meta") for _, dev in guarded_launches), guarded_launches


# ------------------------------------------------------------------------ compiled layouts

# Fused-select cases of the table (the other paths launch the score kernel itself): the
# issue's [3, 1000], a whole-row tile with 8 warps, chunked V, column tiles.
AOT_CASES = [0, 3, 4, 11]


def test_compiled_layouts_of_score_and_select_match():
    """TTGIR for sm_90: the tile loads and the row reductions of the select kernel have the
    score kernel's layouts (and warps).  Compiled in a subprocess with the interpreter off."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(Path(__file__).parent / "_triton_launches.py"),
                           *map(str, AOT_CASES)], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout)
    assert len(result) == len(AOT_CASES)
    for case, r in result.items():
        assert r["select_kernel"] == "_fused_select_kernel", case
        assert r["num_warps"][0] == r["num_warps"][1], case
        ops = [op for op, _ in r["score"]]
        assert ops[0] == "load" and sum(op.startswith("reduce") for op in ops) >= 3, (case, r["score"])
        assert r["select"] == r["score"], case
    column = next(r for case, r in result.items() if case.endswith("transposed"))
    assert "order = [0, 1]" in column["score"][0][1], "column tiles: rows must be the fast axis"
