"""Spoken questions to answer: unit-sequence files (the CSLM authors' form) and benchmark lists.

A unit file holds one question per line, as the authors' `decode_general.py` reads it: `<sosp><12><7><eosp>`,
`<12> <7>` or plain `12 7`. A benchmark list (the tools' `--manifest`) is a tab-separated file with a
header; `id` is required, `audio` (a path, relative to the list) and `text` (the question's reference
transcript) are optional. Without an `audio` column the audio is `<audio_dir>/<id>.wav`, the BELLE-eval-S2S
layout (`test.tsv` + `wav/`).
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from megatron_cslm.fileio import DataError, iter_lines
from megatron_cslm.text.markup import MarkupError
from megatron_cslm.text.markup import parse_unit_line as parse_unit_markup
from megatron_cslm.text.units import UnitListError, check_units


@dataclass
class Question:
    """One spoken question: its units, or audio to tokenize first, and the reference transcript if known."""

    id: str
    source: str  # as given (the unit line, or the audio path): the `question` of responses.json
    units: list[int] | None = None
    audio: Path | None = None
    reference: str | None = None


def parse_unit_line(line: str, num_units: int, path: str | os.PathLike, lineno: int) -> list[int]:
    """Units of one line in any of the accepted forms; DataError (file, line, field 'units') otherwise."""
    try:
        units = parse_unit_markup(line)
    except MarkupError as e:
        raise DataError(path, lineno, "units", str(e)) from None
    if not units:
        raise DataError(path, lineno, "units", "no units on this line")
    try:
        check_units(units, num_units)
    except UnitListError as e:
        raise DataError(path, lineno, "units", e.message) from None
    return units


def read_unit_file(path: str | os.PathLike, num_units: int) -> list[Question]:
    """One question per non-blank line; ids are line numbers."""
    questions = []
    for lineno, line in iter_lines(path):  # decoded line by line: a bad byte is reported on its own line
        if line.strip():
            questions.append(Question(str(lineno), line.strip(), parse_unit_line(line, num_units, path, lineno)))
    return questions


def read_benchmark_list(path: str | os.PathLike, audio_dir: str | os.PathLike | None = None) -> list[Question]:
    """Questions of a tab-separated benchmark list (see module docstring); audio files must exist."""
    path = Path(path)
    audio_dir = Path(audio_dir) if audio_dir is not None else path.parent / "wav"
    questions, seen = [], set()
    # one manifest row per line (QUOTE_NONE), decoded line by line so that a bad byte names its own line
    reader = csv.DictReader((line for _, line in iter_lines(path)), delimiter="\t", quoting=csv.QUOTE_NONE)
    if not reader.fieldnames or "id" not in reader.fieldnames:
        raise DataError(path, 1, "id", f"header must name an 'id' column, got {reader.fieldnames}")
    for row in reader:
        lineno = reader.line_num
        qid = (row.get("id") or "").strip()
        if not qid:
            raise DataError(path, lineno, "id", "empty")
        if qid in seen:
            raise DataError(path, lineno, "id", f"duplicate id {qid!r}")
        seen.add(qid)
        audio = path.parent / row["audio"] if row.get("audio") else audio_dir / f"{qid}.wav"
        if not audio.is_file():
            raise DataError(path, lineno, "audio", f"audio file {audio} not found")
        text = row.get("text")
        questions.append(Question(qid, str(audio), audio=audio, reference=text.strip() if text else None))
    return questions
