# make demo : set up .venv and run the STS demo + benchmark (python -m bench)
# make test : set up .venv and run lint + the whole test suite (what CI runs)
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

.PHONY: demo test lint cuda-venv

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
	$(if $(NVCC),STS_CUDA_PYTHON=$(abspath $(CUDA_VENV))/bin/python) $(BIN)/python -m pytest -q
