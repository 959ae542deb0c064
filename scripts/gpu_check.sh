#!/usr/bin/env bash
# GPU checks for a machine with a CUDA device (not run in CI): builds gdc_ext with its CUDA
# kernels against the torch already installed, runs every `cuda`-marked test (tests/test_cuda.py and
# the cuda cases of the tests parametrized over the `device` fixture), then the sanitizer smoke test
# under compute-sanitizer memcheck and racecheck.
#   PYTHON=python3 scripts/gpu_check.sh        (PYTHON: an interpreter with a CUDA torch)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible to torch'; \
print('torch', torch.__version__, 'on', torch.cuda.get_device_name())"
if ! "$PY" -c "import torch, gdc_ext; assert torch._C._dispatch_has_kernel_for_dispatch_key('gdc::cross_entropy_fwd', 'CUDA')" 2>/dev/null; then
  echo "== building gdc_ext with CUDA kernels"
  GDC_CUDA=ON "$PY" -m pip install -q --no-build-isolation --no-deps -C build-dir=build/gpu-check .
fi

echo "== pytest -m cuda tests (tests/test_cuda.py and the cuda cases of the device fixture)"
"$PY" -m pytest -q -rs -s -m cuda tests

SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
if [ ! -x "$SAN" ]; then
  echo "compute-sanitizer not found: sanitizer checks NOT run" >&2
  exit 1
fi
for tool in memcheck racecheck; do
  echo "== compute-sanitizer --tool $tool (sanitizer_smoke)"
  # torch's own allocator and lazy loading are fine under the sanitizer; any finding fails the run.
  "$SAN" --tool "$tool" --error-exitcode 99 --target-processes all \
    "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py -k sanitizer_smoke
done
echo "gpu_check: all GPU checks passed"
