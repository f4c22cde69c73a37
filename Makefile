# curvscope: set-up, demo and tests in a local virtual environment (.venv).
#
#   make demo   install, then run the main job on the embedded default problem
#   make test   install, then run the test suite (the command CI runs)
#
# torch: `pip install torch==2.13.0` is used when the venv has no torch. On a machine with a
# CPU-only wheel cache this takes the CPU build; elsewhere pass the CPU index explicitly, e.g.
#   make test TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
# An existing torch >= 2.4 in the venv is kept as it is (bring your own CUDA build).

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.curvscope-installed

.PHONY: help venv demo test test-all lint clean

help:
	@echo "make demo      run the main job on the embedded default problem"
	@echo "make test      run the default test suite (CPU; includes the 2-process torchrun tests)"
	@echo "make test-all  also the slow and multi-process tests"
	@echo "make lint      ruff on src/ and tests/"

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[plot,zoo,test,lint]"
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/curvscope demo

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not gpu"

test-all: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
