#!/usr/bin/env bash
# Installs gdc_ext the way the README tells a new user to, in a fresh venv, from a copy of the
# tracked files (a fresh clone, so no build folder of the dev venv is reused), then imports it
# and runs one recording CartoLoss step from outside the source tree. Called by `make test`.
# The install commands are read from the README's "Install" block (the lines starting with
# "pip install"), so the README and this check cannot drift apart.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git ls-files -z | xargs -0 cp --parents -t "$work" 2>/dev/null || tar cf - $(git ls-files) | tar xf - -C "$work"
mapfile -t lines < <(awk '/<!-- install:begin -->/{f=1; next} /<!-- install:end -->/{f=0} f && /^pip install/' README.md)
if [ "${#lines[@]}" -eq 0 ]; then echo "install-check: FAILED: no 'pip install' lines in the README's install block"; exit 1; fi
"$PYTHON" -m venv "$work/venv"
source "$work/venv/bin/activate"
cd "$work"
for line in "${lines[@]}"; do
  line=${line%%#*}                         # drop trailing comments
  line=${line/pip install torch /pip install $TORCH_SPEC }
  [[ "$line" == "pip install torch" ]] && line="pip install $TORCH_SPEC"
  echo "install-check: $line"
  eval "python -m ${line} -q" > "$work/pip.log" 2>&1 || { grep -v "^WARNING: Location" "$work/pip.log"; exit 1; }
done
cd /tmp
python - <<'PY'
import torch, gdc_ext
state = gdc_ext.CartoState(4, burn_in=1)
logits = torch.randn(8, 11, requires_grad=True)
gdc_ext.CartoLoss(state=state)(logits, torch.randint(0, 11, (8,)), torch.arange(4).repeat_interleave(2)).backward()
state.end_epoch()
assert torch.isfinite(state.scores().difficulty).all()
print(f"install-check: OK: gdc_ext {gdc_ext.__version__} with torch {torch.__version__}, from {gdc_ext.__file__}")
PY
