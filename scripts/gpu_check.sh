#!/usr/bin/env bash
# GPU checks for a machine with a CUDA device (not run in CI): builds gdc_ext with its CUDA
# kernels against the torch already installed, runs every `cuda`-marked test (tests/test_cuda.py
# and the cuda cases of the tests parametrized over the `device` fixture), then the sanitizer smoke test under compute-sanitizer memcheck,
# racecheck and synccheck. Every step runs even after a failure (a failing test must not hide a
# sanitizer finding); a pass/fail line per step is printed at the end, and the exit code is the
# worst (highest) one of all steps.
#   PYTHON=python3 scripts/gpu_check.sh        (PYTHON: an interpreter with a CUDA torch)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

worst=0
summary=()
# step NAME CMD...: runs CMD, records its exit code and a pass/fail line.
step() {
  local name=$1
  shift
  echo "== $name"
  "$@"
  local rc=$?
  if [ "$rc" -eq 0 ]; then summary+=("PASS  $name"); else summary+=("FAIL  $name (exit $rc)"); fi
  if [ "$rc" -gt "$worst" ]; then worst=$rc; fi
  return 0
}

finish() {
  echo "== gpu_check summary"
  printf '%s\n' "${summary[@]}"
  if [ "$worst" -eq 0 ]; then echo "gpu_check: all GPU checks passed"; else echo "gpu_check: FAILED (exit $worst)"; fi
  exit "$worst"
}

if ! "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible to torch'; \
print('torch', torch.__version__, 'on', torch.cuda.get_device_name())"; then
  summary+=("FAIL  CUDA device visible to torch")
  worst=1
  finish
fi
if ! "$PY" -c "import torch, gdc_ext; assert torch._C._dispatch_has_kernel_for_dispatch_key('gdc::cross_entropy_fwd', 'CUDA')" 2>/dev/null; then
  step "build gdc_ext with CUDA kernels" \
    env GDC_CUDA=ON "$PY" -m pip install -q --no-build-isolation --no-deps -C build-dir=build/gpu-check .
fi

step "pytest -m cuda tests" "$PY" -m pytest -q -rs -s -m cuda tests

SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
if [ ! -x "$SAN" ]; then
  summary+=("FAIL  compute-sanitizer not found: sanitizer checks NOT run")
  if [ "$worst" -lt 1 ]; then worst=1; fi
  finish
fi
for tool in memcheck racecheck synccheck; do
  # Without torch's caching allocator every tensor is its own cudaMalloc, so memcheck sees an
  # out-of-bounds access that would otherwise land inside a larger cached block.
  step "compute-sanitizer --tool $tool (sanitizer_smoke)" \
    env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool "$tool" --error-exitcode 99 --target-processes all \
    "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py -k sanitizer_smoke
done
finish
