"""Hugging Face safetensors checkpoints, read and written one tensor at a time.

An 8B checkpoint is 16 GB in four ~5 GB shards. Reading keeps a shard open only while one tensor is copied
out (safetensors memory-maps the file and every touched page of a mapping that stays open counts towards
the process RSS). Writing streams: the shard plan (which tensor goes in which file, at which byte offset) is
computed up front from the shapes, so each file's header is written first and tensors are appended as
they are produced, instead of collecting 5 GB in memory for `safetensors.torch.save_file`.
"""
from __future__ import annotations

import contextlib
import json
import struct
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open

from megatron_cslm.errors import CslmError
from megatron_cslm.fileio import DataError, atomic_path, write_json

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
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

    @property
    def total_bytes(self) -> int:
        return sum((self.directory / f).stat().st_size for f in set(self.weight_map.values()))


def shard_file_name(index: int, count: int) -> str:
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * dtype.itemsize


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
    """Streams tensors, in the planned order, into HF shards + `model.safetensors.index.json`.

    Use as a context manager; shards are renamed into place as each one completes and the index is written
    on a clean exit, so an interrupted run leaves no index that points at missing or partial files.
    """

    def __init__(self, directory: str | Path, specs: Sequence[tuple[str, tuple[int, ...]]], dtype: torch.dtype,
                 max_shard_bytes: int = 5 * 10**9):
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"unsupported safetensors dtype {dtype}; use one of {list(DTYPE_NAMES)}")
        self.directory = Path(directory)
        self.dtype = dtype
        self.shards = plan_safetensors_shards(specs, dtype, max_shard_bytes)
        self._order = [(s, name, shape) for s, shard in enumerate(self.shards) for name, shape in shard]
        self._next = 0
        self._file = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "ShardedSafetensorsWriter":
        self.directory.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._stack.__exit__(exc_type, exc, tb)  # renames a finished shard, or deletes a partial one
        if exc_type is None:
            if self._next != len(self._order):
                raise RuntimeError(f"writer closed after {self._next} of {len(self._order)} tensors; next would be "
                                   f"{self._order[self._next][1]}")
            self._write_index()

    def _open_shard(self, s: int) -> None:
        path = self.directory / shard_file_name(s, len(self.shards))
        tmp = self._stack.enter_context(atomic_path(path))
        self._file = open(tmp, "wb")
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in self.shards[s]:
            end = offset + _nbytes(shape, self.dtype)
            header[name] = {"dtype": DTYPE_NAMES[self.dtype], "shape": list(shape), "data_offsets": [offset, end]}
            offset = end
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
        self._file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next planned tensor (cast to the writer's dtype)."""
        if self._next >= len(self._order):
            raise RuntimeError(f"{name}: all planned tensors were already written")
        s, expected, shape = self._order[self._next]
        if name != expected or tuple(tensor.shape) != shape:
            raise RuntimeError(f"expected {expected} {list(shape)} next, got {name} {list(tensor.shape)}")
        if self._file is None:
            self._open_shard(s)
        data = tensor.detach().to(dtype=self.dtype).contiguous()
        self._file.write(data.reshape(-1).view(torch.uint8).numpy().data)
        self._next += 1
        if self._next == len(self._order) or self._order[self._next][0] != s:
            self._file.flush()
            self._file.close()
            self._file = None
            self._stack.close()  # completes atomic_path: renames the finished shard into place
            self._stack = contextlib.ExitStack()

    def _write_index(self) -> None:
        weight_map = {name: shard_file_name(s, len(self.shards)) for s, name, _ in self._order}
        total = sum(_nbytes(shape, self.dtype) for _, _, shape in self._order)
        write_json(self.directory / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
