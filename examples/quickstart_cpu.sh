#!/usr/bin/env bash
# The whole CSLM pipeline on a laptop CPU in minutes, on the embedded toy corpus (synthetic speech; nothing is
# downloaded): corpus -> text tokenizer -> a tiny pretrained text LM (the stand-in for Llama-3.1-8B-Instruct,
# saved as HF) -> hf-to-megatron --expand-vocab -> pretraining data (all recipes) -> .bin/.idx -> continual
# pretraining (data parallel on gloo: reading first, then every recipe) -> packed interleaved SFT data -> SFT
# -> HF export -> streaming spoken answer -> held-out spoken questions (never trained on): TQ character
# error rate and answers matching the reference.
#
#   bash examples/quickstart_cpu.sh            # ~7 min on 2 cores; re-running reuses finished stages
#   QUICK=1 bash examples/quickstart_cpu.sh    # a few steps per stage (what the test suite runs)
#   RUN=/path/to/dir bash examples/quickstart_cpu.sh
#   READ_STEPS_OVERRIDE=3000 SFT_STEPS_OVERRIDE=600 bash examples/quickstart_cpu.sh   # another schedule
#                                              # (also BASE_STEPS_OVERRIDE, PRETRAIN_STEPS_OVERRIDE)
#   VERBOSE=1 bash examples/quickstart_cpu.sh  # also what CPU runs hide (gloo connection lines, CUDA/TE/Apex
#                                              # fallback warnings): CSLM_VERBOSE=1, see distributed/quiet.py
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/venv.sh
VENV="${CSLM_VENV:-$ROOT/.venv}"   # the venv scripts/venv.sh made (CI's Python 3.12 leg sets .venv312)
[[ "$VENV" = /* ]] || VENV="$ROOT/$VENV"
PY="$VENV/bin/python"
RUN="${RUN:-$ROOT/runs/quickstart}"
if [[ "${QUICK:-0}" == 1 ]]; then BASE_STEPS=30; READ_STEPS=20; PRETRAIN_STEPS=10; SFT_STEPS=10; READING=800
else BASE_STEPS=1200; READ_STEPS=2000; PRETRAIN_STEPS=300; SFT_STEPS=400; READING=8000; fi
BASE_STEPS="${BASE_STEPS_OVERRIDE:-$BASE_STEPS}"; READ_STEPS="${READ_STEPS_OVERRIDE:-$READ_STEPS}"
PRETRAIN_STEPS="${PRETRAIN_STEPS_OVERRIDE:-$PRETRAIN_STEPS}"; SFT_STEPS="${SFT_STEPS_OVERRIDE:-$SFT_STEPS}"
export OMP_NUM_THREADS=1
[[ "${VERBOSE:-0}" == 1 ]] && export CSLM_VERBOSE=1
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc-per-node 2)
mkdir -p "$RUN/logs"
stage() { echo; echo "=== [$1] $2"; }
done_iter() { [[ -f "$1/latest_checkpointed_iteration.txt" ]] && [[ "$(cat "$1/latest_checkpointed_iteration.txt")" == "$2" ]]; }
train_log() { tee "$1" | grep --line-buffered -E "iteration|megatron_cslm|rror"; }
T0=$SECONDS

stage 1/13 "toy bilingual speech-text corpus (synthetic speech), with $READING read-speech utterances"
[[ -f "$RUN/corpus/repeat_dialogue.jsonl" ]] || "$PY" tools/make_toy_corpus.py --out "$RUN/corpus" --num-units 512 \
  --reading "$READING" --reading-dialogues $((READING / 4))

stage 2/13 "text tokenizer (byte-level BPE in Llama-3's format, one id per character)"
[[ -f "$RUN/text_tokenizer/tokenizer.json" ]] || "$PY" tools/make_toy_tokenizer.py --corpus "$RUN/corpus" \
  --out "$RUN/text_tokenizer" --characters --text-only

stage 3/13 "base LM: a tiny text Llama that can copy text in context (the stand-in for Llama-3.1-8B-Instruct)"
[[ -f "$RUN/base_hf/config.json" ]] || OMP_NUM_THREADS=2 "$PY" tools/make_toy_base_model.py \
  --tokenizer "$RUN/text_tokenizer" --corpus "$RUN/corpus" --out "$RUN/base_hf" --steps "$BASE_STEPS"

stage 4/13 "HF -> Megatron with 512 speech units + specials added to the vocabulary (hf-to-megatron --expand-vocab)"
[[ -f "$RUN/base/latest_checkpointed_iteration.txt" ]] || "$PY" checkpoints_convert/hf_to_megatron.py \
  --hf-dir "$RUN/base_hf" --out "$RUN/base" --expand-vocab --num-units 512 --new-row-noise 1 --tp 2 \
  > "$RUN/logs/hf_to_megatron.log" 2>&1
TOKENIZER="$RUN/base/tokenizer"

stage 5/13 "pretraining documents: ASR, TTS, interleaved, translation, cross-lingual speech, replay (units deduplicated)"
[[ -f "$RUN/docs/stats.json" ]] || "$PY" tools/build_pretrain_data.py \
  --asr "$RUN/corpus/manifest.jsonl" "$RUN/corpus/reading.jsonl" --parallel "$RUN/corpus/parallel.jsonl" \
  --instruct "$RUN/corpus/instruct.jsonl" --out-dir "$RUN/docs" --num-units 512 --dedup-units --mask-prompt \
  --mask-inputs

stage 6/13 "documents -> .bin/.idx"
for src in asr tts interleave translate cross_speech replay; do
  [[ -f "$RUN/bin/$src.stats.json" ]] || "$PY" tools/preprocess_data.py --input "$RUN/docs/$src.jsonl" \
    --tokenizer-model "$TOKENIZER" --output-prefix "$RUN/bin/$src" --append-eod --workers 2 \
    > "$RUN/logs/preprocess_$src.log"
  echo "$src: $("$PY" -c "import json,sys; s=json.load(open(sys.argv[1])); print(s['documents'], 'documents,', s['tokens'], 'tokens')" "$RUN/bin/$src.stats.json")"
done

# Two phases. A 64-wide model that is asked to speak (predict units) before it can read learns neither (held-out
# CER ~0.9 after 800 steps of the full blend, measured), while reading first, then everything, keeps the reading.
stage 7/13 "continual pretraining, phase 1 (reading): ASR only, data parallel over 2 processes (gloo), $READ_STEPS steps"
done_iter "$RUN/pretrain_read" "$READ_STEPS" || "${TORCHRUN[@]}" -m megatron_cslm.pretrain \
  --config examples/configs/quickstart_pretrain.yaml --load-init "$RUN/base" --data-path 1 "$RUN/bin/asr" \
  --train-iters "$READ_STEPS" --save "$RUN/pretrain_read" --tensorboard-dir "$RUN/tb/pretrain_read" \
  --data-cache-path "$RUN/cache" 2>&1 | train_log "$RUN/logs/pretrain_read.log"

stage 8/13 "continual pretraining, phase 2: every recipe, $PRETRAIN_STEPS steps"
BLEND=(6 "$RUN/bin/asr" 1 "$RUN/bin/tts" 1 "$RUN/bin/interleave" 0.2 "$RUN/bin/translate" 0.2 "$RUN/bin/cross_speech"
       0.3 "$RUN/bin/replay")
done_iter "$RUN/pretrain" "$PRETRAIN_STEPS" || "${TORCHRUN[@]}" -m megatron_cslm.pretrain \
  --config examples/configs/quickstart_pretrain.yaml --load-init "$RUN/pretrain_read" --lr 2e-3 --min-lr 2e-4 \
  --data-path "${BLEND[@]}" --train-iters "$PRETRAIN_STEPS" --save "$RUN/pretrain" \
  --tensorboard-dir "$RUN/tb/pretrain" --data-cache-path "$RUN/cache" 2>&1 | train_log "$RUN/logs/pretrain.log"

stage 9/13 "packed interleaved SFT data: [question] TQ [answer] TA1 SA1 TA2 SA2 ... (spoken Q/A and repeat-after-me)"
for part in qa:dialogue_sft repeat:repeat_dialogue; do
  [[ -f "$RUN/sft_data/${part%%:*}.stats.json" ]] || "$PY" tools/build_sft_data.py \
    --input "$RUN/corpus/${part#*:}.jsonl" --tokenizer-model "$TOKENIZER" --num-units 512 \
    --output-prefix "$RUN/sft_data/${part%%:*}" --seq-length 512 --layout interleaved --chunk-words 4 --dedup-units
done

stage 10/13 "SFT from the pretrained checkpoint, data parallel over 2 processes, $SFT_STEPS steps"
SFT_DATA=()  # the 96 Q/A dialogues 8 times over the 2,000 repeat dialogues: about 30% and 70% of the bins
for _ in 1 2 3 4 5 6 7 8; do SFT_DATA+=("$RUN/sft_data/qa"); done
done_iter "$RUN/sft" "$SFT_STEPS" || "${TORCHRUN[@]}" -m megatron_cslm.sft \
  --config examples/configs/quickstart_sft.yaml --load-init "$RUN/pretrain" \
  --data-path "${SFT_DATA[@]}" "$RUN/sft_data/repeat" --train-iters "$SFT_STEPS" --save "$RUN/sft" \
  --tensorboard-dir "$RUN/tb/sft" 2>&1 | train_log "$RUN/logs/sft.log"

stage 11/13 "export to Hugging Face (fp32) with --verify"
[[ -f "$RUN/hf/config.json" ]] || "$PY" checkpoints_convert/megatron_to_hf.py --megatron-dir "$RUN/sft" \
  --out "$RUN/hf" --dtype fp32 --verify

stage 12/13 "answer a toy spoken question with streaming interleaved decoding"
"$PY" - "$RUN" <<'PYEOF'
import json, sys
run = sys.argv[1]
first = json.loads(open(f"{run}/corpus/dialogue_sft.jsonl", encoding="utf-8").readline())
user = first["turns"][0]
open(f"{run}/question_units.txt", "w").write(" ".join(map(str, user["units"])) + "\n")
print(f"question ({first['lang']}): {user['text']!r} as {len(user['units'])} units")
PYEOF
rm -rf "$RUN/decode"
"$PY" tools/decode.py --model-name-or-path "$RUN/hf" --unit "$RUN/question_units.txt" --lang en \
  --output-dir "$RUN/decode" --stream --seed 0 --max-new-tokens 256 --dedup-units

stage 13/13 "held-out spoken questions (never trained on): TQ error and answers, greedy decoding"
rm -rf "$RUN/heldout"
"$PY" -m megatron_cslm.toy.heldout --model "$RUN/hf" --corpus "$RUN/corpus" --output-dir "$RUN/heldout" \
  --dedup-units

"$PY" - "$RUN" "$((SECONDS - T0))" <<'PYEOF'
import json, re, sys
run, seconds = sys.argv[1], int(sys.argv[2])
def losses(log):
    vals = [float(m.group(1)) for m in re.finditer(r"lm loss ([0-9.]+)", open(log).read())]
    return (vals[0], vals[-1]) if vals else (float("nan"), float("nan"))
r0, r1 = losses(f"{run}/logs/pretrain_read.log")
p0, p1 = losses(f"{run}/logs/pretrain.log")
s0, s1 = losses(f"{run}/logs/sft.log")
base = json.load(open(f"{run}/base_hf/toy_base_model.json", encoding="utf-8"))
item = json.loads(open(f"{run}/decode/decode.jsonl", encoding="utf-8").readline())
kinds = [chunk["kind"].upper() for chunk in item["chunks"]]
ta_then_sa = any(a == "TA" and b == "SA" for a, b in zip(kinds, kinds[1:]))
print("\n=== quickstart summary")
print(f"base LM loss {base['loss_first']:.3f} -> {base['loss_last']:.3f}; pretraining loss: reading {r0:.3f} -> "
      f"{r1:.3f}, every recipe {p0:.3f} -> {p1:.3f}; SFT loss {s0:.3f} -> {s1:.3f}")
print(f"answer chunks: {' '.join(kinds)} (a text chunk followed by a speech chunk: {'yes' if ta_then_sa else 'NO'})")
held = json.load(open(f"{run}/heldout/heldout.json", encoding="utf-8"))["summary"]
print(f"held-out spoken questions (never trained on): {held['items']}; TQ character error rate {held['tq_cer']:.3f}; "
      f"answers matching the reference {held['answers_correct']}/{held['items']}")
print(f"artifacts: corpus {run}/corpus, base LM {run}/base_hf (HF) -> {run}/base (Megatron, tokenizer with units), "
      f"data {run}/bin + {run}/sft_data, checkpoints {run}/pretrain_read + {run}/pretrain + {run}/sft, HF export "
      f"{run}/hf, answers {run}/decode + {run}/heldout, TensorBoard {run}/tb")
print(f"wall time of this invocation: {seconds} s")
PYEOF
