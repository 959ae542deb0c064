#!/usr/bin/env bash
# GPU checks for a machine with a CUDA device (not run in CI): builds gdc_ext with its CUDA
# kernels for the local GPU against the torch already installed, runs every `cuda`-marked test
# (tests/test_cuda.py and the cuda cases of the tests parametrized over the `device` fixture), then
# the sanitizer smoke test under compute-sanitizer memcheck, racecheck and synccheck. This is
# `scripts/gpu_session.sh check` without its time limits: every step runs even after a failure, a
# pass/fail line per step ends the output (and build/gpu-out/gpu_session.log), and the exit code
# is the worst of all steps.
#   PYTHON=python3 scripts/gpu_check.sh        (PYTHON: an interpreter with a CUDA torch)
GPU_DEADLINE=${GPU_DEADLINE:-none} exec bash "$(dirname "$0")/gpu_session.sh" check
