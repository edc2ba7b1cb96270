"""Tokenizing a speech source over many processes and nodes: per-rank part files, resume, merge in input order.

Layout beside the output `units.jsonl`:
    units.jsonl.parts/part-RRRRR-of-WWWWW.jsonl         rank R's records (appended chunk by chunk, fsynced)
    units.jsonl.parts/part-RRRRR-of-WWWWW.rejects.tsv   rank R's rejects of this run (id, audio, reason, detail)
    units.jsonl.parts/part-RRRRR-of-WWWWW.stats.json    written when rank R is done: its counts and speed
    units.jsonl.parts/part-RRRRR-of-WWWWW.progress      items rank R has handled (rank 0's global progress bar)

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
import json
import logging
import multiprocessing
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from megatron_cslm.data.chunking import unit_runs
from megatron_cslm.fileio import DataError, SkipCounter, atomic_open, write_json
from megatron_cslm.speech.audio import SAMPLE_RATE, AudioLimits, AudioRejected, to_16k
from megatron_cslm.speech.extract import UnitExtractor
from megatron_cslm.speech.sources import SpeechItem, source_size

log = logging.getLogger(__name__)
REJECTS_HEADER = "id\taudio\treason\tdetail\n"


@dataclass(frozen=True)
class Shard:
    """This process's place in the job: rank `rank` of `world`; `distributed` when torch.distributed is used."""

    rank: int = 0
    world: int = 1
    distributed: bool = False

    @classmethod
    def resolve(cls, shard_index: int | None = None, num_shards: int | None = None) -> "Shard":
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


def unit_record(item: SpeechItem, units: list[int], num_samples: int, dedup: bool, label: str) -> dict:
    """One output line: the item's metadata, its units (run-length merged with `dedup`) and bookkeeping."""
    rec = {"id": item.id, "audio": item.audio, "text": item.text, "lang": item.lang, "speaker": item.speaker,
           **item.extra}
    if dedup:
        merged, durations = unit_runs(units)
        rec.update(units=merged, durations=durations)
    else:
        rec["units"] = units
    rec.update(num_frames=len(units), sample_rate=SAMPLE_RATE, tokenizer=label,
               duration_s=round(num_samples / SAMPLE_RATE, 4))
    return rec


# Decode workers are forked after the source is opened and inherit it here (nothing heavy is pickled per item
# except what the item carries itself).
_WORKER_SOURCE = None
_WORKER_LIMITS = AudioLimits()


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def _decode(item: SpeechItem) -> np.ndarray | AudioRejected:
    """Worker side: decode, check and resample one item; returns the rejection instead of raising."""
    try:
        audio, rate = _WORKER_SOURCE.load(item, _WORKER_LIMITS)
        return to_16k(audio, rate).numpy()
    except AudioRejected as e:
        return e
    except Exception as e:  # noqa: BLE001 - any decoder failure is this item's problem, not the run's
        return AudioRejected("unreadable", f"{type(e).__name__}: {e}")


def _chunks(items: Iterator[SpeechItem], size: int) -> Iterator[list[SpeechItem]]:
    chunk: list[SpeechItem] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def speed(audio_seconds: float, wall_seconds: float) -> dict:
    """Audio hours, hours of audio per wall second and the real-time factor (wall / audio; < 1 is faster)."""
    return {"audio_seconds": round(audio_seconds, 3), "audio_hours": round(audio_seconds / 3600, 6),
            "wall_seconds": round(wall_seconds, 3),
            "hours_per_second": round(audio_seconds / 3600 / wall_seconds, 8) if wall_seconds else None,
            "rtf": round(wall_seconds / audio_seconds, 6) if audio_seconds else None}


class _Progress:
    """tqdm on rank 0 with counts summed over all ranks' progress files; other ranks only write theirs."""

    def __init__(self, files: PartFiles, output: Path, shard: Shard, total: int | None, enabled: bool):
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


def tokenize_shard(source, output: str | os.PathLike, extractor: UnitExtractor, shard: Shard = Shard(),
                   workers: int = 0, dedup: bool = False, limits: AudioLimits = AudioLimits(),
                   chunk_items: int = 64, prefetch_chunks: int = 2, progress: bool = True) -> dict:
    """Tokenize this rank's items that are not done yet into its part file; returns (and writes) its stats.

    `workers` forked processes decode and resample up to `prefetch_chunks` chunks ahead of the model; the model
    sees each chunk as one length-sorted batch set. Read = written + rejected (by reason) for this run.
    """
    global _WORKER_SOURCE, _WORKER_LIMITS

    output = Path(output)
    files = PartFiles(output, shard.rank, shard.world)
    files.dir.mkdir(parents=True, exist_ok=True)
    for stale in (files.stats, files.rejects, files.progress):
        stale.unlink(missing_ok=True)
    drop_partial_tail(files.units)
    written = written_index(output, extractor.label)
    total = source_size(source)
    already = 0
    seen: set[str] = set()

    def own_items() -> Iterator[SpeechItem]:
        nonlocal already
        for item in source:
            if item.id in seen:
                raise DataError(getattr(source, "where", "source"), item.index, "id", f"duplicate id {item.id!r}")
            seen.add(item.id)
            if item.index % shard.world != shard.rank:
                continue
            if item.id in written:
                already += 1
                continue
            yield item

    counter, rejected = SkipCounter(), []
    audio_seconds = 0.0
    started = time.perf_counter()
    _WORKER_SOURCE, _WORKER_LIMITS = source, limits
    pool = multiprocessing.get_context("fork").Pool(workers, initializer=_init_worker) if workers > 0 else None
    bar = _Progress(files, output, shard, None if total is None else max(0, total - len(written)), progress)
    try:
        chunks = _chunks(own_items(), chunk_items)
        pending: collections.deque = collections.deque()

        def submit() -> None:
            chunk = next(chunks, None)
            if chunk is not None:
                pending.append((chunk, pool.map_async(_decode, chunk) if pool else [_decode(it) for it in chunk]))

        for _ in range(max(1, prefetch_chunks if pool else 1)):
            submit()
        with open(files.units, "a", encoding="utf-8") as out:
            while pending:
                chunk, result = pending.popleft()
                decoded = result.get() if pool else result
                submit()
                counter.read += len(chunk)
                good = []
                for item, wave in zip(chunk, decoded):
                    if isinstance(wave, AudioRejected):
                        counter.skip(wave.reason, f"{item.id}: {wave.detail}")
                        rejected.append((item.id, item.audio, wave.reason, wave.detail))
                    else:
                        good.append((item, wave))
                import torch

                unit_lists = extractor([torch.from_numpy(wave) for _, wave in good])
                recs = [unit_record(item, units, wave.size, dedup, extractor.label)
                        for (item, wave), units in zip(good, unit_lists)]
                out.writelines(json.dumps(rec, ensure_ascii=False) + "\n" for rec in recs)
                out.flush()  # whole lines per chunk, synced: a crash loses at most this chunk
                os.fsync(out.fileno())
                counter.written += len(recs)
                audio_seconds += sum(wave.size for _, wave in good) / SAMPLE_RATE
                bar.update(len(chunk))
    finally:
        bar.close()
        if pool:
            pool.terminate()
    with atomic_open(files.rejects) as f:
        f.write(REJECTS_HEADER)
        f.writelines("\t".join(str(c).replace("\t", " ").replace("\n", " ") for c in r) + "\n" for r in rejected)
    stats = {"rank": shard.rank, "world": shard.world, **counter.as_dict(), "already_done": already,
             **speed(audio_seconds, time.perf_counter() - started), "tokenizer": extractor.label}
    write_json(files.stats, stats)  # the rank's "done" marker
    log.info("rank %d/%d: %s, %.3f h of audio, RTF %s", shard.rank, shard.world, counter.summary(),
             stats["audio_hours"], stats["rtf"])
    return stats


@contextlib.contextmanager
def _merge_lock(output: Path):
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
    with _merge_lock(output):
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
                 "output_records": lines,
                 **speed(sum(s["audio_seconds"] for s in per_rank), max(s["wall_seconds"] for s in per_rank)),
                 "tokenizer": label, "world": world, "per_rank": per_rank}
        write_json(output.with_name(output.name + ".stats.json"), stats)
        shutil.rmtree(parts_dir(output))
        return stats


def init_distributed(shard: Shard) -> None:
    """gloo process group for the final barrier (no tensors move); ranks may finish hours apart."""
    import torch.distributed as dist

    if shard.distributed and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))


def tokenize_speech(source, output: str | os.PathLike, extractor: UnitExtractor, shard: Shard = Shard(),
                    rejects: str | os.PathLike | None = None, **options) -> dict:
    """Run this rank's share, then merge: after a barrier on rank 0 under torchrun, or by whichever independent
    shard finds every item done. Returns the merged stats, or this rank's with "merged": False."""
    init_distributed(shard)
    stats = tokenize_shard(source, output, extractor, shard, **options)
    if shard.distributed:
        import torch.distributed as dist

        dist.barrier()
        merged = merge_parts(source, output, extractor.label, shard.world, rejects) if shard.rank == 0 else None
        dist.barrier()
    else:
        merged = merge_parts(source, output, extractor.label, shard.world, rejects)
    return merged if merged is not None else {**stats, "merged": False}
