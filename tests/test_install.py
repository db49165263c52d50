"""Installation: what the source distribution holds, the build record that guards the extension
against a different torch at run time, and ``python -m rho_kernels info``.

The full sdist -> fresh virtual environment -> smoke path is tests/smoke_install.sh (``make
smoke-sdist``, run by ``make test``); these are the cheap checks that run with the suite.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest
import torch

import rho_kernels as rk
from rho_kernels.backends import _extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG_DIR = os.path.dirname(os.path.abspath(rk.__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


# --------------------------------------------------------------------------- the source distribution
@pytest.fixture(scope="module")
def sdist_files(tmp_path_factory) -> set[str]:
    out = tmp_path_factory.mktemp("sdist")
    proc = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, RHO_KERNELS_NO_EXT="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (tarball,) = glob.glob(str(out / "rho_kernels-*.tar.gz"))
    with tarfile.open(tarball) as tar:
        # "rho_kernels-0.1.0/csrc/rho_math.h" -> "csrc/rho_math.h"
        return {m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile()}


def test_sdist_holds_every_source_a_build_needs(sdist_files):
    csrc = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "**", "*"), recursive=True)
            if os.path.isfile(p)}
    assert {"csrc/rho_math.h", "csrc/cpu/select_cpu_aten.h", "csrc/cuda/row_scan.cuh", "csrc/cuda/select_cuda.cu"} <= csrc
    package = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "rho_kernels", "**", "*.py"), recursive=True)}
    meta = {"setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "LICENSE", "CHANGELOG.md", "Makefile",
            "requirements.txt", "requirements-bench.txt"}  # the Makefile installs from both
    missing = sorted((csrc | package | meta) - sdist_files)
    assert not missing, f"the sdist lacks {missing}"


def test_sdist_holds_no_results_or_build_outputs(sdist_files):
    bad = sorted(f for f in sdist_files
                 if f.startswith(("benchmarks/results/", "build/", "dist/")) or "__pycache__" in f
                 or f.endswith((".so", ".o", ".pyc")) or os.path.basename(f) == _extension.BUILD_RECORD_NAME)
    assert not bad, f"the sdist holds files no build needs: {bad}"


def test_version_in_one_place():
    from rho_kernels import _version

    assert rk.__version__ == _version.__version__
    setup_py = open(os.path.join(ROOT, "setup.py")).read()
    assert "version=read_version()" in setup_py and '"0.1.0"' not in setup_py
    assert f"## [{rk.__version__}]" in open(os.path.join(ROOT, "CHANGELOG.md")).read()


# --------------------------------------------------------------------------- the build record
def test_torch_mismatch_rule():
    running = str(torch.__version__)
    assert _extension.torch_mismatch({"torch": running}) is None
    assert _extension.torch_mismatch(None) is None  # no record: nothing to compare (older builds)
    msg = _extension.torch_mismatch({"torch": "2.6.0+cpu"}, running="2.14.1+cu130")
    assert msg and "2.6.0+cpu" in msg and "2.14.1+cu130" in msg and "--no-build-isolation" in msg
    # Another local build of the same release is another binary.
    assert _extension.torch_mismatch({"torch": "2.14.1+cpu"}, running="2.14.1+cu130")


def test_build_record_of_this_build():
    """The build that make test runs (pip install -e) writes the record beside the loaded _C."""
    if not _flag("RHO_KERNELS_REQUIRE_EXT"):
        pytest.skip("RHO_KERNELS_REQUIRE_EXT is not 1: this checkout may run without a fresh build")
    record = _extension.BUILD_RECORD
    assert record is not None, f"no readable build record at {_extension.BUILD_RECORD_PATH}: setup.py did not write it"
    assert record["torch"] == str(torch.__version__)
    assert record["rho_kernels"] == rk.__version__
    assert record["cpu_isa"] in ("AVX512", "AVX2", "DEFAULT"), record
    if _flag("RHO_KERNELS_EXPECT_CUDA_BUILD"):
        assert record["with_cuda"] is True and record["cuda_archs"], record
        assert all(a.startswith(("sm_", "compute_")) for a in record["cuda_archs"]), record


_MISMATCH_CHECK = r"""
import sys, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch, rho_kernels as rk
from rho_kernels import info
from rho_kernels.backends import _extension
assert rk.__file__.startswith(sys.argv[1]), rk.__file__
msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
assert any("0.0.1+mismatch" in m and str(torch.__version__) in m and "--no-build-isolation" in m for m in msgs), msgs
assert "rho_kernels._C" not in sys.modules, "the mismatched extension was loaded"
assert not hasattr(torch.ops.rho_kernels, "select_rows"), "its ops are registered"
assert "0.0.1+mismatch" in _extension.LOAD_ERROR
backends = rk.available_backends("cpu")
assert backends == ["reference", "triton"], backends
g = torch.Generator().manual_seed(0)
x = torch.randn(33, 7, generator=g); t = torch.randint(0, 7, (33,), generator=g); il = torch.rand(33, generator=g)
want = rk.select(x, t, il, 5, backend="reference")
for b in ("auto", "triton"):
    got = rk.select(x, t, il, 5, backend=b)
    assert torch.equal(got.indices, want.indices) and torch.equal(got.valid, want.valid), (b, got, want)
report = info.format_report(info.collect())
assert "installed is " + str(torch.__version__) in report and "loaded           no:" in report, report
print("ok")
"""


def test_extension_built_against_another_torch_is_not_loaded(tmp_path):
    """A copy of the package whose build record names another torch: importing it warns with
    both versions and the fix, leaves _C unloaded, and selects through reference and Triton."""
    site = tmp_path / "site"
    shutil.copytree(PKG_DIR, site / "rho_kernels", ignore=shutil.ignore_patterns("__pycache__", "_C*"))
    built = sorted(glob.glob(os.path.join(PKG_DIR, "_C.*so")))
    if built:
        shutil.copy2(built[0], site / "rho_kernels")
    else:  # no build here: a file that is not a loadable library shows the record is read first
        (site / "rho_kernels" / "_C.abi3.so").write_bytes(b"not a shared library")
    record = dict(_extension.BUILD_RECORD or {}, torch="0.0.1+mismatch")
    (site / "rho_kernels" / _extension.BUILD_RECORD_NAME).write_text(json.dumps(record))
    env = dict(os.environ, PYTHONPATH=str(site), TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _MISMATCH_CHECK, str(site)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-4000:]


# --------------------------------------------------------------------------- python -m rho_kernels info
def _run_module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rho_kernels", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_info_json_matches_this_process():
    proc = _run_module("info", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(proc.stdout)
    assert data["rho_kernels"] == rk.__version__ and data["torch"] == str(torch.__version__)
    assert data["torch_cuda"] == torch.version.cuda and data["cuda_available"] == torch.cuda.is_available()
    ext = data["extension"]
    assert ext["loaded"] == (_extension.LOAD_ERROR is None)
    assert ext["cuda_verified"] == _extension.CUDA_VERIFIED
    assert ext["cpu_kernel"] == _extension.has_kernel("CPU") and ext["cuda_kernel"] == _extension.has_kernel("CUDA")
    assert ext["build_record"] == _extension.BUILD_RECORD
    if ext["cpu_kernel"]:
        assert ext["cpu_instruction_set"]
    for device in ("cpu", "cuda"):
        b = data["backends"][device]
        assert sorted(b["available"] + list(b["unavailable"])) == sorted(rk.BACKENDS)
        assert all(isinstance(r, str) and r for r in b["unavailable"].values()), b
    assert data["backends"]["cpu"]["available"] == rk.available_backends("cpu")
    assert data["backends"]["cpu"]["auto"] in data["backends"]["cpu"]["available"]


def test_info_report_names_every_backend_and_the_build():
    proc = _run_module("info")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for needle in (f"rho_kernels        {rk.__version__}", f"torch              {torch.__version__}", "triton",
                   "extension rho_kernels._C", "built against", "CPU kernel", "CUDA kernel",
                   "backends on cpu (auto -> ", "backends on cuda (auto -> "):
        assert needle in out, f"{needle!r} missing from:\n{out}"
    for name in rk.BACKENDS:
        assert out.count(f"  {name} ") >= 2, f"backend {name} not reported for both devices:\n{out}"
    if _extension.has_kernel("CUDA"):
        assert "verified on a GPU: " + ("yes" if _extension.CUDA_VERIFIED else "no") in out


def test_cli_help_lists_info():
    proc = _run_module("--help")
    assert proc.returncode == 0 and "info" in proc.stdout and "bench" in proc.stdout


def test_smoke_check_prints_the_reason_only_on_failure(capsys):
    """tests/smoke_install.py: "ok the extension loaded", not "ok the extension loaded (None)"."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("smoke_install", os.path.join(ROOT, "tests", "smoke_install.py"))
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    smoke.check(True, "the extension loaded", None)
    smoke.check(True, "bench exits 0", "")
    assert capsys.readouterr().out == "smoke: ok   the extension loaded\nsmoke: ok   bench exits 0\n"
    with pytest.raises(SystemExit, match=r"^smoke: FAILED: the extension loaded \(no _C\)$"):
        smoke.check(False, "the extension loaded", "no _C")
