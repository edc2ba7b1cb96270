"""Decode outputs, appended to an output directory like the CSLM authors' `responses.json`.

Three files stay aligned item by item (entry i of each is the same question):
  responses.json     JSON list of {"question", "response", ...}: the authors' shape plus our fields
  decode.jsonl       everything per item: chunks with token/time stamps, warnings, latency
  speech_units.txt   the spoken answer as space-separated unit ids, one line per item, re-expanded to
                     frame rate when durations are given: what CosyVoice's token-to-wav consumes
Each file is rewritten atomically with the old items plus the new ones, so an interrupted run never
leaves a half-written file and an earlier run's items are kept.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from megatron_cslm.fileio import DataError, atomic_open, make_dirs, write_json
from megatron_cslm.inference.durations import expand_units
from megatron_cslm.inference.generate import Response
from megatron_cslm.inference.inputs import Question
from megatron_cslm.text.tokenizer import SpeechTextTokenizer

RESPONSES, RECORDS, UNITS = "responses.json", "decode.jsonl", "speech_units.txt"


def speech_units(response: Response, durations: int | Sequence[float] | None) -> list[int]:
    """The answer's units, concatenated over SA chunks, expanded by `durations` when given."""
    units = response.parsed.speech_units
    return expand_units(units, durations) if durations is not None else units


def make_record(question: Question, response: Response, tok: SpeechTextTokenizer, meta: dict,
                durations: int | Sequence[float] | None = None) -> dict:
    """The decode.jsonl record of one item; `meta` (model, languages, sampling) is copied in."""
    parsed = response.parsed
    ids = response.ids[:-1] if parsed.stopped else response.ids
    return {
        "id": question.id, "question": question.source, "reference": question.reference, **meta,
        "response": tok.decode(ids),
        "tq": parsed.question_text, "ta": parsed.answer_text,
        "sa": [c.units for c in parsed.of_kind("sa")],
        "chunks": [c.as_dict() for c in parsed.chunks],
        "warnings": dict(parsed.warnings), "stopped": parsed.stopped,
        "latency": response.latency.as_dict(),
        "speech_units": speech_units(response, durations),
    }


def responses_entry(record: dict) -> dict:
    """The responses.json entry: the authors' {"question", "response"} first, then our summary fields."""
    keys = ("question", "response", "id", "lang", "answer_lang", "tq", "ta", "sa", "warnings")
    return {k: record[k] for k in keys if k in record}


def _read_list(path: Path) -> list:
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(path, e.lineno, None, f"not a JSON list ({e.msg}); the CSLM authors' scripts write one "
                                              "object per line: use a fresh --output-dir") from None
    if not isinstance(data, list):
        raise DataError(path, None, None, f"expected a JSON list of responses, got {type(data).__name__}")
    return data


def _append_lines(path: Path, lines: list[str]) -> None:
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    with atomic_open(path) as f:
        f.write(old + "".join(line + "\n" for line in lines))


def append_outputs(output_dir: str | os.PathLike, records: Sequence[dict]) -> None:
    """Append `records` (from `make_record`) to the three output files."""
    out = Path(output_dir)
    make_dirs(out)
    write_json(out / RESPONSES, _read_list(out / RESPONSES) + [responses_entry(r) for r in records])
    _append_lines(out / RECORDS, [json.dumps(r, ensure_ascii=False) for r in records])
    _append_lines(out / UNITS, [" ".join(map(str, r["speech_units"])) for r in records])
