# make demo   : set up .venv and run the STS demo + benchmark (python -m bench)
# make test   : set up .venv and run lint + the whole test suite (what CI runs first)
# make wheels : build into dist/ the sdist, the pure-Python wheel and (when nvcc is present)
#               the CUDA wheel for sm_80 + sm_90 + compute_90 PTX, tagged +cu130torch2.14
# make wheels-check : build them, then install each into a fresh venv next to its torch and
#               smoke-test the installed package (what CI runs second)
# Override TORCH for another build, e.g. `make test TORCH=torch==2.14.1`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
TRITON ?= triton==3.8.0
# CUDA build of torch for the compile-only check of csrc/*.cu (skipped when nvcc is missing)
CUDA_VENV ?= .venv-cuda
CUDA_TORCH ?= torch==2.14.1
NVCC := $(shell command -v nvcc 2>/dev/null)
# CUDA wheel targets: cubins for Ampere and Hopper, PTX for compute_90 (newer GPUs JIT it)
CUDA_ARCHS ?= 8.0;9.0+PTX
DIST ?= dist
# `make test CUDA_CHECK=` skips the compile-only CUDA build test (CI: wheels-check builds and
# tests the CUDA wheel instead)
CUDA_CHECK ?= $(NVCC)

.PHONY: demo test lint cuda-venv wheels wheels-check

$(BIN)/.installed: pyproject.toml setup.py $(wildcard csrc/*)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH) $(TRITON) ninja setuptools wheel
	$(BIN)/pip install -q --no-build-isolation -e ".[test,bench]"
	touch $@

$(CUDA_VENV)/.installed:
	$(PY) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/pip install -q $(CUDA_TORCH) ninja setuptools wheel
	touch $@

cuda-venv: $(if $(NVCC),$(CUDA_VENV)/.installed)

demo: $(BIN)/.installed
	$(BIN)/python -m sts_kernels.env
	$(BIN)/python -m bench

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint cuda-venv
	$(BIN)/python -m sts_kernels.env
	$(if $(CUDA_CHECK),STS_CUDA_PYTHON=$(abspath $(CUDA_VENV))/bin/python) $(BIN)/python -m pytest -q

# Wheels are built from the sdist (a clean unpacked copy), which also proves the sdist builds.
wheels: $(BIN)/.installed cuda-venv
	rm -rf $(DIST) && mkdir -p $(DIST)
	STS_NO_EXT=1 $(BIN)/python setup.py -q sdist -d $(DIST)
	STS_NO_EXT=1 $(BIN)/pip wheel -q --no-build-isolation --no-deps -w $(DIST) $(DIST)/*.tar.gz
	$(if $(NVCC),STS_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$(CUDA_ARCHS)" MAX_JOBS=2 \
		$(CUDA_VENV)/bin/pip wheel -q --no-build-isolation --no-deps -w $(DIST) $(DIST)/*.tar.gz)
	ls -l $(DIST)

wheels-check: wheels
	$(if $(NVCC),STS_CUDA_PYTHON=$(abspath $(CUDA_VENV))/bin/python) STS_WHEELHOUSE=$(abspath $(DIST)) \
		$(BIN)/python -m pytest -q -p no:cacheprovider tests/build/test_wheels.py
