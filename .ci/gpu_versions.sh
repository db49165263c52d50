#!/usr/bin/env bash
# The second half of `make test`: the GPU machine's versions (torch 2.11.0, triton 3.6.0, numpy < 2.4,
# which triton 3.6's interpreter needs) in a second environment under build/, kept between runs.
# There the CPU kernels are built against torch 2.11 in a copy of the sources (the main build's
# rho_kernels/_C stays as it is), then the CPU kernel tests, the Triton interpreter suite and the
# Triton ahead-of-time compile test run.  The reference backend is not run as a backend under test
# of the big conformance grid here (it still computes every test's expected values, under torch
# 2.11, and its compile/gradient tests run): the main environment covers it.
#
#   .ci/gpu_versions.sh PYTHON ENV_DIR
#
# Only torch, triton and numpy are installed into the venv (--no-deps); everything else (the CUDA
# 13 runtime libraries torch's import loads, pytest, sympy, ...) is found in PYTHON's environment,
# behind the venv's own packages, through a .pth file.  torch 2.11's cu13 wheel is ~530 MB.
set -euo pipefail
PY="$1"
ENV="$(realpath -m "$2")"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PINS=("torch==2.11.0" "triton==3.6.0" "numpy<2.4")
EPY="$ENV/bin/python"

have_pins() {
    "$EPY" - <<'PYEOF' 2>/dev/null
import numpy, torch, triton
assert torch.__version__.split("+")[0] == "2.11.0", torch.__version__
assert triton.__version__ == "3.6.0", triton.__version__
assert tuple(int(x) for x in numpy.__version__.split(".")[:2]) < (2, 4), numpy.__version__
PYEOF
}

# One banner line per stage, with its elapsed time (as the Makefile's stages).
banner() { echo "== gpu-versions: $*"; }

t0=$SECONDS
if [ -x "$EPY" ] && have_pins; then
    banner "reusing $ENV"
else
    banner "installing ${PINS[*]} into $ENV (first run only: ~530 MB download, ~2 GB on disk)"
    rm -rf "$ENV"
    "$PY" -m venv "$ENV"
    site="$("$EPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    "$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$site/zz_main_env.pth"
    "$EPY" -m pip install -q --disable-pip-version-check --no-deps "${PINS[@]}"
    have_pins
    banner "installed in $((SECONDS - t0)) s ($(du -sh "$ENV" | cut -f1))"
fi
"$EPY" -c 'import torch, triton, numpy; print("== gpu-versions: torch", torch.__version__, "triton", triton.__version__, "numpy", numpy.__version__)'

SRC="$ENV/src"
rm -rf "$SRC"
mkdir -p "$SRC"
cp -r "$ROOT/setup.py" "$ROOT/pyproject.toml" "$ROOT/README.md" "$ROOT/LICENSE" "$ROOT/CHANGELOG.md" "$ROOT/csrc" "$ROOT/rho_kernels" "$ROOT/tests" "$ROOT/benchmarks" "$ROOT/python" "$SRC/"
find "$SRC" \( -name '*.so' -o -name __pycache__ \) -prune -exec rm -rf {} +
t1=$SECONDS
banner "building the CPU kernels against torch 2.11 in $SRC (minutes; full log: $SRC/build.log)"
(cd "$SRC" && RHO_KERNELS_SKIP_CUDA=1 "$EPY" setup.py build_ext --inplace > build.log 2>&1) || { tail -50 "$SRC/build.log"; banner "build FAILED after $((SECONDS - t1)) s"; exit 1; }
banner "CPU kernels built in $((SECONDS - t1)) s"

cd "$SRC"
t2=$SECONDS
banner "pytest 2/2: CPU kernel tests, the Triton interpreter suite and the sm_90 AOT compile under torch 2.11 (${TEST_JOBS:-2} workers)"
TRITON_INTERPRET=1 RHO_KERNELS_REQUIRE_EXT=1 RHO_KERNELS_BUILD_LOG="$SRC/build.log" RHO_KERNELS_AOT_CC="${RHO_KERNELS_AOT_CC:-90}" \
    RHO_KERNELS_TEST_LOWER_ISAS=0 "$EPY" -m pytest -q -p no:cacheprovider -n "${TEST_JOBS:-2}" \
    tests/test_build.py tests/test_conformance.py tests/test_triton_paths.py tests/test_selective.py tests/test_triton_aot.py \
    -k "not (test_scores_and_selection and reference)"
banner "pytest 2/2 done in $((SECONDS - t2)) s"
