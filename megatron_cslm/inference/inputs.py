"""Spoken questions to answer: unit-sequence files (the CSLM authors' form) and audio manifests.

A unit file holds one question per line, as the authors' `decode_general.py` reads it: `<sosp><12><7><eosp>`,
`<12> <7>` or plain `12 7`. A manifest is a tab-separated file with a header; `id` is required, `audio`
(a path, relative to the manifest) and `text` (the question's reference transcript) are optional. Without
an `audio` column the audio is `<audio_dir>/<id>.wav`, the BELLE-eval-S2S layout (`test.tsv` + `wav/`).
"""
from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path

from megatron_cslm.fileio import DataError, open_text

_TAGGED = re.compile(r"\s*(?:<sosp>)?((?:\s*<\d+>)*)\s*(?:<eosp>)?\s*")
_TAG = re.compile(r"<(\d+)>")


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
    line = line.strip()
    if "<" in line:
        m = _TAGGED.fullmatch(line)
        if not m:
            raise DataError(path, lineno, "units", f"expected <sosp><k>...<eosp> or space-separated integers, "
                                                   f"got {line[:40]!r}")
        units = [int(u) for u in _TAG.findall(m.group(1))]
    else:
        try:
            units = [int(u) for u in line.split()]
        except ValueError:
            raise DataError(path, lineno, "units", f"expected space-separated integers, got {line[:40]!r}") from None
    if not units:
        raise DataError(path, lineno, "units", "no units on this line")
    bad = next((u for u in units if not 0 <= u < num_units), None)
    if bad is not None:
        raise DataError(path, lineno, "units", f"unit {bad} out of range [0, {num_units})")
    return units


def read_unit_file(path: str | os.PathLike, num_units: int) -> list[Question]:
    """One question per non-blank line; ids are line numbers."""
    questions = []
    with open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                questions.append(Question(str(lineno), line.strip(), parse_unit_line(line, num_units, path, lineno)))
    return questions


def read_manifest(path: str | os.PathLike, audio_dir: str | os.PathLike | None = None) -> list[Question]:
    """Questions of a tab-separated manifest (see module docstring); audio files must exist."""
    path = Path(path)
    audio_dir = Path(audio_dir) if audio_dir is not None else path.parent / "wav"
    questions, seen = [], set()
    with open_text(path) as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
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
