# Quick start: `make demo` (main job end to end on CPU) and `make test` (the whole suite).
# Both create or reuse .venv; each installs only what it needs, torch included: `make demo` the
# package and its runtime dependencies, `make test` also the extras EXTRAS (one stamp file per extra
# set, so `make demo` then `make test` in one clone installs the extras the demo skipped).
# Dependencies are declared once, in pyproject.toml (build requirements and extras); constraints.txt
# pins the versions tested here.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
# Extras installed for the tests: lint, pytest, the Hugging Face integration.
EXTRAS ?= test,hf
PIP := $(PY) -m pip install -q -c constraints.txt
BUILD_REQUIRES = $$($(PY) -c 'import tomllib; print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))')
# prints the requirements of the extras $(EXTRAS), read from pyproject.toml (installed without
# reinstalling the package); an unknown extra is an error naming the known ones
EXTRA_REQUIRES = $(PY) -c 'import sys, tomllib; opt = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]; \
  bad = [e for e in sys.argv[1].split(",") if e and e not in opt]; \
  sys.exit(f"EXTRAS: no extra {bad} in pyproject.toml (known: {sorted(opt)})") if bad else None; \
  print(" ".join(r for e in sys.argv[1].split(",") if e for r in opt[e]))' "$(EXTRAS)"
SOURCES := $(shell find csrc cmake -type f) CMakeLists.txt pyproject.toml
# Test workers: CI has 2 cores.
PYTEST_WORKERS ?= 2
# C++ build jobs: every core (ninja's [n/m] lines show through pip -v)
NPROC ?= $(shell nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)
comma := ,
EXTRAS_STAMP := $(VENV)/.extras-$(subst $(comma),-,$(EXTRAS))

.PHONY: demo test lint install bench clean cuda-check compat-check

# torch first (the extension builds against the installed torch, without build isolation), then
# the build requirements; the package comes with the editable install below, its extras after.
$(VENV)/.deps: pyproject.toml constraints.txt
	@echo "==> venv $(VENV), $(TORCH_SPEC) and the build requirements"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PIP) $(BUILD_REQUIRES)
	touch $@

# The package and its runtime dependencies (what the demo needs); the C++ build shows its steps.
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	@echo "==> gdc_ext and its runtime dependencies; the C++ extension builds with $(NPROC) jobs (about 1 min on 2 cores; CMake's and ninja's [n/6] lines below)"
	CMAKE_BUILD_PARALLEL_LEVEL=$(NPROC) $(PY) -m pip install -v -c constraints.txt --no-build-isolation -e .
	touch $@

# The extras EXTRAS (tests, Hugging Face), one stamp per extra set; the installed torch is pinned so
# that no extra replaces the one the extension was built against.
$(EXTRAS_STAMP): $(VENV)/.deps pyproject.toml constraints.txt
	@echo "==> the extras [$(EXTRAS)]"
	reqs=$$($(EXTRA_REQUIRES)) && torch=$$($(PY) -c 'import importlib.metadata as m; print(m.version("torch"))') && \
	  $(PIP) "torch==$$torch" $$reqs
	touch $@

install: $(VENV)/.built $(EXTRAS_STAMP)

# only the package and its runtime dependencies: no test or Hugging Face extras
demo: $(VENV)/.built
	$(PY) -m examples.demo

# The CUDA compile-and-link check (no GPU needed; see cuda-check below), lint, the suite against the
# oldest supported torch (compat-check), the README's install lines in a fresh venv
# (scripts/install_check.sh), then the suite, whose summary stays the last line.
# CUDA_CHECK=0 / COMPAT_CHECK=0 skip the first / the compat check for a quick local run.
CUDA_CHECK_ENABLED ?= $(if $(filter 0,$(CUDA_CHECK)),,yes)
# The suite against the oldest supported torch (scripts/torch_compat_check.sh); COMPAT_CHECK=0 skips it.
COMPAT_CHECK_ENABLED ?= $(if $(filter 0,$(COMPAT_CHECK)),,yes)
test: install
	$(if $(CUDA_CHECK_ENABLED),$(MAKE) --no-print-directory cuda-check,@echo "cuda-check: skipped (CUDA_CHECK=0)")
	$(MAKE) --no-print-directory lint
	$(if $(COMPAT_CHECK_ENABLED),$(MAKE) --no-print-directory compat-check,@echo "compat-check: skipped (COMPAT_CHECK=0)")
	TORCH_SPEC="$(TORCH_SPEC)" PYTHON=$(PYTHON) bash scripts/install_check.sh
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) tests

lint: install
	$(PY) -m ruff check .

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

compat-check:
	PYTHON="$(PYTHON)" PYTEST_WORKERS=$(PYTEST_WORKERS) bash scripts/torch_compat_check.sh

cuda-check:
	PYTHON="$(PYTHON)" CUDA_VENV="$(CUDA_VENV)" CUDA_TORCH_SPEC="$(CUDA_TORCH_SPEC)" CUDA_DEPS="$(CUDA_DEPS)" \
	  bash scripts/cuda_check.sh

# ---- the paper's experiments (paper/): `make reproduce` runs them offline (CPU default config).
EXP_CONFIG ?= default
EXP_OUT ?= results/reproduce

.PHONY: reproduce reproduce-counterfactual reproduce-noisy-labels test-experiments

$(VENV)/.exp-deps: $(VENV)/.built
	$(PIP) --no-build-isolation -e ".[$(EXTRAS),experiments]"
	touch $@

reproduce: $(VENV)/.exp-deps
	$(PY) -m paper.run --config $(EXP_CONFIG) --out $(EXP_OUT) --docs docs
	$(PY) -m paper.noisy_labels --out results/noisy_labels --docs docs

# The noisy-label benchmark alone (issue 19; part of `reproduce`, ~30 s on the CPU): rewrites only
# its section of docs/RESULTS.md and docs/fig_noisy_labels_map.png.
reproduce-noisy-labels: $(VENV)/.exp-deps
	$(PY) -m paper.noisy_labels --out results/noisy_labels --docs docs

# The counterfactual family alone (every score on every setting with its worst case; part of
# `reproduce`): rewrites only its section of docs/RESULTS.md. CF_SETTINGS="audit audit_b": only
# those settings, merged into the previous run in results/counterfactual.
reproduce-counterfactual: $(VENV)/.exp-deps
	$(PY) -m paper.run --config $(EXP_CONFIG) --only counterfactual --out results/counterfactual --docs docs \
	  $(if $(CF_SETTINGS),--settings $(CF_SETTINGS))

test-experiments: install
	$(PY) -m pytest -q tests/test_experiments_metrics.py tests/test_experiments_smoke.py \
	  tests/test_experiments_counterfactual.py tests/test_experiments_noisy_labels.py
