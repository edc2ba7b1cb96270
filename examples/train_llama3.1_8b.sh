#!/usr/bin/env bash
# Llama-3.1-8B CSLM training with torchrun, one node or many. Usage:
#
#   bash examples/train_llama3.1_8b.sh pretrain DATA_BLEND...   # e.g. 0.3 data/asr 0.3 data/interleave 0.4 data/replay
#   bash examples/train_llama3.1_8b.sh sft PACKED_PREFIX...
#
# Several nodes: run the same command on every node with NNODES, NODE_RANK, MASTER_ADDR (node 0's address) and
# MASTER_PORT set. DRY_RUN=1 prints the command instead. LAUNCHER=srun runs this process alone, without torchrun:
# one process per GPU started by `srun --ntasks-per-node=8`, ranks from SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS
# (examples/slurm_cslm.sbatch does this, so SLURM's pre-timeout SIGUSR1 reaches every trainer directly).
# EXTRA_ARGS (word-split) are appended to the training flags, e.g. EXTRA_ARGS="--async-save --profile".
# PLAN=1 first prints `cslm plan` for this exact layout (memory per GPU by part, whether it fits, the layouts that
# fit ranked by step time, time to TRAIN_TOKENS); PLAN_GPU names the GPU (default h100-80), PLAN_ARGS adds flags
# (e.g. PLAN_ARGS="--mfu 0.45"); works with DRY_RUN=1.
#
# Worked example (pretraining, the paper's preset): 4 nodes x 8 GPUs = 32 GPUs, TP=2, PP=1 -> DP=16.
#   global batch 1024 samples x 1024 tokens = 1,048,576 tokens per step;
#   micro batch 4 -> gradient accumulation = 1024 / (4 x 16) = 16 micro-batches per step;
#   TRAIN_TOKENS=10e9 -> 10e9 / 1,048,576 = 9,537 steps (the script computes --train-iters this way).
set -euo pipefail
STAGE="${1:?usage: $0 pretrain|sft DATA...}"; shift
[[ $# -gt 0 ]] || { echo "give the data prefixes (pretrain: [WEIGHT] PREFIX pairs; sft: packed prefixes)" >&2; exit 2; }
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

case "$STAGE" in
  pretrain) CONFIG="${CONFIG:-$ROOT/examples/configs/pretrain_llama3.1_8b.yaml}"; SEQ="${SEQ:-1024}"; GBS="${GBS:-1024}"
            MBS="${MBS:-4}"; TP="${TP:-2}"; TRAIN_TOKENS="${TRAIN_TOKENS:-10e9}" ;;
  sft)      CONFIG="${CONFIG:-$ROOT/examples/configs/sft_llama3.1_8b.yaml}"; SEQ="${SEQ:-8192}"; GBS="${GBS:-64}"
            MBS="${MBS:-1}"; TP="${TP:-4}"; TRAIN_TOKENS="${TRAIN_TOKENS:-1e9}" ;;
  *) echo "stage must be pretrain or sft, got '$STAGE'" >&2; exit 2 ;;
esac
NNODES="${NNODES:-1}"; NODE_RANK="${NODE_RANK:-0}"; GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"; MASTER_PORT="${MASTER_PORT:-29500}"
PP="${PP:-1}"
PRECISION="${PRECISION:-bf16}"          # bf16 | fp8 (Transformer Engine, Hopper or newer)
RECOMPUTE="${RECOMPUTE:-none}"          # none | selective | full
SAVE_INTERVAL="${SAVE_INTERVAL:-1000}"
SAVE="${SAVE:-$ROOT/checkpoints/cslm-$STAGE}"

WORLD=$((NNODES * GPUS_PER_NODE))
if (( WORLD % (TP * PP) )); then echo "world size $WORLD is not divisible by TP x PP = $((TP * PP))" >&2; exit 2; fi
DP=$((WORLD / (TP * PP)))
if (( GBS % (MBS * DP) )); then echo "global batch $GBS is not a multiple of micro batch $MBS x DP $DP" >&2; exit 2; fi
TOKENS_PER_STEP=$((GBS * SEQ))
TRAIN_ITERS="${TRAIN_ITERS:-$(python3 -c "import math; print(math.ceil(float('$TRAIN_TOKENS') / $TOKENS_PER_STEP))")}"
[[ "${LAUNCHER:-torchrun}" == srun && "${SLURM_PROCID:-0}" != 0 ]] || echo "[$STAGE] $NNODES node(s) x $GPUS_PER_NODE GPUs = $WORLD; TP=$TP PP=$PP DP=$DP; micro batch $MBS," \
     "accumulation $((GBS / (MBS * DP))); $TOKENS_PER_STEP tokens/step; $TRAIN_ITERS steps" \
     "= $((TRAIN_ITERS * TOKENS_PER_STEP)) tokens"

ARGS=(--config "$CONFIG" --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
      --seq-length "$SEQ" --micro-batch-size "$MBS" --global-batch-size "$GBS" --train-iters "$TRAIN_ITERS"
      --save "$SAVE" --save-interval "$SAVE_INTERVAL" --data-path "$@")
[[ "$PRECISION" == fp8 ]] && ARGS+=(--fp8-format hybrid --fp8-recipe delayed --first-last-layers-bf16)
[[ "$RECOMPUTE" == full ]] && ARGS+=(--recompute-granularity full --recompute-method uniform --recompute-num-layers 1)
[[ "$RECOMPUTE" == selective ]] && ARGS+=(--recompute-granularity selective)
(( TP > 1 )) && [[ "${SEQUENCE_PARALLEL:-1}" == 1 ]] && ARGS+=(--sequence-parallel)
# shellcheck disable=SC2206
[[ -n "${EXTRA_ARGS:-}" ]] && ARGS+=($EXTRA_ARGS)

if [[ "${PLAN:-0}" == 1 ]] && [[ "${LAUNCHER:-torchrun}" != srun || "${SLURM_PROCID:-0}" == 0 ]]; then
  PLAN_CMD=("${PYTHON:-python}" "$ROOT/tools/plan.py" --config "$CONFIG" --model-arch llama3.1-8b
            --num-gpus "$WORLD" --gpus-per-node "$GPUS_PER_NODE" --gpu "${PLAN_GPU:-h100-80}"
            --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" --seq-length "$SEQ"
            --micro-batch-size "$MBS" --global-batch-size "$GBS" --train-tokens "$TRAIN_TOKENS")
  [[ "$PRECISION" == fp8 ]] && PLAN_CMD+=(--fp8-format hybrid)
  [[ "$RECOMPUTE" != none ]] && PLAN_CMD+=(--recompute-granularity "$RECOMPUTE")
  [[ "${SEQUENCE_PARALLEL:-1}" == 1 ]] || PLAN_CMD+=(--no-sequence-parallel)
  # shellcheck disable=SC2206
  [[ -n "${PLAN_ARGS:-}" ]] && PLAN_CMD+=($PLAN_ARGS)
  "${PLAN_CMD[@]}"
fi

if [[ "${LAUNCHER:-torchrun}" == srun ]]; then   # this process is one rank; megatron_cslm reads SLURM's variables
  CMD=("${PYTHON:-python}" -m "megatron_cslm.$STAGE" "${ARGS[@]}")
else
  CMD=(torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE"
       --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" -m "megatron_cslm.$STAGE" "${ARGS[@]}")
fi
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${CMD[@]}"; echo
else
  export CUDA_DEVICE_MAX_CONNECTIONS=1  # megatron-core's TP/SP overlap needs ordered kernel launches
  exec "${CMD[@]}"
fi
