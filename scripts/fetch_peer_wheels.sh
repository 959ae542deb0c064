#!/usr/bin/env bash
# Downloads wheels into .whl/ (ignored by git) for a GPU machine that cannot reach PyPI: the
# benchmark's peers, Liger-Kernel and Apple's Cut Cross-Entropy (both pure Python on the Triton
# that the GPU machine's torch brings), and the build backend scikit-build-core at the version
# the build is tested with (the machine's own may be older than pyproject's >= 0.10). gpu_session.sh
# installs them from .whl/ (ahead of site-packages) when the device call names `.whl` in its
# `carry`. Versions are pinned so every run compares and builds with the same code.
#   bash scripts/fetch_peer_wheels.sh            (PY_VERSION=3.12: the GPU machine's Python)
set -euo pipefail
cd "$(dirname "$0")/.."
PEERS=${PEERS:-"liger-kernel==0.8.5 cut-cross-entropy==25.1.1 scikit-build-core==1.1.2"}
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info && echo '/.whl/' >> .git/info/exclude; }
# shellcheck disable=SC2086  # PEERS is a list of requirement specifiers
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PY_VERSION:-3.12}" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $PEERS
ls -l .whl
