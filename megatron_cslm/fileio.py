"""File I/O shared by every tool: atomic outputs, streamed JSONL with located errors, skip accounting.

Outputs are written to a temporary sibling and renamed into place so an interrupted job never leaves a
file that looks complete. Input errors name the file, the line and the field, because corpora are large
and "KeyError: 'units'" tells a user nothing about which of 40 shards is broken.
"""
from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Iterator


class DataError(ValueError):
    """Bad input data, located by file, line and field."""

    def __init__(self, path: str | os.PathLike, line: int | None, field: str | None, message: str):
        self.path, self.line, self.field, self.reason = str(path), line, field, message
        where = self.path + (f":{line}" if line is not None else "")
        what = f" field '{field}'" if field else ""
        super().__init__(f"{where}:{what} {message}")

    def __reduce__(self):  # picklable, so an error raised in a worker process reaches the parent intact
        return DataError, (self.path, self.line, self.field, self.reason)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs should be shared like any other file
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[io.IOBase]:
    """Open a temporary file for writing that replaces `path` atomically on success."""
    binary = "b" in mode
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=None if binary else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically, pretty-printed (stats and configs are read by people)."""
    with atomic_open(path) as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def open_text(path: str | os.PathLike) -> io.TextIOBase:
    """Open a UTF-8 text file for streaming, transparently gunzipping `.gz`."""
    path = str(path)
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="strict")
    return open(path, "r", encoding="utf-8", errors="strict")


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Stream `(line_number, record)` from a JSONL (or .jsonl.gz) file; blank lines are ignored.

    Raises DataError naming the file and line for malformed JSON, non-object records or non-UTF-8 bytes.
    """
    with open_text(path) as f:
        lineno = 0
        while True:
            lineno += 1
            try:
                line = f.readline()
            except UnicodeDecodeError as e:
                raise DataError(path, lineno, None, f"not valid UTF-8 ({e.reason} at byte {e.start})") from e
            if not line:
                return
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(path, lineno, None, f"malformed JSON: {e.msg} (column {e.colno})") from e
            if not isinstance(record, dict):
                raise DataError(path, lineno, None, f"expected a JSON object, got {type(record).__name__}")
            yield lineno, record


def require(record: dict, field: str, kind: type | tuple[type, ...], path: str | os.PathLike, line: int) -> Any:
    """Return record[field], checking presence and type, or raise a located DataError."""
    if field not in record:
        raise DataError(path, line, field, "missing")
    value = record[field]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError(path, line, field, f"expected {names}, got {type(value).__name__}")
    return value


class SkipCounter:
    """Counts records read, written and skipped by reason, so `read == written + sum(skipped)` is checkable."""

    def __init__(self) -> None:
        self.read = 0
        self.written = 0
        self.skipped: Counter[str] = Counter()
        self.examples: dict[str, str] = {}

    def skip(self, reason: str, detail: str = "") -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, detail)

    def merge(self, other: "SkipCounter") -> None:
        self.read += other.read
        self.written += other.written
        self.skipped.update(other.skipped)
        for k, v in other.examples.items():
            self.examples.setdefault(k, v)

    def as_dict(self) -> dict:
        return {"read": self.read, "written": self.written, "skipped": dict(self.skipped),
                "skipped_total": sum(self.skipped.values()), "first_example_per_reason": self.examples}

    def summary(self) -> str:
        parts = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return f"read={self.read} written={self.written} skipped={sum(self.skipped.values())} ({parts})"
