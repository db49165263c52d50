"""Every Triton kernel variant the launch planner can choose compiles for real GPUs (sm_80, sm_90)
without spills and within one block's registers and shared memory: benchmarks/triton_aot.py,
run once per session (no GPU needed; it leaves the interpreter itself).

Environment:
  RHO_KERNELS_AOT_CC     compute capabilities to compile for (default "80,90")
  RHO_KERNELS_AOT_JOBS   compile processes (default: all cores)
  RHO_KERNELS_BUILD_LOG + RHO_KERNELS_EXPECT_CUDA_BUILD=1 (make test): the CUDA kernels' ptxas
                         figures from the nvcc build are checked the same way.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("triton_aot", ROOT / "benchmarks" / "triton_aot.py")
aot = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(aot)

pytest.importorskip("triton")

CCS = [int(c) for c in os.environ.get("RHO_KERNELS_AOT_CC", "80,90").split(",")]


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("aot") / "triton_aot.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "triton_aot.py"), "--json", str(out),
           "--cc", ",".join(map(str, CCS)), "--jobs", os.environ.get("RHO_KERNELS_AOT_JOBS", str(os.cpu_count() or 1))]
    log = os.environ.get("RHO_KERNELS_BUILD_LOG")
    if log and _flag("RHO_KERNELS_EXPECT_CUDA_BUILD"):
        cmd += ["--cuda-build-log", str(log if os.path.isabs(log) else ROOT / log)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    print(proc.stdout[-4000:])
    assert out.exists(), f"triton_aot.py wrote no report (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text())


def test_every_variant_compiles_within_limits(report: dict) -> None:
    assert report["variants"] > 0
    assert not report["failed"], "\n".join(report["failed"])


def test_report_covers_every_kernel_path_dtype_and_method(report: dict) -> None:
    recs = report["triton_kernels"]
    for cc in CCS:
        mine = [r for r in recs if r["cc"] == cc]
        names = {r["kernel"] for r in mine}
        assert {"_score_kernel", "_split_merge_kernel", "_fused_select_kernel", "_block_topk_kernel",
                "_ce_grad_rows_kernel"} <= names, names
        score = [r["variant"] for r in mine if r["kernel"] == "_score_kernel"]
        for m in range(5):
            assert any(f"METHOD={m} " in v for v in score), f"method {m} not compiled for sm_{cc}"
        assert any("SPLIT=1 " in v for v in score) and any("SPLIT=1 " not in v for v in score)
        fused = [r["variant"] for r in mine if r["kernel"] == "_fused_select_kernel"]
        assert any("ONE_PROGRAM=True" in v for v in fused) and any("ONE_PROGRAM=False" in v for v in fused)
        for ptr in ("*fp32", "*bf16", "*fp64"):
            assert any(ptr in r["variant"] for r in mine if r["kernel"] == "_score_kernel"), ptr
    assert all(r["registers"] > 0 and r["compile_s"] >= 0 for r in recs if not r.get("error"))


def test_cuda_kernels_in_report(report: dict) -> None:
    if not (_flag("RHO_KERNELS_EXPECT_CUDA_BUILD") and os.environ.get("RHO_KERNELS_BUILD_LOG")):
        pytest.skip("no nvcc build log to read (make test sets RHO_KERNELS_BUILD_LOG and RHO_KERNELS_EXPECT_CUDA_BUILD)")
    cuda = report["cuda_kernels"]
    assert cuda, "the nvcc build log has no ptxas -v figures of our kernels (is -Xptxas=-v set?)"
    assert {r["cc"] for r in cuda} >= {80, 90}
    assert all(r["registers"] > 0 for r in cuda)


_LOG = """\
ptxas info    : Compiling entry function '_ZN8rho_cuda3fooEv' for 'sm_90'
ptxas info    : Function properties for _ZN8rho_cuda3fooEv
    8 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 1024 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function '_ZN8rho_cuda3barEv' for 'sm_80'
ptxas info    : Function properties for _ZN8rho_cuda3barEv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers, 380 bytes cmem[0]
"""


def test_ptxas_parser() -> None:
    got = aot.parse_ptxas(_LOG)
    assert got[("_ZN8rho_cuda3fooEv", "sm_90")] == {
        "registers": 40, "spill_stores": 8, "spill_loads": 4, "stack": 8, "static_smem": 1024}
    assert got[("_ZN8rho_cuda3barEv", "sm_80")]["registers"] == 255
    assert got[("_ZN8rho_cuda3barEv", "sm_80")]["spill_stores"] == 0


def _rec(**kw) -> dict:
    base = {"cc": 90, "registers": 64, "threads": 256, "spill_stores": 0, "spill_loads": 0, "shared_bytes": 0}
    base.update(kw)
    return base


def test_limits_fail() -> None:
    assert aot.problems(_rec()) == []
    assert aot.problems(_rec(registers=255, threads=256)) == []  # 65280 <= 65536
    assert "registers" in aot.problems(_rec(registers=136, threads=512))[0]
    assert "spills" in aot.problems(_rec(spill_loads=4))[0]
    assert aot.problems(_rec(shared_bytes=227 * 1024)) == []
    assert "shared memory" in aot.problems(_rec(shared_bytes=227 * 1024 + 1))[0]
    assert "shared memory" in aot.problems(_rec(cc=80, shared_bytes=164 * 1024))[0]
    assert "compile error" in aot.problems(_rec(error="CompilationError: boom"))[0]
