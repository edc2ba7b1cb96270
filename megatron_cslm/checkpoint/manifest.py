"""`cslm_model.json`: what a megatron-core checkpoint directory holds, for training and for export.

A `torch_dist` checkpoint stores tensors, not the architecture. The run directory therefore carries

    <run>/cslm_model.json                 this manifest (LlamaArch, padded vocab, tokenizer location)
    <run>/tokenizer/                      the tokenizer the vocabulary was built with
    <run>/iter_0000000/                   the checkpoint (Megatron-LM layout)
    <run>/latest_checkpointed_iteration.txt

`padded_vocab_size` is part of the checkpoint's tensor shapes: a model that loads it must be built with
this size (it is a multiple of 128 x the TP it was converted for, so it also splits at every smaller TP
that divides it), not with the size its own TP would pad to.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from megatron_cslm.fileio import DataError, write_json
from megatron_cslm.models.llama import LlamaArch
from megatron_cslm.checkpoint.save_load import TRACKER, latest_iteration

MANIFEST = "cslm_model.json"


@dataclass(frozen=True)
class ModelManifest:
    arch: LlamaArch  # vocab_size: the unpadded vocabulary (text + speech units + specials when expanded)
    padded_vocab_size: int
    tokenizer: str = "tokenizer"  # relative to the manifest's directory (or absolute); holds the unit count too

    def save(self, run_dir: str | Path) -> None:
        write_json(Path(run_dir) / MANIFEST, {
            "format": 1, "arch": self.arch.to_dict(), "padded_vocab_size": self.padded_vocab_size,
            "tokenizer": self.tokenizer})

    @classmethod
    def load(cls, run_dir: str | Path) -> "ModelManifest":
        path = Path(run_dir) / MANIFEST
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: a converted or trained run directory has a {MANIFEST} "
                                    "next to its iter_* checkpoints (written by hf_to_megatron)")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(path, e.lineno, None, f"malformed JSON: {e.msg}") from e
        for key in ("arch", "padded_vocab_size"):
            if key not in d:
                raise DataError(path, None, key, "missing")
        try:
            arch = LlamaArch.from_dict(d["arch"])
        except (TypeError, ValueError) as e:
            raise DataError(path, None, "arch", str(e)) from e
        if d["padded_vocab_size"] < arch.vocab_size:
            raise DataError(path, None, "padded_vocab_size", f"{d['padded_vocab_size']} < vocab_size {arch.vocab_size}")
        return cls(arch, d["padded_vocab_size"], d.get("tokenizer", "tokenizer"))

    def tokenizer_dir(self, run_dir: str | Path) -> Path:
        return Path(run_dir) / self.tokenizer


def resolve_checkpoint(path: str | Path) -> tuple[Path, int]:
    """(run directory, iteration) for a run directory (latest iteration) or one of its `iter_*` directories."""
    path = Path(path)
    if (path / TRACKER).exists():
        return path, latest_iteration(path)
    if path.name.startswith("iter_") and (path / "metadata.json").exists():
        try:
            return path.parent, int(path.name[len("iter_"):])
        except ValueError:
            pass
    raise FileNotFoundError(f"{path}: expected a run directory with {TRACKER} or an iter_XXXXXXX checkpoint "
                            "directory with metadata.json")
