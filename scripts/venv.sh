#!/usr/bin/env bash
# Create (or reuse) a project-local venv with a pinned CPU stack. Idempotent: re-running is a no-op unless the
# packaging files or the constraints file changed. Sourced by the quickstart, the test runner and .ci/run.
#   CSLM_VENV         venv folder (default: .venv)
#   CSLM_CONSTRAINTS  constraints file (default: constraints-ci.txt; CI's Python 3.12 leg: constraints-ci-py312.txt)
#   PYTHON            interpreter that creates the venv (default: python3)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CSLM_VENV:-$ROOT/.venv}"
[[ "$VENV" = /* ]] || VENV="$ROOT/$VENV"
CONSTRAINTS="${CSLM_CONSTRAINTS:-$ROOT/constraints-ci.txt}"
[[ "$CONSTRAINTS" = /* ]] || CONSTRAINTS="$ROOT/$CONSTRAINTS"
PY="${PYTHON:-python3}"
STAMP="$VENV/.cslm-install-stamp"
WANT="$(for f in "$ROOT/setup.py" "$ROOT/pyproject.toml" "$CONSTRAINTS"; do [[ -f "$f" ]] && cat "$f"; done \
        | sha256sum | cut -d' ' -f1)"
if [[ ! -x "$VENV/bin/python" ]]; then
  "$PY" -m venv "$VENV"
fi
if [[ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]]; then
  echo "[venv] installing megatron_cslm and the versions pinned in $(basename "$CONSTRAINTS") into $VENV (first run: ~2-3 min)"
  "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
  "$VENV/bin/python" -m pip install -q -c "$CONSTRAINTS" --config-settings editable_mode=compat -e "$ROOT[all-cpu]"
  # CosyVoice's flow/hifigan modules (speech out): without their declared dependencies (see pyproject's synth)
  if COSYVOICE="$(grep -E '^cosyvoice-minicpmo==' "$CONSTRAINTS")"; then
    "$VENV/bin/python" -m pip install -q --no-deps "$COSYVOICE"
  fi
  echo "$WANT" > "$STAMP"
fi
