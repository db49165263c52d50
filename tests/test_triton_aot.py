"""Every Triton kernel variant the launch planner can choose compiles for the GPUs people own
(sm_80, 86, 89, 90, 100, 120) without spills and within one block's registers and that
architecture's shared memory: benchmarks/triton_aot.py, run once per session (no GPU needed; it
leaves the interpreter itself).

What CI compiles and what it verifies from the committed report
(benchmarks/results/triton_aot.json): the planner runs for all six targets; a variant whose
record in the report matches (same triton version, target, compile job and kernel source hash)
is taken from the report and its figures checked again; the rest are compiled here, but only for
the CI targets (RHO_KERNELS_AOT_CC: sm_80 under triton 3.8, sm_90 under triton 3.6, as before:
every target costs minutes of compiling on 2 cores).  A variant of another target that the
report lacks (a kernel edited since the report was made) is not compiled:
test_report_is_current_for_every_target is then skipped, naming the regeneration command
``python benchmarks/triton_aot.py --update benchmarks/results/triton_aot.json``.

Environment:
  RHO_KERNELS_AOT_CC     targets to compile what the report lacks for (default "80,90")
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
ALL = list(aot.TARGETS)
COMMITTED = ROOT / "benchmarks" / "results" / "triton_aot.json"


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("aot") / "triton_aot.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "triton_aot.py"), "--json", str(out),
           "--cc", ",".join(map(str, ALL)), "--compile-cc", ",".join(map(str, CCS)),
           "--jobs", os.environ.get("RHO_KERNELS_AOT_JOBS", str(os.cpu_count() or 1))]
    if COMMITTED.exists():
        cmd += ["--reuse", str(COMMITTED)]
    log = os.environ.get("RHO_KERNELS_BUILD_LOG")
    if log and _flag("RHO_KERNELS_EXPECT_CUDA_BUILD"):
        cmd += ["--cuda-build-log", str(log if os.path.isabs(log) else ROOT / log)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    print(proc.stdout[-4000:])
    assert out.exists(), f"triton_aot.py wrote no report (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    rep = json.loads(out.read_text())
    ((version, summary),) = rep["runs"].items()
    return {**rep, **summary, "triton_version": version}


def test_every_variant_compiles_within_limits(report: dict) -> None:
    assert report["variants"] > 0
    assert not report["failed"], "\n".join(report["failed"])
    cut = [r for r in report["not_compiled"] if r["cc"] in CCS]
    assert not cut, f"{len(cut)} variants of the CI targets were not compiled: {cut[:3]}"


def test_report_covers_every_kernel_path_dtype_and_method(report: dict) -> None:
    recs = report["triton_kernels"]
    for cc in CCS:
        mine = [r for r in recs if r["cc"] == cc and not r.get("not_compiled")]
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


def test_report_is_current_for_every_target(report: dict) -> None:
    """Every target's variants are in the report for this kernel source (the CI targets' were
    compiled above where missing), each within that target's limits (checked above)."""
    stale = [r for r in report["not_compiled"] if r["cc"] not in CCS]
    if stale:
        ccs = sorted({r["cc"] for r in stale})
        kernels = sorted({r["kernel"] for r in stale})
        pytest.skip(f"{len(stale)} variants of {kernels} for sm_{ccs} are not in the committed report for this "
                    f"kernel source under triton {report['triton_version']}: regenerate it with "
                    "`python benchmarks/triton_aot.py --update benchmarks/results/triton_aot.json`")
    assert {r["cc"] for r in report["triton_kernels"]} == set(ALL)


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
    for cc in (86, 89, 120):  # ~100 KB per block (99 KB opt-in), not 228
        assert aot.problems(_rec(cc=cc, shared_bytes=99 * 1024)) == []
        assert "shared memory" in aot.problems(_rec(cc=cc, shared_bytes=99 * 1024 + 1))[0]
    assert aot.problems(_rec(cc=100, shared_bytes=227 * 1024)) == []


_KERNELS = """
import triton
import triton.language as tl

K = 4


@triton.jit
def helper(x):
    return x * HELPER


@triton.jit
def uses(p):
    tl.store(p, helper(tl.load(p)) * K)


@triton.jit
def other(p):
    tl.store(p, tl.load(p) + 1)
"""

_HASHES = """
import importlib.util, json, sys
def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
aot = load("triton_aot", sys.argv[1])
out = {}
for i, path in enumerate(sys.argv[2:]):
    m = load("kmod", path)  # one module name, three versions of its source
    out[i] = [aot.kernel_source_hash(m.uses), aot.kernel_source_hash(m.other)]
print(json.dumps(out))
"""


def test_source_hash_follows_the_kernel_and_what_it_calls(tmp_path) -> None:
    """The cache key: a kernel's hash changes with a helper it calls (or a constant it reads),
    and no other kernel's does.  Run without the interpreter (jit functions must be JITFunctions)."""
    paths = []
    for i, helper in enumerate(("2", "3", "2")):
        path = tmp_path / f"k{i}.py"
        path.write_text(_KERNELS.replace("HELPER", helper).replace("K = 4", "K = 5" if i == 2 else "K = 4"))
        paths.append(str(path))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _HASHES, str(ROOT / "benchmarks" / "triton_aot.py"), *paths],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    h = json.loads(proc.stdout)
    assert h["0"][0] != h["1"][0] and h["0"][0] != h["2"][0]  # the helper's source; the constant K
    assert h["0"][1] == h["1"][1] == h["2"][1]  # "other" calls neither


def test_cache_key_and_merge() -> None:
    rec = {"triton": "3.8.0", "cc": 86, "job_key": "j", "source_hash": "h", "kernel": "k", "variant": "METHOD=3"}
    assert aot.cache_key(rec) == ("3.8.0", 86, "j", "h", "METHOD=3")
    # a folded job whose bounding launch changed (the planner's choice) is not the same compile
    assert aot.cache_key({**rec, "variant": "METHOD=4"}) != aot.cache_key(rec)
    old = {"runs": {"3.6.0": {"x": 1}, "3.8.0": {"x": 2}}, "targets": {"sm_80": {}},
           "triton_kernels": [{**rec, "triton": "3.6.0"}, rec]}
    new = {"runs": {"3.8.0": {"x": 3}}, "targets": {"sm_86": {}}, "triton_kernels": [{**rec, "cc": 120}]}
    got = aot.merge(old, new)
    assert got["runs"] == {"3.6.0": {"x": 1}, "3.8.0": {"x": 3}}
    assert [(r["triton"], r["cc"]) for r in got["triton_kernels"]] == [("3.6.0", 86), ("3.8.0", 120)]
    assert set(got["targets"]) == {"sm_80", "sm_86"}
    assert "compile error" in aot.problems(_rec(error="CompilationError: boom"))[0]
