"""Source records of the pretraining recipes, validated on read with errors naming file, line and field.

Accepted inputs:

* speech (ASR/TTS manifest, as ``tools/tokenize_speech.py`` writes): ``{"text": str, "units": [int],
  "id"?: str, "lang"?: str, "speaker"?: str, "words"?: [{"word": str, "start": int, "end": int}]}``, word
  timestamps being unit indices (end exclusive) whose words appear in order in ``text``.
* parallel text: ``{"zh": str, "en": str, "zh_units"?: [int], "en_units"?: [int], "id"?: str}``, or the
  Hugging Face WMT layout ``{"translation": {"zh": str, "en": str}}``; the two language keys are configurable.
* instructions: ``{"prompt": str, "response": str}`` (the CSLM authors' format), ``{"messages": [{"role",
  "content"}]}`` or ShareGPT/InfinityInstruct ``{"conversations": [{"from", "value"}]}``; optional ``"lang"``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from megatron_cslm.data.chunking import check_words, dedup_units, raw_to_dedup
from megatron_cslm.fileio import DataError, require
from megatron_cslm.speech.runs import unit_runs
from megatron_cslm.text.language import guess_lang  # the project's one language rule (used when "lang" is absent)
from megatron_cslm.text.units import UnitListError, check_units

ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}


def _text(record: dict, key: str, path: str, line: int, where: str | None = None) -> str:
    value = require(record, key, str, path, line).strip()
    if not value:
        raise DataError(path, line, where or key, "empty text")
    return value


def _units(value: object, path: str, line: int, key: str, num_units: int) -> list[int]:
    if not isinstance(value, list):
        raise DataError(path, line, key, "expected a non-empty list of unit ids")
    try:
        check_units(value, num_units, strict=True)
    except UnitListError as e:
        raise DataError(path, line, key, e.message) from None
    return value


def _lang(record: dict, text: str, path: str, line: int) -> str:
    """The record's "lang", guessed from the text when absent or empty (tokenize_speech writes "" if unknown)."""
    if record.get("lang") in (None, ""):
        return guess_lang(text)
    return require(record, "lang", str, path, line)


def _record_id(record: dict, path: str, line: int) -> str:
    rid = record.get("id")
    return str(rid) if rid is not None else f"{Path(path).name}:{line}"


@dataclass(frozen=True)
class SpeechRecord:
    """One utterance: transcript, units and optional word timestamps; `path`/`line` locate later errors."""

    id: str
    text: str
    lang: str
    units: list[int]
    words: list[dict] | None
    path: str
    line: int

    def deduplicated(self) -> "SpeechRecord":
        """Runs of a repeated unit collapsed (`1 1 2 2 2 3` -> `1 2 3`, what `tokenize-speech --dedup` writes),
        word timestamps moved to the collapsed indices (`chunking.raw_to_dedup`: a run cut by a word boundary
        stays with the word before it)."""
        units, durations = unit_runs(self.units)
        words = self.words
        if words is not None:
            starts = raw_to_dedup(durations, [w["start"] for w in words])
            ends = raw_to_dedup(durations, [w["end"] for w in words])
            words = [{**w, "start": a, "end": b} for w, a, b in zip(words, starts, ends)]
        return dataclasses.replace(self, units=units, words=words)


def parse_speech(record: dict, path: str, line: int, num_units: int) -> SpeechRecord:
    text = _text(record, "text", path, line)
    units = _units(require(record, "units", list, path, line), path, line, "units", num_units)
    words = record.get("words")
    if words is not None:
        if not isinstance(words, list) or not words:
            raise DataError(path, line, "words", "expected a non-empty list of {word, start, end} (or no field)")
        try:
            check_words(words, len(units))
        except ValueError as e:
            raise DataError(path, line, "words", str(e)) from None
    return SpeechRecord(_record_id(record, path, line), text, _lang(record, text, path, line), units, words,
                        str(path), line)


@dataclass(frozen=True)
class ParallelRecord:
    """A sentence pair: `text[lang]`, and `units[lang]` for the sides that have speech."""

    id: str
    text: dict[str, str]
    units: dict[str, list[int]] = field(default_factory=dict)

    def deduplicated(self) -> "ParallelRecord":
        """Runs of a repeated unit collapsed on every spoken side."""
        return dataclasses.replace(self, units={lang: dedup_units(u) for lang, u in self.units.items()})


def parse_parallel(record: dict, path: str, line: int, langs: tuple[str, str], num_units: int) -> ParallelRecord:
    sides = require(record, "translation", dict, path, line) if "translation" in record else record
    prefix = "translation." if sides is not record else ""
    text = {lang: _text(sides, lang, path, line, prefix + lang) for lang in langs}
    units = {lang: _units(record[f"{lang}_units"], path, line, f"{lang}_units", num_units)
             for lang in langs if record.get(f"{lang}_units") is not None}
    return ParallelRecord(_record_id(record, path, line), text, units)


@dataclass(frozen=True)
class InstructionRecord:
    """Chat turns as (role, content), roles normalised to system/user/assistant, ending with the assistant."""

    id: str
    lang: str
    turns: list[tuple[str, str]]


def parse_instruction(record: dict, path: str, line: int) -> InstructionRecord:
    if "prompt" in record or "response" in record:
        turns = [("user", _text(record, "prompt", path, line)), ("assistant", _text(record, "response", path, line))]
    else:
        key, role_key, text_key = (("messages", "role", "content") if "messages" in record
                                   else ("conversations", "from", "value") if "conversations" in record
                                   else (None, None, None))
        if key is None:
            raise DataError(path, line, None, "expected 'prompt'/'response', 'messages' or 'conversations'")
        items = require(record, key, list, path, line)
        turns = []
        for i, turn in enumerate(items):
            where = f"{key}[{i}]"
            if not isinstance(turn, dict):
                raise DataError(path, line, where, f"expected an object, got {type(turn).__name__}")
            role = turn.get(role_key)
            if role not in ROLES:
                raise DataError(path, line, f"{where}.{role_key}", f"unknown role {role!r}; expected {sorted(ROLES)}")
            content = turn.get(text_key)
            if not isinstance(content, str) or not content.strip():
                raise DataError(path, line, f"{where}.{text_key}", "expected non-empty text")
            turns.append((ROLES[role], content.strip()))
        if not turns or turns[-1][0] != "assistant":
            raise DataError(path, line, key, "the conversation must end with an assistant turn")
    lang = _lang(record, " ".join(c for _, c in turns), path, line)
    return InstructionRecord(_record_id(record, path, line), lang, turns)
