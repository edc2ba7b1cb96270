"""Speech-to-speech benchmark report: latency to first speech, answer lengths, language and error rates.

Per model (e.g. the interleaved CSLM model and a sequential baseline answering the same questions with the
same seeds) it reports per-item figures and means: tokens and seconds to the first complete speech chunk,
TA/SA lengths, the off-target language ratio of the text answer, the TQ transcript's WER/CER against the
reference transcript, and, given an ASR command, WER/CER of the spoken answer against the text answer.

The paper's scores (`add_speech_scores`) come on top: WER/CER between the text answer and an ASR transcript of
the spoken answer's audio, its UTMOS, and a judge model's 1-5 score of the text answer. Every item keeps its
own scores, and a scorer's per-item failure (a judge error) is recorded on that item, never raised. Means are
over the items that have the score; the counts say how many.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import tempfile
from collections import Counter
from pathlib import Path
from statistics import mean
from typing import Callable, Mapping, Sequence

from megatron_cslm.data.sft import SFTEncoder
from megatron_cslm.inference.asr import Wave
from megatron_cslm.inference.generate import Response, SpeechLM
from megatron_cslm.inference.inputs import Question
from megatron_cslm.inference.latency import summarize
from megatron_cslm.inference.metrics import error_rates, script_language
from megatron_cslm.inference.outputs import speech_units
from megatron_cslm.inference.runner import DecodeOptions, decode_to_dir


class AsrCommand:
    """Runs a user's ASR on units: `template` holds `{units_file}`, a file of space-separated unit ids.

    The command must print the transcript on stdout. It is run without a shell (split like a shell would).
    """

    def __init__(self, template: str):
        self.args = shlex.split(template)
        if not any("{units_file}" in a for a in self.args):
            raise ValueError(f"ASR command {template!r} must contain {{units_file}}")

    def __call__(self, units: Sequence[int]) -> str:
        with tempfile.TemporaryDirectory(prefix="cslm_asr_") as tmp:
            path = Path(tmp) / "units.txt"
            path.write_text(" ".join(map(str, units)) + "\n", encoding="utf-8")
            args = [a.replace("{units_file}", str(path)) for a in self.args]
            done = subprocess.run(args, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"ASR command {shlex.join(args)} failed with exit code {done.returncode}: "
                               f"{done.stderr.strip()[-500:]}")
        return done.stdout.strip()


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return mean(values) if values else None


def evaluate(questions: Sequence[Question], responses: Sequence[Response], answer_lang: str,
             asr: Callable[[Sequence[int]], str] | None = None,
             units_for_asr: Callable[[Response], list[int]] | None = None) -> dict:
    """{"summary": ..., "items": [...]} for one model's responses to `questions`.

    `units_for_asr` maps a response to the units the ASR hears (e.g. re-expanded); default: as generated.
    """
    items, warnings = [], Counter()
    for q, r in zip(questions, responses, strict=True):
        p = r.parsed
        lang = script_language(p.answer_text)
        row = {"id": q.id, "reference": q.reference, "tq": p.question_text, "ta": p.answer_text,
               "ta_lang": lang, "off_target": None if lang is None else lang != answer_lang,
               "ta_chunks": len(p.of_kind("ta")), "sa_chunks": len(p.of_kind("sa")),
               **r.latency.as_dict(), "warnings": dict(p.warnings)}
        if q.reference:
            row["tq_error"] = error_rates([q.reference], [p.question_text])
        if asr is not None and p.speech_units:
            row["asr_transcript"] = asr(units_for_asr(r) if units_for_asr else p.speech_units)
            row["asr_error"] = error_rates([p.answer_text], [row["asr_transcript"]])
        warnings.update(p.warnings)
        items.append(row)
    judged = [row["off_target"] for row in items if row["off_target"] is not None]
    with_ref = [(row["reference"], row["tq"]) for row in items if row["reference"]]
    with_asr = [(row["ta"], row["asr_transcript"]) for row in items if "asr_transcript" in row]
    summary = {
        **summarize(r.latency for r in responses),
        "mean_ta_chunks": _mean([row["ta_chunks"] for row in items]),
        "mean_sa_chunks": _mean([row["sa_chunks"] for row in items]),
        "answer_lang": answer_lang,
        "off_target_ratio": sum(judged) / len(judged) if judged else None,
        "items_without_text_answer": len(items) - len(judged),
        "tq_error": error_rates(*zip(*with_ref)) if with_ref else None,
        "asr_error": error_rates(*zip(*with_asr)) if with_asr else None,
        "warnings": dict(sorted(warnings.items())),
    }
    return {"summary": summary, "items": items}


def add_speech_scores(report: dict, questions: Sequence[Question], waves: Mapping[str, Wave] | None = None,
                      asr: Callable[[Sequence[Wave]], list[str]] | None = None,
                      utmos: Callable[[Sequence[Wave]], list[float]] | None = None, judge=None) -> dict:
    """Add ASR (of `waves`, {item id: waveform}), UTMOS and judge scores to `report` in place; returns it.

    `judge` has ``score(question, answer) -> {"score", "error", "cached"}`` (`inference.judge.Judge`); the
    question it sees is the reference transcript, or the model's TQ when there is none.
    """
    items, by_id = report["items"], {q.id: q for q in questions}
    heard = [row for row in items if waves and row["id"] in waves]
    if asr is not None and heard:
        for row, text in zip(heard, asr([waves[row["id"]] for row in heard]), strict=True):
            row["asr_transcript"] = text
            row["asr_error"] = error_rates([row["ta"]], [text])
    if utmos is not None and heard:
        for row, mos in zip(heard, utmos([waves[row["id"]] for row in heard]), strict=True):
            row["utmos"] = mos
    if judge is not None:
        for row in items:
            if not row["ta"].strip():
                row["judge"] = {"score": None, "error": "no text answer", "cached": False}
                continue
            row["judge"] = judge.score(by_id[row["id"]].reference or row["tq"], row["ta"])
    s = report["summary"]
    with_asr = [(row["ta"], row["asr_transcript"]) for row in items if "asr_transcript" in row]
    s["asr_error"] = error_rates(*zip(*with_asr)) if with_asr else s.get("asr_error")
    s["items_with_audio"] = len(heard) if waves is not None else s.get("items_with_audio")
    s["mean_utmos"] = _mean([row.get("utmos") for row in items])
    judged = [row["judge"] for row in items if "judge" in row]
    s["mean_judge_score"] = _mean([j["score"] for j in judged])
    s["judge_scored"] = sum(j["score"] is not None for j in judged) if judged else None
    s["judge_errors"] = sum(j["error"] is not None for j in judged) if judged else None
    return report


_ROWS = [  # (label, getter over a summary)
    ("items", lambda s: s["items"]),
    ("items with speech", lambda s: s["items_with_speech"]),
    ("mean tokens to first speech chunk", lambda s: s["mean_first_speech_tokens"]),
    ("mean seconds to first speech chunk", lambda s: s["mean_first_speech_s"]),
    ("mean TA chunks before first speech", lambda s: s["mean_text_chunks_before_speech"]),
    ("mean TA tokens before first speech", lambda s: s["mean_text_tokens_before_speech"]),
    ("mean TA tokens", lambda s: s["mean_answer_text_tokens"]),
    ("mean SA units", lambda s: s["mean_speech_units"]),
    ("mean TA / SA chunks", lambda s: _pair(s["mean_ta_chunks"], s["mean_sa_chunks"])),
    ("mean generated tokens", lambda s: s["mean_generated_tokens"]),
    ("mean seconds per answer", lambda s: s["mean_total_s"]),
    ("off-target answer language", lambda s: s["off_target_ratio"]),
    ("TQ WER / CER", lambda s: s["tq_error"] and _pair(s["tq_error"]["wer"], s["tq_error"]["cer"])),
    ("ASR WER / CER of SA vs TA", lambda s: s["asr_error"] and _pair(s["asr_error"]["wer"], s["asr_error"]["cer"])),
    ("UTMOS", lambda s: s.get("mean_utmos")),
    ("judge score (1-5)", lambda s: s.get("mean_judge_score")),
    ("judge scored / errors", lambda s: s.get("judge_scored") is not None
     and _pair(s["judge_scored"], s["judge_errors"]) or None),
    ("parse warnings", lambda s: ", ".join(f"{k}={v}" for k, v in s["warnings"].items()) or "none"),
]


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _pair(a, b) -> str:
    return f"{_fmt(a)} / {_fmt(b)}"


def render_markdown(reports: dict[str, dict]) -> str:
    """Summary table with one column per model, then first-speech latency per item."""
    labels = list(reports)
    lines = ["| metric | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for name, get in _ROWS:
        lines.append(f"| {name} | " + " | ".join(_fmt(get(reports[m]["summary"])) for m in labels) + " |")
    lines += ["", "Tokens (seconds) to the first complete speech chunk, per item:", "",
              "| id | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    per_model = [{row["id"]: row for row in reports[m]["items"]} for m in labels]
    for qid in per_model[0]:
        cells = []
        for rows in per_model:
            row = rows.get(qid)
            cells.append("-" if row is None or row["first_speech_tokens"] is None
                         else f"{row['first_speech_tokens']} ({_fmt(row['first_speech_s'])})")
        lines.append(f"| {qid} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


_ITEM_COLUMNS = [  # (label, getter over an item row): the per-item scores of one model
    ("TQ CER", lambda r: r.get("tq_error") and r["tq_error"]["cer"]),
    ("off-target", lambda r: r["off_target"]),
    ("first speech tokens", lambda r: r["first_speech_tokens"]),
    ("ASR WER", lambda r: r.get("asr_error") and r["asr_error"]["wer"]),
    ("ASR CER", lambda r: r.get("asr_error") and r["asr_error"]["cer"]),
    ("UTMOS", lambda r: r.get("utmos")),
    ("judge", lambda r: r.get("judge") and (r["judge"]["score"] if r["judge"]["error"] is None
                                            else f"error: {r['judge']['error'][:60]}")),
]


def render_model_markdown(label: str, report: dict) -> str:
    """One model's table: its summary, then every item's scores (judge errors shown on their item)."""
    lines = [f"## {label}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {name} | {_fmt(get(report['summary']))} |" for name, get in _ROWS]
    lines += ["", "| id | " + " | ".join(name for name, _ in _ITEM_COLUMNS) + " |",
              "|---|" + "---|" * len(_ITEM_COLUMNS)]
    for row in report["items"]:
        cells = [_fmt(get(row)).replace("|", "/") for _, get in _ITEM_COLUMNS]
        lines.append(f"| {row['id']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


PAPER_COLUMNS = [  # (column, getter over a summary): the paper's table, one row per model
    ("judge (1-5)", lambda s: s.get("mean_judge_score")),
    ("UTMOS", lambda s: s.get("mean_utmos")),
    ("ASR-WER", lambda s: s.get("asr_error") and s["asr_error"]["wer"]),
    ("ASR-CER", lambda s: s.get("asr_error") and s["asr_error"]["cer"]),
    ("off-target", lambda s: s["off_target_ratio"]),
    ("first speech (tokens)", lambda s: s["mean_first_speech_tokens"]),
]


def paper_table(reports: dict[str, dict]) -> list[dict]:
    """Side-by-side rows, one per model, with the paper's columns (None where a score was not computed)."""
    return [{"model": label, **{name: get(r["summary"]) for name, get in PAPER_COLUMNS}}
            for label, r in reports.items()]


def render_paper_markdown(reports: dict[str, dict]) -> str:
    rows = paper_table(reports)
    lines = ["| model | " + " | ".join(name for name, _ in PAPER_COLUMNS) + " |",
             "|---|" + "---|" * len(PAPER_COLUMNS)]
    lines += [f"| {row['model']} | " + " | ".join(_fmt(row[name]) for name, _ in PAPER_COLUMNS) + " |"
              for row in rows]
    return "\n".join(lines) + "\n"


def run_benchmark(models: dict[str, str], load: Callable[[str], tuple[SpeechLM, SFTEncoder]],
                  questions: Sequence[Question], options: DecodeOptions, output_dir: str | os.PathLike,
                  asr: Callable[[Sequence[int]], str] | None = None,
                  durations: int | Sequence[float] | None = None, progress: bool = True) -> dict[str, dict]:
    """Answer `questions` with each model ({label: path}, loaded by `load`) and evaluate them.

    Each model's decode outputs go to `<output_dir>/<label>/`; returns {label: report}.
    """
    reports = {}
    for label, path in models.items():
        lm, encoder = load(path)
        meta = {"model": path, "label": label, "answer_lang": options.answer_lang, "seed_base": options.seed}
        responses = decode_to_dir(lm, encoder, questions, options, Path(output_dir) / label, meta, durations,
                                  progress=progress)
        reports[label] = evaluate(questions, responses, options.answer_lang, asr,
                                  lambda r: speech_units(r, durations))
        del lm, encoder  # free this model before the next one loads
    return reports
