#!/usr/bin/env bash
# The README's test command: installs the pinned stack into a venv (idempotent), then runs the suite on CPU.
# CSLM_VENV / CSLM_CONSTRAINTS / PYTHON choose the venv, the pinned versions and the interpreter (scripts/venv.sh).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/venv.sh"
VENV="${CSLM_VENV:-$ROOT/.venv}"
[[ "$VENV" = /* ]] || VENV="$ROOT/$VENV"
cd "$ROOT"
"$VENV/bin/python" -c 'import sys, megatron_cslm, torch, megatron.core as m, transformers as t
print(f"[tests] Python {sys.version.split()[0]}, torch {torch.__version__}, megatron-core {m.__version__}, "
      f"transformers {t.__version__}")'
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider --durations=25 "${@:-tests}"
