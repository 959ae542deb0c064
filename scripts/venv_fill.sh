# Sourced by cuda_check.sh and torch_compat_check.sh (not run on its own).
# fill_venv VENV TORCH_SPEC PACKAGES...: creates VENV with $PYTHON when missing and installs
# TORCH_SPEC first (the extension builds against the torch already there), then PACKAGES under
# constraints.txt. A marker file (VENV/.deps) records what was installed, so the venv is refilled
# only when the request changes, not on every run. Sets PY to the venv's interpreter.
fill_venv() {
  local venv=$1 torch_spec=$2
  shift 2
  test -x "$venv/bin/python" || "${PYTHON:-python3}" -m venv "$venv"
  PY="$(cd "$venv" && pwd)/bin/python"
  local wanted="$torch_spec $*"
  if [ "$(cat "$venv/.deps" 2>/dev/null)" != "$wanted" ]; then
    "$PY" -m pip install -q "$torch_spec"
    "$PY" -m pip install -q -c constraints.txt "$@"
    echo "$wanted" > "$venv/.deps"
  fi
}
