"""Where a speech-text vocabulary's units and specials are: a pure function of the text vocabulary.

Why pure: the ids a model learned for its units are the contract between every artifact (datasets,
checkpoints, converters, decoding); deciding them from (vocabulary size, added tokens, requested unit count)
alone, without a tokenizer object, makes that rule testable and reusable. Invariants:
- tokens already in the vocabulary (`<k>` units, `<sosp>` `<eosp>` `[question]` `[answer]`, a released speech
  LM's or one saved by `save_pretrained`) keep their ids, in whatever order they were added;
- a partial unit set, a duplicated token or a second spelling of a unit (`<012>`) is refused, naming it;
- what is missing is appended after the text vocabulary: units `<0>`..`<N-1>` (only when the vocabulary holds
  none), then the missing specials in the order of `SpecialTokens.as_list()`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from megatron_cslm.text.backends import incompatible
from megatron_cslm.text.markup import SpecialTokens
from megatron_cslm.text.units import UNIT_LIKE, UNIT_TOKEN, unit_token

DEFAULT_NUM_UNITS = 4096  # CosyVoice S3 tokenizer v1


def find_speech_tokens(added: Iterable[tuple[int, str]], specials: SpecialTokens,
                       where: str | Path) -> tuple[dict[int, int], dict[str, int]]:
    """Unit -> id and special -> id among a vocabulary's added tokens, (id, content) in id order.

    Refuses, naming the first offending token: a duplicated token, a second spelling of a unit (``<012>``)
    and a partial unit set (``<12>`` missing among ``<0>``..``<N-1>``).
    """
    ours = set(specials.as_list())
    seen: dict[str, int] = {}
    units: dict[int, int] = {}
    found: dict[str, int] = {}
    for token_id, content in added:
        like = UNIT_LIKE.fullmatch(content)
        if like is None and content not in ours:
            continue
        if content in seen:
            raise incompatible(where, f"token {content!r} is duplicated (ids {seen[content]} and {token_id}): "
                                       "which one the model learned is ambiguous")
        seen[content] = token_id
        if content in ours:
            found[content] = token_id
        elif not UNIT_TOKEN.fullmatch(content):
            k = int(like.group(1))
            raise incompatible(where, f"unit token {content!r} (id {token_id}) is a second spelling of unit {k} "
                                       f"(expected {unit_token(k)!r}): the unit set is ambiguous")
        else:
            units[int(like.group(1))] = token_id
    if units and len(units) != max(units) + 1:
        missing = next(k for k in range(max(units) + 1) if k not in units)
        raise incompatible(where, f"the unit set is partial: {unit_token(missing)!r} is missing ({len(units)} unit "
                                   f"tokens up to {unit_token(max(units))!r})")
    return units, found


@dataclass(frozen=True)
class Vocabulary:
    """The resolved layout: unit k is `unit_ids[k]`; specials in `SpecialTokens.as_list()` order."""

    unit_ids: np.ndarray
    special_ids: tuple[int, ...]
    vocab_size: int
    units_in_vocabulary: bool  # the units were read from the vocabulary, not appended
    appended_specials: tuple[str, ...]  # specials that were missing and got new ids


def resolve_vocabulary(base_vocab_size: int, added: Iterable[tuple[int, str]], specials: SpecialTokens,
                       num_units: int | None, where: str | Path) -> Vocabulary:
    """Unit and special ids of a text vocabulary of `base_vocab_size` ids whose added tokens are `added`.

    `num_units` must match the units the vocabulary holds (refused otherwise, naming both); without units in
    the vocabulary, `num_units` units (default 4,096) are appended."""
    if num_units is not None and num_units <= 0:
        raise ValueError(f"num_units must be positive, got {num_units}")
    units, found = find_speech_tokens(added, specials, where)
    next_id = base_vocab_size
    if units:
        if num_units is not None and num_units != len(units):
            raise incompatible(where, f"the vocabulary holds {len(units)} unit tokens "
                                      f"({unit_token(0)}..{unit_token(len(units) - 1)}), but num_units is "
                                      f"{num_units}", "num_units")
        unit_ids = np.array([units[k] for k in range(len(units))], dtype=np.int64)
    else:
        count = DEFAULT_NUM_UNITS if num_units is None else num_units
        unit_ids = np.arange(next_id, next_id + count, dtype=np.int64)
        next_id += count
    special_ids, appended = [], []
    for s in specials.as_list():
        if s in found:
            special_ids.append(found[s])
        else:
            special_ids.append(next_id)
            appended.append(s)
            next_id += 1
    return Vocabulary(unit_ids, tuple(special_ids), next_id, bool(units), tuple(appended))
