"""megatron-core checkpoint (any TP x PP it was trained at) -> HF Llama directory, without custom code.

Streams HF safetensors shards (~5 GB, like Meta's) with `model.safetensors.index.json` at the disk's speed in
a bounded working set. The checkpoint is read in pieces of at most CHUNK_BYTES (32 MiB): row chunks of the
embedding and head, and each layer's `layout.layer_chunks`, each holding the HF row blocks that land in it
(`layout.layer_row_map`: q/k/v and gate/up are row ranges, never reassembled). Each block goes to its planned
offset in its shard: copied file to file by the kernel (`copy_file_range`, no memory at all) when the export
keeps the stored dtype and the piece is contiguous runs of stored records (`DistCheckpointReader.file_ranges`;
what the converter and megatron-core write for whole-row chunks); otherwise (a cast, TP-split columns, DCP-only
records) `pread` into one of POOL_BUFFERS buffers allocated once, cast in place, and `pwrite` from it by the
writer threads, the buffer going back once written. A background thread plans and reads ahead of the writes;
peak RSS is the imports plus at most ~0.3 GB whatever the model size. The tokenizer, configs and model card are
written meanwhile by another thread (config.json is removed again if the weights fail). Embedding
padding rows are dropped (config.json carries the unpadded vocabulary), RoPE scaling is written in the
classic `rope_theta` + `rope_scaling` form that vLLM and older transformers read, and the tokenizer saved
with the checkpoint (speech units as added tokens, Llama-3.1 chat template) is copied alongside.
"""
from __future__ import annotations

import math
import shlex
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import torch
from tqdm import tqdm

from megatron_cslm.checkpoint.manifest import ModelManifest, resolve_checkpoint
from megatron_cslm.checkpoint.save_load import iteration_dir
from megatron_cslm.convert.dist_ckpt import DistCheckpointReader
from megatron_cslm.convert.hf_to_megatron import TOKENIZER_FILES
from megatron_cslm.convert.layout import (
    EMBEDDING,
    FINAL_NORM,
    LAYER_KEYS,
    OUTPUT,
    hf_layer_names,
    hf_tensor_specs,
    layer_chunks,
    megatron_layer_shapes,
    row_chunks,
)
from megatron_cslm.convert.rawio import BufferPool, read_ahead
from megatron_cslm.convert.safetensors_io import INDEX_FILE, FileRows, ShardedSafetensorsWriter
from megatron_cslm.errors import CslmError
from megatron_cslm.fileio import DataError, make_dirs, write_json
from megatron_cslm.models.llama import LlamaArch
from megatron_cslm.speech.identity import IDENTITY_KEY
from megatron_cslm.text.chat import EOT

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
TURN_END = EOT


def check_shapes(reader: DistCheckpointReader, arch: LlamaArch, padded_vocab: int) -> None:
    """Every tensor the export needs is in the checkpoint with the global shape cslm_model.json implies."""
    expected = {EMBEDDING: (padded_vocab, arch.hidden_size), FINAL_NORM: (arch.hidden_size,)}
    if not arch.tie_word_embeddings:
        expected[OUTPUT] = (padded_vocab, arch.hidden_size)
    for key, shape in megatron_layer_shapes(arch).items():
        expected[key] = (arch.num_layers, *shape)
    for key, shape in expected.items():
        got = tuple(reader.tensor_meta(key).size)
        if got != shape:
            raise DataError(reader.directory / ".metadata", None, key,
                            f"global shape {list(got)}, but cslm_model.json implies {list(shape)}")


CHUNK_BYTES = 32 * 2**20  # bytes read per piece (one pool buffer, plus the cast copy when the dtype changes)
POOL_BUFFERS = 4  # one being filled, two read ahead, one being written (more wait for the writer threads)

# One read of the megatron checkpoint: (key, (offset, shape)) and the HF row blocks in it, (name, first HF row,
# index of the block within the region).
Piece = tuple[str, tuple[tuple[int, ...], tuple[int, ...]], list[tuple[str, int, tuple]]]


def plan_pieces(reader: DistCheckpointReader, arch: LlamaArch, chunk_bytes: int = CHUNK_BYTES) -> list[Piece]:
    """Every read of the export, in HF file order: row chunks of the embedding (padding dropped), each layer's
    `layout.layer_chunks`, the final norm, the head."""
    v, h = arch.vocab_size, arch.hidden_size
    itemsize = {key: reader.tensor_meta(key).properties.dtype.itemsize for key in (EMBEDDING, FINAL_NORM, *LAYER_KEYS)}

    def matrix(key: str, name: str) -> list[Piece]:
        size = reader.tensor_meta(key).properties.dtype.itemsize
        return [(key, ((r, 0), (rows, h)), [(name, r, ())]) for r, rows in row_chunks(v, h * size, chunk_bytes)]

    pieces = matrix(EMBEDDING, "model.embed_tokens.weight")
    shapes = megatron_layer_shapes(arch)
    for i in range(arch.num_layers):
        names = hf_layer_names(i)
        for c in layer_chunks(arch, chunk_bytes, itemsize):
            shape = shapes[c.key]
            region = ((i, c.row) + (0,) * (len(shape) - 1), (1, c.rows, *shape[1:]))
            pieces.append((c.key, region, [(names[part], hf_row, (0, slice(row, row + rows)))
                                           for part, hf_row, row, rows in c.sources]))
    pieces.append((FINAL_NORM, ((0,), (h,)), [("model.norm.weight", 0, ())]))
    if not arch.tie_word_embeddings:
        pieces += matrix(OUTPUT, "lm_head.weight")
    return pieces


def _file_rows(ranges: list[tuple[Path, int, int]], shape: tuple[int, ...], index: tuple) -> FileRows:
    """The file ranges of the block `index` selects of a region of `shape` (the whole region, or rows
    `index[1]` of its (1, rows, ...) layer slice), cut out of the region's ranges."""
    total = sum(n for _, _, n in ranges)
    if not index:
        return FileRows(shape[0], tuple(ranges))
    rows = index[1]
    row_bytes = total // shape[1]
    start, end, out, at = rows.start * row_bytes, rows.stop * row_bytes, [], 0
    for path, offset, nbytes in ranges:
        lo, hi = max(start, at), min(end, at + nbytes)
        if lo < hi:
            out.append((path, offset + lo - at, hi - lo))
        at += nbytes
    return FileRows(rows.stop - rows.start, tuple(out))


def write_weights(reader: DistCheckpointReader, arch: LlamaArch, out: Path, dtype: torch.dtype,
                  max_shard_bytes: int, progress: bool = True, chunk_bytes: int = CHUNK_BYTES) -> None:
    """Stream the checkpoint into HF shards through `POOL_BUFFERS` reused buffers: a background thread reads
    (and casts) the next pieces while the writer threads write this one's blocks at their planned offsets."""
    pieces = plan_pieces(reader, arch, chunk_bytes)
    stored = {key: reader.tensor_meta(key).properties.dtype for key, _, _ in pieces}

    def layout(key: str, shape: tuple[int, ...]) -> tuple[int, int]:
        """Bytes of the stored piece (64-aligned), and of its cast copy after it (0 when none is needed)."""
        n = math.prod(shape)
        return -(-n * stored[key].itemsize // 64) * 64, (n * dtype.itemsize if stored[key] != dtype else 0)

    pool = BufferPool(max(sum(layout(key, region[1])) for key, region, _ in pieces), POOL_BUFFERS)

    def task(piece: Piece):
        def read():
            key, (offset, shape), blocks = piece
            ranges = reader.file_ranges(key, offset, shape) if stored[key] == dtype else None
            if ranges is not None:  # stored as exported: copied file to file, no memory
                return [(name, row, _file_rows(ranges, shape, index)) for name, row, index in blocks], lambda: None
            buffer = pool.acquire()
            release = pool.releaser(buffer)
            try:
                data = reader.read_into({key: (offset, shape)}, {key: pool.view(buffer, stored[key], shape)})[key]
                cast_at, cast_bytes = layout(key, shape)
                if cast_bytes:
                    data = pool.view(buffer, dtype, shape, at=cast_at).copy_(data)
            except BaseException:
                release()
                raise
            return [(name, row, data[index]) for name, row, index in blocks], release
        return read

    specs = [(s.name, s.shape) for s in hf_tensor_specs(arch)]
    with ShardedSafetensorsWriter(out, specs, dtype, max_shard_bytes) as writer, \
            tqdm(total=sum(math.prod(region[1]) for _, region, _ in pieces) * dtype.itemsize, desc="megatron -> hf",
                 unit="B", unit_scale=True, disable=not progress) as bar:
        for (_, (_, shape), _), (blocks, release) in zip(pieces, read_ahead(map(task, pieces), depth=POOL_BUFFERS - 2)):
            try:
                writer.write_rows(blocks, release)
            except BaseException:
                release()  # not queued: the reader may be waiting for this buffer
                raise
            bar.update(math.prod(shape) * dtype.itemsize)


def write_configs(out: Path, arch: LlamaArch, dtype: torch.dtype, speech_tokenizer=None) -> None:
    """config.json and generation_config.json; token ids come from the copied tokenizer, as transformers sees it.
    Both carry `speech_tokenizer` (the manifest's SpeechTokenizerId, null when unknown): decode reads it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(out))
    turn_end = tokenizer.convert_tokens_to_ids(TURN_END)  # chat turns end with it, documents with eos
    if turn_end == tokenizer.unk_token_id:
        turn_end = None
    stops = list(dict.fromkeys(i for i in (tokenizer.eos_token_id, turn_end) if i is not None))
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": stops if len(stops) > 1 else next(iter(stops), None)}
    speech = {IDENTITY_KEY: speech_tokenizer.to_dict() if speech_tokenizer is not None else None}
    write_json(out / "config.json", {**arch.to_hf_config(torch_dtype=str(dtype).removeprefix("torch."), **ids),
                                     **speech})
    write_json(out / "generation_config.json", {"_from_model_config": False, **ids, **intended_sampling(), **speech})


def intended_sampling() -> dict:
    """The sampling the model is meant to be decoded with: the CSLM authors' (inference/sampling.py defaults)."""
    from megatron_cslm.inference.sampling import SamplingConfig

    sampling = SamplingConfig()
    return {"do_sample": sampling.temperature > 0, "temperature": sampling.temperature, "top_p": sampling.top_p}


def write_hub_files(out: Path, run_dir: Path, iteration: int, manifest: ModelManifest, tokenizer_dir: Path,
                    command: str) -> list[str]:
    """Licence/notice files, `chat_template.jinja` and the README.md model card; returns the notices copied."""
    import json

    from megatron_cslm.checkpoint.manifest import copy_notices, read_common_state
    from megatron_cslm.convert.model_card import model_card
    from megatron_cslm.text.tokenizer import CHAT_TEMPLATE_FILE, META_FILE, SpeechTextTokenizer

    notices = copy_notices(run_dir, out)
    if (tokenizer_dir / META_FILE).exists():
        tokenizer = SpeechTextTokenizer.from_pretrained(tokenizer_dir)
    else:  # read once; a text-only model converted without --expand-vocab exports as one: the card says so
        read = SpeechTextTokenizer(tokenizer_dir)
        tokenizer = read if read.units_in_vocabulary else None
    config_path = out / "tokenizer_config.json"
    if config_path.exists() and not (out / CHAT_TEMPLATE_FILE).exists():
        # the hub's layout (transformers >= 4.43 saves it so): the template in its own file, not in the config
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if isinstance(config.get("chat_template"), str):
            (out / CHAT_TEMPLATE_FILE).write_text(config.pop("chat_template"), encoding="utf-8")
            write_json(config_path, config)
    generation = json.loads((out / "generation_config.json").read_text(encoding="utf-8"))
    card = model_card(manifest, final_args=read_common_state(run_dir, iteration).get("args", {}), tokenizer=tokenizer,
                      generation=generation, notices=notices, export_command=command)
    (out / "README.md").write_text(card, encoding="utf-8")
    return notices


def convert_megatron_to_hf(megatron_dir: str | Path, out: str | Path, *, dtype: str = "bf16",
                           max_shard_bytes: int = 5 * 10**9, progress: bool = True,
                           command: str | None = None) -> ModelManifest:
    """Export a run directory (latest iteration) or one iter_* directory to a new HF directory `out`, ready
    for the hub: weights, configs, tokenizer + chat template, licence/notice files and a model card."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    run_dir, iteration = resolve_checkpoint(megatron_dir)
    manifest = ModelManifest.load(run_dir)
    arch = manifest.arch
    reader = DistCheckpointReader(iteration_dir(run_dir, iteration))
    check_shapes(reader, arch, manifest.padded_vocab_size)
    tokenizer_dir = manifest.tokenizer_dir(run_dir)
    if not tokenizer_dir.is_dir():
        raise CslmError(run_dir / "cslm_model.json", None, "tokenizer", f"names {tokenizer_dir}, which is not a "
                        "directory", kind="checkpoint", reason="missing")
    out = Path(out)
    if (out / INDEX_FILE).exists() or (out / "config.json").exists():
        raise CslmError(out, None, None, "already holds a HF checkpoint; choose a new --out directory", kind="io",
                        reason="output_exists")

    def small_files() -> None:  # tokenizer, configs, card: seconds of CPU that overlap the weights' I/O
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).exists():
                shutil.copyfile(tokenizer_dir / name, out / name)
        write_configs(out, arch, DTYPES[dtype], manifest.speech_tokenizer)
        write_hub_files(out, run_dir, iteration, manifest, tokenizer_dir, command or shlex.join(sys.argv))

    make_dirs(out)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub-files") as pool:
        small = pool.submit(small_files)
        try:
            write_weights(reader, arch, out, DTYPES[dtype], max_shard_bytes, progress)
        except BaseException:
            wait([small])
            (out / "config.json").unlink(missing_ok=True)  # no weights: the directory may be written again
            raise
        small.result()
    return manifest

