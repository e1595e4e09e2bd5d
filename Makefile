# Two entry points do all set-up on a fresh machine (see README.md):
#   make bench   -- create the virtual environment, install everything, run `moe-bench`
#   make test    -- same set-up, then lint, the test suites and the static GPU gate
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.14.1
# CUTLASS's C++ headers for the CUDA extension's grouped GEMM (csrc/cuda/cutlass/)
CUTLASS ?= nvidia-cutlass==4.2.0.0
# Backends that must be available here; a backend that failed to build fails the tests.
REQUIRE ?= reference,cpu
BIN := $(VENV)/bin
export MAX_JOBS ?= 2
# GPU architectures of the CUDA extension (9.0a, not 9.0: the sm_90a features need the "a" target)
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0a
# The CUDA root for the extension build when CUDA_HOME is unset: /usr/local/cuda if it holds nvcc,
# else the folder above the nvcc found on PATH (PATH may hold a wrapper script, which is why
# /usr/local/cuda comes first).
CUDA_HOME ?= $(or $(realpath $(patsubst %/bin/nvcc,%,$(wildcard /usr/local/cuda/bin/nvcc))),$(patsubst %/bin/nvcc,%,$(realpath $(shell command -v nvcc 2>/dev/null))))
# "True" when the installed torch is a CUDA build (evaluated when a recipe runs, after the venv
# exists).
TORCH_IS_CUDA = $(shell $(BIN)/python -c "import torch; print(torch.version.cuda is not None)" 2>/dev/null)
# 1: the install step must build moe_kernels._C_cuda (it fails loudly if it cannot, e.g. without
# nvcc) and the tests require it; the default with a CUDA build of torch.  0: skip it (the
# default with a CPU-only torch).  Set MOE_KERNELS_BUILD_CUDA=0 or 1 to choose.
BUILD_CUDA = $(or $(MOE_KERNELS_BUILD_CUDA),$(if $(filter True,$(TORCH_IS_CUDA)),1,0))
comma := ,
# Compiled extensions whose absence fails the tests (MOE_KERNELS_REQUIRE_BUILT, tests/conftest.py).
REQUIRE_BUILT ?= _C$(if $(filter 1,$(BUILD_CUDA)),$(comma)_C_cuda)
# make test-sanitizer: the compute-sanitizer binary, its tools (run one after the other) and the
# test files (only the tests marked gpu among them run).
SANITIZER ?= $(firstword $(shell command -v compute-sanitizer 2>/dev/null) $(wildcard $(CUDA_HOME)/bin/compute-sanitizer) compute-sanitizer)
SANITIZER_TOOLS ?= memcheck racecheck
SANITIZER_TESTS ?= .

.PHONY: venv install bench bench-results test lint test-py test-triton gate test-gpu test-sanitizer clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

venv: $(BIN)/python
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q "$(TORCH)" numpy pybind11 ninja "$(CUTLASS)"

# With a CUDA build of torch, MOE_KERNELS_BUILD_CUDA=1 (BUILD_CUDA above) makes the build fail
# loudly when the CUDA extension cannot be built (no nvcc, no CUDA_HOME) instead of leaving it out.
install: venv
	$(if $(CUDA_HOME),CUDA_HOME="$(CUDA_HOME)") MOE_KERNELS_BUILD_CUDA=$(BUILD_CUDA) \
		$(BIN)/pip install -q --no-build-isolation ".[test,bench,triton]"

bench: install
	cd /tmp && $(abspath $(BIN))/moe-bench

# Refresh this machine type's recorded results, bench/results/<machine>.json and .png (README.md,
# "Recorded results"); run it on a quiet machine.
bench-results: install
	$(BIN)/python bench/record_results.py

# C++ sources checked against .clang-format (the clang-format pinned in the test extra).
CXX_SOURCES = $(wildcard csrc/*.cpp csrc/*/*.h csrc/*/*.cpp csrc/*/*.cu csrc/*/*.cuh csrc/*/*/*.h csrc/*/*/*.cu csrc/*/*/*.cuh tests/cpp/*.cpp)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/clang-format --dry-run -Werror $(CXX_SOURCES)
	$(BIN)/check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml
	$(BIN)/shellcheck .ci/run bench/*.sh

# Tests run against the installed package: pytest is started from tests/ so the source tree's
# moe_kernels/ (which has no compiled extension) is not on sys.path.  The op modules run every
# backend usable here; the Triton interpreter must be on before triton is imported, so the Triton
# backend runs them again in a second process (tiny cases only).
OP_TESTS := test_gating.py test_routing.py test_permute.py test_grouped_gemm.py test_moe_ffn.py

test-py: install
	cd tests && MOE_KERNELS_REQUIRE_BACKENDS=$(REQUIRE) MOE_KERNELS_REQUIRE_BUILT=$(REQUIRE_BUILT) \
		MOE_KERNELS_TEST_INSTALLED=1 TORCHINDUCTOR_COMPILE_THREADS=1 \
		$(abspath $(BIN))/pytest -q -p no:cacheprovider .

test-triton: install
	cd tests && TRITON_INTERPRET=1 MOE_KERNELS_TEST_BACKENDS=triton \
		MOE_KERNELS_REQUIRE_BACKENDS=reference,triton MOE_KERNELS_TEST_INSTALLED=1 \
		$(abspath $(BIN))/pytest -q -p no:cacheprovider $(OP_TESTS) test_values.py test_triton_poison.py test_layer_training.py

gate: install
	cd /tmp && MOE_KERNELS_REQUIRE_BUILT=$(REQUIRE_BUILT) $(abspath $(BIN))/python -m moe_kernels.tools.gpu_gate

test: lint test-py test-triton gate

# GPU machines only (without a device every test is skipped): the tests marked gpu, on every
# backend usable there; the cuda backend and its extension must be available.
GPU_TEST_ENV = MOE_KERNELS_REQUIRE_BACKENDS=reference,cuda MOE_KERNELS_REQUIRE_BUILT=_C_cuda \
	MOE_KERNELS_TEST_INSTALLED=1

test-gpu: install
	cd tests && $(GPU_TEST_ENV) $(abspath $(BIN))/pytest -q -p no:cacheprovider -m gpu .

# The GPU tests under compute-sanitizer, once per tool (memcheck: out-of-bounds and misaligned
# accesses; racecheck: shared-memory races); any error the tool reports fails the target.
# PYTORCH_NO_CUDA_MEMORY_CACHING=1 lets memcheck see each allocation's true bounds;
# MOE_KERNELS_TEST_SANITIZER=1 skips the model-sized and 64-bit cases (too slow under the tools).
test-sanitizer: install
	@command -v $(SANITIZER) >/dev/null || { echo "compute-sanitizer not found: set SANITIZER=path"; exit 1; }
	cd tests && for tool in $(SANITIZER_TOOLS); do \
		echo "== compute-sanitizer --tool $$tool"; \
		$(GPU_TEST_ENV) PYTORCH_NO_CUDA_MEMORY_CACHING=1 MOE_KERNELS_TEST_SANITIZER=1 \
		$(SANITIZER) --tool $$tool --error-exitcode 1 --target-processes all \
			$(abspath $(BIN))/python -m pytest -q -p no:cacheprovider -m gpu \
			$(SANITIZER_TESTS) || exit 1; \
	done

clean:
	rm -rf build *.egg-info $(VENV)
