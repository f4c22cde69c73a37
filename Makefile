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

# torchvision (for the torchvision / timm examples and tests) must match the venv's torch:
# torch 2.X <-> torchvision 0.(X+15). It is installed before the project, so that timm (extra
# `real`) finds it; the installed torch is pinned in the same command, so pip never swaps it. If it cannot be had, the project is installed
# without timm and those model families are skipped by the tests.
$(STAMP): $(PY) pyproject.toml
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	@tv="torchvision==$$($(PY) -W ignore -c 'import torch; v = torch.__version__.split("."); print(f"0.{int(v[1]) + 15}.*" if v[0] == "2" else "unknown")')"; \
	torch_now="torch==$$($(PY) -W ignore -c 'import torch; print(torch.__version__)')"; \
	if $(PIP) install --quiet $(TORCH_PIP_ARGS) "$$tv" "$$torch_now"; then \
	  $(PIP) install --quiet -e ".[plot,zoo,test,lint,real]"; \
	else \
	  echo "curvscope: could not install $$tv to match the venv's torch; the torchvision and timm model families will be skipped"; \
	  $(PIP) install --quiet -e ".[plot,zoo,test,lint]" "transformers>=4.46"; \
	fi
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/curvscope demo

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not gpu" --durations=15

test-all: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
