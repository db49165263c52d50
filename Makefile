# The two commands of the README.  Both install what they need first.
#   make bench   install the build and benchmark requirements (requirements-bench.txt), build,
#                then run the microbenchmark of the fused select op vs the reference
#   make test    install everything (requirements.txt), build (CUDA kernels compiled and linked
#                too), then run the whole test suite
#   make clean   remove build/ (the build log and the second environment of `make test`) and dist/
PY ?= python3
# Compile the CUDA kernels even on a GPU-less machine, so that CI compiles and links them.
CUDA_ARCHS ?= 8.0;9.0
BUILD_DIR ?= build
DIST_DIR ?= dist
BUILD_LOG ?= $(BUILD_DIR)/build.log
# The GPU machine's torch/triton, for the second half of `make test` (created once, then reused).
GPU_VERSIONS_ENV ?= $(BUILD_DIR)/env-torch2.11
# pytest-xdist workers (one per core of the 2-core CI machine).
TEST_JOBS ?= 2

# $(call stage,NAME,WHAT,COMMAND): COMMAND between two banner lines, "== NAME: WHAT" and
# "== NAME: done in N s", with the time since the make command began (RHO_MAKE_T0, kept by the
# recursive make): a long silent stretch says what it is, where its log is and how long it took.
# (No commas in WHAT or COMMAND: make's call would split them.)
ifndef RHO_MAKE_T0
RHO_MAKE_T0 := $(shell date +%s)
endif
export RHO_MAKE_T0
stage = @t=$$(date +%s); echo "== $(1): $(2)  [at $$((t - $(RHO_MAKE_T0))) s]"; \
	$(3) || { echo "== $(1): FAILED after $$(($$(date +%s) - t)) s"; exit 1; }; \
	echo "== $(1): done in $$(($$(date +%s) - t)) s  [at $$(($$(date +%s) - $(RHO_MAKE_T0))) s]"

.PHONY: deps deps-bench build build-cuda bench test clean

deps:
	$(call stage,deps,pip install -r requirements.txt (quiet; the first run downloads torch),\
		$(PY) -m pip install -q -r requirements.txt)

deps-bench:
	$(call stage,deps,pip install -r requirements-bench.txt (quiet; the first run downloads torch),\
		$(PY) -m pip install -q -r requirements-bench.txt)

build: deps-bench
	@mkdir -p $(dir $(BUILD_LOG))
	$(call stage,build,the extension's CPU kernels (minutes; full log: $(BUILD_LOG)),\
		$(PY) -m pip install -v --no-build-isolation -e . > $(BUILD_LOG) 2>&1 || (tail -50 $(BUILD_LOG); exit 1))

build-cuda: deps
	@mkdir -p $(dir $(BUILD_LOG))
	$(call stage,build,the extension's CPU and CUDA kernels for $(CUDA_ARCHS) (minutes; full log: $(BUILD_LOG)),\
		TORCH_CUDA_ARCH_LIST="$(CUDA_ARCHS)" $(PY) -m pip install -v --no-build-isolation -e . > $(BUILD_LOG) 2>&1 || (tail -50 $(BUILD_LOG); exit 1))

bench: build
	$(call stage,bench,python -m rho_kernels bench,$(PY) -m rho_kernels bench)

# TRITON_INTERPRET=1 runs every Triton kernel on the CPU; RHO_KERNELS_BUILD_LOG lets the
# suite check that the extension (CUDA part included) really built, without warnings.
# The Triton AOT compile test (tests/test_triton_aot.py) takes minutes per target on 2 cores, so
# each target is compiled once per run: sm_80 here (triton 3.8), sm_90 in the second environment
# (triton 3.6, the GPU machine's pair), which then repeats the CPU kernel tests and the Triton
# interpreter suite under torch 2.11 (.ci/gpu_versions.sh).
test: build-cuda
	$(call stage,pytest 1/2,the whole suite under the installed torch and triton (TRITON_INTERPRET=1; $(TEST_JOBS) workers),\
		TRITON_INTERPRET=1 RHO_KERNELS_REQUIRE_EXT=1 RHO_KERNELS_EXPECT_CUDA_BUILD=1 RHO_KERNELS_AOT_CC=80 \
		RHO_KERNELS_BUILD_LOG=$(BUILD_LOG) $(PY) -m pytest -q -n $(TEST_JOBS) tests)
	$(call stage,second environment,torch 2.11 + triton 3.6 in $(GPU_VERSIONS_ENV) (.ci/gpu_versions.sh: pytest 2/2),\
		bash .ci/gpu_versions.sh $(PY) $(GPU_VERSIONS_ENV))
	$(call stage,smoke-sdist,the sdist installed into a fresh venv (tests/smoke_install.sh),\
		$(MAKE) --no-print-directory smoke-sdist PY="$(PY)")

# The user's install path: build the sdist, install it into a fresh virtual environment (which
# sees the installed torch), and use it from outside the source tree.  A few minutes: one
# CPU-only compile of the extension.  See tests/smoke_install.sh.
.PHONY: smoke-sdist
smoke-sdist: deps
	PY="$(PY)" bash tests/smoke_install.sh

clean:
	rm -rf $(BUILD_DIR) $(DIST_DIR)
