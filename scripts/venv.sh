#!/usr/bin/env bash
# Create (or reuse) the project-local .venv with the pinned CPU stack. Idempotent: re-running is a no-op
# unless setup.py or constraints-ci.txt changed. Sourced by the quickstart and the test runner.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
STAMP="$VENV/.cslm-install-stamp"
WANT="$(cat "$ROOT/setup.py" "$ROOT/constraints-ci.txt" | sha256sum | cut -d' ' -f1)"
if [[ ! -x "$VENV/bin/python" ]]; then
  "$PY" -m venv "$VENV"
fi
if [[ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]]; then
  echo "[venv] installing megatron_cslm and pinned dependencies into $VENV (first run: ~2-3 min)"
  "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
  "$VENV/bin/python" -m pip install -q -c "$ROOT/constraints-ci.txt" --config-settings editable_mode=compat -e "$ROOT[all-cpu]"
  echo "$WANT" > "$STAMP"
fi
