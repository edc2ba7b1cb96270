"""Hugging Face safetensors checkpoints, read and written one tensor at a time, at the disk's speed.

An 8B checkpoint is 16 GB in four ~5 GB shards. Reading: `read_into` copies a tensor's bytes (or a block of
its rows) from the page cache straight into the caller's buffer with `pread`, using the offsets of the shard's
own header; no mapping stays open, so RSS holds only the buffers (a mapping that stays open counts every
touched page), and the caller can place rows where the output wants them (fused matrices need no `cat`).
Writing: the shard plan (which tensor goes in which file, at which byte offset) is computed up front from
the shapes, so each file's header is written first and every tensor is written at its planned offset with
`pwrite` by a small pool of threads, straight from the tensor's memory (or from several row blocks of it:
views need no copy), while the caller produces the next one. A tensor may also arrive as row blocks in any
order (`write_rows`), from memory or as file ranges copied by the kernel (`FileRows`), so a converter streams
it through a few reused buffers, or none, instead of holding it whole.
Files are byte for byte what a serial writer writes (the layout is fixed by the plan, not by which thread
finishes first); each shard appears under its name only once complete, and the index only once every shard is.
"""
from __future__ import annotations

import collections
import contextlib
import json
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open

from megatron_cslm.convert.rawio import WriteBehind, copy_ranges, pread_into, pwrite_from
from megatron_cslm.errors import CslmError
from megatron_cslm.fileio import DataError, atomic_path, write_json

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
# Non-parameter buffers older transformers versions saved; they are recomputed from config.json.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _checkpoint_error(shard: Path, tensor: str | None, error: Exception) -> CslmError:
    return CslmError(shard, None, tensor, f"unreadable safetensors shard (truncated or corrupt?): {error}",
                     kind="checkpoint", reason="corrupt_shard")


@contextlib.contextmanager
def open_shard(shard: Path, tensor: str | None = None):
    """`safe_open(shard)`; a truncated or corrupt file raises a CslmError naming the shard (and `tensor`, the
    one being read) instead of safetensors' own error, which names neither."""
    try:
        f = safe_open(shard, framework="pt")
    except Exception as e:  # SafetensorError, OSError: safetensors raises several types for a bad header
        raise _checkpoint_error(shard, tensor, e) from e
    with f:
        yield f


def read_tensor(shard: Path, name: str) -> torch.Tensor:
    """One tensor copied out of `shard`, or a CslmError naming the shard and the tensor."""
    with open_shard(shard, name) as f:
        try:
            return f.get_tensor(name)
        except Exception as e:  # data past the end of a truncated file, bad offsets
            raise _checkpoint_error(shard, name, e) from e


class HFCheckpoint:
    """Lazy reader of a HF checkpoint directory (`model.safetensors` or shards + `model.safetensors.index.json`)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._headers: dict[str, tuple[dict, int]] = {}
        self._lock = threading.Lock()
        index = self.directory / INDEX_FILE
        if index.exists():
            self.source = index
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(index, None, "weight_map", f"not a safetensors index ({e})", kind="checkpoint") from e
            missing = sorted({f for f in weight_map.values() if not (self.directory / f).exists()})
            if missing:
                example = next(n for n, f in weight_map.items() if f == missing[0])
                raise DataError(index, None, "weight_map",
                                f"shard {missing[0]} (holding e.g. {example}) not found in {self.directory}"
                                + (f"; {len(missing) - 1} more shards missing" if len(missing) > 1 else ""),
                                kind="checkpoint")
            self.weight_map: dict[str, str] = weight_map
        elif (self.directory / SINGLE_FILE).exists():
            self.source = self.directory / SINGLE_FILE
            with open_shard(self.source) as f:
                self.weight_map = {name: SINGLE_FILE for name in f.keys()}
        else:
            raise CslmError(self.directory, None, None, f"no {SINGLE_FILE} or {INDEX_FILE} (expected a Hugging "
                            "Face safetensors checkpoint directory)", kind="checkpoint", reason="missing")

    def check(self, expected: dict[str, tuple[int, ...]], allowed_extra: Sequence[str] = ()) -> None:
        """Fail before converting anything if a tensor is missing, unexpected or has the wrong shape."""
        for name in expected:
            if name not in self.weight_map:
                raise DataError(self.source, None, name, "tensor missing from the checkpoint", kind="checkpoint")
        extra = [n for n in self.weight_map if n not in expected and n not in allowed_extra
                 and not n.endswith(IGNORED_SUFFIXES)]
        if extra:
            raise DataError(self.source, None, extra[0], f"unexpected tensor for this Llama config.json "
                            f"({len(extra)} unexpected in total; biases and non-Llama layers are not supported)")
        by_file: dict[str, list[str]] = {}
        for name in expected:
            by_file.setdefault(self.weight_map[name], []).append(name)
        for file, names in by_file.items():
            with open_shard(self.directory / file) as f:
                present = set(f.keys())
                for name in names:
                    if name not in present:
                        raise DataError(self.directory / file, None, name, "listed in the index but not in this shard",
                                        kind="checkpoint")
                    shape = tuple(f.get_slice(name).get_shape())
                    if shape != tuple(expected[name]):
                        raise DataError(self.directory / file, None, name,
                                        f"shape {list(shape)} does not match config.json, which implies "
                                        f"{list(expected[name])}")

    def get(self, name: str) -> torch.Tensor:
        """One tensor, copied out of its shard (the shard is closed again, releasing its mapping)."""
        if name not in self.weight_map:
            raise DataError(self.source, None, name, "tensor missing from the checkpoint", kind="checkpoint")
        return read_tensor(self.directory / self.weight_map[name], name)

    def _header(self, file: str) -> tuple[dict, int]:
        """A shard's header (tensor name -> dtype, shape, data_offsets) and where its data section starts."""
        with self._lock:
            if file not in self._headers:
                path = self.directory / file
                try:
                    with open(path, "rb") as f:
                        size = struct.unpack("<Q", f.read(8))[0]
                        header = json.loads(f.read(size))
                except (OSError, ValueError, struct.error) as e:
                    raise _checkpoint_error(path, None, e) from e
                self._headers[file] = (header, 8 + size)
            return self._headers[file]

    def dtype(self, name: str) -> torch.dtype | None:
        """The stored dtype of `name` (None for one `read_into` cannot read: `get` still can)."""
        header, _ = self._header(self.weight_map[name])
        return DTYPES.get(header[name]["dtype"])

    def shape(self, name: str) -> tuple[int, ...]:
        header, _ = self._header(self.weight_map[name])
        return tuple(header[name]["shape"])

    def read_into(self, name: str, out: torch.Tensor, row: int = 0) -> None:
        """Fill contiguous `out` with rows `row`.. of tensor `name` (all of it by default) in one `pread`.

        `out` must have the stored dtype and a whole number of the tensor's rows; nothing is converted.
        """
        if self.dtype(name) != out.dtype:
            raise ValueError(f"{name} is {self.dtype(name)} in {self.directory / self.weight_map[name]}, the buffer "
                             f"is {out.dtype}")
        path, offset, _ = self.byte_range(name, row, out.numel() * out.dtype.itemsize)
        fd = os.open(path, os.O_RDONLY)
        try:
            pread_into(fd, out, offset, path, name)
        finally:
            os.close(fd)

    def byte_range(self, name: str, row: int, nbytes: int) -> tuple[Path, int, int]:
        """(shard path, file offset, `nbytes`) of the stored bytes of `name` from row `row`; checked to lie inside
        the tensor (whose header must describe whole rows)."""
        file = self.weight_map[name]
        header, data_start = self._header(file)
        entry, path = header[name], self.directory / file
        shape, itemsize = entry["shape"], DTYPES[entry["dtype"]].itemsize
        begin, end = entry["data_offsets"]
        offset = begin + row * itemsize * _numel(shape[1:])
        if nbytes + offset > end or end - begin != _numel(shape) * itemsize:
            raise ValueError(f"{name} {list(shape)}: rows from {row} do not hold {nbytes} bytes")
        return path, data_start + offset, nbytes

    @property
    def total_bytes(self) -> int:
        return sum((self.directory / f).stat().st_size for f in set(self.weight_map.values()))


def shard_file_name(index: int, count: int) -> str:
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return _numel(shape) * dtype.itemsize


def plan_safetensors_shards(specs: Sequence[tuple[str, tuple[int, ...]]], dtype: torch.dtype,
                max_shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Split tensors, in order, into shards of at most `max_shard_bytes` (a larger tensor gets its own)."""
    shards: list[list] = [[]]
    size = 0
    for name, shape in specs:
        nbytes = _nbytes(shape, dtype)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, tuple(shape)))
        size += nbytes
    return shards


@dataclass(frozen=True)
class FileRows:
    """`rows` rows of a tensor whose bytes (in the writer's dtype) are already on disk: (path, file offset, byte
    count) ranges in order, for `ShardedSafetensorsWriter.write_rows` to copy file to file."""
    rows: int
    ranges: tuple[tuple[Path, int, int], ...]


class ShardedSafetensorsWriter:
    """Writes planned tensors into HF shards + `model.safetensors.index.json`, whole or as blocks of rows.

    Each block is written at its planned offset by one of `threads` writer threads while the caller goes on
    (at most `max_pending_bytes` queued; the data is only read, never changed, and a `release` callback says
    when its memory may be reused). Blocks may come in any order (the bytes are fixed by the plan); a shard is
    renamed into place once all its bytes are on disk, the index is written on a clean exit once every tensor
    is complete, and an interrupted run leaves no index that points at missing or partial files.
    """

    def __init__(self, directory: str | Path, specs: Sequence[tuple[str, tuple[int, ...]]], dtype: torch.dtype,
                 max_shard_bytes: int = 5 * 10**9, threads: int = 2, max_pending_bytes: int = 2**30):
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"unsupported safetensors dtype {dtype}; use one of {list(DTYPE_NAMES)}")
        self.directory = Path(directory)
        self.dtype = dtype
        self.shards = plan_safetensors_shards(specs, dtype, max_shard_bytes)
        self._where = {name: (s, shape) for s, shard in enumerate(self.shards) for name, shape in shard}
        self._rows_left = {name: shape[0] if shape else 1 for name, (_, shape) in self._where.items()}
        self._left = [sum(_nbytes(shape, dtype) for _, shape in shard) for shard in self.shards]  # not yet on disk
        self._open: dict[int, WriteBehind] = {}  # by shard: its fd, written back as it is written (rawio: why)
        self._data_start: dict[int, tuple[int, dict[str, int]]] = {}
        self._stacks: dict[int, contextlib.ExitStack] = {}
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="safetensors-write")
        self._pending: collections.deque = collections.deque()  # (future, {shard: nbytes}), in submission order
        self._pending_bytes = 0
        self._max_pending = max_pending_bytes

    def __enter__(self) -> "ShardedSafetensorsWriter":
        self.directory.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._drain(0, raise_errors=exc_type is None)
        finally:
            self._pool.shutdown(wait=True)
            for s in list(self._open):
                os.close(self._open.pop(s).fd)
            for s in list(self._stacks):  # partial shards: atomic_path deletes them
                self._stacks.pop(s).__exit__(exc_type or RuntimeError, exc, tb)
        if exc_type is None:
            missing = [name for name, left in self._rows_left.items() if left]
            if missing:
                raise RuntimeError(f"writer closed with {len(missing)} of {len(self._where)} tensors incomplete, "
                                   f"e.g. {missing[0]}")
            self._write_index()

    def _open_shard(self, s: int) -> None:
        path = self.directory / shard_file_name(s, len(self.shards))
        stack = contextlib.ExitStack()
        tmp = stack.enter_context(atomic_path(path))
        self._stacks[s] = stack
        self._open[s] = WriteBehind(os.open(tmp, os.O_WRONLY | os.O_TRUNC))
        header, offsets, offset = {"__metadata__": {"format": "pt"}}, {}, 0
        for name, shape in self.shards[s]:
            end = offset + _nbytes(shape, self.dtype)
            header[name] = {"dtype": DTYPE_NAMES[self.dtype], "shape": list(shape), "data_offsets": [offset, end]}
            offsets[name] = offset
            offset = end
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
        os.pwrite(self._open[s].fd, struct.pack("<Q", len(raw)) + raw, 0)
        self._data_start[s] = (8 + len(raw), offsets)

    def write(self, name: str, tensor: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """Queue a whole tensor (cast to the writer's dtype), given as one or as blocks of rows that concatenate
        to it (views of a fused matrix: each block is written from its own memory, no copy)."""
        blocks = [tensor] if isinstance(tensor, torch.Tensor) else list(tensor)
        rows = [0]
        for b in blocks[:-1]:
            rows.append(rows[-1] + (b.shape[0] if b.dim() else 1))
        shape = self._where[name][1] if name in self._where else None
        got = (rows[-1] + blocks[-1].shape[0], *blocks[-1].shape[1:]) if blocks[-1].dim() else ()
        if shape is not None and tuple(got) != shape:
            raise RuntimeError(f"{name}: planned {list(shape)}, got {list(got)}")
        self.write_rows([(name, row, b) for row, b in zip(rows, blocks)])

    def write_rows(self, blocks: Sequence[tuple[str, int, "torch.Tensor | FileRows"]], release=None) -> None:
        """Queue (tensor name, first row, rows) blocks as one job, the rows given as a tensor or as `FileRows`
        (copied file to file by the kernel); `release()` runs once they are on disk (or failed): the moment the
        caller may reuse their memory."""
        jobs, shards = [], collections.Counter()
        for name, row, block in blocks:
            if name not in self._where:
                raise RuntimeError(f"{name}: not a planned tensor")
            s, shape = self._where[name]
            row_bytes = _nbytes(shape[1:], self.dtype)
            if isinstance(block, FileRows):
                rows, nbytes, data = block.rows, sum(n for _, _, n in block.ranges), block
                fits = nbytes == rows * row_bytes
            else:
                rows = block.shape[0] if block.dim() else 1
                data = block.detach().to(dtype=self.dtype).contiguous()
                nbytes, fits = data.numel() * self.dtype.itemsize, tuple(block.shape[1:]) == tuple(shape[1:])
            if not fits or row < 0 or row + rows > (shape[0] if shape else 1):
                raise RuntimeError(f"{name} {list(shape)}: a block of {rows} rows ({nbytes} bytes) at row {row} "
                                   "does not fit")
            if rows > self._rows_left[name]:
                raise RuntimeError(f"{name}: more rows written than planned")
            self._rows_left[name] -= rows
            if s not in self._open:
                self._open_shard(s)
            data_start, offsets = self._data_start[s]
            jobs.append((self._open[s], data, data_start + offsets[name] + row * row_bytes))
            shards[s] += nbytes
        nbytes = sum(shards.values())
        self._drain(max(self._max_pending - nbytes, 0))
        self._pending.append((self._pool.submit(self._write_blocks, jobs, release), shards))
        self._pending_bytes += nbytes

    @staticmethod
    def _write_blocks(jobs: list[tuple[WriteBehind, "torch.Tensor | FileRows", int]], release) -> None:
        try:
            for behind, data, offset in jobs:
                if isinstance(data, FileRows):
                    copy_ranges(data.ranges, behind.fd, offset, behind=behind)
                else:
                    behind.written(offset, pwrite_from(behind.fd, data, offset))
        finally:
            if release is not None:
                release()

    def _drain(self, limit: int, raise_errors: bool = True) -> None:
        """Wait for queued writes, oldest first, until at most `limit` bytes are queued; seal finished shards."""
        while self._pending and (self._pending_bytes > limit or limit == 0):
            future, shards = self._pending.popleft()
            self._pending_bytes -= sum(shards.values())
            error = future.exception()
            if error is not None:
                if raise_errors:
                    raise error
                continue
            for s, nbytes in shards.items():
                self._left[s] -= nbytes
                if self._left[s] == 0:
                    os.close(self._open.pop(s).fd)
                    self._stacks.pop(s).close()  # completes atomic_path: renames the finished shard into place

    def _write_index(self) -> None:
        weight_map = {name: shard_file_name(s, len(self.shards)) for name, (s, _) in self._where.items()}
        total = sum(_nbytes(shape, self.dtype) for _, shape in self._where.values())
        write_json(self.directory / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
