#!/usr/bin/env bash
# The install path of a user of the source distribution, end to end:
#   build the sdist -> fresh virtual environment -> pip install the sdist -> use it from a
#   directory outside the source tree (tests/smoke_install.py: import, backends, select vs the
#   reference on CPU, `python -m rho_kernels bench` on a tiny shape, `python -m rho_kernels info`).
# The venv sees the installed torch, so nothing is downloaded, and the
# extension is built CPU-only (the main build already compiles the CUDA kernels).
# Usage: tests/smoke_install.sh   (PY=python3 by default; KEEP=1 keeps the work directory)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PY:-python3}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/rho_kernels_smoke.XXXXXX")"
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT
start=$(date +%s)
step() { echo "== smoke-sdist [$(( $(date +%s) - start ))s] $*"; }
run_logged() {  # run "$@" with its output in $WORK/$1.log, shown only on failure
    local log="$WORK/$1.log"; shift
    "$@" > "$log" 2>&1 || { tail -60 "$log"; echo "smoke-sdist: FAILED: $*" >&2; exit 1; }
}

step "building the sdist"
# --no-isolation: the build requirements (torch included) are the installed ones.  Run from
# $WORK: in the checkout, its build/ folder would shadow the `build` module.
cd "$WORK"
run_logged sdist "$PY" -m build --sdist --no-isolation --outdir "$WORK/dist" "$ROOT"
SDIST="$(ls "$WORK"/dist/rho_kernels-*.tar.gz)"
echo "$(basename "$SDIST"): $(tar tzf "$SDIST" | grep -vc '/$') files"
tar tzf "$SDIST" | grep -v '/$' | sed 's|^[^/]*/|  |'

step "installing it into a fresh virtual environment ($WORK/venv)"
"$PY" -m venv --without-pip "$WORK/venv"
VPY="$WORK/venv/bin/python"
# The venv sees the development environment's site-packages (torch, pip, setuptools, ninja) as
# plain path entries after its own: their .pth hooks do not run, so an editable install of this
# checkout there cannot stand in for a module the sdist lacks.
"$PY" -c 'import sys; print("\n".join(p for p in sys.path if p.rstrip("/").endswith(("site-packages", "dist-packages"))))' \
    > "$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_development_env.pth"
run_logged install env RHO_KERNELS_SKIP_CUDA=1 "$VPY" -m pip install -v --no-index --no-build-isolation --no-deps "$SDIST"

step "smoke test from $WORK/run (outside the source tree)"
mkdir -p "$WORK/run"
cp "$ROOT/tests/smoke_install.py" "$WORK/run/"
(cd "$WORK/run" && env -u PYTHONPATH -u TRITON_INTERPRET SMOKE_SOURCE_TREE="$ROOT" "$VPY" smoke_install.py)
step "passed"
