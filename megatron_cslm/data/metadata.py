"""Dataset metadata (`<prefix>.meta.json`): which tokenizer built a `.bin/.idx` and its largest token id.

Why: training must refuse data built with another tokenizer and data whose ids overflow the model's
vocabulary, but it must not read the `.bin` to find out (40 GB at the paper's scale, on every start).
Preprocessing (`data/indexed.preprocess`) and SFT packing (`data/sft.build_sft_data`) know both facts for
free while they write the tokens, so they record them here; `training/data.check_indexed_dataset` reads
this small file and the `.idx` header, never the token payload.

Invariants:
- `tokenizer.fingerprint` is a hash of the *vocabulary* (every base-vocabulary piece in id order, the unit
  block and the specials), not of the files, so a tokenizer saved again (other JSON formatting, added units
  written into tokenizer.json) keeps its identity while any change of ids changes it.
- `max_token_id` is an upper bound of every id in the `.bin` (packing may cut samples, never add ids).
- `speech_tokenizer` (speech/identity.py) is the one speech tokenizer of the dataset's units, null for a text-only
  dataset; a file without the key predates identities (legacy: accepted with a warning).
- The file is written atomically after the `.bin/.idx` it describes; a dataset without it is a foreign
  dataset (e.g. Megatron-LM's preprocess_data.py) and gets a bounded sampled check instead.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from megatron_cslm.errors import CslmError
from megatron_cslm.fileio import write_json
from megatron_cslm.speech.identity import IDENTITY_KEY, SpeechTokenizerId, parse_identity, warn_legacy

META_SUFFIX = ".meta.json"
META_FORMAT = 1


def metadata_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}{META_SUFFIX}")


def tokenizer_identity(tokenizer) -> dict:
    """Vocabulary size, unit layout and fingerprint of a SpeechTextTokenizer: its own `identity()`, the one
    definition (see the module docstring for what the fingerprint covers)."""
    return dict(tokenizer.identity())


def write_dataset_metadata(prefix: str | os.PathLike, tokenizer, max_token_id: int,
                           speech_tokenizer: SpeechTokenizerId | None = None, **extra) -> dict:
    """Record the tokenizer identity, the speech tokenizer of the units (None: text only) and the largest id next
    to `<prefix>.bin/.idx` (atomically)."""
    meta = {"format": META_FORMAT, "tokenizer": tokenizer_identity(tokenizer), "max_token_id": int(max_token_id),
            IDENTITY_KEY: speech_tokenizer.to_dict() if speech_tokenizer is not None else None, **extra}
    write_json(metadata_path(prefix), meta)
    return meta


def read_dataset_metadata(prefix: str | os.PathLike) -> dict | None:
    """The metadata of `prefix`, or None when the dataset has none (built by another tool)."""
    path = metadata_path(prefix)
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        int(meta["max_token_id"]), dict(meta["tokenizer"])
    except (ValueError, KeyError, TypeError) as e:
        raise CslmError(path, None, None, f"not a dataset metadata file ({type(e).__name__}: {e})",
                        reason="corrupt") from None
    return meta


def dataset_speech_tokenizer(prefix: str | os.PathLike, meta: dict | None) -> SpeechTokenizerId | None:
    """The speech tokenizer recorded in a dataset's metadata: None for text-only data, and (warned) for metadata
    written before identities or a foreign dataset without metadata."""
    if meta is None or IDENTITY_KEY not in meta:
        warn_legacy(metadata_path(prefix) if meta is not None else f"{prefix} (no {META_SUFFIX})")
        return None
    return parse_identity(meta[IDENTITY_KEY], metadata_path(prefix))


def identity_mismatch(recorded: dict, expected: dict) -> str | None:
    """A one-line description of the first field that differs, or None when the identities agree."""
    for key in ("vocab_size", "num_units", "unit_offset", "eod_id", "fingerprint"):
        if key in recorded and key in expected and recorded[key] != expected[key]:
            return f"{key} {recorded[key]} (dataset) != {expected[key]} (tokenizer)"
    return None
