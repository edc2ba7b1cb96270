"""Answer chunking for the interleaved chain of modality: text chunks and their matching speech chunks.

CSLM interleaves `TA1 SA1 TA2 SA2 ...` so each speech chunk is generated right after the text it speaks,
which keeps the speech aligned with (and conditioned on) a short text span instead of the whole answer.
Text is cut at punctuation near a target size (~7 words by default); Chinese has no spaces, so every CJK
character counts as a word. Speech is cut at the unit index where the next chunk's first word starts when
word timestamps are given, else proportionally to spoken (non-space) characters.

Invariants the layouts rely on: `"".join(c.text for c in chunks) == text` (whitespace is kept, at the start
of the following chunk as Llama-3's BPE expects) and the chunks' units concatenate to the answer units
(deduplicated as a whole when `dedup` is set, so a repeat spanning a boundary is not counted twice).
"""
from __future__ import annotations

import bisect
import itertools
import re
import unicodedata
from dataclasses import dataclass
from typing import Callable, Sequence

from megatron_cslm.speech.runs import unit_runs
from megatron_cslm.text.language import CJK as _CJK  # scripts without spaces: each character is one word

# A piece is leading whitespace plus one word: a CJK character with any punctuation glued to it, or a run of
# non-space, non-CJK characters; a trailing whitespace run is its own (silent) piece.
_PIECE = re.compile(rf"\s*(?:[{_CJK}][^\s\w]*|[^\s{_CJK}]+)|\s+")
_SENTENCE_END = set(".!?;。！？；…")


@dataclass(frozen=True)
class AnswerChunk:
    """One answer chunk: its text (with leading whitespace) and the speech units that say it."""

    text: str
    units: list[int]


def split_pieces(text: str) -> list[str]:
    """Split text into word pieces whose concatenation is `text` (see `_PIECE`)."""
    pieces = [m.group(0) for m in _PIECE.finditer(text)]
    assert "".join(pieces) == text, "piece regex must cover the text"
    return pieces


def is_spoken(piece: str) -> bool:
    return any(c.isalnum() for c in piece)


def _closing(piece: str) -> bool:
    """Unspoken and without opening brackets/quotes: belongs to the text before it."""
    return not is_spoken(piece) and not any(unicodedata.category(c) in ("Ps", "Pi") for c in piece)


def _ends_punct(piece: str) -> bool:
    return bool(piece) and unicodedata.category(piece[-1]).startswith("P")


def word_count(piece: str) -> int:
    """Default chunk size measure: one per spoken piece (a space-separated word or a CJK character)."""
    return int(is_spoken(piece))


def _chunk_end(pieces: Sequence[str], sizes: Sequence[int], start: int, target: int) -> int:
    """End (exclusive piece index) of the chunk starting at `start`.

    Punctuation between half and 1.5x the target ends the chunk (sentence ends at once, commas once the
    target is reached or looked back to); with no punctuation in reach the chunk is cut at the target.
    """
    half, limit = (target + 1) // 2, target + target // 2
    acc, last_punct, at_target = 0, None, None
    for i in range(start, len(pieces)):
        acc += sizes[i]
        if at_target is not None and acc > limit:
            return at_target
        if acc >= half and _ends_punct(pieces[i]):
            if acc >= target or pieces[i].rstrip()[-1:] in _SENTENCE_END:
                return i + 1
            last_punct = i + 1
        if acc >= target:
            if last_punct is not None:
                return last_punct
            at_target = at_target or i + 1
    return len(pieces)


def chunk_text(text: str, target: int = 7, count: Callable[[str], int] = word_count) -> list[str]:
    """Cut `text` into chunks of about `target` (as measured by `count`: words, or tokens) at punctuation.

    Chunks end at punctuation where it falls within [0.5, 1.5] x target, else at the target. Unspoken
    pieces (closing punctuation, trailing space) stay with the chunk before them, so no chunk starts with a
    stray comma.
    """
    if target < 1:
        raise ValueError(f"chunk target must be >= 1, got {target}")
    pieces = split_pieces(text)
    sizes = [count(p) for p in pieces]
    chunks, start = [], 0
    while start < len(pieces):
        end = _chunk_end(pieces, sizes, start, target)
        while end < len(pieces) and _closing(pieces[end]):
            end += 1
        chunks.append("".join(pieces[start:end]))
        start = end
    return chunks


def dedup_units(units: Sequence[int]) -> list[int]:
    """Collapse runs of repeated units (`1 1 2 2 2 3` -> `1 2 3`), as in deduplicated pretraining data."""
    return unit_runs(units)[0]


def _dedup_positions(units: Sequence[int]) -> list[int]:
    """`pos[i]` = index in `dedup_units(units)` of raw index i (a run split by a cut stays on the left)."""
    run_starts = (int(i == 0 or units[i] != units[i - 1]) for i in range(len(units)))
    return [0, *itertools.accumulate(run_starts)]


def raw_to_dedup(durations: Sequence[int], raw: Sequence[int]) -> list[int]:
    """Indices in deduplicated units (run lengths `durations`, as `unit_runs` gives) of raw frame boundaries `raw`:
    the number of runs starting before each, so a run cut by a boundary stays on the left, as in `split_units`."""
    run_starts = list(itertools.accumulate(durations[:-1], initial=0))
    return [bisect.bisect_left(run_starts, r) for r in raw]


def _chunk_starts(chunks: Sequence[str]) -> list[int]:
    """Character offset of the first spoken character of every chunk after the first."""
    offsets = itertools.accumulate(len(c) for c in chunks[:-1])
    return [o + len(c) - len(c.lstrip()) for o, c in zip(offsets, chunks[1:])]


def _align_words(text: str, words: Sequence[dict]) -> list[tuple[int, int]]:
    """Character span of every timestamped word in `text`, searched in order (case-insensitively)."""
    lowered = text.lower()
    haystack, pos, spans = (lowered if len(lowered) == len(text) else text), 0, []
    for k, w in enumerate(words):
        needle = w["word"].strip()
        needle = needle.lower() if haystack is lowered else needle
        at = haystack.find(needle, pos) if needle else -1
        if at < 0:
            raise ValueError(f"words[{k}] {w['word']!r} not found in the answer text after character {pos}")
        spans.append((at, at + len(needle)))
        pos = at + len(needle)
    return spans


def _cuts_from_timestamps(text: str, chunks: Sequence[str], words: Sequence[dict]) -> list[int]:
    spans = _align_words(text, words)
    cuts = []
    for b in _chunk_starts(chunks):
        j = next((k for k, (s, e) in enumerate(spans) if e > b), None)
        if j is None:  # the rest of the text has no timestamps: it gets the speech after the last word
            cut = words[-1]["end"]
        else:
            s, e = spans[j]
            w = words[j]
            frac = max(0, b - s) / (e - s)  # > 0 only when the chunk boundary falls inside the word
            cut = round(w["start"] + frac * (w["end"] - w["start"]))
        cuts.append(cut)
    return cuts


def _cuts_proportional(chunks: Sequence[str], n_units: int) -> list[int]:
    spoken = [sum(not c.isspace() for c in chunk) for chunk in chunks]
    total, cuts, acc = max(1, sum(spoken)), [], 0
    for n in spoken[:-1]:
        acc += n
        cuts.append(round(n_units * acc / total))
    return cuts


def check_words(words: Sequence[dict], n_units: int) -> None:
    """Validate unit-index word timestamps: ints, start <= end, non-decreasing, within the units."""
    prev = 0
    for k, w in enumerate(words):
        if not isinstance(w, dict) or not isinstance(w.get("word"), str):
            raise ValueError(f"words[{k}] must be an object with a string 'word'")
        s, e = w.get("start"), w.get("end")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (s, e)):
            raise ValueError(f"words[{k}] 'start'/'end' must be unit indices (int), got {s!r}/{e!r}")
        if not (prev <= s <= e <= n_units):
            raise ValueError(f"words[{k}] span [{s}, {e}] must be ordered and within 0..{n_units} units")
        prev = s


def chunk_answer(text: str, units: Sequence[int], *, words: Sequence[dict] | None = None, target: int = 7,
                 count: Callable[[str], int] = word_count, dedup: bool = False) -> list[AnswerChunk]:
    """Chunk an answer's text and cut its units to match (by `words` timestamps if given, else by characters).

    `words` timestamps are unit indices into the raw (not deduplicated) `units`.
    """
    texts = chunk_text(text, target, count)
    if not texts:
        return [AnswerChunk(text, dedup_units(units) if dedup else list(units))]
    return align_chunks(text, texts, units, words, dedup)


def align_chunks(text: str, texts: Sequence[str], units: Sequence[int], words: Sequence[dict] | None,
                 dedup: bool = False) -> list[AnswerChunk]:
    """Pair text chunks (which concatenate to `text`) with their speech: cut `units` where the next chunk's
    first word starts by `words` timestamps when given, else proportionally to characters.

    Shared by SFT answers and interleaved pretraining documents, so both cut speech at words the same way.
    """
    if words:
        check_words(words, len(units))
        cuts = _cuts_from_timestamps(text, texts, words)
    else:
        cuts = _cuts_proportional(texts, len(units))
    return split_units(texts, units, cuts, dedup)


def split_units(texts: Sequence[str], units: Sequence[int], cuts: Sequence[int], dedup: bool) -> list[AnswerChunk]:
    """Pair text chunks with units cut at raw indices `cuts` (one per boundary), deduplicating if asked."""
    assert len(cuts) == len(texts) - 1
    bounds, prev = [0], 0
    for c in cuts:
        prev = min(max(prev, c), len(units))  # monotone and in range, whatever rounding did
        bounds.append(prev)
    bounds.append(len(units))
    if dedup:
        pos = _dedup_positions(units)
        bounds = [pos[b] for b in bounds]
        units = dedup_units(units)
    return [AnswerChunk(t, list(units[a:b])) for t, a, b in zip(texts, bounds, bounds[1:])]


def rechunk(chunks: Sequence[AnswerChunk], dedup: bool) -> list[AnswerChunk]:
    """Pre-chunked answers (`"chunks": [{"text", "units"}]`) with units deduplicated across chunk boundaries."""
    if not dedup:
        return list(chunks)
    cuts, acc = [], 0
    for c in chunks[:-1]:
        acc += len(c.units)
        cuts.append(acc)
    return split_units([c.text for c in chunks], [u for c in chunks for u in c.units], cuts, dedup)


CUT_KINDS = ("aligned", "proportional", "pre_chunked")


def cut_kind(words: Sequence[dict] | None, chunks: Sequence[AnswerChunk] | None = None) -> str:
    """How an answer's speech is cut into chunks: at word timestamps (`aligned`, e.g. by `cslm align-words`),
    proportionally to characters (`proportional`), or not at all (`pre_chunked`: the record gives its chunks)."""
    return "pre_chunked" if chunks is not None else "aligned" if words else "proportional"
