"""The converters' streaming invariants on a small model (seconds): tensors stored as many row chunks (file-copied
and from memory) read back identically through the direct reader and through DCP's planner (what megatron-core's
load uses), the new vocabulary rows streamed chunk by chunk equal `tail_rows` on the whole matrix bit for bit,
and the export of such a checkpoint is the source again. test_convert.py covers the full CLI round trips."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_cslm.convert.dist_ckpt import DistCheckpointReader
from megatron_cslm.convert.hf_to_megatron import write_checkpoint
from megatron_cslm.convert.layout import EMBEDDING, OUTPUT, hf_layer_names, hf_layer_to_megatron, hf_tensor_specs
from megatron_cslm.convert.megatron_to_hf import write_weights
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
