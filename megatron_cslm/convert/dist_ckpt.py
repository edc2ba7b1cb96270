"""megatron-core `torch_dist` checkpoints written and read tensor by tensor, without a model or process group.

The format is PyTorch Distributed Checkpoint (DCP) plus two megatron-core files:

    .metadata        pickled `torch.distributed.checkpoint.Metadata`: for every global tensor its shape, dtype
                     and the chunks it was saved in; for every chunk the file, byte offset and length
    __0_0.distcp     the chunks, each a `torch.save` record (what DCP's FileSystemWriter writes)
    common.pt        megatron-core's non-sharded state (torch.save of a dict)
    metadata.json    megatron-core's backend tag: {"sharded_backend": "torch_dist", ...}

`dist_checkpointing.save` needs the whole state dict in memory (its async writer preloads every tensor), so
the writer here appends one chunk at a time (a decoder layer is one chunk of each stacked tensor, exactly
as megatron-core saves them) and writes `.metadata` last. Reading goes through DCP's own planner and
FileSystemReader, so checkpoints saved by training at any TP/PP (many chunks per tensor, optimizer state
alongside) are read correctly: a request for a region is assembled from whatever chunks overlap it.
"""
from __future__ import annotations

import gc
import json
import math
import pickle
import uuid
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION, FileSystemReader, _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from megatron_cslm.errors import CslmError
from megatron_cslm.fileio import DataError, atomic_open

DATA_FILE = "__0_0.distcp"
MCORE_CONFIG = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
                "common_backend_version": 1}


class DistCheckpointWriter:
    """Appends tensor chunks and objects to a new `torch_dist` checkpoint directory; `finish` seals it."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=False)
        self._file = open(self.directory / DATA_FILE, "wb")
        self._tensors: dict[str, TensorStorageMetadata] = {}
        self._objects: set[str] = set()
        self._storage: dict[MetadataIndex, _StorageInfo] = {}

    def __enter__(self) -> "DistCheckpointWriter":
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

    def _append(self, obj: Any) -> tuple[int, int]:
        start = self._file.tell()
        torch.save(obj, self._file)
        gc.collect(1)  # torch.save leaves a reference cycle that pins the saved storage until the next full GC
        return start, self._file.tell() - start

    def add_tensor(self, key: str, chunk: torch.Tensor, global_shape: Sequence[int] | None = None,
                   offset: Sequence[int] | None = None) -> None:
        """Store `chunk` at `offset` of global tensor `key` (default: the chunk is the whole tensor)."""
        global_shape = torch.Size(global_shape if global_shape is not None else chunk.shape)
        offset = torch.Size(offset if offset is not None else (0,) * chunk.dim())
        if len(offset) != len(global_shape) or chunk.dim() != len(global_shape) or any(
                o + s > g for o, s, g in zip(offset, chunk.shape, global_shape)):
            raise ValueError(f"{key}: chunk {list(chunk.shape)} at {list(offset)} does not fit {list(global_shape)}")
        chunk = chunk.detach().contiguous()
        if chunk.untyped_storage().nbytes() != chunk.numel() * chunk.element_size():
            chunk = chunk.clone()  # torch.save writes the whole storage of a view
        md = self._tensors.setdefault(key, TensorStorageMetadata(TensorProperties(dtype=chunk.dtype), global_shape, []))
        if md.size != global_shape or md.properties.dtype != chunk.dtype:
            raise ValueError(f"{key}: chunks disagree on global shape/dtype ({list(md.size)} {md.properties.dtype} "
                             f"vs {list(global_shape)} {chunk.dtype})")
        md.chunks.append(ChunkStorageMetadata(offsets=offset, sizes=chunk.shape))
        start, length = self._append(chunk)
        self._storage[MetadataIndex(key, offset)] = _StorageInfo(DATA_FILE, start, length)

    def add_object(self, unique_key: str, value: Any) -> None:
        """Store a megatron-core ShardedObject (saved as a one-element list, like megatron-core does)."""
        start, length = self._append([value])
        self._objects.add(unique_key)
        self._storage[MetadataIndex(unique_key)] = _StorageInfo(DATA_FILE, start, length)

    def finish(self, common: dict) -> None:
        """Check every tensor is fully covered, then write `.metadata`, `common.pt` and `metadata.json`."""
        for key, md in self._tensors.items():
            covered = sum(math.prod(c.sizes) for c in md.chunks)
            if covered != math.prod(md.size):
                raise RuntimeError(f"{key}: chunks cover {covered} of {math.prod(md.size)} elements")
        self._file.flush()
        self._file.close()
        state = dict(self._tensors)
        state.update({k: BytesStorageMetadata() for k in self._objects})
        metadata = Metadata(state_dict_metadata=state, storage_data=self._storage,
                            storage_meta=StorageMeta(checkpoint_id=str(self.directory), save_id=str(uuid.uuid4())),
                            version=CURRENT_DCP_VERSION)
        with atomic_open(self.directory / ".metadata", "wb") as f:
            pickle.dump(metadata, f)
        with atomic_open(self.directory / "common.pt", "wb") as f:
            torch.save(common, f)
        with atomic_open(self.directory / "metadata.json") as f:
            json.dump(MCORE_CONFIG, f)


def _region(key: str, buffer: torch.Tensor, global_shape: torch.Size, offset: Sequence[int]) -> torch.Tensor:
    """A DCP load target for one region of a global tensor (megatron-core's own Checkpointable wrapper)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.strategies.checkpointable import CheckpointableShardedTensor

    sh_ten = ShardedTensor(key=key, data=buffer, dtype=buffer.dtype, local_shape=tuple(buffer.shape),
                           global_shape=tuple(global_shape), global_offset=tuple(offset), axis_fragmentations=None)
    return CheckpointableShardedTensor.from_sh_ten(sh_ten)


class DistCheckpointReader:
    """Reads regions of global tensors from a `torch_dist` checkpoint (ours or one saved by training)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        config = self.directory / "metadata.json"
        if not config.exists():
            raise CslmError(config, None, None, f"not found: {self.directory} is not a megatron-core "
                            "dist_checkpointing checkpoint (or was not saved completely)", kind="checkpoint",
                            reason="missing")
        try:
            backend = json.loads(config.read_text()).get("sharded_backend")
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError) as e:
            raise CslmError(config, None, None, f"unreadable ({e})", kind="checkpoint", reason="corrupt") from e
        if backend != "torch_dist":
            raise DataError(config, None, "sharded_backend", f"is {backend!r}; only 'torch_dist' is supported",
                            kind="checkpoint")
        self._reader = FileSystemReader(str(self.directory))
        try:
            self.metadata = self._reader.read_metadata()
        except Exception as e:  # a truncated or corrupt .metadata pickle: name it
            raise CslmError(self.directory / ".metadata", None, None, f"unreadable ({type(e).__name__}: {e})",
                            kind="checkpoint", reason="corrupt") from e

    def tensor_meta(self, key: str) -> TensorStorageMetadata:
        md = self.metadata.state_dict_metadata.get(key)
        if not isinstance(md, TensorStorageMetadata):
            raise DataError(self.directory / ".metadata", None, key, "tensor missing from the checkpoint",
                            kind="checkpoint")
        return md

    def read(self, regions: dict[str, tuple[Sequence[int], Sequence[int]]]) -> dict[str, torch.Tensor]:
        """{key: (offset, shape)} -> {key: tensor} in the stored dtype, all read in one DCP pass."""
        buffers, targets = {}, {}
        for key, (offset, shape) in regions.items():
            md = self.tensor_meta(key)
            buffers[key] = torch.empty(tuple(shape), dtype=md.properties.dtype)
            targets[key] = _region(key, buffers[key], md.size, offset)
        try:
            dcp.load(targets, storage_reader=self._reader, no_dist=True)
        except Exception as e:  # a truncated or corrupt data file: name the checkpoint and the tensors read
            names = ", ".join(list(regions)[:3]) + (" ..." if len(regions) > 3 else "")
            raise CslmError(self.directory, None, names, f"unreadable tensor data ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})", kind="checkpoint", reason="corrupt") from e
        gc.collect(1)  # free the loaded chunks now (torch.load leaves reference cycles that pin them)
        return buffers

    def read_layer(self, keys: Sequence[str], layer: int) -> dict[str, torch.Tensor]:
        """One layer's slice of stacked [num_layers, ...] tensors, without the layer axis."""
        regions = {}
        for key in keys:
            size = self.tensor_meta(key).size
            regions[key] = ((layer,) + (0,) * (len(size) - 1), (1,) + tuple(size[1:]))
        return {k: v[0] for k, v in self.read(regions).items()}
