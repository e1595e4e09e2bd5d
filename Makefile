# Two entry points do all set-up on a fresh machine (see README.md):
#   make bench   -- create the virtual environment, install everything, run `moe-bench`
#   make test    -- same set-up, then lint, the test suites and the static GPU gate
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.14.1
# Backends that must be available here; a backend that failed to build fails the tests.
REQUIRE ?= reference,cpu
BIN := $(VENV)/bin
export MAX_JOBS ?= 2

.PHONY: venv install bench test lint test-py test-triton gate clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

venv: $(BIN)/python
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q "$(TORCH)" numpy pybind11 ninja

install: venv
	$(BIN)/pip install -q --no-build-isolation ".[test,bench,triton]"

bench: install
	cd /tmp && $(abspath $(BIN))/moe-bench

# C++ sources checked against .clang-format (the clang-format pinned in the test extra).
CXX_SOURCES = $(wildcard csrc/*.cpp csrc/*/*.h csrc/*/*.cpp csrc/*/*.cu csrc/*/*.cuh tests/cpp/*.cpp)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/clang-format --dry-run -Werror $(CXX_SOURCES)

# Tests run against the installed package: pytest is started from tests/ so the source tree's
# moe_kernels/ (which has no compiled extension) is not on sys.path.  The op modules run every
# backend usable here; the Triton interpreter must be on before triton is imported, so the Triton
# backend runs them again in a second process (tiny cases only).
OP_TESTS := test_gating.py test_routing.py test_permute.py test_grouped_gemm.py test_moe_ffn.py

test-py: install
	cd tests && MOE_KERNELS_REQUIRE_BACKENDS=$(REQUIRE) MOE_KERNELS_TEST_INSTALLED=1 \
		TORCHINDUCTOR_COMPILE_THREADS=1 $(abspath $(BIN))/pytest -q -p no:cacheprovider .

test-triton: install
	cd tests && TRITON_INTERPRET=1 MOE_KERNELS_TEST_BACKENDS=triton \
		MOE_KERNELS_REQUIRE_BACKENDS=reference,triton MOE_KERNELS_TEST_INSTALLED=1 \
		$(abspath $(BIN))/pytest -q -p no:cacheprovider $(OP_TESTS) test_values.py test_triton_poison.py

gate: install
	cd /tmp && $(abspath $(BIN))/python -m moe_kernels.tools.gpu_gate

test: lint test-py test-triton gate

clean:
	rm -rf build *.egg-info $(VENV)
