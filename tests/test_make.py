"""The README's two commands as a newcomer sees them: the Makefile's stages announce themselves.

`make` runs here with a stand-in for Python (FAKE_PY below) that does nothing but succeed (or
fail on request), so the recipes, the banner lines and .ci/gpu_versions.sh's stages run for
real in about a second, without installing, building or testing anything.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# `python ARGS`: succeeds, printing nothing, except where a recipe needs an answer or a file:
# a venv (a bin/python that is this script again), the sdist (an empty tarball), a
# site-packages path.  FAKE_FAIL=WORD fails any call whose arguments contain WORD.
FAKE_PY = r"""#!/usr/bin/env bash
echo "$*" >> "$FAKE_CALLS"
if [ -n "${FAKE_FAIL:-}" ] && [[ "$*" == *"$FAKE_FAIL"* ]]; then echo "fake failure: $*"; exit 3; fi
case "$*" in
  *"-m venv"*) env="${@: -1}"; mkdir -p "$env/bin"; ln -sf "$FAKE_SELF" "$env/bin/python" ;;
  *"-m build"*) out="$(echo "$*" | sed -n 's/.*--outdir \([^ ]*\).*/\1/p')"; mkdir -p "$out/x"
                touch "$out/x/setup.py"; tar czf "$out/rho_kernels-0.0.0.tar.gz" -C "$out" x ;;
  *sysconfig*) echo "$FAKE_SITE" ;;
esac
exit 0
"""

BANNER = re.compile(r"^== (?P<name>[^:]+): (?P<what>.*?)(  \[at (?P<at>\d+) s\])?$")


def make(target: str, tmp_path: Path, *extra: str, **env) -> subprocess.CompletedProcess:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    fake = tmp_path / "python"
    fake.write_text(FAKE_PY)
    fake.chmod(0o755)
    (tmp_path / "site").mkdir(exist_ok=True)
    gpu_env = tmp_path / "env-torch2.11"
    (gpu_env / "bin").mkdir(parents=True, exist_ok=True)  # an existing second environment: reused
    if not (gpu_env / "bin" / "python").exists():
        (gpu_env / "bin" / "python").symlink_to(fake)
    env = dict(os.environ, FAKE_CALLS=str(tmp_path / "calls"), FAKE_SELF=str(fake), FAKE_SITE=str(tmp_path / "site"),
               TMPDIR=str(tmp_path), **env)
    env.pop("RHO_MAKE_T0", None)
    for var in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS"):  # when the suite itself runs under `make test`
        env.pop(var, None)
    return subprocess.run(["make", "--no-print-directory", target, f"PY={fake}",
                           f"BUILD_LOG={tmp_path / 'build' / 'build.log'}", f"GPU_VERSIONS_ENV={gpu_env}", *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def banners(stdout: str) -> list[re.Match]:
    return [m for m in map(BANNER.match, stdout.splitlines()) if m]


def test_make_bench_announces_each_stage(tmp_path):
    proc = make("bench", tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [(m["name"], m["what"]) for m in banners(proc.stdout)]
    names = [n for n, w in lines if not w.startswith("done in")]
    assert names == ["deps", "build", "bench"], proc.stdout
    assert [n for n, w in lines if w.startswith("done in")] == names, proc.stdout
    build = lines[names.index("build") * 2][1]
    assert f"full log: {tmp_path / 'build' / 'build.log'}" in build, build
    assert (tmp_path / "build" / "build.log").exists()  # the build's output went to the log it names
    installs = [c for c in (tmp_path / "calls").read_text().splitlines() if "pip install" in c and " -r " in c]
    assert installs == ["-m pip install -q -r requirements-bench.txt"], installs  # not the test tools


def test_make_test_announces_each_stage(tmp_path):
    if not (ROOT / ".ci" / "gpu_versions.sh").exists():
        pytest.skip("not a checkout (.ci/ is not in the sdist)")
    proc = make("test", tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = banners(proc.stdout)
    started = [m["name"] for m in found if not m["what"].startswith("done in")]
    # the second environment's own stages (.ci/gpu_versions.sh) sit inside its make stage; the
    # smoke test's recursive make installs the requirements again (a no-op once they are there)
    assert started == ["deps", "build", "pytest 1/2", "second environment"] + ["gpu-versions"] * 5 + [
        "smoke-sdist", "deps"], proc.stdout
    done = [m["name"] for m in found if m["what"].startswith("done in")]
    assert done == ["deps", "build", "pytest 1/2", "second environment", "deps", "smoke-sdist"], proc.stdout
    for m in found:
        if m["name"] != "gpu-versions":
            assert m["at"] is not None, m.group(0)  # time since `make test` began
    text = proc.stdout
    assert "full log: " + str(tmp_path / "build" / "build.log") in text
    assert "gpu-versions: reusing" in text and "/src/build.log" in text
    assert re.search(r"gpu-versions: pytest 2/2 done in \d+ s", text), text
    assert "== smoke-sdist [" in text  # tests/smoke_install.sh's own steps
    installs = {c for c in (tmp_path / "calls").read_text().splitlines() if "pip install" in c and " -r " in c}
    assert installs == {"-m pip install -q -r requirements.txt"}, installs  # everything


@pytest.mark.parametrize("fail,stage", [("pytest", "pytest 1/2"), ("build_ext", "second environment")])
def test_make_test_names_the_stage_that_failed(tmp_path, fail, stage):
    if not (ROOT / ".ci" / "gpu_versions.sh").exists():
        pytest.skip("not a checkout (.ci/ is not in the sdist)")
    proc = make("test", tmp_path, FAKE_FAIL=fail)
    assert proc.returncode != 0
    assert re.search(rf"^== {re.escape(stage)}: FAILED after \d+ s$", proc.stdout, re.M), proc.stdout


def _requirements(name: str) -> list[str]:
    """The distributions a requirements file names, following its -r includes (names normalised)."""
    out = []
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r "):
            out += _requirements(line[3:].strip())
        elif line:
            out.append(re.split(r"[<>=!~\[ ;]", line)[0].lower().replace("_", "-"))
    return out


def test_make_test_installs_what_make_bench_does_and_more():
    bench, full = _requirements("requirements-bench.txt"), _requirements("requirements.txt")
    assert set(bench) < set(full)
    assert {"torch", "triton", "numpy", "ninja", "setuptools"} <= set(bench)
    assert not set(bench) & {"transformers", "accelerate", "lightning", "scikit-learn", "pytest", "matplotlib"}


def _closure(names) -> set[str]:
    """The installed distributions ``names`` pull in: themselves and their requirements,
    transitively (no extras; markers evaluated for this machine)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for text in reqs:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name.lower().replace("_", "-"))
    return seen


def test_bench_needs_only_its_requirements():
    """`python -m rho_kernels bench` (its defaults: the compiled reference too) runs with the
    distributions that only requirements.txt brings in (pytest, transformers, lightning, ... and
    what they pull in) hidden from the import system: requirements-bench.txt is enough."""
    from importlib import metadata

    test_only = _closure(_requirements("requirements.txt")) - _closure(_requirements("requirements-bench.txt"))
    assert {"transformers", "lightning", "scikit-learn", "pytest"} <= test_only
    # setuptools falls back to its vendored copies (packaging, jaraco, ...) where they are not installed
    import setuptools

    vendor = Path(setuptools.__file__).parent / "_vendor"
    vendored = {p.name.removesuffix(".py") for p in vendor.iterdir()} if vendor.is_dir() else set()
    hidden = sorted(top for top, dists in metadata.packages_distributions().items()
                    if all(d.lower().replace("_", "-") in test_only for d in dists) and top not in vendored)
    assert "transformers" in hidden and "sklearn" in hidden
    # None in sys.modules: `import x` raises ModuleNotFoundError and importlib.util.find_spec("x")
    # says None, as for a distribution that is not installed.
    code = f"""
import sys
sys.modules.update(dict.fromkeys({hidden!r}))
from rho_kernels import benchmark
sys.exit(benchmark.main(["--device", "cpu", "--shapes", "3x7", "--dtypes", "float32", "--repeats", "1"]))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "compiled" in proc.stdout and "ERROR" not in proc.stdout, proc.stdout


def test_make_clean_removes_the_build_outputs(tmp_path):
    for d in ("build/env-torch2.11/bin", "dist"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "build" / "build.log").write_text("log")
    keep = tmp_path / "keep"
    keep.mkdir()
    proc = make("clean", tmp_path, f"BUILD_DIR={tmp_path / 'build'}", f"DIST_DIR={tmp_path / 'dist'}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not (tmp_path / "build").exists() and not (tmp_path / "dist").exists() and keep.exists()
    dry = subprocess.run(["make", "--no-print-directory", "-n", "clean"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert dry.stdout.split() == ["rm", "-rf", "build", "dist"], dry.stdout  # by default: the checkout's
