"""Tensor bytes moved between files and memory with one copy, through a few reused buffers, with a bounded
read-ahead, for the converters.

Why: conversion is I/O bound only when nothing else is in the way. `pread_into` fills a caller's buffer
straight from the page cache (no mapping kept open, so nothing counts towards RSS after it returns; no
intermediate `bytes`), `copy_range` moves bytes file to file inside the kernel (no user memory at all),
`pwrite_from` writes a tensor's memory as is at an absolute file offset (so several
threads can fill one file whose layout was planned up front), and `read_ahead` runs the reading of the next
groups in a background thread while the caller writes the current one. Every call here releases the GIL
while the kernel copies, which is what lets reading, converting and writing overlap on threads.

`WriteBehind` keeps the page cache out of the way: a conversion reads and writes each byte once, so nothing it
touches is worth caching, and a page cache full of its dirty output is what stalls it. Left to the kernel, the
output piles up until the dirty threshold (10% of memory starts background write-back), after which every
writer is paced by `balance_dirty_pages` to a write-back rate it estimates, far below the disk's (measured
here: the last 1 GB of an 8B head went at 0.1 GB/s, while the same disk took 3.8 GB in 3.5 s once each range
was written back as soon as it was written). So each written range's write-back starts at once
(`posix_fadvise(DONTNEED)` on dirty pages submits them without waiting), and a range `lag` bytes behind is
dropped (clean by then); `copy_ranges` drops the input ranges it has consumed. Pages freed this way are the
next ones allocated, so a conversion also runs in a small, warm set of page-cache pages, which matters on VMs
that hand freed memory back to their host (a fresh page there costs a host fault).

`BufferPool` is the converters' whole working set: a few buffers allocated once and handed round, so a
conversion streams any checkpoint through a fixed amount of memory. Fresh memory is what costs: glibc maps
and unmaps every large allocation, so each new 1 GB tensor faults in 1 GB of new pages (0.2-0.5 s/GB on a
server, ~9 s/GB on a VM that hands freed pages back to its host), more than the disk takes to write it.

Invariants: offsets and lengths are bytes; a short read means a truncated file and raises a CslmError
naming it; `read_ahead` yields results in submission order and never holds more than `depth` of them.
"""
from __future__ import annotations

import collections
import errno
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

import torch

from megatron_cslm.errors import CslmError

T = TypeVar("T")


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    if not t.is_contiguous():
        raise ValueError(f"tensor of shape {list(t.shape)} and strides {list(t.stride())} is not contiguous")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


def pread_into(fd: int, out: torch.Tensor, offset: int, path: str | Path, what: str | None = None) -> None:
    """Fill contiguous `out` with the bytes at `offset` of the open file `fd` (named `path` in errors)."""
    view, done = tensor_bytes(out), 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise CslmError(path, None, what, f"truncated or corrupt: {len(view)} bytes expected at offset {offset}, "
                            f"the file ends after {done}", kind="checkpoint", reason="corrupt_shard")
        done += n


def pwrite_from(fd: int, t: torch.Tensor, offset: int) -> int:
    """Write contiguous `t` at `offset` of `fd`; returns the byte count."""
    view, done = tensor_bytes(t), 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
    return done


def copy_range(src: int, dst: int, nbytes: int, src_offset: int, dst_offset: int, path: str | Path,
               what: str | None = None) -> None:
    """Copy `nbytes` at `src_offset` of open file `src` to `dst_offset` of `dst`, inside the kernel.

    Why: bytes that pass through user memory (pread, then write) cost 3-5x more kernel time than
    `copy_file_range` on the VMs measured (a plain copy's sendfile is what the disk-speed target is measured
    against), and touch no anonymous memory at all here. Falls back to pread/pwrite where the kernel or file
    system cannot (EXDEV, ENOSYS, ...)."""
    done = 0
    while done < nbytes:
        try:
            n = os.copy_file_range(src, dst, nbytes - done, src_offset + done, dst_offset + done)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF):
                raise
            n = os.pwrite(dst, os.pread(src, min(nbytes - done, 2**20), src_offset + done), dst_offset + done)
        if n == 0:
            raise CslmError(path, None, what, f"truncated or corrupt: {nbytes} bytes expected at offset {src_offset}, "
                            f"the file ends after {done}", kind="checkpoint", reason="corrupt_shard")
        done += n


def drop_cached(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to drop these bytes of `fd` from the page cache; dirty pages are not dropped but their
    write-back starts (without waiting for it). Only pages wholly inside the range go, so a page shared with a
    neighbouring range stays. Advice only: a no-op where the platform or file system has none."""
    if nbytes > 0 and hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass


WRITE_BEHIND_BYTES = 256 * 2**20  # written bytes left in the page cache while their write-back runs


class WriteBehind:
    """Write-back of an output file as it is written: each range `written` starts going to disk at once, and is
    dropped from the page cache once `lag_bytes` more have been written after it (module docstring: why).
    Thread-safe; several threads may write one file at planned offsets."""

    def __init__(self, fd: int, lag_bytes: int = WRITE_BEHIND_BYTES):
        self.fd, self.lag_bytes = fd, lag_bytes
        self._ranges: collections.deque = collections.deque()
        self._bytes = 0
        self._lock = threading.Lock()

    def written(self, offset: int, nbytes: int) -> None:
        drop_cached(self.fd, offset, nbytes)  # dirty: this submits the range for write-back
        done = []
        with self._lock:
            self._ranges.append((offset, nbytes))
            self._bytes += nbytes
            while self._bytes > self.lag_bytes:
                done.append(self._ranges.popleft())
                self._bytes -= done[-1][1]
        for start, length in done:  # written back by now (or nearly): their pages go
            drop_cached(self.fd, start, length)


def copy_ranges(ranges: Iterable[tuple[str | Path, int, int]], dst: int, dst_offset: int,
                what: str | None = None, behind: WriteBehind | None = None) -> int:
    """Copy (path, file offset, byte count) source ranges, in order, to consecutive bytes of `dst` from
    `dst_offset` (`copy_range` each, the source opened for its copy only); returns the offset after them.
    Each source range is dropped from the page cache once copied (a conversion reads it once), and `behind`,
    if given, is told of each range written."""
    for path, start, nbytes in ranges:
        src = os.open(path, os.O_RDONLY)
        try:
            copy_range(src, dst, nbytes, start, dst_offset, path, what)
            drop_cached(src, start, nbytes)
        finally:
            os.close(src)
        if behind is not None:
            behind.written(dst_offset, nbytes)
        dst_offset += nbytes
    return dst_offset


def read_ahead(tasks: Iterable[Callable[[], T]], depth: int = 1) -> Iterator[T]:
    """Results of `tasks`, in order, computed in a background thread up to `depth` tasks ahead of the consumer.

    The consumer's own work (writing) overlaps the next reads; memory is bounded by depth + 1 results. An
    exception in a task is raised at its place in the order; leaving the loop early cancels what is queued.
    """
    pending: collections.deque = collections.deque()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead") as pool:
        try:
            for task in tasks:
                pending.append(pool.submit(task))
                if len(pending) > depth:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


class BufferPool:
    """`count` byte buffers of `nbytes` each, allocated once; `acquire` blocks until one is free.

    Holders view a prefix of a buffer in any dtype and shape (`view`) and give it back with `release` once
    its bytes are written, so the pool bounds a conversion's memory and no chunk costs fresh pages.
    """

    def __init__(self, nbytes: int, count: int):
        self.nbytes = nbytes
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(count):
            self._free.put(torch.empty(nbytes, dtype=torch.uint8))

    def acquire(self) -> torch.Tensor:
        return self._free.get()

    def release(self, buffer: torch.Tensor) -> None:
        self._free.put(buffer)

    def releaser(self, buffer: torch.Tensor) -> Callable[[], None]:
        """A call that gives `buffer` back once, however often it runs (success and failure paths may both)."""
        once = threading.Lock()

        def release() -> None:
            if once.acquire(blocking=False):
                self.release(buffer)
        return release

    def view(self, buffer: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...], at: int = 0) -> torch.Tensor:
        """Contiguous `dtype` tensor of `shape` over the buffer's bytes from `at` (which must be aligned)."""
        nbytes = dtype.itemsize * _numel(shape)
        if at % dtype.itemsize or at + nbytes > self.nbytes:
            raise ValueError(f"{list(shape)} {dtype} at byte {at} does not fit a {self.nbytes}-byte buffer")
        return buffer[at:at + nbytes].view(dtype).view(shape)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
