"""megatron-core `torch_dist` checkpoints written and read tensor by tensor, without a model or process group.

The format is PyTorch Distributed Checkpoint (DCP) plus two megatron-core files:

    .metadata        pickled `torch.distributed.checkpoint.Metadata`: for every global tensor its shape, dtype
                     and the chunks it was saved in; for every chunk the file, byte offset and length
    __0_0.distcp     the chunks, each a `torch.save` record (what DCP's FileSystemWriter writes)
    common.pt        megatron-core's non-sharded state (torch.save of a dict)
    metadata.json    megatron-core's backend tag: {"sharded_backend": "torch_dist", ...}

`dist_checkpointing.save` needs the whole state dict in memory (its async writer preloads every tensor), so
the writer here appends one chunk at a time and writes `.metadata` last. A global tensor may be stored as
many chunks at different offsets (DCP's planner, megatron-core's load and the reader here all assemble
whatever chunks overlap a request), so the converters store bounded row chunks (a decoder layer's slice of
a stacked tensor as one or more (1, rows, ...) chunks at (layer, row, 0); the embedding as row chunks):
memory stays a few buffers whatever the model. A chunk's record is torch.save's own bytes around the data
(`tensor_record`, CRC32 fields zero as with `torch.serialization.set_crc32_options(False)`: torch.load, DCP
and megatron-core do not check them; Python's zipfile would, so the reader here reads members through their
local headers), and the data is written from memory or copied file to file by the kernel.

Reading assembles a requested region from whatever stored chunks overlap it, so checkpoints saved by
training at any TP/PP (many chunks per tensor, optimizer state alongside) are read correctly. Each chunk is a
`torch.save` record (a zip holding a pickle and the raw storage); when the pickle says the record is exactly
one contiguous tensor of the chunk's shape and dtype (what DCP and this writer save), its bytes are read
with `pread` straight into the destination rows (no `torch.load` into a temporary, no `BytesIO`, no second
copy). Anything else (transforms, other record layouts, a truncated or corrupt file) goes through DCP's own
planner and FileSystemReader, which is also what names the damage in errors.
"""
from __future__ import annotations

import collections
import gc
import io
import itertools
import json
import math
import os
import pickle
import struct
import threading
import uuid
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
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

from megatron_cslm.convert.rawio import WriteBehind, copy_ranges, pread_into, pwrite_from
from megatron_cslm.errors import CslmError
from megatron_cslm.fileio import DataError, atomic_open

DATA_FILE = "__0_0.distcp"
MCORE_CONFIG = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
                "common_backend_version": 1}


class _RecordCapture(io.RawIOBase):
    """Collects what torch.save writes, except the tensor's bytes (recognised by address), which become a hole."""

    def __init__(self, data_address: int):
        self.data_address, self.pos = data_address, 0
        self.head, self.tail, self.hole = bytearray(), bytearray(), None

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def write(self, b) -> int:
        view = memoryview(b).cast("B")
        address = np.frombuffer(view, dtype=np.uint8).ctypes.data if view.nbytes else None
        if self.hole is None and address == self.data_address:
            self.hole = (self.pos, view.nbytes)
        else:
            (self.head if self.hole is None else self.tail).extend(view)
        self.pos += view.nbytes
        return view.nbytes


_CRC_LOCK = threading.Lock()  # the CRC option is process-wide: one record at a time


def tensor_record(shape: Sequence[int], dtype: torch.dtype) -> tuple[bytes, int, bytes]:
    """torch.save's record of one contiguous `shape` tensor of `dtype` without its data: (bytes before the data,
    data length, bytes after). Written around the data, they are the record torch.save writes with
    `set_crc32_options(False)` (CRC fields zero: torch.load and DCP do not check them), so the data can come from
    anywhere: a file range copied by the kernel, a buffer. The tensor given to torch.save is never touched."""
    placeholder = torch.empty(math.prod(shape) * dtype.itemsize, dtype=torch.uint8).view(dtype).view(tuple(shape))
    capture = _RecordCapture(placeholder.data_ptr())
    crc = torch.serialization.get_crc32_options()
    with _CRC_LOCK:
        torch.serialization.set_crc32_options(False)
        try:
            torch.save(placeholder, capture)
        finally:
            torch.serialization.set_crc32_options(crc)
    gc.collect(1)  # torch.save leaves a reference cycle that pins the saved storage until the next full GC
    if capture.hole is None or capture.hole[1] != placeholder.nbytes or placeholder.nbytes == 0:
        raise RuntimeError(f"torch.save did not write the {list(shape)} {dtype} data in one piece")
    return bytes(capture.head), capture.hole[1], bytes(capture.tail)



class DistCheckpointWriter:
    """Appends tensor chunks and objects to a new `torch_dist` checkpoint directory; `finish` seals it.

    Every record is written at an explicit offset (`pwrite`, `copy_range`): a tensor chunk is torch.save's
    record (`tensor_record`) around data from memory (`add_tensor`) or copied file to file by the kernel
    (`add_tensor_from_files`)."""

    def __init__(self, directory: str | Path, copy_threads: int = 1):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=False)
        self._fd = os.open(self.directory / DATA_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self._behind = WriteBehind(self._fd)  # tensor data goes to disk as it is written (rawio: why)
        self._end = 0
        self._tensors: dict[str, TensorStorageMetadata] = {}
        self._objects: set[str] = set()
        self._storage: dict[MetadataIndex, _StorageInfo] = {}
        # file-to-file copies run here while the caller appends the next records around them (their place in
        # the file is fixed when they are queued, so the bytes do not depend on which thread finishes first)
        self._copier = ThreadPoolExecutor(max_workers=copy_threads, thread_name_prefix="dist-ckpt-copy")
        self._copies: list = []

    def __enter__(self) -> "DistCheckpointWriter":
        return self

    def __exit__(self, *exc) -> None:
        self._copier.shutdown(wait=True, cancel_futures=True)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _put(self, data: bytes) -> None:
        done = 0
        while done < len(data):
            done += os.pwrite(self._fd, data[done:], self._end + done)
        self._end += len(data)

    def _append(self, obj: Any) -> tuple[int, int]:
        record = io.BytesIO()
        torch.save(obj, record)
        gc.collect(1)
        start = self._end
        self._put(record.getbuffer())
        return start, self._end - start

    def _chunk(self, key: str, shape: Sequence[int], dtype: torch.dtype, global_shape: Sequence[int] | None,
               offset: Sequence[int] | None, write_data: Callable[[int], None]) -> None:
        """Check the chunk against its global tensor, then append its record (`write_data(at)` fills the data)."""
        shape = torch.Size(shape)
        global_shape = torch.Size(global_shape if global_shape is not None else shape)
        offset = torch.Size(offset if offset is not None else (0,) * len(shape))
        if len(offset) != len(global_shape) or len(shape) != len(global_shape) or any(
                o + s > g for o, s, g in zip(offset, shape, global_shape)):
            raise ValueError(f"{key}: chunk {list(shape)} at {list(offset)} does not fit {list(global_shape)}")
        md = self._tensors.setdefault(key, TensorStorageMetadata(TensorProperties(dtype=dtype), global_shape, []))
        if md.size != global_shape or md.properties.dtype != dtype:
            raise ValueError(f"{key}: chunks disagree on global shape/dtype ({list(md.size)} {md.properties.dtype} "
                             f"vs {list(global_shape)} {dtype})")
        head, nbytes, tail = tensor_record(shape, dtype)
        start = self._end
        self._put(head)
        write_data(self._end)
        self._end += nbytes
        self._put(tail)
        md.chunks.append(ChunkStorageMetadata(offsets=offset, sizes=shape))
        self._storage[MetadataIndex(key, offset)] = _StorageInfo(DATA_FILE, start, self._end - start)

    def add_tensor(self, key: str, chunk: torch.Tensor, global_shape: Sequence[int] | None = None,
                   offset: Sequence[int] | None = None) -> None:
        """Store `chunk` at `offset` of global tensor `key` (default: the chunk is the whole tensor)."""
        chunk = chunk.detach().contiguous()
        self._chunk(key, chunk.shape, chunk.dtype, global_shape, offset,
                    lambda at: self._behind.written(at, pwrite_from(self._fd, chunk, at)) if chunk.numel() else None)

    def add_tensor_from_files(self, key: str, shape: Sequence[int], dtype: torch.dtype,
                              sources: Sequence[tuple[str | Path, int, int]], global_shape: Sequence[int],
                              offset: Sequence[int]) -> None:
        """Store a chunk whose bytes are already on disk, in row-major order: (path, file offset, byte count)
        ranges, copied by the kernel (`copy_range`) without passing through memory."""
        if sum(n for _, _, n in sources) != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"{key}: sources hold {sum(n for _, _, n in sources)} bytes, a {list(shape)} {dtype} "
                             "chunk needs " f"{math.prod(shape) * dtype.itemsize}")

        self._chunk(key, shape, dtype, global_shape, offset, lambda at: self._copies.append(
            self._copier.submit(copy_ranges, sources, self._fd, at, key, self._behind)))

    def add_object(self, unique_key: str, value: Any) -> None:
        """Store a megatron-core ShardedObject (saved as a one-element list, like megatron-core does)."""
        start, length = self._append([value])
        self._objects.add(unique_key)
        self._storage[MetadataIndex(unique_key)] = _StorageInfo(DATA_FILE, start, length)

    def finish(self, common: dict) -> None:
        """Wait for the queued copies, check every tensor is fully covered, then write `.metadata`, `common.pt`
        and `metadata.json`."""
        for future in self._copies:
            future.result()
        for key, md in self._tensors.items():
            covered = sum(math.prod(c.sizes) for c in md.chunks)
            if covered != math.prod(md.size):
                raise RuntimeError(f"{key}: chunks cover {covered} of {math.prod(md.size)} elements")
        os.close(self._fd)
        self._fd = None
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


class _FileWindow(io.RawIOBase):
    """Bytes [start, start + length) of an open file, as a seekable stream (for `zipfile`)."""

    def __init__(self, fd: int, start: int, length: int):
        self._fd, self._start, self._length, self._pos = fd, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = max(0, {0: pos, 1: self._pos + pos, 2: self._length + pos}[whence])
        return self._pos

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self._length - self._pos))
        data = os.pread(self._fd, n, self._start + self._pos)
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)


class _TensorPickle(pickle.Unpickler):
    """Reads a `torch.save` pickle of one tensor without torch: (storage key, storage class, numel, storage
    offset, size, stride); anything that is not a plain tensor fails to unpickle."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, stride, *_: (storage, offset, tuple(size), tuple(stride))
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name.endswith("Storage"):
            return name
        raise pickle.UnpicklingError(f"not a plain tensor record ({module}.{name})")

    def persistent_load(self, pid):
        return tuple(pid)


def _contiguous_strides(size: Sequence[int]) -> tuple[int, ...]:
    strides, step = [], 1
    for s in reversed(size):
        strides.append(step)
        step *= s
    return tuple(reversed(strides))


def _member_offset(fd: int, start: int, info: zipfile.ZipInfo) -> int:
    """File offset of the data of zip member `info` of the record at `start`, from its local header."""
    header = os.pread(fd, 30, start + info.header_offset)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise ValueError("bad local header")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return start + info.header_offset + 30 + name_len + extra_len


def _stored_member(fd: int, start: int, info: zipfile.ZipInfo) -> bytes:
    """The bytes of a stored (uncompressed) zip member of the record at `start`, read through its local header."""
    data = os.pread(fd, info.file_size, _member_offset(fd, start, info))
    if len(data) != info.file_size:
        raise ValueError("truncated member")
    return data


def _run_start(box: Sequence[tuple[int, int]], sizes: Sequence[int]) -> int | None:
    """Row-major element index where `box` starts in an array of `sizes`, if the box is one contiguous run (every
    dim after its first one of extent > 1 whole); None otherwise."""
    seen_wide = False
    for (lo, hi), n in zip(box, sizes):
        if seen_wide and (lo, hi) != (0, n):
            return None
        seen_wide = seen_wide or hi - lo > 1
    return sum(lo * stride for (lo, _), stride in zip(box, _contiguous_strides(sizes)))


def _raw_tensor_offset(fd: int, start: int, length: int, sizes: Sequence[int], dtype: torch.dtype) -> int | None:
    """File offset of the raw bytes of the `torch.save` record at [start, start + length) when it holds exactly
    one contiguous tensor of `sizes` and `dtype` from the start of its storage; None otherwise."""
    try:
        with zipfile.ZipFile(_FileWindow(fd, start, length)) as archive:
            infos = archive.infolist()
            pickles = [i for i in infos if i.filename.endswith("/data.pkl")]
            data = [i for i in infos if "/data/" in i.filename and not i.filename.endswith("/data.pkl")]
            if len(pickles) != 1 or len(data) != 1 or any(i.compress_type != zipfile.ZIP_STORED
                                                           for i in (pickles[0], data[0])):
                return None
        pickled = _stored_member(fd, start, pickles[0])  # not archive.read: records may carry no CRC32
        storage, offset, size, stride = _TensorPickle(io.BytesIO(pickled)).load()
        data_offset = _member_offset(fd, start, data[0])
    except Exception:  # noqa: BLE001 - any surprise: DCP's own reader handles (and names) it
        return None
    dtype_name = str(dtype).removeprefix("torch.")
    storage_class = {"bfloat16": "BFloat16Storage", "float32": "FloatStorage", "float16": "HalfStorage",
                     "float64": "DoubleStorage"}.get(dtype_name)
    numel = math.prod(sizes)
    if (storage[:2] != ("storage", storage_class)
            or storage[2] != data[0].filename.rsplit("/", 1)[1] or storage[4] != numel or offset != 0
            or size != tuple(sizes) or stride != _contiguous_strides(sizes)
            or data[0].file_size != numel * dtype.itemsize):
        return None
    return data_offset


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
        self._raw_offsets: dict[MetadataIndex, int | None] = {}
        self._local = threading.local()  # per-thread scratch for regions that are not contiguous in a buffer
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
        """{key: (offset, shape)} -> {key: tensor} in the stored dtype (new buffers; see `read_into`)."""
        buffers = {key: torch.empty(tuple(shape), dtype=self.tensor_meta(key).properties.dtype)
                   for key, (_, shape) in regions.items()}
        return self.read_into(regions, buffers)

    def read_into(self, regions: dict[str, tuple[Sequence[int], Sequence[int]]],
                  buffers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fill `buffers` (the stored dtype, each of its region's shape) with {key: (offset, shape)} regions:
        read directly when every overlapping chunk is a plain tensor record, else all in one DCP pass."""
        for key, (_, shape) in regions.items():
            dtype = self.tensor_meta(key).properties.dtype
            if tuple(buffers[key].shape) != tuple(shape) or buffers[key].dtype != dtype:
                raise ValueError(f"{key}: buffer {list(buffers[key].shape)} {buffers[key].dtype} for a region of "
                                 f"{list(shape)} {dtype}")
        if self._read_raw(regions, buffers):
            return buffers
        return self._read_dcp(regions, buffers)

    def _located(self, key: str, offset: Sequence[int], shape: Sequence[int], fds: dict[str, int]) -> list | None:
        """The stored chunks overlapping a region, as (box in global coordinates, chunk, path, fd, offset of the
        raw bytes); None when one needs DCP (not a plain record, transforms) or the chunks do not tile it."""
        md, located, covered = self.tensor_meta(key), [], 0
        for chunk in md.chunks:
            box = [(max(o, c), min(o + s, c + n)) for o, s, c, n in zip(offset, shape, chunk.offsets, chunk.sizes)]
            if any(lo >= hi for lo, hi in box):
                continue
            index = MetadataIndex(key, chunk.offsets)
            info = self.metadata.storage_data.get(index)
            if info is None or getattr(info, "transform_descriptors", None):
                return None
            if info.relative_path not in fds:
                fds[info.relative_path] = os.open(self.directory / info.relative_path, os.O_RDONLY)
            fd = fds[info.relative_path]
            if index not in self._raw_offsets:
                self._raw_offsets[index] = _raw_tensor_offset(fd, info.offset, info.length, chunk.sizes,
                                                              md.properties.dtype)
            if self._raw_offsets[index] is None:
                return None
            located.append((box, chunk, self.directory / info.relative_path, fd, self._raw_offsets[index]))
            covered += math.prod(hi - lo for lo, hi in box)
        return located if covered == math.prod(shape) else None  # gaps or overlaps: DCP decides what they mean

    def _read_raw(self, regions: dict[str, tuple[Sequence[int], Sequence[int]]],
                  buffers: dict[str, torch.Tensor]) -> bool:
        """Fill `buffers` chunk by chunk with `pread`; False (nothing trusted) when any chunk needs DCP."""
        fds: dict[str, int] = {}
        try:
            for key, (offset, shape) in regions.items():
                located = self._located(key, offset, shape, fds)
                if located is None:
                    return False
                for box, chunk, path, fd, raw in located:
                    dest = buffers[key][tuple(slice(lo - o, hi - o) for (lo, hi), o in zip(box, offset))]
                    within = [(lo - c, hi - c) for (lo, hi), c in zip(box, chunk.offsets)]
                    self._pread_box(fd, raw, chunk.sizes, within, dest, path, key)
        except CslmError:
            return False  # truncated data: DCP's reader reports it
        finally:
            for fd in fds.values():
                os.close(fd)
        return True

    def file_ranges(self, key: str, offset: Sequence[int], shape: Sequence[int]) -> list[tuple[Path, int, int]] | None:
        """The bytes of a region, in row-major order, as (path, file offset, byte count) ranges of the stored
        records, so they can be copied file to file; None when the region is not a few contiguous runs of plain
        records (TP-split columns, DCP-only records: read it into memory instead)."""
        fds: dict[str, int] = {}
        try:
            located = self._located(key, offset, shape, fds)
        finally:
            for fd in fds.values():
                os.close(fd)
        if located is None:
            return None
        itemsize, runs = self.tensor_meta(key).properties.dtype.itemsize, []
        for box, chunk, path, _, raw in located:
            in_region = _run_start([(lo - o, hi - o) for (lo, hi), o in zip(box, offset)], shape)
            in_chunk = _run_start([(lo - c, hi - c) for (lo, hi), c in zip(box, chunk.offsets)], chunk.sizes)
            if in_region is None or in_chunk is None:
                return None
            runs.append((in_region * itemsize, path, raw + in_chunk * itemsize,
                         math.prod(hi - lo for lo, hi in box) * itemsize))
        runs.sort(key=lambda r: r[0])
        return [(path, start, nbytes) for _, path, start, nbytes in runs]

    def _pread_box(self, fd: int, raw: int, sizes: Sequence[int], box: list[tuple[int, int]], dest: torch.Tensor,
                   path: Path, key: str) -> None:
        """Read the `box` of a stored row-major chunk of `sizes` (raw bytes at `raw`) into `dest`, one `pread` per
        contiguous run of the box (one run when it is whole rows of the chunk, the common case): straight into
        `dest` where it is contiguous, else through this thread's reused scratch (no chunk-sized temporary)."""
        if not sizes:  # a scalar
            return pread_into(fd, dest, raw, path, key)
        partial = [d for d, ((lo, hi), n) in enumerate(zip(box, sizes)) if hi - lo != n]
        k = partial[-1] if partial else 0  # dims after k are whole: each run is box[k] x sizes[k + 1:]
        strides, itemsize = _contiguous_strides(sizes), dest.element_size()
        for outer in itertools.product(*(range(lo, hi) for lo, hi in box[:k])):
            start = sum(i * s for i, s in zip((*outer, box[k][0]), strides)) * itemsize
            target = dest[tuple(i - lo for i, (lo, _) in zip(outer, box))]  # box[k] x sizes[k + 1:]
            if target.is_contiguous():
                pread_into(fd, target, raw + start, path, key)
            else:
                staged = self._scratch(tuple(target.shape), dest.dtype)
                pread_into(fd, staged, raw + start, path, key)
                target.copy_(staged)

    def _scratch(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous `shape` view of this thread's scratch bytes, grown (never shrunk) as needed."""
        nbytes = math.prod(shape) * dtype.itemsize
        buffer = getattr(self._local, "scratch", None)
        if buffer is None or buffer.numel() < nbytes:
            buffer = self._local.scratch = torch.empty(nbytes, dtype=torch.uint8)
        return buffer[:nbytes].view(dtype).view(shape)

    def _read_dcp(self, regions: dict[str, tuple[Sequence[int], Sequence[int]]],
                  buffers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        targets = {}
        for key, (offset, _) in regions.items():
            targets[key] = _region(key, buffers[key], self.tensor_meta(key).size, offset)
        try:
            dcp.load(targets, storage_reader=self._reader, no_dist=True)
        # a truncated or corrupt data file: name the checkpoint and the tensors read (DCP wraps the error in a
        # CheckpointException, a BaseException)
        except (Exception, CheckpointException) as e:
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
