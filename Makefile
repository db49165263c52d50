# The two commands of the README.  Both install everything they need first.
#   make bench   build, then run the microbenchmark of the fused select op vs the reference
#   make test    build (CUDA kernels compiled and linked too), then run the whole test suite
PY ?= python3
# Compile the CUDA kernels even on a GPU-less machine, so that CI compiles and links them.
CUDA_ARCHS ?= 8.0;9.0
BUILD_LOG ?= build/build.log

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
test: build-cuda
	TRITON_INTERPRET=1 RHO_KERNELS_REQUIRE_EXT=1 RHO_KERNELS_EXPECT_CUDA_BUILD=1 \
	RHO_KERNELS_BUILD_LOG=$(BUILD_LOG) $(PY) -m pytest -q tests
	$(MAKE) --no-print-directory smoke-sdist PY="$(PY)"

# The user's install path: build the sdist, install it into a fresh virtual environment (which
# sees the installed torch), and use it from outside the source tree.  A few minutes: one
# CPU-only compile of the extension.  See tests/smoke_install.sh.
.PHONY: smoke-sdist
smoke-sdist: deps
	PY="$(PY)" bash tests/smoke_install.sh
