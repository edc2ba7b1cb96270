"""HF Llama checkpoint -> megatron-core `dist_checkpointing` run directory, optionally adding speech units.

Streams at the disk's speed in a bounded working set. The output is written as row chunks of at most
CHUNK_BYTES (32 MiB): the embedding and head as chunks of whole rows (multiples of 64 rows when new
vocabulary rows are added), each decoder layer's slice of a stacked tensor as (1, rows, ...) chunks at
(layer, row, 0) (`layout.layer_chunks`); DCP and megatron-core assemble any chunking, so it loads at every
TP x PP. A chunk whose bytes are rows of HF tensors in the stored dtype (nearly all) is copied file to file
by the kernel (`copy_file_range`) inside torch.save's own record (`dist_ckpt.tensor_record`): bytes that pass
through user memory cost 3-5x the kernel time of a plain copy on the VMs measured, and fresh memory costs
more still (glibc maps every large allocation anew). The output's write-back starts as each range is written
(`rawio.WriteBehind`), so it never piles up in the page cache. What needs memory goes through POOL_BUFFERS buffers
allocated once: the new rows' float64 moments, summed block by block as the existing rows go by (one
reused cache-sized block buffer per matrix; the same sums as `vocab.row_moments`, bit for bit), the new and
padding rows (drawn in that buffer), other dtypes. Two background threads do that work (embedding, head)
while this one queues the copies (run by the writer's threads); peak RSS is the imports plus ~0.5 GB for
Llama-3.1-8B shapes. The records are in a fixed order
(embedding, layers with their `_extra_state` objects, final norm, head), so the files are deterministic.
The tokenizer is saved by a third thread meanwhile.

The output loads at any TP x PP (see `layout`); `--tp` only sets the vocabulary padding (128 x TP) and is
checked against the head counts, `--pp` is checked against the layer count. A tokenizer that already holds
speech units (a released speech LM) is read, never expanded a second time: `--expand-vocab` on it stops.

Output (Megatron-LM layout; the tracker is written last, so a crashed conversion is never picked up):

    <out>/iter_0000000/  <out>/cslm_model.json  <out>/tokenizer/  <out>/latest_checkpointed_iteration.txt
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import math
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable, Iterable

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
    hf_tensor_specs,
    layer_chunks,
    layer_row_map,
    megatron_layer_shapes,
    row_chunks,
)
from megatron_cslm.convert.rawio import BufferPool
from megatron_cslm.convert.safetensors_io import HFCheckpoint
from megatron_cslm.convert.vocab import (
    BLOCK_ROWS,
    NOISE_SCALE,
    RowMoments,
    draw_new_rows,
    expansion_units,
    moment_scratch,
)
from megatron_cslm.errors import CslmError
from megatron_cslm.fileio import DataError, atomic_open, make_dirs
from megatron_cslm.models.llama import LlamaArch, check_parallel_fit, padded_vocab_size
from megatron_cslm.speech.identity import SpeechTokenizerId
from megatron_cslm.text.tokenizer import TOKENIZER_FILES, SpeechTextTokenizer


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


CHUNK_BYTES = 32 * 2**20  # bytes per stored chunk: one record of the output, one pool buffer
POOL_BUFFERS = 4  # one being filled, two read ahead, one being written


@dataclasses.dataclass(frozen=True)
class _Chunk:
    """One record of the output: `shape` rows of global tensor `key` at `offset`, then `objects` (the layer's
    `_extra_state` keys, after its last chunk). Its data is `copies`, (HF tensor, first row, bytes) ranges
    copied file to file in order, when set; else what `fill` writes into a buffer view of `shape`. With
    `copies`, `fill` (if any) only looks at the rows (the moments of new vocabulary rows)."""
    key: str
    global_shape: tuple[int, ...]
    offset: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype
    fill: Callable[[torch.Tensor], None] | None
    copies: tuple[tuple[str, int, int], ...] = ()
    objects: tuple[str, ...] = ()
    lane: int = 0  # the background thread that runs `fill`, in order with the lane's other fills

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _dtype(checkpoint: HFCheckpoint, names: Iterable[str]) -> torch.dtype:
    """The megatron dtype of a tensor made of these HF tensors (their common dtype, as `torch.cat` would)."""
    dtypes = [checkpoint.dtype(n) or checkpoint.get(n).dtype for n in names]
    return functools.reduce(torch.promote_types, dtypes)


def _read_rows(checkpoint: HFCheckpoint, name: str, out: torch.Tensor, row: int) -> None:
    """Rows `row`.. of HF tensor `name` into `out`: `pread` straight in, or (another dtype) through a copy."""
    if checkpoint.dtype(name) == out.dtype:
        checkpoint.read_into(name, out, row)
    else:  # dtypes `read_into` cannot place as is: rare, so the whole tensor is read and cast
        out.copy_(checkpoint.get(name)[row:row + out.shape[0]])


def _layer_chunks(checkpoint: HFCheckpoint, arch: LlamaArch, i: int, chunk_bytes: int) -> list[_Chunk]:
    """Layer i: each stacked tensor's slice as (1, rows, ...) chunks at (i, row, 0), each filled from the HF row
    blocks that land in it (`layout.layer_chunks`), then the layer's `_extra_state` objects."""
    names, n, parts = hf_layer_names(i), arch.num_layers, collections.defaultdict(set)
    for block in layer_row_map(arch):
        parts[block.key].add(names[block.part])
    dtypes = {key: _dtype(checkpoint, parts[key]) for key in parts}
    shapes, chunks = megatron_layer_shapes(arch), []
    for piece in layer_chunks(arch, chunk_bytes, {key: dtype.itemsize for key, dtype in dtypes.items()}):
        shape, dtype = shapes[piece.key], dtypes[piece.key]

        def fill(data: torch.Tensor, sources=piece.sources) -> None:
            for part, hf_row, row, count in sources:  # data[0]: the layer axis is the chunk's first
                _read_rows(checkpoint, names[part], data[0, row:row + count], hf_row)
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        copies = tuple((names[part], hf_row, count * row_bytes) for part, hf_row, _, count in piece.sources)
        as_stored = all(checkpoint.dtype(name) == dtype for name, _, _ in copies)
        chunks.append(_Chunk(piece.key, (n, *shape), (i, piece.row) + (0,) * (len(shape) - 1),
                             (1, piece.rows, *shape[1:]), dtype, None if as_stored else fill,
                             copies if as_stored else ()))
    chunks[-1] = dataclasses.replace(chunks[-1], objects=tuple(extra_state_key(m, i, n) for m in EXTRA_STATE_MODULES))
    return chunks


def _matrix_chunks(checkpoint: HFCheckpoint, name: str, key: str, new_count: int, padded: int, seed: int,
                   scratch: torch.Tensor | None, chunk_bytes: int, noise_scale: float) -> list[_Chunk]:
    """An embedding-shaped matrix as row chunks; with new rows, their moments are summed as the existing rows
    stream by, and the new rows (`vocab.tail_rows`'s values, drawn in `scratch`) and the zero padding follow
    as the last chunks."""
    v, h = checkpoint.shape(name)
    dtype = _dtype(checkpoint, [name])
    if padded < v + new_count:
        raise ValueError(f"padded rows {padded} < {v} existing + {new_count} new rows")
    moments = RowMoments(h, scratch) if new_count else None
    row_bytes = h * dtype.itemsize
    drawn: list[torch.Tensor] = []

    def existing(data: torch.Tensor, r: int) -> None:
        _read_rows(checkpoint, name, data, r)
        if moments is not None:
            moments.add(data)

    def tail(data: torch.Tensor, r: int) -> None:
        if new_count and not drawn:  # every existing row has gone by: the moments are complete
            drawn.append(draw_new_rows(*moments.result(), new_count, torch.Generator().manual_seed(seed), scratch,
                                       noise_scale))
        split = max(0, min(data.shape[0], v + new_count - r))
        if split:
            data[:split].copy_(drawn[0][r - v:r - v + split])
        data[split:].zero_()

    multiple = BLOCK_ROWS if new_count else 1
    as_stored = checkpoint.dtype(name) == dtype
    chunks = [_Chunk(key, (padded, h), (r, 0), (rows, h), dtype,
                     functools.partial(existing, r=r) if moments is not None or not as_stored else None,
                     ((name, r, rows * row_bytes),) if as_stored else ())
              for r, rows in row_chunks(v, row_bytes, chunk_bytes, multiple)]
    chunks += [_Chunk(key, (padded, h), (v + r, 0), (rows, h), dtype, functools.partial(tail, r=v + r))
               for r, rows in row_chunks(padded - v, row_bytes, chunk_bytes)]
    return chunks


def plan_chunks(checkpoint: HFCheckpoint, arch: LlamaArch, new_rows: int, padded: int, seed: int,
                chunk_bytes: int = CHUNK_BYTES, noise_scale: float = NOISE_SCALE) -> list[_Chunk]:
    """Every record of the output, in write order: embedding, layers, final norm, head."""
    scratch = moment_scratch(arch.hidden_size, new_rows) if new_rows else None
    chunks = _matrix_chunks(checkpoint, "model.embed_tokens.weight", EMBEDDING, new_rows, padded, seed, scratch,
                            chunk_bytes, noise_scale)
    for i in range(arch.num_layers):
        chunks += _layer_chunks(checkpoint, arch, i, chunk_bytes)
    h = arch.hidden_size
    chunks.append(_Chunk(FINAL_NORM, (h,), (0,), (h,), _dtype(checkpoint, ["model.norm.weight"]),
                         lambda data: _read_rows(checkpoint, "model.norm.weight", data, 0)))  # 8 KB: via memory
    if not arch.tie_word_embeddings:  # its own lane (and scratch): its moments are summed alongside the embedding's
        head_scratch = moment_scratch(arch.hidden_size, new_rows) if new_rows else None
        chunks += [dataclasses.replace(c, lane=1) for c in _matrix_chunks(
            checkpoint, "lm_head.weight", OUTPUT, new_rows, padded, seed + 1, head_scratch, chunk_bytes,
            noise_scale)]
    return chunks


def write_checkpoint(checkpoint: HFCheckpoint, arch: LlamaArch, directory: Path, new_rows: int, padded: int,
                     seed: int, common: dict, progress: bool = True, chunk_bytes: int = CHUNK_BYTES,
                     noise_scale: float = NOISE_SCALE) -> None:
    """Stream the HF tensors into a new `torch_dist` checkpoint directory through `POOL_BUFFERS` reused buffers:
    a background thread fills the next chunks (reads, and the moments and new rows) while this one writes."""
    chunks = plan_chunks(checkpoint, arch, new_rows, padded, seed, chunk_bytes, noise_scale)
    pool = BufferPool(max(c.nbytes for c in chunks), POOL_BUFFERS)

    stop = threading.Event()

    def filled(chunk: _Chunk) -> torch.Tensor | None:
        """Run `chunk.fill` in a pool buffer; the buffer when the record is written from it, else None."""
        if stop.is_set():
            return None
        buffer = pool.acquire()
        try:
            chunk.fill(pool.view(buffer, chunk.dtype, chunk.shape))
        except BaseException:
            pool.release(buffer)
            raise
        if chunk.copies:  # the rows were only looked at: the record's data is copied from the files
            pool.release(buffer)
            return None
        return buffer

    # Two background lanes run the fills (reads, moments, new rows), each in order: the embedding's and the
    # head's moments are summed at the same time. This thread waits for the records written from memory and
    # for the rows of a copied chunk to be read (so it is read from disk once); the file copies go on meanwhile.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fill") as lane0, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="fill-head") as lane1, \
            DistCheckpointWriter(directory) as writer, \
            tqdm(total=sum(c.nbytes for c in chunks), desc="hf -> megatron", unit="B", unit_scale=True,
                 disable=not progress) as bar:
        fills = {i: (lane0, lane1)[c.lane].submit(filled, c) for i, c in enumerate(chunks) if c.fill is not None}
        try:
            for i, chunk in enumerate(chunks):
                if chunk.copies:
                    if chunk.fill is not None:  # rows looked at first (moments): queued once read, so the copy
                        fills.pop(i).result()  # finds them in the page cache before it drops them (rawio)
                    ranges = [checkpoint.byte_range(name, row, nbytes) for name, row, nbytes in chunk.copies]
                    writer.add_tensor_from_files(chunk.key, chunk.shape, chunk.dtype, ranges, chunk.global_shape,
                                                 chunk.offset)
                else:
                    buffer = fills.pop(i).result()
                    try:  # the buffer goes back even on failure: the lane may be waiting for it
                        writer.add_tensor(chunk.key, pool.view(buffer, chunk.dtype, chunk.shape),
                                          chunk.global_shape, chunk.offset)
                    finally:
                        pool.release(buffer)
                for key in chunk.objects:
                    writer.add_object(key, None)
                bar.update(chunk.nbytes)
            for future in fills.values():  # look-only fills (moments): their errors count too
                future.result()
        except BaseException:
            stop.set()
            for future in fills.values():  # stop the lane: queued fills never start, held buffers go back
                if not future.cancel() and future.done() and future.exception() is None and future.result() is not None:
                    pool.release(future.result())
            raise
        writer.finish(common)


def convert_hf_to_megatron(hf_dir: str | Path, out: str | Path, *, tensor_parallel_size: int = 1,
                           pipeline_parallel_size: int = 1, expand_vocab: bool = False,
                           num_units: int | None = None, tokenizer: str | Path | None = None, seed: int = 1234,
                           progress: bool = True, speech_tokenizer: SpeechTokenizerId | None = None,
                           noise_scale: float = NOISE_SCALE) -> ModelManifest:
    """Convert `hf_dir` into a new run directory `out`; returns its manifest (also saved as cslm_model.json).

    `speech_tokenizer`: the identity of the units the model will be trained on, recorded in the manifest (the
    expansion then holds its codes; `num_units` must agree). Default unit count: the paper's tokenizer's.
    `noise_scale`: variance of the new rows around the existing rows' mean, in units of their variance (`vocab`)."""
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
                             {"cslm": {"iteration": 0, "converted_from": str(hf_dir)}}, progress,
                             noise_scale=noise_scale)
        except BaseException:
            wait([small])
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        small.result()
    os.replace(tmp, final)
    manifest = ModelManifest(arch.with_vocab(vocab), padded, "tokenizer", base_model=hf_dir.resolve().name,
                             lineage=({"stage": "convert", "from": str(hf_dir.resolve()),
                                       "expand_vocab": bool(speech), "num_units": num_units if speech else None,
                                       **({"new_row_noise": noise_scale} if speech else {})},),
                             speech_tokenizer=speech_tokenizer)
    manifest.save(out)
    with atomic_open(out / TRACKER) as f:
        f.write("0\n")
    return manifest
