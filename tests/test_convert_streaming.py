"""The converters' streaming invariants on a small model (seconds): tensors stored as many row chunks (file-copied
and from memory) read back identically through the direct reader and through DCP's planner (what megatron-core's
load uses), the new vocabulary rows streamed chunk by chunk equal `tail_rows` on the whole matrix bit for bit,
and the export of such a checkpoint is the source again; the output's write-behind drops written ranges from
the page cache past its lag. test_convert.py covers the full CLI round trips."""
from __future__ import annotations

import dataclasses
import mmap
import os

import pytest
import torch

from megatron_cslm.convert.dist_ckpt import DistCheckpointReader
from megatron_cslm.convert.hf_to_megatron import write_checkpoint
from megatron_cslm.convert.layout import EMBEDDING, OUTPUT, hf_layer_names, hf_layer_to_megatron, hf_tensor_specs
from megatron_cslm.convert.megatron_to_hf import write_weights
from megatron_cslm.convert.rawio import WriteBehind, pwrite_from
from megatron_cslm.convert.safetensors_io import HFCheckpoint, ShardedSafetensorsWriter
from megatron_cslm.convert.vocab import RowMoments, row_moments, tail_rows
from megatron_cslm.models.llama import ARCHS

ARCH = dataclasses.replace(ARCHS["tiny"].with_vocab(5000), num_layers=2)
NEW_ROWS, PADDED, SEED, CHUNK = 300, 5376, 7, 20_000  # CHUNK: bytes, so every matrix is several chunks


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    g = torch.Generator().manual_seed(0)
    tensors = {s.name: (torch.randn(s.shape, generator=g) * 0.02).to(torch.bfloat16) for s in hf_tensor_specs(ARCH)}
    with ShardedSafetensorsWriter(root / "hf", [(n, tuple(t.shape)) for n, t in tensors.items()], torch.bfloat16,
                                  max_shard_bytes=2**20) as writer:
        for name, t in tensors.items():
            writer.write(name, t)
    write_checkpoint(HFCheckpoint(root / "hf"), ARCH, root / "run", NEW_ROWS, PADDED, SEED, {}, progress=False,
                     chunk_bytes=CHUNK)
    return root, tensors, DistCheckpointReader(root / "run")


def whole(reader: DistCheckpointReader, key: str) -> torch.Tensor:
    size = tuple(reader.tensor_meta(key).size)
    return reader.read({key: ((0,) * len(size), size)})[key]


def test_row_chunks_read_back_through_both_readers(converted):
    _, tensors, reader = converted
    assert len(reader.tensor_meta(EMBEDDING).chunks) > 2  # existing rows in 4096-row multiples, then the tail
    for i in range(ARCH.num_layers):
        hf = {part: tensors[name] for part, name in hf_layer_names(i).items()}
        for key, expected in hf_layer_to_megatron(hf, ARCH).items():
            assert len(reader.tensor_meta(key).chunks) >= ARCH.num_layers
            assert torch.equal(whole(reader, key)[i], expected), key
    for key, name, seed in ((EMBEDDING, "model.embed_tokens.weight", SEED), (OUTPUT, "lm_head.weight", SEED + 1)):
        weight = tensors[name]
        stored = whole(reader, key)
        assert torch.equal(stored[:ARCH.vocab_size], weight)
        assert torch.equal(stored[ARCH.vocab_size:], tail_rows(weight, NEW_ROWS, PADDED, seed)), key
        region = {key: ((4000, 3), (1300, 40))}  # straddles an existing-rows chunk and the tail's chunks
        buffers = {key: torch.empty(1300, 40, dtype=torch.bfloat16)}
        assert torch.equal(reader._read_dcp(region, buffers)[key], stored[4000:5300, 3:43])


def test_streamed_moments_equal_one_pass():
    weight = (torch.randn(9000, 48, generator=torch.Generator().manual_seed(1)) * 0.02).to(torch.bfloat16)
    moments = RowMoments(48, block_rows=1024)
    for start, end in ((0, 2048), (2048, 6144), (6144, 9000)):  # whole 1024-row blocks, then a partial one
        moments.add(weight[start:end])
    mean, var = moments.result()
    one_mean, one_var = row_moments(weight, block_rows=1024)
    assert torch.equal(mean, one_mean) and torch.equal(var, one_var)
    with pytest.raises(ValueError, match="partial block"):
        moments.add(weight[:1024])


def test_export_of_a_chunked_checkpoint_is_the_source(converted):
    root, tensors, reader = converted
    out = root / "back"
    exported_arch = dataclasses.replace(ARCH, vocab_size=ARCH.vocab_size + NEW_ROWS)
    write_weights(reader, exported_arch, out, torch.bfloat16, max_shard_bytes=2**20, progress=False,
                  chunk_bytes=CHUNK)
    back = HFCheckpoint(out)
    for name, t in tensors.items():
        got = back.get(name)
        assert torch.equal(got[:t.shape[0]], t), name



def _resident_pages(path, nbytes: int) -> list[bool]:
    """Which pages of the file's first `nbytes` are in the page cache (mincore over a mapping never touched)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    vec = (ctypes.c_ubyte * (nbytes // mmap.PAGESIZE))()
    with open(path, "rb") as f:
        address = libc.mmap(None, nbytes, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
    try:
        assert libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(nbytes), vec) == 0, ctypes.get_errno()
    finally:
        libc.munmap(ctypes.c_void_p(address), ctypes.c_size_t(nbytes))
    return [bool(v & 1) for v in vec]


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise on this platform")
def test_write_behind_drops_written_ranges_past_the_lag(tmp_path):
    """What keeps a conversion at disk speed (rawio: WriteBehind): a written range leaves the page cache once
    `lag_bytes` more are written, while the last `lag_bytes` stay; the bytes on disk are what was written."""
    probe = tmp_path / "probe.bin"
    probe.write_bytes(bytes(mmap.PAGESIZE))
    with open(probe, "rb+") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    if all(_resident_pages(probe, mmap.PAGESIZE)):
        pytest.skip("this file system keeps pages it is told to drop (tmpfs)")
    block = 64 * mmap.PAGESIZE
    data = torch.randint(0, 256, (9 * block,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "out.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        behind = WriteBehind(fd, lag_bytes=2 * block)
        for i in range(8):
            behind.written(i * block, pwrite_from(fd, data[i * block:(i + 1) * block], i * block))
        os.fsync(fd)  # every range clean: a drop from here on cannot find pages still being written back
        behind.written(8 * block, pwrite_from(fd, data[8 * block:], 8 * block))
    finally:
        os.close(fd)
    pages = _resident_pages(path, 9 * block)
    per_block = [pages[i * 64:(i + 1) * 64] for i in range(9)]
    assert not any(per_block[6]), "the range 2 blocks behind the last write was not dropped"
    assert all(per_block[7]) and all(per_block[8]), "ranges within the lag were dropped"
    assert path.read_bytes() == bytes(data.numpy())
