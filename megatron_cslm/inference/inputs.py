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


def exported_model_config(model_dir: str | os.PathLike, option: str = "--model-name-or-path") -> dict:
    """The config.json of an exported (Hugging Face) model directory, or one `checkpoint` error naming what the
    directory is instead (a Megatron run directory, or no model at all): checked before any model or audio work."""
    import json

    from megatron_cslm.errors import CslmError

    model_dir = Path(model_dir)
    path = model_dir / "config.json"
    if not path.is_file():
        what = ("a Megatron run directory: export it first (checkpoints_convert/megatron_to_hf.py)"
                if (model_dir / "cslm_model.json").exists() else "not an exported model (no config.json)")
        raise CslmError(model_dir, None, option, what, kind="checkpoint", reason="missing")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(path, None, None, f"not a JSON config ({e})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise CslmError(path, None, "model_type", "missing: not a Hugging Face model config", kind="checkpoint",
                        reason="missing")
    return config


def model_speech_tokenizer(model_dir: str | os.PathLike):
    """The speech tokenizer an exported model records in its config.json (`speech_tokenizer`, written by the
    export from cslm_model.json): None when it records none (a foreign checkpoint, or unknown at training)."""
    from megatron_cslm.speech.identity import IDENTITY_KEY, parse_identity

    return parse_identity(exported_model_config(model_dir).get(IDENTITY_KEY), Path(model_dir) / "config.json")


def resolve_speech_tokenizer(flag: str | None, weights: str | os.PathLike | None, models: dict[str, str]):
    """The S3 tokenizer to turn audio questions into units for `models` ({flag: model dir}): the one they record,
    checked against `--speech-tokenizer` (`flag`) and the weights given (None: random-init, seed 0) before any
    net is built or audio read. A model with no record needs `flag`. Returns (name, identity or None)."""
    from megatron_cslm.errors import CslmError
    from megatron_cslm.speech.identity import S3_TOKENIZERS, IdentityJoin, check_same, s3_identity

    join = IdentityJoin()
    for option, model in models.items():
        recorded = model_speech_tokenizer(model)
        if recorded is None and flag is None:
            raise CslmError.usage(f"{option} {model} records no speech tokenizer (a foreign checkpoint?): pass "
                                  f"--speech-tokenizer, one of {sorted(S3_TOKENIZERS)}", "--speech-tokenizer")
        if recorded is not None:
            join.add(recorded, f"{option} {model}", Path(model) / "config.json")
    recorded = join.identity
    if recorded is not None and flag is not None and recorded.name != flag:
        raise CslmError.compat(f"{join.where} was trained on units of {recorded.describe()} but --speech-tokenizer "
                               f"is {flag}: its units would mean nothing to the model (drop the flag to use the "
                               "model's)", field="--speech-tokenizer")
    name = flag or recorded.name
    if name not in S3_TOKENIZERS:
        raise CslmError.compat(f"{join.where} was trained on units of {recorded.describe()}, not an S3 tokenizer's: "
                               "audio cannot be tokenized for it; give its questions as units (--unit)",
                               field="--manifest")
    if recorded is not None:
        check_same(recorded, join.where, s3_identity(name, weights), "the S3 tokenizer given (--tokenizer-weights "
                   "/ --random-init)")
    return name, recorded
