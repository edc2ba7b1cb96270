"""HF Llama checkpoint -> megatron-core `dist_checkpointing` run directory, optionally adding speech units.

Streams, at the disk's speed: a background thread reads the next tensor group (the embeddings, one decoder
layer, the head) while this one is written, each HF tensor read with `pread` straight into its rows of the
fused megatron buffer (`layout.layer_row_map`: no `torch.cat`), into two reused sets of layer buffers (no
fresh pages to fault in per layer); the embedding's new vocabulary rows are computed in that thread too,
while the existing rows are written, and the head's by a side thread while the layers are written. At most
one embedding-sized matrix and two layers are in memory (~3.2 GiB peak RSS for Llama-3.1-8B shapes, imports
included). The files are byte for byte those of a serial conversion: the order of the records is the order
of the groups. The tokenizer is saved by a third thread meanwhile.

The output loads at any TP x PP (see `layout`); `--tp` only sets the vocabulary padding (128 x TP) and is
checked against the head counts, `--pp` is checked against the layer count. A tokenizer that already holds
speech units (a released speech LM) is read, never expanded a second time: `--expand-vocab` on it stops.

Output (Megatron-LM layout; the tracker is written last, so a crashed conversion is never picked up):

    <out>/iter_0000000/  <out>/cslm_model.json  <out>/tokenizer/  <out>/latest_checkpointed_iteration.txt
"""
from __future__ import annotations

import os
import queue
import shutil
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable

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
    layer_row_map,
    megatron_layer_shapes,
)
from megatron_cslm.convert.rawio import read_ahead
from megatron_cslm.convert.safetensors_io import HFCheckpoint
from megatron_cslm.convert.vocab import expansion_units, tail_rows
from megatron_cslm.errors import CslmError
from megatron_cslm.fileio import DataError, atomic_open, make_dirs
from megatron_cslm.models.llama import LlamaArch, check_parallel_fit, padded_vocab_size
from megatron_cslm.speech.identity import SpeechTokenizerId
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


# One write to the megatron checkpoint: (key, chunk, global shape, offset) for a tensor chunk, (key, None, None,
# None) for a per-layer `_extra_state` object.
Write = tuple[str, "torch.Tensor | None", "tuple[int, ...] | None", "tuple[int, ...] | None"]


def _read(checkpoint: HFCheckpoint, name: str) -> torch.Tensor:
    """A whole HF tensor in its stored dtype, read straight into a new buffer."""
    dtype = checkpoint.dtype(name)
    if dtype is None:  # a dtype this reader does not know: safetensors' own reader
        return checkpoint.get(name)
    out = torch.empty(tuple(checkpoint.shape(name)), dtype=dtype)
    checkpoint.read_into(name, out)
    return out


class _LayerReader:
    """Reads decoder layers into megatron-core's fused layout, in sets of buffers that are reused once written."""

    def __init__(self, checkpoint: HFCheckpoint, arch: LlamaArch, sets: int):
        self.checkpoint, self.arch = checkpoint, arch
        self.free: queue.Queue = queue.Queue()
        names = hf_layer_names(0)
        dtypes = {checkpoint.dtype(n) for n in names.values()}
        self.dtype = dtypes.pop() if len(dtypes) == 1 else None  # mixed or unknown dtypes: the tensor route
        for _ in range(sets if self.dtype is not None else 0):
            self.free.put({k: torch.empty(s, dtype=self.dtype) for k, s in megatron_layer_shapes(arch).items()})

    def read(self, i: int) -> tuple[dict[str, torch.Tensor], Callable[[], None]]:
        """Layer i's megatron tensors, and the call that hands their buffers back once they are written."""
        names = hf_layer_names(i)
        if self.dtype is None or any(self.checkpoint.dtype(n) != self.dtype for n in names.values()):
            hf = {part: self.checkpoint.get(name) for part, name in names.items()}
            return hf_layer_to_megatron(hf, self.arch), lambda: None
        buffers = self.free.get()
        for block in layer_row_map(self.arch):
            rows = buffers[block.key][block.megatron_row:block.megatron_row + block.rows]
            self.checkpoint.read_into(names[block.part], rows, block.hf_row)
        return buffers, lambda: self.free.put(buffers)


def _rows_tasks(checkpoint: HFCheckpoint, name: str, key: str, new_count: int, padded: int, seed: int,
                rows_ready: Callable[[], torch.Tensor | None] | None = None
                ) -> list[Callable[[], tuple[list[Write], Callable[[], None]]]]:
    """Existing rows as one chunk, then (a second task, run while the first is written) new + padding rows as a
    second chunk of the same global tensor (`rows_ready`: their result, when computed elsewhere earlier)."""
    held: dict[str, torch.Tensor] = {}

    def existing():
        held["weight"] = weight = _read(checkpoint, name)
        return [(key, weight, (padded, weight.shape[1]), (0, 0))], lambda: None

    def tail():
        weight = held.pop("weight")
        rows = rows_ready() if rows_ready is not None else tail_rows(weight, new_count, padded, seed)
        return ([] if rows is None else [(key, rows, (padded, weight.shape[1]), (weight.shape[0], 0))]), lambda: None

    return [existing, tail]


def _layer_task(layers: _LayerReader, arch: LlamaArch, i: int) -> Callable[[], tuple[list[Write], Callable]]:
    """Layer i as chunk i of each stacked tensor, then its `_extra_state` objects."""
    def task():
        n = arch.num_layers
        tensors, release = layers.read(i)
        writes = [(key, t.unsqueeze(0), (n, *t.shape), (i,) + (0,) * t.dim()) for key, t in tensors.items()]
        return writes + [(extra_state_key(m, i, n), None, None, None) for m in EXTRA_STATE_MODULES], release
    return task


def write_checkpoint(checkpoint: HFCheckpoint, arch: LlamaArch, directory: Path, new_rows: int, padded: int,
                     seed: int, common: dict, progress: bool = True) -> None:
    """Stream the HF tensors into a new `torch_dist` checkpoint directory, reading ahead of the writes.

    The head's new rows need a float64 pass over the whole head (seconds of CPU at 8B): a side thread computes
    them while the layers are written, starting at layer 1 (the embedding is released by then, so one matrix
    at a time stays in memory); only the rows are kept, the head itself is read again at the end."""
    layers = _LayerReader(checkpoint, arch, sets=2)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="head-rows") as side:
        head_rows: list = []
        early = not arch.tie_word_embeddings and new_rows > 0

        def layer_task(i: int):
            task = _layer_task(layers, arch, i)
            if not early or i != min(1, arch.num_layers - 1):
                return task

            def start_head_rows_then_read():
                head_rows.append(side.submit(
                    lambda: tail_rows(_read(checkpoint, "lm_head.weight"), new_rows, padded, seed + 1)))
                return task()
            return start_head_rows_then_read

        tasks = _rows_tasks(checkpoint, "model.embed_tokens.weight", EMBEDDING, new_rows, padded, seed)
        tasks += [layer_task(i) for i in range(arch.num_layers)]
        tasks.append(lambda: ([(FINAL_NORM, _read(checkpoint, "model.norm.weight"), None, None)], lambda: None))
        if not arch.tie_word_embeddings:
            tasks += _rows_tasks(checkpoint, "lm_head.weight", OUTPUT, new_rows, padded, seed + 1,
                                 (lambda: head_rows[0].result()) if early else None)
        with DistCheckpointWriter(directory) as writer, \
                tqdm(total=len(tasks), desc="hf -> megatron", unit="group", disable=not progress) as bar:
            for writes, release in read_ahead(tasks, depth=1):
                for key, tensor, global_shape, offset in writes:
                    if tensor is None:
                        writer.add_object(key, None)
                    else:
                        writer.add_tensor(key, tensor, global_shape, offset)
                release()
                bar.update()
            writer.finish(common)


def convert_hf_to_megatron(hf_dir: str | Path, out: str | Path, *, tensor_parallel_size: int = 1,
                           pipeline_parallel_size: int = 1, expand_vocab: bool = False,
                           num_units: int | None = None, tokenizer: str | Path | None = None, seed: int = 1234,
                           progress: bool = True, speech_tokenizer: SpeechTokenizerId | None = None) -> ModelManifest:
    """Convert `hf_dir` into a new run directory `out`; returns its manifest (also saved as cslm_model.json).

    `speech_tokenizer`: the identity of the units the model will be trained on, recorded in the manifest (the
    expansion then holds its codes; `num_units` must agree). Default unit count: the paper's tokenizer's."""
    hf_dir, out = Path(hf_dir), Path(out)
    num_units = expansion_units(num_units, speech_tokenizer.name if speech_tokenizer else None)
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
    make_dirs(out)
    def small_files() -> None:  # seconds of tokenizer CPU work, overlapping the weights' I/O
        shutil.rmtree(out / "tokenizer", ignore_errors=True)
        if speech:
            speech.save_pretrained(out / "tokenizer")
        else:
            (out / "tokenizer").mkdir()
            for name in TOKENIZER_FILES:
                if (tokenizer_dir / name).exists():
                    shutil.copyfile(tokenizer_dir / name, out / "tokenizer" / name)
        copy_notices(hf_dir, out)  # LICENSE, USE_POLICY...: they travel with the weights into every export

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer") as pool:
        small = pool.submit(small_files)  # the tracker, written last, is what makes the directory a checkpoint
        try:
            write_checkpoint(checkpoint, arch, tmp, vocab - base, padded, seed,
                             {"cslm": {"iteration": 0, "converted_from": str(hf_dir)}}, progress)
        except BaseException:
            wait([small])
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        small.result()
    os.replace(tmp, final)
    manifest = ModelManifest(arch.with_vocab(vocab), padded, "tokenizer", base_model=hf_dir.resolve().name,
                             lineage=({"stage": "convert", "from": str(hf_dir.resolve()),
                                       "expand_vocab": bool(speech), "num_units": num_units if speech else None},),
                             speech_tokenizer=speech_tokenizer)
    manifest.save(out)
    with atomic_open(out / TRACKER) as f:
        f.write("0\n")
    return manifest
