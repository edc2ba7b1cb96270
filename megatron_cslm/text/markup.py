"""The textual form of speech: `<sosp><12><345><eosp>`, and the one parser of it.

The CSLM authors' data and unit files write speech as unit tokens between `<sosp>` and `<eosp>`. Every
reader of that form (authors'-format SFT records, unit files for decoding, benchmarks) uses this module, so
what counts as a unit span is decided once: unit tokens `<k>` with optional whitespace between them, and
nothing else. Range checks are `text.units.check_units`; ids come from the tokenizer, never from here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from megatron_cslm.errors import CslmError
from megatron_cslm.text.units import UNIT_LIKE


@dataclass(frozen=True)
class SpecialTokens:
    """Strings of the four speech/dialogue specials (configurable to match other releases)."""

    sosp: str = "<sosp>"
    eosp: str = "<eosp>"
    question: str = "[question]"
    answer: str = "[answer]"

    def as_list(self) -> list[str]:
        return [self.sosp, self.eosp, self.question, self.answer]


class MarkupError(CslmError):
    """Text that should be a unit span but is not (a thin subclass of the project's one error type, errors.py;
    constructed with the message only, callers add file, line and field)."""

    def __init__(self, message: str):
        super().__init__(None, None, None, message, reason="bad_markup")


_UNIT_RUN = re.compile(rf"\s*{UNIT_LIKE.pattern}")


def render_units(units: Sequence[int], specials: SpecialTokens = SpecialTokens(), wrap: bool = True) -> str:
    """`<sosp><12><345><eosp>` (without the wrapping markers when `wrap` is False)."""
    body = "".join(f"<{int(u)}>" for u in units)
    return f"{specials.sosp}{body}{specials.eosp}" if wrap else body


def parse_unit_span(span: str) -> list[int]:
    """Units of `<12><345>` / `<12> <345>` (whitespace allowed); MarkupError naming the first non-unit text."""
    units, pos = [], 0
    for m in _UNIT_RUN.finditer(span):
        if m.start() != pos:
            break
        units.append(int(m.group(1)))
        pos = m.end()
    if span[pos:].strip():
        raise MarkupError(f"unit span holds non-unit text {span[pos:pos + 20]!r}")
    return units


def split_speech(text: str, specials: SpecialTokens = SpecialTokens()) -> tuple[list[str], list[str]]:
    """Text outside and unit spans inside `<sosp>...<eosp>`: `texts` has one more element than `spans`
    (text, span, text, ..., text); spans are not parsed yet (see `parse_unit_span`)."""
    parts = re.split(rf"{re.escape(specials.sosp)}(.*?){re.escape(specials.eosp)}", text, flags=re.S)
    return parts[0::2], parts[1::2]


def bare_speech(text: str, specials: SpecialTokens = SpecialTokens()) -> str | None:
    """The inner span if `text` is exactly one `<sosp>...<eosp>` (whitespace around allowed), else None."""
    m = re.fullmatch(rf"\s*{re.escape(specials.sosp)}(.*?){re.escape(specials.eosp)}\s*", text, re.S)
    return m.group(1) if m else None


def parse_unit_line(line: str, specials: SpecialTokens = SpecialTokens()) -> list[int]:
    """A unit file line as the authors' decode scripts read it: `<sosp><12><7><eosp>`, `<12> <7>` (markers
    optional) or plain `12 7`. MarkupError if it is none of these."""
    line = line.strip()
    if "<" not in line:
        try:
            return [int(u) for u in line.split()]
        except ValueError:
            raise MarkupError(f"expected space-separated integers, got {line[:40]!r}") from None
    inner = line
    if inner.startswith(specials.sosp):
        inner = inner[len(specials.sosp):]
    if inner.rstrip().endswith(specials.eosp):
        inner = inner.rstrip()[:-len(specials.eosp)]
    try:
        return parse_unit_span(inner)
    except MarkupError:
        raise MarkupError(f"expected {specials.sosp}<k>...{specials.eosp} or space-separated integers, "
                          f"got {line[:40]!r}") from None
