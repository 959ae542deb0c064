#!/usr/bin/env bash
# The suite against the oldest supported torch (default torch==2.11.0: the torch of the lent GPU
# machines, where the CUDA tests and benchmarks run), with a CPU-only build of the extension in
# its own venv and build dir. torch 2.11 lacks nn.LinearCrossEntropyLoss / F.linear_cross_entropy
# (2.13); this is what keeps `import gdc_ext` and the suite working there. `make test` runs it.
#   Environment: PYTHON (python3, makes the venv), COMPAT_VENV (.venv-compat),
#   COMPAT_TORCH_SPEC (torch==2.11.0), COMPAT_EXTRAS (test,hf), PYTEST_WORKERS (2).
# From a fresh clone on the 2-core machine kind: ~2 min venv (torch from PyPI with its CUDA
# libraries, ~5 GB), ~1 min build, ~2-3 min tests; a rerun with nothing changed skips the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
COMPAT_VENV=${COMPAT_VENV:-.venv-compat}
COMPAT_TORCH_SPEC=${COMPAT_TORCH_SPEC:-torch==2.11.0}
COMPAT_EXTRAS=${COMPAT_EXTRAS:-test,hf}

source scripts/venv_fill.sh
# shellcheck disable=SC2046  # the build requirements, a list of requirement specifiers
fill_venv "$COMPAT_VENV" "$COMPAT_TORCH_SPEC" $("$PYTHON" -c 'import tomllib
print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))')
# A regular (not editable) install: the tests import the installed package, as a user would.
GDC_CUDA=OFF "$PY" -m pip install -q -c constraints.txt --no-build-isolation -C build-dir=build/compat \
  ".[$COMPAT_EXTRAS]"
echo "compat-check: $("$PY" -c 'import torch; print("torch", torch.__version__)')"
"$PY" -m pytest -q -p no:cacheprovider -n "${PYTEST_WORKERS:-2}" tests
