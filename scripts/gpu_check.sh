#!/usr/bin/env bash
# One-GPU check without Transformer Engine (a cloud box with one NVIDIA GPU, or a maintainer's workstation):
#   1. installs the pinned stack with a CUDA build of torch into a venv (scripts/venv.sh mechanics; idempotent),
#   2. runs the CUDA-capable tests on the GPU (single GPU: TP=1): per-sample packed attention == the dense-mask
#      path in fp32 (tests/test_packed_attention.py, CSLM_TEST_DEVICE=cuda),
#   3. runs bench/train.py --device cuda --bf16 (megatron_cslm vs transformers' Trainer, same model and data;
#      DeepSpeed ZeRO-2 on the Trainer side when it is installed), which prints MFU per side.
# Budget: under 8 minutes on one H100/H200 once the wheels are cached (first install: a few minutes more).
#
#   bash scripts/gpu_check.sh                      # everything above
#   CSLM_VENV=.venv bash scripts/gpu_check.sh      # reuse an existing venv (its torch is kept if it sees a GPU)
#   SKIP_BENCH=1 bash scripts/gpu_check.sh         # tests only
#
# Environment:
#   CSLM_VENV        venv folder (default: .venv-gpu, kept apart from the CPU .venv)
#   TORCH_INDEX_URL  wheel index of the CUDA torch (default: https://download.pytorch.org/whl/cu128)
#   BENCH_ARGS       extra arguments for bench/train.py (e.g. "--arch tiny" or "--sft-samples 400")
#   PYTHON           interpreter that creates the venv (default: python3)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export CSLM_VENV="${CSLM_VENV:-$ROOT/.venv-gpu}"
[[ "$CSLM_VENV" = /* ]] || CSLM_VENV="$ROOT/$CSLM_VENV"
PY_VENV="$CSLM_VENV/bin/python"
TORCH_INDEX_URL="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu128}"
START=$SECONDS

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "[gpu_check] no NVIDIA GPU visible (nvidia-smi -L failed); run scripts/run_tests.sh for the CPU suite" >&2
  exit 2
fi
nvidia-smi -L

# 1. Environment: the pinned stack, with a CUDA torch of the pinned version (torch==X matches X+cuNNN).
TORCH_PIN="$(grep -E '^torch==' "$ROOT/constraints-ci.txt" | cut -d= -f3)"
if [[ ! -x "$PY_VENV" ]]; then
  "${PYTHON:-python3}" -m venv "$CSLM_VENV"
fi
if ! "$PY_VENV" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "[gpu_check] installing torch==$TORCH_PIN from $TORCH_INDEX_URL into $CSLM_VENV"
  "$PY_VENV" -m pip install -q --upgrade pip
  "$PY_VENV" -m pip install -q --force-reinstall --index-url "$TORCH_INDEX_URL" \
    "torch==$TORCH_PIN" "torchaudio==$TORCH_PIN"
fi
bash "$ROOT/scripts/venv.sh"  # the rest of the pinned stack (keeps the CUDA torch: same version)
# transformers' Trainer (the bench's baseline side) needs accelerate.
"$PY_VENV" -c 'import accelerate' 2>/dev/null \
  || "$PY_VENV" -m pip install -q -c "$ROOT/constraints-ci.txt" accelerate
"$PY_VENV" - <<'EOF'
import importlib.util, torch, megatron.core as m, transformers as t
assert torch.cuda.is_available(), "torch in this venv does not see the GPU"
te = importlib.util.find_spec("transformer_engine") is not None
print(f"[gpu_check] torch {torch.__version__} (CUDA {torch.version.cuda}) on {torch.cuda.get_device_name()}, "
      f"megatron-core {m.__version__}, transformers {t.__version__}, Transformer Engine: "
      f"{'installed (the bench forces the local spec anyway)' if te else 'absent (local spec)'}")
EOF
echo "[gpu_check] environment ready after $((SECONDS - START)) s"

# 2. CUDA tests (TP=1). CPU-mode tests refuse a CUDA machine by design; CSLM_TEST_DEVICE moves these to the GPU.
cd "$ROOT"
CSLM_TEST_DEVICE=cuda "$PY_VENV" -m pytest -q -p no:cacheprovider tests/test_packed_attention.py \
  -k "tp1 or bin_packed"
echo "[gpu_check] tests passed after $((SECONDS - START)) s"

# 3. megatron_cslm vs the Trainer on the GPU, BF16, with MFU.
if [[ -z "${SKIP_BENCH:-}" ]]; then
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of words on purpose
  "$PY_VENV" bench/train.py --device cuda --bf16 ${BENCH_ARGS:-}
fi
echo "[gpu_check] done in $((SECONDS - START)) s"
