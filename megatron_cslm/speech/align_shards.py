"""Aligning a units JSONL over many processes: per-rank part files, resume, merge in input order.

The same layout and rules as extraction (`speech/sharded.py`, whose `JobRank`, `PartFiles`, `drop_partial_tail`,
`complete_lines`, `speed` and `init_distributed` are reused): record k of the input belongs to rank k mod W;
rank R appends its records to `<output>.parts/part-R-of-W.jsonl` (fsynced every `chunk_items`), writes its
`.stats.json` when done; the merged output holds the part lines verbatim in input order, written atomically
once every input id is in a part file; then the parts are removed.

Invariants:
- Every input record is written once, with `words` or without (the proportional cut): read = aligned +
  unaligned (by reason), written = read. Records left without words are listed in `<output>.unaligned.tsv`
  (id, audio, reason, detail); they are done (a rerun does not retry them: vocabulary gaps are deterministic).
- A record whose id is in any part file (of any world size) or in the merged output is done: a rerun resumes,
  also with another number of processes. Output lines start with the id, so resume reads ids without parsing.
- Bad input (malformed JSON, no id, duplicate ids, units/durations that disagree, an unknown rate) stops with a
  one-line error naming file, line and field.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

from megatron_cslm.errors import CslmError
from megatron_cslm.fileio import atomic_open, iter_jsonl, write_json
from megatron_cslm.speech.align import CtcAligner, load_record_audio, record_layout, record_rate
from megatron_cslm.speech.audio import SAMPLE_RATE, AudioLimits
from megatron_cslm.speech.sharded import (
    JobRank,
    PartFiles,
    complete_lines,
    drop_partial_tail,
    init_distributed,
    merge_lock,
    parts_dir,
    speed,
)

log = logging.getLogger(__name__)
UNALIGNED_HEADER = "id\taudio\treason\tdetail\n"
_ID_PREFIX = b'{"id": '
_DECODER = json.JSONDecoder()


def _line_id(line: bytes, path: Path, number: int) -> str:
    """The id of an output line (written id first), read without parsing the units."""
    if line.startswith(_ID_PREFIX):
        with contextlib.suppress(json.JSONDecodeError):
            value, _ = _DECODER.raw_decode(line.decode("utf-8"), len(_ID_PREFIX))
            if isinstance(value, str):
                return value
    raise CslmError(path, number, "id", "not a line of align-words (the id must come first)")


def done_index(output: Path) -> dict[str, tuple[Path, int, int]]:
    """id -> (file, offset, length) of every record in the merged output and in any part file."""
    files = ([output] if output.exists() else []) + sorted(parts_dir(output).glob("part-*-of-*.jsonl"))
    index: dict[str, tuple[Path, int, int]] = {}
    for path in files:
        for number, offset, line in complete_lines(path):
            index.setdefault(_line_id(line, path, number), (path, offset, len(line)))
    return index


def input_records(path: Path) -> Iterator[tuple[int, int, dict]]:
    """(index, line, record) of the units JSONL, ids checked: present, strings, unique."""
    seen: dict[str, int] = {}
    for index, (line, rec) in enumerate(iter_jsonl(path)):
        id_ = rec.get("id")
        if not isinstance(id_, str) or not id_:
            raise CslmError(path, line, "id", "missing or not a non-empty string")
        if id_ in seen:
            raise CslmError(path, line, "id", f"duplicate id {id_!r} (first on line {seen[id_]})")
        seen[id_] = line
        yield index, line, rec


def align_record(rec: dict, aligner: CtcAligner, audio_root: Path, limits: AudioLimits, path: Path,
                 line: int) -> tuple[dict, CslmError | None, float]:
    """The record with fresh `words` (id first), or without them and the reason; and its audio seconds.

    Input faults (units, durations, rate) raise; faults of this utterance (audio, spelling) are returned."""
    rate = record_rate(rec, path, line)
    n_raw, durations = record_layout(rec, path, line)
    text = rec.get("text")
    if not isinstance(text, str):
        raise CslmError(path, line, "text", "missing or not a string: alignment needs the transcript")
    out = {"id": rec["id"], **{k: v for k, v in rec.items() if k not in ("id", "words")}}
    try:
        wave = load_record_audio(rec, audio_root, limits)
        out["words"] = aligner.align(text, wave, rate, n_raw, durations)
    except CslmError as e:
        if e.kind != "data":
            raise
        return out, e, 0.0
    return out, None, wave.size / SAMPLE_RATE


def align_shard(input_path: str | os.PathLike, output: str | os.PathLike, aligner: CtcAligner,
                shard: JobRank = JobRank(), audio_root: str | os.PathLike | None = None,
                limits: AudioLimits = AudioLimits(), chunk_items: int = 64, progress: bool = True) -> dict:
    """Align this rank's records that are not done yet into its part file; returns (and writes) its stats."""
    from tqdm import tqdm

    input_path, output = Path(input_path), Path(output)
    audio_root = Path(audio_root) if audio_root is not None else input_path.parent
    files = PartFiles(output, shard.rank, shard.world)
    files.dir.mkdir(parents=True, exist_ok=True)
    files.stats.unlink(missing_ok=True)
    drop_partial_tail(files.units)
    drop_partial_tail(files.rejects)
    done = done_index(output)
    read, aligned, already, audio_seconds = 0, 0, 0, 0.0
    unaligned: Counter[str] = Counter()
    examples: dict[str, str] = {}
    started = time.perf_counter()
    bar = tqdm(unit="utt", desc=f"align ({shard.world} ranks)", disable=not progress or shard.rank != 0)
    new_rejects = not files.rejects.exists()
    with open(files.units, "a", encoding="utf-8") as out, open(files.rejects, "a", encoding="utf-8") as rej:
        if new_rejects:
            rej.write(UNALIGNED_HEADER)
        for index, line, rec in input_records(input_path):
            if index % shard.world != shard.rank:
                continue
            if rec["id"] in done:
                already += 1
                continue
            result, error, seconds = align_record(rec, aligner, audio_root, limits, input_path, line)
            read += 1
            audio_seconds += seconds
            if error is None:
                aligned += 1
            else:
                detail = str(error.located(input_path, line))
                unaligned[error.reason] += 1
                examples.setdefault(error.reason, detail)
                rej.write("\t".join(str(c).replace("\t", " ").replace("\n", " ") for c in
                                     (rec["id"], rec.get("audio", ""), error.reason, error.message)) + "\n")
            out.write(json.dumps(result, ensure_ascii=False) + "\n")
            if read % chunk_items == 0:
                _sync(rej, out)
            bar.update(1)
        _sync(rej, out)
    bar.close()
    stats = {"rank": shard.rank, "world": shard.world, "read": read, "written": read, "aligned": aligned,
             "unaligned": dict(unaligned), "unaligned_total": sum(unaligned.values()),
             "first_example_per_reason": examples, "already_done": already,
             **speed(audio_seconds, time.perf_counter() - started), "aligner": aligner.name}
    write_json(files.stats, stats)  # the rank's "done" marker
    log.info("rank %d/%d: read=%d aligned=%d unaligned=%s", shard.rank, shard.world, read, aligned, dict(unaligned))
    return stats


def _sync(*files) -> None:
    """Whole lines, synced, unaligned list first: a crash loses at most the last chunk, and a record in a part
    file always has its unaligned line (a line without its record is redone, and deduplicated at the merge)."""
    for f in files:
        f.flush()
        os.fsync(f.fileno())


def merge_aligned(input_path: str | os.PathLike, output: str | os.PathLike, world: int) -> dict | None:
    """Write the merged output in input order when every input id is done; else None. Stats go to
    `<output>.stats.json`, records without words to `<output>.unaligned.tsv`; then the parts are removed."""
    input_path, output = Path(input_path), Path(output)
    with merge_lock(output):
        ranks = [PartFiles(output, r, world) for r in range(world)]
        if not all(p.stats.exists() for p in ranks):
            return None
        per_rank = [json.loads(p.stats.read_text()) for p in ranks]
        done = done_index(output)
        ids = [rec["id"] for _, _, rec in input_records(input_path)]
        missing = [i for i in ids if i not in done]
        if missing:
            log.info("not merging yet: %d records (e.g. %r) are in no part file", len(missing), missing[0])
            return None
        unaligned_tsv = output.with_name(output.name + ".unaligned.tsv")
        listed: dict[str, str] = {}  # id -> unaligned line, from earlier merges and every part file of any world
        for path in [unaligned_tsv] * unaligned_tsv.exists() + sorted(parts_dir(output).glob("part-*.rejects.tsv")):
            for line in path.read_text(encoding="utf-8").splitlines(True)[1:]:
                listed.setdefault(line.split("\t", 1)[0], line)
        handles: dict[Path, object] = {}
        try:
            with atomic_open(output, "wb") as out, atomic_open(unaligned_tsv) as rej:
                for id_ in ids:
                    path, offset, length = done[id_]
                    f = handles.get(path) or handles.setdefault(path, open(path, "rb"))
                    f.seek(offset)
                    out.write(f.read(length))
                rej.write(UNALIGNED_HEADER)
                rej.writelines(listed[i] for i in ids if i in listed)
        finally:
            for f in handles.values():
                f.close()
        unaligned: Counter[str] = Counter()
        for s in per_rank:
            unaligned.update(s["unaligned"])
        stats = {"read": sum(s["read"] for s in per_rank), "written": sum(s["written"] for s in per_rank),
                 "aligned": sum(s["aligned"] for s in per_rank), "unaligned": dict(unaligned),
                 "unaligned_total": sum(unaligned.values()), "already_done": sum(s["already_done"] for s in per_rank),
                 "output_records": len(ids),
                 **speed(sum(s["audio_seconds"] for s in per_rank), max(s["wall_seconds"] for s in per_rank)),
                 "aligner": per_rank[0]["aligner"], "world": world, "per_rank": per_rank}
        write_json(output.with_name(output.name + ".stats.json"), stats)
        shutil.rmtree(parts_dir(output))
        return stats


def align_words(input_path: str | os.PathLike, output: str | os.PathLike, aligner: CtcAligner,
                shard: JobRank = JobRank(), **options) -> dict:
    """Run this rank's share, then merge (after a barrier on rank 0 under torchrun, or by whichever independent
    shard finds every record done). Returns the merged stats, or this rank's with "merged": False."""
    if Path(input_path).resolve() == Path(output).resolve():
        raise CslmError.usage("must differ from --input (the input is read again to resume and merge)", "--output")
    init_distributed(shard)
    stats = align_shard(input_path, output, aligner, shard, **options)
    if shard.distributed:
        import torch.distributed as dist

        dist.barrier()
        merged = merge_aligned(input_path, output, shard.world) if shard.rank == 0 else None
        dist.barrier()
    else:
        merged = merge_aligned(input_path, output, shard.world)
    return merged if merged is not None else {**stats, "merged": False}
