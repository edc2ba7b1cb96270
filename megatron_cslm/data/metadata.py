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
- The file is written atomically after the `.bin/.idx` it describes; a dataset without it is a foreign
  dataset (e.g. Megatron-LM's preprocess_data.py) and gets a bounded sampled check instead.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from megatron_cslm.fileio import write_json

META_SUFFIX = ".meta.json"
META_FORMAT = 1


def metadata_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}{META_SUFFIX}")


def _base_pieces(tokenizer) -> list[str]:
    """The text vocabulary's pieces for ids [0, base_vocab_size), in id order."""
    text = tokenizer.text
    n = tokenizer.base_vocab_size
    if hasattr(text, "tok"):  # Hugging Face tokenizers backend
        return [text.tok.id_to_token(i) or "" for i in range(n)]
    return [text.sp.id_to_piece(i) for i in range(n)]  # SentencePiece backend


def tokenizer_identity(tokenizer) -> dict:
    """Vocabulary size, unit layout and a fingerprint of a SpeechTextTokenizer (see the module docstring)."""
    if hasattr(tokenizer, "identity"):  # the tokenizer's own definition, when it has one
        return dict(tokenizer.identity())
    h = hashlib.sha256()
    for piece in _base_pieces(tokenizer):
        h.update(piece.encode("utf-8", "surrogatepass") + b"\0")
    layout = {"base_vocab_size": tokenizer.base_vocab_size, "num_units": tokenizer.num_units,
              "unit_offset": tokenizer.unit_offset, "specials": list(tokenizer.specials.as_list()),
              "special_ids": [tokenizer.sosp_id, tokenizer.eosp_id, tokenizer.question_id, tokenizer.answer_id],
              "eod_id": tokenizer.eod_id}
    h.update(json.dumps(layout, sort_keys=True).encode())
    return {"vocab_size": tokenizer.vocab_size, "num_units": tokenizer.num_units,
            "unit_offset": tokenizer.unit_offset, "eod_id": tokenizer.eod_id,
            "fingerprint": "sha256:" + h.hexdigest()}


def write_dataset_metadata(prefix: str | os.PathLike, tokenizer, max_token_id: int, **extra) -> dict:
    """Record the tokenizer identity and the largest id next to `<prefix>.bin/.idx` (atomically)."""
    meta = {"format": META_FORMAT, "tokenizer": tokenizer_identity(tokenizer), "max_token_id": int(max_token_id),
            **extra}
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
        raise ValueError(f"{path}: not a dataset metadata file ({type(e).__name__}: {e})") from None
    return meta


def identity_mismatch(recorded: dict, expected: dict) -> str | None:
    """A one-line description of the first field that differs, or None when the identities agree."""
    for key in ("vocab_size", "num_units", "unit_offset", "eod_id", "fingerprint"):
        if key in recorded and key in expected and recorded[key] != expected[key]:
            return f"{key} {recorded[key]} (dataset) != {expected[key]} (tokenizer)"
    return None
