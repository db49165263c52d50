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


@pytest.mark.parametrize("fail,stage", [("pytest", "pytest 1/2"), ("build_ext", "second environment")])
def test_make_test_names_the_stage_that_failed(tmp_path, fail, stage):
    if not (ROOT / ".ci" / "gpu_versions.sh").exists():
        pytest.skip("not a checkout (.ci/ is not in the sdist)")
    proc = make("test", tmp_path, FAKE_FAIL=fail)
    assert proc.returncode != 0
    assert re.search(rf"^== {re.escape(stage)}: FAILED after \d+ s$", proc.stdout, re.M), proc.stdout
