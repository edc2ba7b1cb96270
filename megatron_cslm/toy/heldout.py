"""Did the quickstart model learn? Held-out spoken questions -> TQ character error rate and answer accuracy.

Why: a quickstart that only shows well-formed output cannot tell a trained model from a broken one. The toy
corpus holds out spoken questions that no training stage heard (`toy.corpus`, ``heldout.jsonl``); this module
answers them with greedy decoding through the same library calls `cslm decode` uses and reports
- the TQ character error rate against the true question (speech recognition of unseen utterances), and
- how many text answers equal the corpus's reference answer after normalisation (`inference.metrics.normalize`).

    python -m megatron_cslm.toy.heldout --model RUN/hf --corpus RUN/corpus --output-dir RUN/heldout

Writes ``heldout.json`` (summary and per-item rows) and each language's decode outputs under the output dir.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from megatron_cslm.argtypes import positive_int
from megatron_cslm.errors import CslmError
from megatron_cslm.fileio import write_json
from megatron_cslm.tool import run_tool, tool_parser

log = logging.getLogger(__name__)


def read_heldout(corpus: str | Path) -> list[dict]:
    path = Path(corpus) / "heldout.jsonl"
    if not path.exists():
        raise CslmError(path, None, None, "missing: regenerate the toy corpus (cslm make-toy-corpus)", kind="io",
                        reason="missing_input")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def evaluate_heldout(model: str | Path, corpus: str | Path, output_dir: str | Path,
                     max_new_tokens: int = 256, device: str | None = "cpu", dedup_units: bool = False) -> dict:
    """Answer every held-out question (greedy); returns {"summary": {...}, "items": [...]}."""
    from megatron_cslm.data.sft import SFTConfig, SFTEncoder
    from megatron_cslm.inference.evaluate import evaluate
    from megatron_cslm.inference.generate import SpeechLM
    from megatron_cslm.inference.inputs import Question
    from megatron_cslm.inference.metrics import error_rates, normalize
    from megatron_cslm.inference.runner import DecodeOptions, decode_to_dir
    from megatron_cslm.inference.sampling import SamplingConfig

    records = read_heldout(corpus)
    lm = SpeechLM.from_pretrained(model, device=device)
    encoder = SFTEncoder(lm.tok, SFTConfig(dedup_units=dedup_units))
    items = []
    for lang in sorted({r["lang"] for r in records}):
        mine = [r for r in records if r["lang"] == lang]
        questions = [Question(r["id"], r["id"], units=r["units"], reference=r["question"]) for r in mine]
        options = DecodeOptions(lang, SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens),
                                batch_size=len(questions))
        responses = decode_to_dir(lm, encoder, questions, options, Path(output_dir) / lang,
                                  {"model": str(model), "answer_lang": lang}, progress=False)
        report = evaluate(questions, responses, lang)
        for r, row in zip(mine, report["items"]):
            items.append({"id": r["id"], "lang": lang, "question": r["question"], "tq": row["tq"],
                          "tq_cer": row["tq_error"]["cer"], "answer": r["answer"], "ta": row["ta"],
                          "answer_correct": normalize(row["ta"]) == normalize(r["answer"]),
                          "sa_units": row["speech_units"]})
    rates = error_rates([i["question"] for i in items], [i["tq"] for i in items])
    summary = {"items": len(items), "tq_cer": rates["cer"], "tq_wer": rates["wer"],
               "answers_correct": sum(i["answer_correct"] for i in items),
               "answers_with_speech": sum(i["sa_units"] > 0 for i in items)}
    result = {"summary": summary, "items": items}
    write_json(Path(output_dir) / "heldout.json", result)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = tool_parser(__doc__)
    parser.add_argument("--model", required=True, help="exported HF checkpoint directory")
    parser.add_argument("--corpus", required=True, help="toy corpus directory (holds heldout.jsonl)")
    parser.add_argument("--output-dir", required=True, help="heldout.json and decode outputs go here")
    parser.add_argument("--max-new-tokens", type=positive_int, default=256, help="generated tokens per answer")
    parser.add_argument("--dedup-units", action="store_true",
                        help="the model was trained on deduplicated units: collapse repeats in the questions' units")
    args = parser.parse_args(argv)
    result = evaluate_heldout(args.model, args.corpus, args.output_dir, args.max_new_tokens,
                              dedup_units=args.dedup_units)
    for item in result["items"]:
        mark = "ok" if item["answer_correct"] else "--"
        print(f"[{mark}] {item['lang']} TQ {item['tq']!r} (true {item['question']!r}, CER {item['tq_cer']:.2f}); "
              f"TA {item['ta']!r}")
    s = result["summary"]
    print(f"held-out spoken questions: {s['items']}, TQ CER {s['tq_cer']:.3f}, answers matching the reference "
          f"{s['answers_correct']}/{s['items']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_tool(main))
