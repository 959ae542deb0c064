#!/usr/bin/env bash
# Everything the GPU issue needs from a lent GPU machine, in as few device calls as possible
# (a session gets ~15 min of device time, starts included, and at most 10 min per call).
#
#   bash scripts/gpu_session.sh check     # build, CUDA tests, compute-sanitizer      (first call)
#   bash scripts/gpu_session.sh bench     # loss_bench + linear_ce_bench on CUDA     (second call, back to back)
#   bash scripts/gpu_session.sh all       # build, tests, both benchmarks, sanitizers (one call, when only one fits)
#   bash scripts/gpu_session.sh STEP...   # any of: build tests sanitize loss linear suite
#
# Steps: build (CUDA build of this tree against the installed torch, only for the local GPU's
# architecture; skipped when the installed gdc_ext already has CUDA kernels and csrc/ is unchanged
# since), tests (every `cuda`-marked test), sanitize (compute-sanitizer memcheck, racecheck and
# synccheck over the sanitizer smoke test), loss (bench/loss_bench.py --device cuda --end-epoch),
# linear (bench/linear_ce_bench.py --device cuda), suite (the CPU cases of the suite).
# Every step runs even after a failure, each under a time limit cut to what is left of the call's
# deadline (GPU_DEADLINE seconds from the start, default 560, under the device tool's 600 s; `none`
# for no limits, as scripts/gpu_check.sh runs it), so
# the call returns with its logs. Output goes to $OUT (the device tool's folder; default
# build/gpu-out): gpu_session.log, bench/results.{json,md,png}, bench/linear_ce.{json,md,png}
# (7 files; the device tool returns at most 8, two folders down).
# Peer wheels (Liger-Kernel, Cut Cross-Entropy) are installed from .whl/ when it is there: fetch
# them here with scripts/fetch_peer_wheels.sh and name `.whl` in the device call's `carry`.
# Exit code: the worst of all steps (0 when all passed); a summary line per step ends the log.
# GPU_SESSION_REQUIRE_CUDA=0 runs the steps without a CUDA device (to test this script on a CPU).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-build/gpu-out}
DEADLINE=${GPU_DEADLINE:-560}
mkdir -p "$OUT/bench"
LOG="$OUT/gpu_session.log"
export PYTHONUNBUFFERED=1

start=$(date +%s)
worst=0
summary=()
left() { if [ "$DEADLINE" = none ]; then echo 999999; else echo $((DEADLINE - ($(date +%s) - start))); fi; }

# step NAME BUDGET_S CMD...: runs CMD (a program, not a shell function) under min(BUDGET_S, time
# left - 10 s), records a pass/fail line and returns CMD's exit code. GPU_DEADLINE=none: no limits.
step() {
  local name=$1 budget=$2
  shift 2
  if [ "$DEADLINE" = none ]; then budget=0; fi  # timeout 0: no limit
  local avail=$(($(left) - 10))
  if [ "$avail" -lt 20 ]; then
    summary+=("SKIP  $name (deadline: ${avail}s left)")
    if [ "$worst" -lt 1 ]; then worst=1; fi
    return 1
  fi
  if [ "$budget" -gt "$avail" ]; then budget=$avail; fi
  echo "== $name ($([ "$budget" -eq 0 ] && echo "no limit" || echo "limit ${budget}s"), t=$(($(date +%s) - start))s)"
  local t0
  t0=$(date +%s)
  timeout --kill-after=5 "$budget" "$@"
  local rc=$? dt=$(($(date +%s) - t0))
  if [ "$rc" -eq 0 ]; then
    summary+=("PASS  $name (${dt}s)")
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    summary+=("FAIL  $name (timed out after ${dt}s)")
  else
    summary+=("FAIL  $name (exit $rc, ${dt}s)")
  fi
  if [ "$rc" -gt "$worst" ]; then worst=$rc; fi
  return "$rc"
}

main() {
steps=("$@")
if [ ${#steps[@]} -eq 0 ]; then steps=(check); fi
expanded=()
for s in "${steps[@]}"; do
  case "$s" in
    check) expanded+=(build tests sanitize) ;;
    # build again: skipped in seconds when the warm machine still has this tree's build
    bench) expanded+=(build loss linear) ;;
    all) expanded+=(build tests loss linear sanitize) ;;
    build|tests|sanitize|loss|linear|suite) expanded+=("$s") ;;
    *) echo "gpu_session: unknown step '$s' (expected check, bench, all, build, tests, sanitize, loss, linear, suite)"
       return 2 ;;
  esac
done

echo "== machine"
nvidia-smi -L 2>&1 || true
nvcc --version 2>&1 | tail -1 || true
"$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
if [ "${GPU_SESSION_REQUIRE_CUDA:-1}" != 0 ] && ! "$PY" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
  echo "gpu_session: FAILED: torch sees no CUDA device"
  return 1
fi
git log -1 --format='commit %H %s' 2>/dev/null || true

if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" -c "
import importlib
for m in ('liger_kernel', 'cut_cross_entropy', 'triton', 'scikit_build_core'):
    try:
        mod = importlib.import_module(m); print('package', m, getattr(mod, '__version__', 'importable'))
    except Exception as e:
        print('package', m, 'NOT importable:', type(e).__name__, e)
"

# The local GPU's compute capability, e.g. 9.0 on an H100/H200: one architecture keeps the build short.
ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo 9.0)
# From /tmp, so the installed package is imported, not python/ of the checkout.
OPS_CHECK=(bash -c 'cd /tmp && exec "$0" "$1"' "$PY" "$ROOT/scripts/check_cuda_ops.py")

for s in "${expanded[@]}"; do
  case "$s" in
    build)
      # A rerun in the same warm machine skips the build when the kernels are in and csrc/ is unchanged.
      if "${OPS_CHECK[@]}" >/dev/null 2>&1 && [ -f build/gpu/.csrc.sum ] && [ "$(csrc_sum)" = "$(cat build/gpu/.csrc.sum)" ]; then
        echo "== build: skipped (installed gdc_ext has CUDA kernels, csrc/ unchanged)"
      else
        step "build (GDC_CUDA=ON, arch $ARCH)" 360 env TORCH_CUDA_ARCH_LIST="$ARCH" \
          CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" GDC_CUDA=ON "$PY" -m pip install -q --no-build-isolation --no-deps \
          -C build-dir=build/gpu .
        step "import with CUDA kernels" 60 "${OPS_CHECK[@]}" && csrc_sum > build/gpu/.csrc.sum
      fi
      ;;
    tests)
      "${OPS_CHECK[@]}" >/dev/null 2>&1 || echo "WARNING: the installed gdc_ext has no CUDA kernels: run the build step first"
      # Workers in parallel on one GPU: each holds its own context (~0.5 GiB); the largest test
      # (end_epoch over 1e8 samples) needs ~20 GiB.
      step "pytest -m cuda" 300 "$PY" -m pytest -q -rfEs -m cuda -n 4 -p no:cacheprovider --durations=10 tests
      ;;
    sanitize)
      SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
      if [ ! -x "$SAN" ]; then
        summary+=("FAIL  compute-sanitizer not found: sanitizer checks NOT run")
        if [ "$worst" -lt 1 ]; then worst=1; fi
        continue
      fi
      for tool in memcheck racecheck synccheck; do
        # Without the caching allocator every tensor is its own cudaMalloc, so memcheck sees an
        # out-of-bounds access that would otherwise land inside a larger cached block.
        step "compute-sanitizer --tool $tool" 150 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool "$tool" \
          --error-exitcode 99 --target-processes all \
          "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py -k sanitizer_smoke
      done
      ;;
    loss)
      step "bench/loss_bench.py --device cuda --end-epoch" 420 "$PY" bench/loss_bench.py --device cuda --end-epoch \
        --out "$OUT/bench"
      ;;
    linear)
      step "bench/linear_ce_bench.py --device cuda" 240 "$PY" bench/linear_ce_bench.py --device cuda --out "$OUT/bench"
      ;;
    suite)
      step "pytest -m 'not cuda'" 300 "$PY" -m pytest -q -rfE -m "not cuda" -n 8 -p no:cacheprovider tests
      ;;
  esac
done

echo "== gpu_session summary ($(($(date +%s) - start))s)"
printf '%s\n' "${summary[@]}"
if [ "$worst" -eq 0 ]; then echo "gpu_session: all steps passed"; else echo "gpu_session: FAILED (worst exit $worst)"; fi
return "$worst"
}

ROOT=$(pwd)
csrc_sum() { find csrc cmake CMakeLists.txt -type f -print0 | sort -z | xargs -0 cat | md5sum | cut -d' ' -f1; }
main "$@" 2>&1 | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
