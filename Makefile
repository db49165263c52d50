# The two commands of the README.  Both install everything they need first.
#   make bench   build, then run the microbenchmark of the fused select op vs the reference
#   make test    build (CUDA kernels compiled and linked too), then run the whole test suite
PY ?= python3
# Compile the CUDA kernels even on a GPU-less machine, so that CI compiles and links them.
CUDA_ARCHS ?= 8.0;9.0
BUILD_LOG ?= build/build.log
# The GPU machine's torch/triton, for the second half of `make test` (created once, then reused).
GPU_VERSIONS_ENV ?= build/env-torch2.11
# pytest-xdist workers (one per core of the 2-core CI machine).
TEST_JOBS ?= 2

.PHONY: deps build build-cuda bench test

deps:
	$(PY) -m pip install -q -r requirements.txt

build: deps
	mkdir -p build
	$(PY) -m pip install -v --no-build-isolation -e . > $(BUILD_LOG) 2>&1 || (tail -50 $(BUILD_LOG); exit 1)

build-cuda: deps
	mkdir -p build
	TORCH_CUDA_ARCH_LIST="$(CUDA_ARCHS)" $(PY) -m pip install -v --no-build-isolation -e . > $(BUILD_LOG) 2>&1 || (tail -50 $(BUILD_LOG); exit 1)

bench: build
	$(PY) -m rho_kernels bench

# TRITON_INTERPRET=1 runs every Triton kernel on the CPU; RHO_KERNELS_BUILD_LOG lets the
# suite check that the extension (CUDA part included) really built, without warnings.
# The Triton AOT compile test (tests/test_triton_aot.py) takes minutes per target on 2 cores, so
# each target is compiled once per run: sm_80 here (triton 3.8), sm_90 in the second environment
# (triton 3.6, the GPU machine's pair), which then repeats the CPU kernel tests and the Triton
# interpreter suite under torch 2.11 (.ci/gpu_versions.sh).
test: build-cuda
	TRITON_INTERPRET=1 RHO_KERNELS_REQUIRE_EXT=1 RHO_KERNELS_EXPECT_CUDA_BUILD=1 RHO_KERNELS_AOT_CC=80 \
	RHO_KERNELS_BUILD_LOG=$(BUILD_LOG) $(PY) -m pytest -q -n $(TEST_JOBS) tests
	bash .ci/gpu_versions.sh $(PY) $(GPU_VERSIONS_ENV)
	$(MAKE) --no-print-directory smoke-sdist PY="$(PY)"

# The user's install path: build the sdist, install it into a fresh virtual environment (which
# sees the installed torch), and use it from outside the source tree.  A few minutes: one
# CPU-only compile of the extension.  See tests/smoke_install.sh.
.PHONY: smoke-sdist
smoke-sdist: deps
	PY="$(PY)" bash tests/smoke_install.sh
