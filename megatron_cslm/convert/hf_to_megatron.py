"""HF Llama checkpoint -> megatron-core `dist_checkpointing` run directory, optionally adding speech units.

Streams: one HF tensor group (the embeddings, one decoder layer, the head) is in memory at a time, so the
peak is about one embedding matrix above the interpreter's own footprint (~2 GiB RSS for Llama-3.1-8B). The
output loads at any TP x PP (see `layout`); `--tp` only sets the vocabulary padding (128 x TP) and is checked
against the head counts, `--pp` is checked against the layer count. A tokenizer that already holds speech units
(a released speech LM) is read, never expanded a second time: `--expand-vocab` on it stops.

Output (Megatron-LM layout; the tracker is written last, so a crashed conversion is never picked up):

    <out>/iter_0000000/  <out>/cslm_model.json  <out>/tokenizer/  <out>/latest_checkpointed_iteration.txt
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from megatron_cslm.checkpoint.manifest import ModelManifest, copy_notices
from megatron_cslm.checkpoint.save_load import TRACKER, iteration_dir
from megatron_cslm.convert.dist_ckpt import DistCheckpointWriter
from megatron_cslm.convert.layout import (
    EMBEDDING,
    EXTRA_STATE_MODULES,
    FINAL_NORM,
    OUTPUT,
    extra_state_key,
    hf_layer_names,
    hf_layer_to_megatron,
    hf_tensor_specs,
)
from megatron_cslm.convert.safetensors_io import HFCheckpoint
from megatron_cslm.convert.vocab import tail_rows
from megatron_cslm.errors import CslmError
from megatron_cslm.fileio import DataError, atomic_open
from megatron_cslm.models.llama import LlamaArch, check_parallel_fit, padded_vocab_size
from megatron_cslm.text.tokenizer import CHAT_TEMPLATE_FILE, META_FILE, SpeechTextTokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   CHAT_TEMPLATE_FILE, META_FILE)


def expansion_tokenizer(tokenizer_dir: str | Path, num_units: int) -> SpeechTextTokenizer:
    """The tokenizer `--expand-vocab` appends units and specials to; refused when it already speaks units
    (a second unit set would silently give the model two ids per unit)."""
    speech = SpeechTextTokenizer(tokenizer_dir)  # reads units and specials when the vocabulary has them
    if speech.units_in_vocabulary:
        raise DataError(tokenizer_dir, None, "--expand-vocab",
                        f"the tokenizer already holds speech units ({speech.layout.describe()}, <sosp> at id "
                        f"{speech.sosp_id}), so the checkpoint is already expanded: convert it without --expand-vocab",
                        kind="compat", reason="incompatible")
    return speech if speech.num_units == num_units else SpeechTextTokenizer(tokenizer_dir, num_units)


def _write_rows(writer: DistCheckpointWriter, key: str, weight: torch.Tensor, new_count: int, padded: int,
                seed: int) -> None:
    """Existing rows as one chunk, then new + padding rows as a second chunk of the same global tensor."""
    shape = (padded, weight.shape[1])
    writer.add_tensor(key, weight, shape, (0, 0))
    tail = tail_rows(weight, new_count, padded, seed)
    if tail is not None:
        writer.add_tensor(key, tail, shape, (weight.shape[0], 0))


def _write_layer(writer: DistCheckpointWriter, checkpoint: HFCheckpoint, arch: LlamaArch, i: int) -> None:
    """Layer i as chunk i of each stacked tensor (a function, so its tensors are freed on return)."""
    n = arch.num_layers
    hf = {part: checkpoint.get(name) for part, name in hf_layer_names(i).items()}
    for key, t in hf_layer_to_megatron(hf, arch).items():
        writer.add_tensor(key, t.unsqueeze(0), (n, *t.shape), (i,) + (0,) * t.dim())
    for module in EXTRA_STATE_MODULES:
        writer.add_object(extra_state_key(module, i, n), None)


def write_checkpoint(checkpoint: HFCheckpoint, arch: LlamaArch, directory: Path, new_rows: int, padded: int,
                     seed: int, common: dict, progress: bool = True) -> None:
    """Stream the HF tensors into a new `torch_dist` checkpoint directory."""
    with DistCheckpointWriter(directory) as writer, \
            tqdm(total=arch.num_layers + 2, desc="hf -> megatron", unit="group", disable=not progress) as bar:
        _write_rows(writer, EMBEDDING, checkpoint.get("model.embed_tokens.weight"), new_rows, padded, seed)
        bar.update()
        for i in range(arch.num_layers):
            _write_layer(writer, checkpoint, arch, i)
            bar.update()
        writer.add_tensor(FINAL_NORM, checkpoint.get("model.norm.weight"))
        if not arch.tie_word_embeddings:
            _write_rows(writer, OUTPUT, checkpoint.get("lm_head.weight"), new_rows, padded, seed + 1)
        bar.update()
        writer.finish(common)


def convert_hf_to_megatron(hf_dir: str | Path, out: str | Path, *, tensor_parallel_size: int = 1,
                           pipeline_parallel_size: int = 1, expand_vocab: bool = False, num_units: int = 4096,
                           tokenizer: str | Path | None = None, seed: int = 1234,
                           progress: bool = True) -> ModelManifest:
    """Convert `hf_dir` into a new run directory `out`; returns its manifest (also saved as cslm_model.json)."""
    hf_dir, out = Path(hf_dir), Path(out)
    arch = LlamaArch.from_hf_config(hf_dir)
    check_parallel_fit(arch, tensor_parallel_size, pipeline_parallel_size)
    tokenizer_dir = Path(tokenizer) if tokenizer is not None else hf_dir
    speech = expansion_tokenizer(tokenizer_dir, num_units) if expand_vocab else None
    # Reading the tokenizer also validates a unit set it already holds (partial, duplicated: refused here,
    # before any tensor is written).
    base = (speech or SpeechTextTokenizer(tokenizer_dir)).base_vocab_size
    if base != arch.vocab_size:
        hint = " (already expanded? convert it without --expand-vocab)" if speech and base < arch.vocab_size else ""
        raise DataError(hf_dir / "config.json", None, "vocab_size",
                        f"is {arch.vocab_size}, but the {'base vocabulary of the ' if speech else ''}tokenizer in "
                        f"{tokenizer_dir} has {base} ids; the tokenizer must be the checkpoint's own{hint}")
    vocab = speech.vocab_size if speech else base
    padded = padded_vocab_size(vocab, tensor_parallel_size)

    checkpoint = HFCheckpoint(hf_dir)
    extra = ("lm_head.weight",) if arch.tie_word_embeddings else ()
    checkpoint.check({s.name: s.shape for s in hf_tensor_specs(arch)}, allowed_extra=extra)
    final = iteration_dir(out, 0)
    if (out / TRACKER).exists() or final.exists():
        raise CslmError(out, None, None, "already holds a checkpoint; choose a new --out directory", kind="io",
                        reason="output_exists")
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    try:
        write_checkpoint(checkpoint, arch, tmp, vocab - base, padded, seed,
                         {"cslm": {"iteration": 0, "converted_from": str(hf_dir)}}, progress)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.replace(tmp, final)

    shutil.rmtree(out / "tokenizer", ignore_errors=True)
    if speech:
        speech.save_pretrained(out / "tokenizer")
    else:
        (out / "tokenizer").mkdir()
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).exists():
                shutil.copyfile(tokenizer_dir / name, out / "tokenizer" / name)
    copy_notices(hf_dir, out)  # LICENSE, USE_POLICY...: they travel with the weights into every export
    manifest = ModelManifest(arch.with_vocab(vocab), padded, "tokenizer", base_model=hf_dir.resolve().name,
                             lineage=({"stage": "convert", "from": str(hf_dir.resolve()),
                                       "expand_vocab": bool(speech), "num_units": num_units if speech else None},))
    manifest.save(out)
    with atomic_open(out / TRACKER) as f:
        f.write("0\n")
    return manifest
