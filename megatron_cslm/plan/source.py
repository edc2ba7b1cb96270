"""Which model a plan is for: a preset name, a run directory / `cslm_model.json`, or a Hugging Face config.json.

Why here: the vocabulary's padding is part of the embedding's bytes, so it is read from the artifact, never
assumed. A run directory's `cslm_model.json` already holds the expanded vocabulary and the padded size the
checkpoint was written with (kept when it splits evenly at the planned TP, re-padded otherwise, as the trainer
does); a preset or an HF config is the base model, to which the CSLM expansion (the speech tokenizer's codes
+ the four specials) is added unless --num-units 0.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from megatron_cslm.checkpoint.manifest import MANIFEST, ModelManifest
from megatron_cslm.errors import CslmError
from megatron_cslm.models.llama import ARCHS, VOCAB_PAD_MULTIPLE, LlamaArch, run_padded_vocab_size
from megatron_cslm.text.markup import SpecialTokens

NUM_SPECIALS = len(SpecialTokens().as_list())


@dataclass(frozen=True)
class ModelSpec:
    arch: LlamaArch  # vocab_size: unpadded, units and specials included
    description: str
    checkpoint_padded_vocab: int | None = None
    pad_multiple: int = VOCAB_PAD_MULTIPLE

    def padded_vocab(self, tp: int) -> int:
        """The trainer's padded vocabulary at this TP (models.llama.run_padded_vocab_size)."""
        return run_padded_vocab_size(self.arch.vocab_size, self.checkpoint_padded_vocab, tp, self.pad_multiple)


def resolve_model(model: str, num_units: int, pad_multiple: int = VOCAB_PAD_MULTIPLE) -> ModelSpec:
    """`model`: a preset of models/llama.py ARCHS, a run directory or its cslm_model.json, or an HF config.json
    (or its directory). `num_units`: speech units added to a preset/HF vocabulary (0: none, nor specials)."""
    extra = num_units + NUM_SPECIALS if num_units else 0
    if model in ARCHS:
        arch = ARCHS[model]
        return ModelSpec(arch.with_vocab(arch.vocab_size + extra),
                         f"{model} (preset) + {num_units} units + {NUM_SPECIALS} specials" if extra else model,
                         pad_multiple=pad_multiple)
    path = Path(model)
    if path.is_dir():
        path = path / MANIFEST if (path / MANIFEST).exists() else path / "config.json"
    if not path.exists():
        raise CslmError(model, None, "model", f"is neither a preset ({', '.join(sorted(ARCHS))}) nor an existing "
                        f"run directory, {MANIFEST} or HF config.json", kind="usage")
    if path.name == MANIFEST:
        manifest = ModelManifest.load(path.parent)
        return ModelSpec(manifest.arch, f"{path} (vocabulary {manifest.arch.vocab_size}, padded "
                         f"{manifest.padded_vocab_size})", manifest.padded_vocab_size, pad_multiple)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CslmError(path, e.lineno, None, f"malformed JSON: {e.msg}") from e
    arch = LlamaArch.from_hf_config(path) if isinstance(config, dict) else None
    if arch is None:
        raise CslmError(path, None, None, "expected a JSON object (an HF config.json)")
    return ModelSpec(arch.with_vocab(arch.vocab_size + extra),
                     f"{path}" + (f" + {num_units} units + {NUM_SPECIALS} specials" if extra else ""),
                     pad_multiple=pad_multiple)
