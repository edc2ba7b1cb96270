"""Which speech tokenizer made a unit sequence: the identity every artifact carries and every join checks.

Why: a speech unit is only an integer. CosyVoice-300M's S3 tokenizer (v1, 50 units/s) and CosyVoice-300M-25Hz's
(v1_25hz, 25 units/s) both have 4,096 codes but different codebooks, so unit 345 of one means nothing to a
model trained on the other; CosyVoice 2's (v2_25hz) has 6,561 codes. Nothing in an integer tells them apart,
so the identity travels beside the units: units JSONL -> pretraining documents / SFT records -> `.meta.json`
-> `cslm_model.json` -> HF export -> decode / eval reports, and each join compares it.

Invariants:
- Identity = (name, units_per_second, num_codes, weights). `weights` is ``sha256:<16 hex>`` of the weight file's
  bytes, or ``random-init:seed=<n>``; two different weight files of one architecture are two tokenizers.
  Precision (bf16 autocast) is *not* part of it: it changes a few frames, not the codebook.
- Dedup (repeated units merged) is not part of it either: it is a property of a sequence, recorded next to it.
- `None` means "no speech" (text-only datasets: replay, translation): it joins with anything.
- Artifacts written before identities existed have none; readers warn (`legacy`) and accept them.
- This module imports nothing heavy (no torch): every reader of an artifact uses it.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import asdict, dataclass
from typing import Iterable, Mapping

from megatron_cslm.errors import CslmError

log = logging.getLogger(__name__)

# name -> (units per second, codes): the S3 tokenizers s3tokenizer implements.
S3_TOKENIZERS: dict[str, tuple[int, int]] = {
    "speech_tokenizer_v1": (50, 4096),
    "speech_tokenizer_v1_25hz": (25, 4096),
    "speech_tokenizer_v2_25hz": (25, 6561),
}
DEFAULT_S3_TOKENIZER = "speech_tokenizer_v1_25hz"  # the paper: CosyVoice's 25 Hz tokens, 4,096 codes
IDENTITY_KEY = "speech_tokenizer"  # the field name in every JSON artifact


@dataclass(frozen=True)
class SpeechTokenizerId:
    """Name, rate, code count and weights of the speech tokenizer that produced some units."""

    name: str
    units_per_second: float
    num_codes: int
    weights: str  # "sha256:<16 hex>" or "random-init:seed=<n>"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping, where: str | os.PathLike | None = None) -> "SpeechTokenizerId":
        try:
            rate = float(d["units_per_second"])
            return cls(name=str(d["name"]), units_per_second=int(rate) if rate.is_integer() else rate,
                       num_codes=int(d["num_codes"]), weights=str(d["weights"]))
        except (KeyError, TypeError, ValueError) as e:
            raise CslmError(where, None, IDENTITY_KEY, f"not a speech tokenizer identity ({e!r}): expected "
                            "{name, units_per_second, num_codes, weights}") from None

    @classmethod
    def s3(cls, name: str, weights: str) -> "SpeechTokenizerId":
        """One of CosyVoice's S3 tokenizers; `weights` from `weights_digest` or `random_init_tag`."""
        if name not in S3_TOKENIZERS:
            raise CslmError(None, None, IDENTITY_KEY, f"unknown S3 tokenizer {name!r}; choose from "
                            f"{sorted(S3_TOKENIZERS)}", kind="usage")
        rate, codes = S3_TOKENIZERS[name]
        return cls(name, rate, codes, weights)

    def describe(self) -> str:
        """One line for messages and model cards: ``speech_tokenizer_v1_25hz (25 units/s, 4096 codes, sha256:..)``."""
        return f"{self.name} ({self.units_per_second:g} units/s, {self.num_codes} codes, {self.weights})"

    def __str__(self) -> str:
        return self.describe()


def weights_digest(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """``sha256:<16 hex>`` of a weight file's bytes (a ~1 GB ONNX hashes in ~1-2 s)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return "sha256:" + h.hexdigest()[:16]


def random_init_tag(seed: int) -> str:
    return f"random-init:seed={int(seed)}"


def s3_identity(name: str, weights: str | os.PathLike | None = None, seed: int = 0) -> SpeechTokenizerId:
    """S3 tokenizer `name` with the weight file `weights` (hashed; a recorded tag, ``sha256:...`` or
    ``random-init:seed=N``, is taken as it is), or randomly initialised with `seed` when `weights` is None."""
    if weights is None:
        tag = random_init_tag(seed)
    elif str(weights).startswith(("sha256:", "random-init:seed=")):
        tag = str(weights)
    else:
        tag = weights_digest(weights)
    return SpeechTokenizerId.s3(name, tag)


def parse_identity(value, where: str | os.PathLike | None = None) -> SpeechTokenizerId | None:
    """The identity stored in an artifact (a dict, or None for text-only / legacy artifacts)."""
    if value is None:
        return None
    if isinstance(value, SpeechTokenizerId):
        return value
    if isinstance(value, Mapping):
        return SpeechTokenizerId.from_dict(value, where)
    raise CslmError(where, None, IDENTITY_KEY, f"expected an object, got {type(value).__name__}")


def mismatch(a: SpeechTokenizerId | None, b: SpeechTokenizerId | None) -> bool:
    """True when both are known and differ (None joins with anything)."""
    return a is not None and b is not None and a != b


def check_same(a: SpeechTokenizerId | None, where_a: str, b: SpeechTokenizerId | None, where_b: str,
               path: str | os.PathLike | None = None, line: int | None = None) -> None:
    """Raise a one-line `compat` error naming both tokenizers when `a` and `b` are both known and differ."""
    if mismatch(a, b):
        raise CslmError(path, line, IDENTITY_KEY, f"units from two speech tokenizers: {where_a} has {a.describe()}, "
                        f"{where_b} has {b.describe()}; units of one codebook mean nothing to a model of the other",
                        kind="compat", reason="speech_tokenizer_mismatch")


def common_identity(items: Iterable[tuple[str, SpeechTokenizerId | None]],
                    path: str | os.PathLike | None = None) -> SpeechTokenizerId | None:
    """The one identity shared by all (source, identity) pairs, ignoring None; stops at the first that differs."""
    first: tuple[str, SpeechTokenizerId] | None = None
    for where, ident in items:
        if ident is None:
            continue
        if first is None:
            first = (where, ident)
        else:
            check_same(first[1], first[0], ident, where, path)
    return None if first is None else first[1]


def warn_legacy(where: str | os.PathLike) -> None:
    """An artifact from before speech tokenizer identities: accepted, once, with a warning."""
    log.warning("%s records no speech tokenizer (written before identities were recorded): it is accepted, "
                "but nothing checks that its units come from the same codebook as the rest", where)


class IdentityJoin:
    """The one speech tokenizer of a stream of records or artifacts being joined (documents into a `.bin`, units
    files into documents or SFT records, datasets into a blend).

    `add` keeps the first known identity and where it came from and stops, naming both, at any other
    (`check_same`). An item without one is text-only (`has_speech=False`: joins with anything) or legacy (warned
    once per source). With `num_units`, the identity's code count must equal it (the vocabulary's unit block).
    Parsed identities are cached by value: a corpus repeats the same dict on every line.
    Picklable, so per-process joins `merge` into one."""

    def __init__(self, num_units: int | None = None, units_where: str = "the tokenizer"):
        self.identity: SpeechTokenizerId | None = None
        self.where: str | None = None
        self.num_units, self.units_where = num_units, units_where  # the unit count the identity must have
        self.legacy: set[str] = set()
        self._parsed: dict = {}

    def add(self, value, where: str, path: str | os.PathLike | None = None, line: int | None = None,
            has_speech: bool = True) -> SpeechTokenizerId | None:
        if value is None:
            source = str(path if path is not None else where)
            if has_speech and source not in self.legacy:
                self.legacy.add(source)
                warn_legacy(source)
            return None
        try:
            key = tuple(sorted(value.items())) if isinstance(value, Mapping) else value
            ident = self._parsed.get(key)
        except TypeError:  # unhashable: let parse_identity name the problem
            key, ident = None, None
        if ident is None:
            ident = parse_identity(value, path)
            if key is not None:
                self._parsed[key] = ident
        if self.identity is None:
            if self.num_units is not None and ident.num_codes != self.num_units:
                raise CslmError(path, line, IDENTITY_KEY, f"{where} has units of {ident.describe()} but "
                                f"{self.units_where} has {self.num_units} units: they must be equal",
                                kind="compat", reason="speech_tokenizer_mismatch")
            self.identity, self.where = ident, where
        else:
            check_same(self.identity, self.where, ident, where, path, line)
        return ident

    def merge(self, other: "IdentityJoin") -> None:
        if other.identity is not None:
            self.add(other.identity, other.where)
        self.legacy |= other.legacy
