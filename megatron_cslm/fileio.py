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

from megatron_cslm.errors import CslmError

# The project's one error type (megatron_cslm/errors.py). `DataError` is the same class under the name its
# twenty readers import: their ``DataError(path, line, field, message)`` calls are CslmError's positional form.
DataError = CslmError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_dirs(directory: str | os.PathLike) -> Path:
    """`mkdir -p directory`, or one located `io` error (exit 5) when a regular file stands where a folder of the
    path should be, or the folder cannot be created: an output path under a file is a usage mistake, not a bug."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in (directory, *directory.parents) if p.exists() and not p.is_dir()), directory)
        raise CslmError(directory, None, None, f"cannot be created: {blocker} is a file, not a folder", kind="io",
                        reason="unwritable") from None
    except PermissionError as e:
        raise CslmError(directory, None, None, f"cannot be created: permission denied ({e.filename})", kind="io",
                        reason="unwritable") from None
    return directory


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    if path.is_dir():
        raise CslmError(path, None, None, "is a directory: give a file name for the output", kind="io",
                        reason="unwritable")
    make_dirs(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except PermissionError as e:
        raise CslmError(path, None, None, f"cannot be written: permission denied ({e.filename})", kind="io",
                        reason="unwritable") from None
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


def _open_bytes(path: str | os.PathLike) -> io.BufferedIOBase:
    path = str(path)
    try:
        return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")
    except FileNotFoundError:
        raise DataError(path, None, None, "file not found", reason="unreadable") from None
    except IsADirectoryError:
        raise DataError(path, None, None, "is a directory, expected a file", reason="unreadable") from None


def _decoded_lines(path: str | os.PathLike) -> Iterator[tuple[int, str | CslmError]]:
    """`(line_number, text)` per line, decoded one line at a time; a line that is not UTF-8 comes back as a
    located DataError value (reason ``not_utf8``) so callers choose between stopping and skipping."""
    with _open_bytes(path) as f:
        lineno = 0
        while True:
            lineno += 1
            try:
                raw = f.readline()
            except (EOFError, gzip.BadGzipFile, OSError) as e:
                raise DataError(path, lineno, None, f"unreadable compressed data ({e})", reason="unreadable") from None
            if not raw:
                return
            try:
                yield lineno, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                yield lineno, DataError(path, lineno, None, f"not valid UTF-8 ({e.reason} at byte {e.start} of the "
                                                            "line)", reason="not_utf8")


def iter_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """Stream `(line_number, text)` of a UTF-8 (or .gz) text file, 1-based, without the line ending.

    Bytes are read and decoded one line at a time, so invalid UTF-8 is reported (DataError) on the line that
    holds it, with the byte offset within that line; text-mode reading decodes ahead and cannot do that.
    """
    for lineno, text in _decoded_lines(path):
        if isinstance(text, CslmError):
            raise text
        yield lineno, text


def parse_json_line(path: str | os.PathLike, lineno: int, text: str) -> dict:
    """The JSON object on one line, or a DataError (reason ``malformed_json``) naming file and line."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, lineno, None, f"malformed JSON: {e.msg} (column {e.colno})",
                        reason="malformed_json") from None
    if not isinstance(record, dict):
        raise DataError(path, lineno, None, f"expected a JSON object, got {type(record).__name__}",
                        reason="malformed_json")
    return record


def iter_jsonl(path: str | os.PathLike, skipped: SkipCounter | None = None) -> Iterator[tuple[int, dict]]:
    """Stream `(line_number, record)` from a JSONL (or .jsonl.gz) file; blank lines are ignored.

    A malformed line (invalid UTF-8, malformed JSON, not an object) raises DataError naming the file and line,
    unless `skipped` is given (the tool's --skip-bad-records): then the line is counted there as read and as
    skipped under the error's reason, and reading goes on. The caller counts only the records it receives, so
    ``read == written + skipped`` holds over both.
    """
    for lineno, text in _decoded_lines(path):
        error = text if isinstance(text, CslmError) else None
        if error is None:
            if not text.strip():
                continue
            try:
                record = parse_json_line(path, lineno, text)
            except CslmError as e:
                error = e
        if error is None:
            yield lineno, record
        elif skipped is None:
            raise error
        else:
            skipped.read += 1
            skipped.skip(error.reason, str(error))


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
