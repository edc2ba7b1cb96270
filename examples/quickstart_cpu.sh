#!/usr/bin/env bash
# The whole CSLM pipeline on a laptop CPU in minutes, on the embedded toy corpus (synthetic speech; nothing is
# downloaded): corpus -> tokenizer -> pretraining data (all recipes) -> .bin/.idx -> continual pretraining
# (tiny Llama, TP=2 on gloo) -> packed interleaved SFT data -> SFT -> HF export -> streaming spoken answer ->
# held-out spoken questions (never trained on): TQ character error rate and answers matching the reference.
#
#   bash examples/quickstart_cpu.sh            # ~3-4 min on 2 cores; re-running reuses finished stages
#   QUICK=1 bash examples/quickstart_cpu.sh    # a few steps per stage (what the test suite runs)
#   RUN=/path/to/dir bash examples/quickstart_cpu.sh
#   PRETRAIN_STEPS_OVERRIDE=400 SFT_STEPS_OVERRIDE=150 bash examples/quickstart_cpu.sh   # another schedule
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
if [[ "${QUICK:-0}" == 1 ]]; then PRETRAIN_STEPS=20; SFT_STEPS=10; else PRETRAIN_STEPS=200; SFT_STEPS=150; fi
PRETRAIN_STEPS="${PRETRAIN_STEPS_OVERRIDE:-$PRETRAIN_STEPS}"; SFT_STEPS="${SFT_STEPS_OVERRIDE:-$SFT_STEPS}"
export OMP_NUM_THREADS=1
[[ "${VERBOSE:-0}" == 1 ]] && export CSLM_VERBOSE=1
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc-per-node 2)
mkdir -p "$RUN/logs"
stage() { echo; echo "=== [$1] $2"; }
done_iter() { [[ -f "$1/latest_checkpointed_iteration.txt" ]] && [[ "$(cat "$1/latest_checkpointed_iteration.txt")" == "$2" ]]; }
T0=$SECONDS

stage 1/10 "toy bilingual speech-text corpus (synthetic speech)"
[[ -f "$RUN/corpus/heldout.jsonl" ]] || "$PY" tools/make_toy_corpus.py --out "$RUN/corpus" --num-units 512

stage 2/10 "text tokenizer + 512 speech units + specials"
[[ -f "$RUN/tokenizer/cslm_tokenizer.json" ]] || "$PY" tools/make_toy_tokenizer.py --corpus "$RUN/corpus" --out "$RUN/tokenizer"

stage 3/10 "pretraining documents: ASR, TTS, interleaved, translation, cross-lingual speech, replay"
[[ -f "$RUN/docs/stats.json" ]] || "$PY" tools/build_pretrain_data.py --asr "$RUN/corpus/manifest.jsonl" \
  --parallel "$RUN/corpus/parallel.jsonl" --instruct "$RUN/corpus/instruct.jsonl" --out-dir "$RUN/docs" \
  --num-units 512 --mask-prompt

stage 4/10 "documents -> .bin/.idx"
BLEND=()
for src in asr tts interleave translate cross_speech replay; do
  [[ -f "$RUN/bin/$src.stats.json" ]] || "$PY" tools/preprocess_data.py --input "$RUN/docs/$src.jsonl" \
    --tokenizer-model "$RUN/tokenizer" --output-prefix "$RUN/bin/$src" --append-eod --workers 2 \
    > "$RUN/logs/preprocess_$src.log"
  echo "$src: $("$PY" -c "import json,sys; s=json.load(open(sys.argv[1])); print(s['documents'], 'documents,', s['tokens'], 'tokens')" "$RUN/bin/$src.stats.json")"
  BLEND+=(1 "$RUN/bin/$src")
done

stage 5/10 "continual pretraining: tiny Llama-3.1-shaped model, TP=2 on CPU (gloo), $PRETRAIN_STEPS steps"
done_iter "$RUN/pretrain" "$PRETRAIN_STEPS" || "${TORCHRUN[@]}" -m megatron_cslm.pretrain \
  --config examples/configs/quickstart_pretrain.yaml --tokenizer-model "$RUN/tokenizer" --data-path "${BLEND[@]}" \
  --train-iters "$PRETRAIN_STEPS" --save "$RUN/pretrain" --tensorboard-dir "$RUN/tb/pretrain" \
  --data-cache-path "$RUN/cache" 2>&1 | tee "$RUN/logs/pretrain.log" | grep --line-buffered -E "iteration|megatron_cslm|rror"

stage 6/10 "packed interleaved SFT data: [question] TQ [answer] TA1 SA1 TA2 SA2 ..."
[[ -f "$RUN/sft_data/interleaved.stats.json" ]] || "$PY" tools/build_sft_data.py \
  --input "$RUN/corpus/dialogue_sft.jsonl" --tokenizer-model "$RUN/tokenizer" --num-units 512 \
  --output-prefix "$RUN/sft_data/interleaved" --seq-length 512 --layout interleaved --chunk-words 4

stage 7/10 "SFT from the pretrained checkpoint, $SFT_STEPS steps"
done_iter "$RUN/sft" "$SFT_STEPS" || "${TORCHRUN[@]}" -m megatron_cslm.sft \
  --config examples/configs/quickstart_sft.yaml --load-init "$RUN/pretrain" \
  --data-path "$RUN/sft_data/interleaved" --train-iters "$SFT_STEPS" --save "$RUN/sft" \
  --tensorboard-dir "$RUN/tb/sft" 2>&1 | tee "$RUN/logs/sft.log" | grep --line-buffered -E "iteration|megatron_cslm|rror"

stage 8/10 "export to Hugging Face (fp32) with --verify"
[[ -f "$RUN/hf/config.json" ]] || "$PY" checkpoints_convert/megatron_to_hf.py --megatron-dir "$RUN/sft" \
  --out "$RUN/hf" --dtype fp32 --verify

stage 9/10 "answer a toy spoken question with streaming interleaved decoding"
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
  --output-dir "$RUN/decode" --stream --seed 0 --max-new-tokens 256

stage 10/10 "held-out spoken questions (never trained on): TQ error and answers, greedy decoding"
rm -rf "$RUN/heldout"
"$PY" -m megatron_cslm.toy.heldout --model "$RUN/hf" --corpus "$RUN/corpus" --output-dir "$RUN/heldout"

"$PY" - "$RUN" "$((SECONDS - T0))" <<'PYEOF'
import json, re, sys
run, seconds = sys.argv[1], int(sys.argv[2])
def losses(log):
    vals = [float(m.group(1)) for m in re.finditer(r"lm loss ([0-9.]+)", open(log).read())]
    return (vals[0], vals[-1]) if vals else (float("nan"), float("nan"))
p0, p1 = losses(f"{run}/logs/pretrain.log")
s0, s1 = losses(f"{run}/logs/sft.log")
item = json.loads(open(f"{run}/decode/decode.jsonl", encoding="utf-8").readline())
kinds = [chunk["kind"].upper() for chunk in item["chunks"]]
ta_then_sa = any(a == "TA" and b == "SA" for a, b in zip(kinds, kinds[1:]))
print("\n=== quickstart summary")
print(f"pretraining loss {p0:.3f} -> {p1:.3f} ({p1 / p0:.2f} of start); SFT loss {s0:.3f} -> {s1:.3f}")
print(f"answer chunks: {' '.join(kinds)} (a text chunk followed by a speech chunk: {'yes' if ta_then_sa else 'NO'})")
held = json.load(open(f"{run}/heldout/heldout.json", encoding="utf-8"))["summary"]
print(f"held-out spoken questions (never trained on): {held['items']}; TQ character error rate {held['tq_cer']:.3f}; "
      f"answers matching the reference {held['answers_correct']}/{held['items']}")
print(f"artifacts: corpus {run}/corpus, tokenizer {run}/tokenizer, data {run}/bin + {run}/sft_data, checkpoints "
      f"{run}/pretrain + {run}/sft, HF export {run}/hf, answers {run}/decode + {run}/heldout, TensorBoard {run}/tb")
print(f"wall time of this invocation: {seconds} s")
PYEOF
