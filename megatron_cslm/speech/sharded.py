"""Tokenizing a speech source over many processes and nodes: per-rank part files, resume, merge in input order.

Layout beside the output `units.jsonl`:
    units.jsonl.parts/part-RRRRR-of-WWWWW.jsonl         rank R's records (appended chunk by chunk, fsynced)
    units.jsonl.parts/part-RRRRR-of-WWWWW.rejects.tsv   rank R's rejects of this run (id, audio, reason, detail)
    units.jsonl.parts/part-RRRRR-of-WWWWW.stats.json    written when rank R is done: its counts and speed
    units.jsonl.parts/part-RRRRR-of-WWWWW.progress      items rank R has handled (rank 0's global progress bar)

A rank's run (`tokenize_rank`) is a pipeline of one-job parts: `PendingItems` (its items not yet done, ids checked
unique) -> `decoded_chunks` (forked decode workers, chunks prefetched) -> `extract_chunk` (units, records,
rejects) -> `ChunkWriter` (appends and fsyncs, counts, writes rejects and stats). `tokenize_speech` runs it and
merges (`merge_parts`).

Invariants:
- Item k of the source belongs to rank k mod W. That split does not depend on what is already done, so every
  rank computes the same split without talking to the others, and a rank only ever appends its own items.
- An item whose id is in any part file (of any world size) or in the merged output is done and skipped: a run
  resumes after a crash and after a change of world size. Rejected items are retried by the next run.
- The merged output holds the part lines verbatim, in the source's order, so 1 process and N processes give
  byte-identical files. It is written (atomically) only once every item is written or rejected by the current
  world's ranks; the parts are then removed.
"""
from __future__ import annotations

import collections
import contextlib
import datetime
import fcntl
import itertools
import json
import logging
import multiprocessing
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Container, Iterable, Iterator

import numpy as np
import torch

from megatron_cslm.fileio import DataError, SkipCounter, atomic_open, write_json
from megatron_cslm.speech.audio import SAMPLE_RATE, AudioLimits, AudioRejected, to_16k
from megatron_cslm.speech.extract import UnitExtractor
from megatron_cslm.speech.identity import IDENTITY_KEY, SpeechTokenizerId
from megatron_cslm.speech.runs import unit_runs
from megatron_cslm.speech.sources import SpeechItem, source_size

log = logging.getLogger(__name__)
REJECTS_HEADER = "id\taudio\treason\tdetail\n"


@dataclass(frozen=True)
class JobRank:
    """This process's place in the job: rank `rank` of `world`; `distributed` when torch.distributed is used.

    (Not data/indexed.py's `Shard`, a byte range of an input file.)"""

    rank: int = 0
    world: int = 1
    distributed: bool = False

    @classmethod
    def resolve(cls, shard_index: int | None = None, num_shards: int | None = None) -> "JobRank":
        """From torchrun's RANK/WORLD_SIZE, or the SLURM-array form --shard-index K --num-shards N."""
        env_world = int(os.environ.get("WORLD_SIZE", "1"))
        if shard_index is not None or num_shards is not None:
            if shard_index is None or num_shards is None or not 0 <= shard_index < num_shards:
                raise ValueError(f"need 0 <= --shard-index < --num-shards, got {shard_index} and {num_shards}")
            if env_world > 1:
                raise ValueError("--shard-index/--num-shards are for independent jobs (SLURM arrays); "
                                 "under torchrun the ranks come from RANK and WORLD_SIZE")
            return cls(shard_index, num_shards)
        if env_world > 1:
            return cls(int(os.environ["RANK"]), env_world, distributed=True)
        return cls()


class PartFiles:
    """The files of one rank of one world size (see the module docstring)."""

    def __init__(self, output: Path, rank: int, world: int):
        self.dir = parts_dir(output)
        stem = f"part-{rank:05d}-of-{world:05d}"
        self.units = self.dir / f"{stem}.jsonl"
        self.rejects = self.dir / f"{stem}.rejects.tsv"
        self.stats = self.dir / f"{stem}.stats.json"
        self.progress = self.dir / f"{stem}.progress"


def parts_dir(output: Path) -> Path:
    return output.with_name(output.name + ".parts")


def drop_partial_tail(path: Path) -> None:
    """Cut an incomplete last line (a run killed mid-write) off a file this process is about to append to."""
    if not path.exists():
        return
    with open(path, "rb+") as f:
        size = end = f.seek(0, os.SEEK_END)
        while end > 0:  # scan back from the end for the last newline
            start = max(0, end - (1 << 20))
            f.seek(start)
            newline = f.read(end - start).rfind(b"\n")
            if newline >= 0:
                end = start + newline + 1
                break
            end = start
        if end < size:
            log.warning("%s: dropping an incomplete last line (%d bytes) from an interrupted run", path, size - end)
            f.truncate(end)


def complete_lines(path: Path) -> Iterator[tuple[int, int, bytes]]:
    """(line number, byte offset, line) of every newline-terminated line; a partial last line is not read."""
    offset = 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                return
            yield number, offset, line
            offset += len(line)


def written_index(output: Path, label: str) -> dict[str, tuple[Path, int, int]]:
    """id -> (file, offset, length) of every record in the merged output and in any part file.

    Refuses records of another tokenizer: resuming would mix two unit vocabularies.
    """
    files = [output] if output.exists() else []
    files += sorted(parts_dir(output).glob("part-*-of-*.jsonl"))
    index: dict[str, tuple[Path, int, int]] = {}
    for path in files:
        for number, offset, line in complete_lines(path):
            id_, tokenizer = _id_and_tokenizer(line, path, number)
            if tokenizer != label:
                raise DataError(path, number, "tokenizer", f"{tokenizer!r} differs from this run's "
                                                           f"{label!r}: resuming would mix units of two tokenizers")
            index.setdefault(id_, (path, offset, len(line)))
    return index


_ID_PREFIX, _TOKENIZER_KEY = b'{"id": ', b', "tokenizer": '
_DECODER = json.JSONDecoder()


def _id_and_tokenizer(line: bytes, path: Path, number: int) -> tuple[str, str | None]:
    """A record's id and tokenizer without parsing its units: resume scans every line of every part file.

    Lines are written by `unit_record` (id first, tokenizer among the last keys); anything else is parsed whole.
    """
    text = line.decode("utf-8")
    tail = line.rfind(_TOKENIZER_KEY)
    if line.startswith(_ID_PREFIX) and tail > 0:
        try:
            id_, _ = _DECODER.raw_decode(text, len(_ID_PREFIX))
            tokenizer, _ = _DECODER.raw_decode(line[tail + len(_TOKENIZER_KEY):].decode("utf-8"))
            if isinstance(id_, str):
                return id_, tokenizer
        except json.JSONDecodeError:
            pass
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, number, None, f"malformed JSON: {e.msg}") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("id"), str):
        raise DataError(path, number, "id", "missing or not a string")
    return rec["id"], rec.get("tokenizer")


def unit_record(item: SpeechItem, units: list[int], num_samples: int, dedup: bool, label: str,
                identity: SpeechTokenizerId | None = None) -> dict:
    """One output line: the item's metadata, its units (run-length merged with `dedup`) and bookkeeping, with the
    speech tokenizer's identity (`speech_tokenizer`, after `tokenizer`: every later join compares it)."""
    rec = {"id": item.id, "audio": item.audio, "text": item.text, "lang": item.lang, "speaker": item.speaker,
           **item.extra}
    if dedup:
        merged, durations = unit_runs(units)
        rec.update(units=merged, durations=durations)
    else:
        rec["units"] = units
    rec.update(num_frames=len(units), sample_rate=SAMPLE_RATE, tokenizer=label,
               duration_s=round(num_samples / SAMPLE_RATE, 4))
    if identity is not None:
        rec[IDENTITY_KEY] = identity.to_dict()
    return rec


# A decode worker's source and limits, set by the pool's initializer in the worker process itself (forked: the
# source is inherited, never pickled); the parent process never touches it.
_WORKER_STATE: dict = {}


def _init_worker(source, limits: AudioLimits) -> None:
    torch.set_num_threads(1)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the pool ends workers with SIGTERM: no inherited handler
    _WORKER_STATE.update(source=source, limits=limits)


def _decode_in_worker(item: SpeechItem) -> np.ndarray | AudioRejected:
    return decode_item(_WORKER_STATE["source"], item, _WORKER_STATE["limits"])


def decode_item(source, item: SpeechItem, limits: AudioLimits) -> np.ndarray | AudioRejected:
    """Decode, check and resample one item to 16 kHz; returns the rejection instead of raising."""
    try:
        audio, rate = source.load(item, limits)
        return to_16k(audio, rate).numpy()
    except AudioRejected as e:
        return e
    except Exception as e:  # noqa: BLE001 - any decoder failure is this item's problem, not the run's
        return AudioRejected("unreadable", f"{type(e).__name__}: {e}")


def _chunks(items: Iterable[SpeechItem], size: int) -> Iterator[list[SpeechItem]]:
    chunk: list[SpeechItem] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class PendingItems:
    """This rank's items that no part file or merged output holds yet, in source order (an iterable).

    Checks that ids are unique over the whole source (every rank reads all of it) and counts in `already` the
    rank's items that are done."""

    def __init__(self, source, written: Container[str], rank: JobRank):
        self.source, self.written, self.rank = source, written, rank
        self.already = 0

    def __iter__(self) -> Iterator[SpeechItem]:
        seen: set[str] = set()
        for item in self.source:
            if item.id in seen:
                raise DataError(getattr(self.source, "where", "source"), item.index, "id",
                                f"duplicate id {item.id!r}")
            seen.add(item.id)
            if item.index % self.rank.world != self.rank.rank:
                continue
            if item.id in self.written:
                self.already += 1
                continue
            yield item


def decoded_chunks(items: Iterable[SpeechItem], source, limits: AudioLimits, workers: int = 0,
                   chunk_items: int = 64, prefetch_chunks: int = 2) -> Iterator[tuple[list[SpeechItem], list]]:
    """(chunk, its waves or AudioRejected per item) in order: `workers` forked processes decode up to
    `prefetch_chunks` chunks ahead of the consumer (0: in this process). The pool ends with the generator."""
    chunks = _chunks(items, chunk_items)
    if workers <= 0:
        for chunk in chunks:
            yield chunk, [decode_item(source, item, limits) for item in chunk]
        return
    pool = multiprocessing.get_context("fork").Pool(workers, initializer=_init_worker, initargs=(source, limits))
    try:
        pending: collections.deque = collections.deque()
        for chunk in itertools.islice(chunks, max(1, prefetch_chunks)):
            pending.append((chunk, pool.map_async(_decode_in_worker, chunk)))
        while pending:
            chunk, result = pending.popleft()
            decoded = result.get()
            following = next(chunks, None)
            if following is not None:
                pending.append((following, pool.map_async(_decode_in_worker, following)))
            yield chunk, decoded
    finally:
        pool.terminate()


def extract_chunk(extractor: UnitExtractor, chunk: list[SpeechItem], decoded: list, dedup: bool
                  ) -> tuple[list[dict], list[tuple[SpeechItem, AudioRejected]], float]:
    """Unit records of a chunk's decoded items, its rejects, and the seconds of audio tokenized."""
    good = [(item, wave) for item, wave in zip(chunk, decoded) if not isinstance(wave, AudioRejected)]
    rejects = [(item, wave) for item, wave in zip(chunk, decoded) if isinstance(wave, AudioRejected)]
    unit_lists = extractor([torch.from_numpy(wave) for _, wave in good])
    records = [unit_record(item, units, wave.size, dedup, extractor.label, getattr(extractor, "identity", None))
               for (item, wave), units in zip(good, unit_lists)]
    return records, rejects, sum(wave.size for _, wave in good) / SAMPLE_RATE


def speed(audio_seconds: float, wall_seconds: float) -> dict:
    """Audio hours, hours of audio per wall second and the real-time factor (wall / audio; < 1 is faster)."""
    return {"audio_seconds": round(audio_seconds, 3), "audio_hours": round(audio_seconds / 3600, 6),
            "wall_seconds": round(wall_seconds, 3),
            "hours_per_second": round(audio_seconds / 3600 / wall_seconds, 8) if wall_seconds else None,
            "rtf": round(wall_seconds / audio_seconds, 6) if audio_seconds else None}


class _Progress:
    """tqdm on rank 0 with counts summed over all ranks' progress files; other ranks only write theirs."""

    def __init__(self, files: PartFiles, output: Path, shard: JobRank, total: int | None, enabled: bool):
        from tqdm import tqdm

        self.files, self.shard, self.done = files, shard, 0
        self.others = [PartFiles(output, r, shard.world).progress for r in range(shard.world) if r != shard.rank]
        self.bar = tqdm(total=total, unit="item", desc=f"tokenize ({shard.world} ranks)",
                        disable=not enabled or shard.rank != 0)

    def update(self, n: int) -> None:
        self.done += n
        self.files.progress.write_text(str(self.done))
        if not self.bar.disable:
            others = 0
            for path in self.others:
                with contextlib.suppress(OSError, ValueError):
                    others += int(path.read_text() or 0)
            self.bar.update(self.done + others - self.bar.n)

    def close(self) -> None:
        self.bar.close()


class ChunkWriter:
    """Appends a rank's records to its part file chunk by chunk (whole lines, flushed and fsynced: a crash loses
    at most the chunk being written); counts read = written + rejected (by reason) and keeps the rejects, which
    `finish` writes with the stats (the rank's "done" marker)."""

    def __init__(self, files: PartFiles):
        self.files = files
        self.counter, self.rejected, self.audio_seconds = SkipCounter(), [], 0.0
        self.clipped_to_end = 0  # written records whose span was clipped to the recording's end (sources.py)
        self.out = None

    def __enter__(self) -> "ChunkWriter":
        self.out = open(self.files.units, "a", encoding="utf-8")
        return self

    def __exit__(self, *exc) -> None:
        self.out.close()

    def write(self, records: list[dict], rejects: list[tuple[SpeechItem, AudioRejected]], audio_seconds: float
              ) -> None:
        self.counter.read += len(records) + len(rejects)
        for item, rejected in rejects:
            self.counter.skip(rejected.reason, f"{item.id}: {rejected.detail}")
            self.rejected.append((item.id, item.audio, rejected.reason, rejected.detail))
        self.out.writelines(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records)
        self.out.flush()
        os.fsync(self.out.fileno())
        self.counter.written += len(records)
        self.audio_seconds += audio_seconds
        self.clipped_to_end += sum("clipped_to_end_s" in rec for rec in records)

    def finish(self, rank: JobRank, already: int, wall_seconds: float, label: str) -> dict:
        with atomic_open(self.files.rejects) as f:
            f.write(REJECTS_HEADER)
            f.writelines("\t".join(str(c).replace("\t", " ").replace("\n", " ") for c in r) + "\n"
                         for r in self.rejected)
        stats = {"rank": rank.rank, "world": rank.world, **self.counter.as_dict(), "already_done": already,
                 "clipped_to_end": self.clipped_to_end,
                 **speed(self.audio_seconds, wall_seconds), "tokenizer": label}
        write_json(self.files.stats, stats)
        return stats


def tokenize_rank(source, output: str | os.PathLike, extractor: UnitExtractor, rank: JobRank = JobRank(),
                  workers: int = 0, dedup: bool = False, limits: AudioLimits = AudioLimits(),
                  chunk_items: int = 64, prefetch_chunks: int = 2, progress: bool = True) -> dict:
    """Tokenize this rank's items that are not done yet into its part file; returns (and writes) its stats.

    Pending items -> decode pipeline (`workers` forked processes, `prefetch_chunks` chunks ahead) -> the extractor
    (each chunk one length-sorted batch set) -> the chunk writer. Read = written + rejected (by reason), this run.
    """
    output = Path(output)
    files = PartFiles(output, rank.rank, rank.world)
    files.dir.mkdir(parents=True, exist_ok=True)
    for stale in (files.stats, files.rejects, files.progress):
        stale.unlink(missing_ok=True)
    drop_partial_tail(files.units)
    written = written_index(output, extractor.label)
    pending = PendingItems(source, written, rank)
    total = source_size(source)
    started = time.perf_counter()
    bar = _Progress(files, output, rank, None if total is None else max(0, total - len(written)), progress)
    chunks = decoded_chunks(pending, source, limits, workers, chunk_items, prefetch_chunks)
    with contextlib.closing(chunks), ChunkWriter(files) as writer:
        try:
            for chunk, decoded in chunks:
                writer.write(*extract_chunk(extractor, chunk, decoded, dedup))
                bar.update(len(chunk))
        finally:
            bar.close()
    stats = writer.finish(rank, pending.already, time.perf_counter() - started, extractor.label)
    (log.info if rank.world > 1 else log.debug)(  # one process: the tool prints the same totals as its summary
        "rank %d/%d: %s, %.3f h of audio, RTF %s", rank.rank, rank.world, writer.counter.summary(),
        stats["audio_hours"], stats["rtf"])
    return stats


@contextlib.contextmanager
def merge_lock(output: Path):
    """Serialise merges of shards that finish at the same moment (SLURM arrays have no barrier)."""
    fd = os.open(output.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def merge_parts(source, output: str | os.PathLike, label: str, world: int,
                rejects: str | os.PathLike | None = None) -> dict | None:
    """Write the merged output in the source's order if every item is written or rejected; else return None.

    Rejects of the current world's ranks go to `rejects` (default `<output>.rejects.tsv`), and totals plus each
    rank's stats to `<output>.stats.json`; then the part files are removed.
    """
    output = Path(output)
    rejects = Path(rejects) if rejects else output.with_name(output.name + ".rejects.tsv")
    with merge_lock(output):
        ranks = [PartFiles(output, r, world) for r in range(world)]
        if not all(p.stats.exists() for p in ranks):
            return None
        per_rank = [json.loads(p.stats.read_text()) for p in ranks]
        rejected: dict[str, str] = {}
        for p in ranks:
            for line in p.rejects.read_text(encoding="utf-8").splitlines()[1:]:
                rejected.setdefault(line.split("\t", 1)[0], line + "\n")
        written = written_index(output, label)
        missing = [item.id for item in source if item.id not in written and item.id not in rejected]
        if missing:
            log.info("not merging yet: %d items (e.g. %r) are in no part file", len(missing), missing[0])
            return None
        handles: dict[Path, object] = {}
        try:
            with atomic_open(output, "wb") as out, atomic_open(rejects) as rej:
                rej.write(REJECTS_HEADER)
                lines = 0
                for item in source:
                    if item.id in written:
                        path, offset, length = written[item.id]
                        f = handles.get(path) or handles.setdefault(path, open(path, "rb"))
                        f.seek(offset)
                        out.write(f.read(length))
                        lines += 1
                    else:
                        rej.write(rejected[item.id])
        finally:
            for f in handles.values():
                f.close()
        totals = SkipCounter()
        for s in per_rank:
            part = SkipCounter()
            part.read, part.written = s["read"], s["written"]
            part.skipped.update(s["skipped"])
            part.examples.update(s["first_example_per_reason"])
            totals.merge(part)
        stats = {**totals.as_dict(), "already_done": sum(s["already_done"] for s in per_rank),
                 "output_records": lines, "clipped_to_end": sum(s.get("clipped_to_end", 0) for s in per_rank),
                 **speed(sum(s["audio_seconds"] for s in per_rank), max(s["wall_seconds"] for s in per_rank)),
                 "tokenizer": label, "world": world, "per_rank": per_rank}
        write_json(output.with_name(output.name + ".stats.json"), stats)
        shutil.rmtree(parts_dir(output))
        return stats


def init_distributed(shard: JobRank) -> None:
    """gloo process group for the final barrier (no tensors move); ranks may finish hours apart."""
    import torch.distributed as dist

    if shard.distributed and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))


def tokenize_speech(source, output: str | os.PathLike, extractor: UnitExtractor, shard: JobRank = JobRank(),
                    rejects: str | os.PathLike | None = None, **options) -> dict:
    """Run this rank's share, then merge: after a barrier on rank 0 under torchrun, or by whichever independent
    shard finds every item done. Returns the merged stats, or this rank's with "merged": False."""
    init_distributed(shard)
    stats = tokenize_rank(source, output, extractor, shard, **options)
    if shard.distributed:
        import torch.distributed as dist

        dist.barrier()
        merged = merge_parts(source, output, extractor.label, shard.world, rejects) if shard.rank == 0 else None
        dist.barrier()
    else:
        merged = merge_parts(source, output, extractor.label, shard.world, rejects)
    return merged if merged is not None else {**stats, "merged": False}
