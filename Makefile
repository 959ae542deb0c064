# Quick start: `make demo` (main job end to end on CPU) and `make test` (the whole suite).
# Both create or reuse .venv and install everything, torch included.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
DEPS := scikit-build-core pybind11 cmake ninja numpy safetensors tqdm matplotlib pytest hypothesis pytest-xdist
# Optional extra `hf` (gdc_ext.integrations.hf), installed so its tests run here and in CI.
# transformers 5.23.0 + accelerate 1.15.0 (the Trainer needs accelerate) install beside
# torch 2.13.0 CPU without replacing it (checked); no pin needed.
DEPS += transformers==5.23.0 accelerate==1.15.0
SOURCES := $(shell find csrc cmake -type f) CMakeLists.txt pyproject.toml
# Test workers: CI has 2 cores.
PYTEST_WORKERS ?= 2

.PHONY: demo test install bench clean

$(VENV)/.deps: Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q $(DEPS)
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $@

install: $(VENV)/.built

demo: install
	$(PY) -m gdc_ext.demo

test: install
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) tests

bench: install
	$(PY) bench/loss_bench.py

clean:
	rm -rf build $(VENV)
