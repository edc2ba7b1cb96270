"""Hugging Face safetensors checkpoints, read and written one tensor at a time, at the disk's speed.

An 8B checkpoint is 16 GB in four ~5 GB shards. Reading: `read_into` copies a tensor's bytes (or a block of
its rows) from the page cache straight into the caller's buffer with `pread`, using the offsets of the shard's
own header; no mapping stays open, so RSS holds only the buffers (a mapping that stays open counts every
touched page), and the caller can place rows where the output wants them (fused matrices need no `cat`).
Writing: the shard plan (which tensor goes in which file, at which byte offset) is computed up front from
the shapes, so each file's header is written first and every tensor is written at its planned offset with
`pwrite` by a small pool of threads, straight from the tensor's memory (or from several row blocks of it:
views need no copy), while the caller produces the next one. Files are byte for byte what a serial writer
writes (the layout is fixed by the plan, not by which thread finishes first); each shard appears under its
name only once complete, and the index only once every shard is.
"""
from __future__ import annotations

import collections
import contextlib
import json
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open

from megatron_cslm.convert.rawio import pread_into, pwrite_from
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
        file = self.weight_map[name]
        header, data_start = self._header(file)
        entry, path = header[name], self.directory / file
        dtype, shape = DTYPES.get(entry["dtype"]), entry["shape"]
        if dtype != out.dtype:
            raise ValueError(f"{name} is {entry['dtype']} in {path}, the buffer is {out.dtype}")
        row_bytes = out.dtype.itemsize * _numel(shape[1:])
        begin, end = entry["data_offsets"]
        offset = begin + row * row_bytes
        if out.numel() * out.dtype.itemsize + offset > end or end - begin != _numel(shape) * out.dtype.itemsize:
            raise ValueError(f"{name} {list(shape)}: rows from {row} do not hold a buffer of {list(out.shape)}")
        fd = os.open(path, os.O_RDONLY)
        try:
            pread_into(fd, out, data_start + offset, path, name)
        finally:
            os.close(fd)

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


class ShardedSafetensorsWriter:
    """Writes tensors, in the planned order, into HF shards + `model.safetensors.index.json`.

    Each tensor is written at its planned offset by one of `threads` writer threads while the caller goes
    on (at most `max_pending_bytes` queued; the tensor is only read, never changed). Use as a context
    manager: a shard is renamed into place when its last tensor is on disk, the index is written on a clean
    exit, and an interrupted run leaves no index that points at missing or partial files.
    """

    def __init__(self, directory: str | Path, specs: Sequence[tuple[str, tuple[int, ...]]], dtype: torch.dtype,
                 max_shard_bytes: int = 5 * 10**9, threads: int = 2, max_pending_bytes: int = 2**30):
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"unsupported safetensors dtype {dtype}; use one of {list(DTYPE_NAMES)}")
        self.directory = Path(directory)
        self.dtype = dtype
        self.shards = plan_safetensors_shards(specs, dtype, max_shard_bytes)
        self._order = [(s, name, shape) for s, shard in enumerate(self.shards) for name, shape in shard]
        self._next = 0
        self._left = [len(shard) for shard in self.shards]  # tensors of each shard not yet on disk
        self._fds: dict[int, int] = {}
        self._data_start: dict[int, tuple[int, dict[str, int]]] = {}
        self._stacks: dict[int, contextlib.ExitStack] = {}
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="safetensors-write")
        self._pending: collections.deque = collections.deque()  # (future, shard, nbytes), in submission order
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
            for s in list(self._fds):
                os.close(self._fds.pop(s))
            for s in list(self._stacks):  # partial shards: atomic_path deletes them
                self._stacks.pop(s).__exit__(exc_type or RuntimeError, exc, tb)
        if exc_type is None:
            if self._next != len(self._order):
                raise RuntimeError(f"writer closed after {self._next} of {len(self._order)} tensors; next would be "
                                   f"{self._order[self._next][1]}")
            self._write_index()

    def _open_shard(self, s: int) -> None:
        path = self.directory / shard_file_name(s, len(self.shards))
        stack = contextlib.ExitStack()
        tmp = stack.enter_context(atomic_path(path))
        self._stacks[s] = stack
        self._fds[s] = os.open(tmp, os.O_WRONLY | os.O_TRUNC)
        header, offsets, offset = {"__metadata__": {"format": "pt"}}, {}, 0
        for name, shape in self.shards[s]:
            end = offset + _nbytes(shape, self.dtype)
            header[name] = {"dtype": DTYPE_NAMES[self.dtype], "shape": list(shape), "data_offsets": [offset, end]}
            offsets[name] = offset
            offset = end
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
        os.pwrite(self._fds[s], struct.pack("<Q", len(raw)) + raw, 0)
        self._data_start[s] = (8 + len(raw), offsets)

    def write(self, name: str, tensor: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """Queue the next planned tensor (cast to the writer's dtype), given whole or as blocks of rows that
        concatenate to it (views of a fused matrix: each block is written from its own memory, no copy)."""
        blocks = [tensor] if isinstance(tensor, torch.Tensor) else list(tensor)
        if self._next >= len(self._order):
            raise RuntimeError(f"{name}: all planned tensors were already written")
        s, expected, shape = self._order[self._next]
        got = (sum(b.shape[0] for b in blocks), *blocks[0].shape[1:]) if blocks[0].dim() else tuple(blocks[0].shape)
        if name != expected or tuple(got) != shape or any(b.shape[1:] != blocks[0].shape[1:] for b in blocks):
            raise RuntimeError(f"expected {expected} {list(shape)} next, got {name} {list(got)}")
        if s not in self._fds:
            self._open_shard(s)
        data_start, offsets = self._data_start[s]
        offset = data_start + offsets[name]
        data = [b.detach().to(dtype=self.dtype).contiguous() for b in blocks]
        nbytes = sum(d.numel() for d in data) * self.dtype.itemsize
        self._drain(max(self._max_pending - nbytes, 0))
        self._pending.append((self._pool.submit(self._write_blocks, self._fds[s], data, offset), s, nbytes))
        self._pending_bytes += nbytes
        self._next += 1

    @staticmethod
    def _write_blocks(fd: int, blocks: list[torch.Tensor], offset: int) -> None:
        for block in blocks:
            offset += pwrite_from(fd, block, offset)

    def _drain(self, limit: int, raise_errors: bool = True) -> None:
        """Wait for queued writes, oldest first, until at most `limit` bytes are queued; seal finished shards."""
        while self._pending and (self._pending_bytes > limit or limit == 0):
            future, s, nbytes = self._pending.popleft()
            self._pending_bytes -= nbytes
            error = future.exception()
            if error is not None:
                if raise_errors:
                    raise error
                continue
            self._left[s] -= 1
            if self._left[s] == 0:
                os.close(self._fds.pop(s))
                self._stacks.pop(s).close()  # completes atomic_path: renames the finished shard into place

    def _write_index(self) -> None:
        weight_map = {name: shard_file_name(s, len(self.shards)) for s, name, _ in self._order}
        total = sum(_nbytes(shape, self.dtype) for _, _, shape in self._order)
        write_json(self.directory / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
