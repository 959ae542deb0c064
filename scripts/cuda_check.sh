#!/usr/bin/env bash
# CUDA compile-and-link check (no GPU needed): builds the CUDA kernels for sm_80/sm_90 into
# $CUDA_VENV with the CUDA 13.0 torch wheel, in its own build dir, then checks that the module
# imports and registers a CUDA kernel for every op. Skips (exit 0) only when nvcc is not found.
# From a fresh clone on the 2-core machine kind: ~20 min wall under load (venv ~7 min, compile
# ~13 min); a rerun with nothing changed: ~30 s. `make cuda-check` (and `make test`) run it.
#   Environment: PYTHON (python3, makes the venv), CUDA_VENV (.venv-cuda),
#   CUDA_TORCH_SPEC (torch==2.14.1), CUDA_DEPS (build deps), CUDA_BUILD_DIR (build/cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
CUDA_VENV=${CUDA_VENV:-.venv-cuda}
CUDA_TORCH_SPEC=${CUDA_TORCH_SPEC:-torch==2.14.1}
CUDA_DEPS=${CUDA_DEPS:-scikit-build-core pybind11 cmake ninja numpy safetensors}
CUDA_BUILD_DIR=${CUDA_BUILD_DIR:-build/cuda}

NVCC=$(command -v nvcc 2>/dev/null || true)
if [ -z "$NVCC" ] && [ -x /usr/local/cuda/bin/nvcc ]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [ -z "$NVCC" ]; then
  echo "cuda-check: SKIPPED: nvcc not found (install the CUDA toolkit, or put nvcc on PATH)"
  exit 0
fi

source scripts/venv_fill.sh
# shellcheck disable=SC2086  # CUDA_DEPS is a list of package names
fill_venv "$CUDA_VENV" "$CUDA_TORCH_SPEC" $CUDA_DEPS

GDC_CUDA=ON "$PY" -m pip install -q --no-build-isolation --no-deps -C build-dir="$CUDA_BUILD_DIR" .
# From /tmp, so the installed package is imported, not python/ of the source tree.
script="$(pwd)/scripts/check_cuda_ops.py"
cd /tmp && "$PY" "$script" | sed 's/^/cuda-check: /'
