"""JSONL speech-text documents -> megatron-core indexed dataset (`<prefix>.bin/.idx`), multi-process.

A record is ``{"segments": [{"text": ...}, {"units": [...]}, ...], "source"?: str, "lang"?: str}`` or plain
``{"text": ...}``; unit segments are wrapped in <sosp>/<eosp>, and one record is one document. A segment may
carry ``"loss": false`` (e.g. the prompt of replayed instruction data); if any record does, a parallel
``<prefix>_lossmask.bin/.idx`` (uint8, 1 = token is a training target) with the same document layout is written.

Inputs are split into byte-range shards at line boundaries (a .gz file is one shard). Shards are tokenized in
parallel into partial datasets that are concatenated in input order with `IndexedDatasetBuilder.add_index`, so
the output does not depend on the worker count. Everything is written to temporary names and renamed at the
end (.bin before .idx), so an existing `<prefix>.idx` always belongs to a complete dataset.

A document holding units may carry ``"speech_tokenizer"`` (build_pretrain_data writes it): all of them must agree
(the run stops naming both otherwise) and `.meta.json` records the one identity (null for text-only data).
"""
from __future__ import annotations

import gc
import glob
import gzip
import itertools
import json
import multiprocessing
import os
import re
import shutil
import signal
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from megatron_cslm.data.metadata import write_dataset_metadata
from megatron_cslm.errors import CslmError
from megatron_cslm.fileio import DataError, SkipCounter, make_dirs, parse_json_line, write_json
from megatron_cslm.speech.identity import IDENTITY_KEY, IdentityJoin
from megatron_cslm.text.tokenizer import SpeechTextTokenizer

LOSS_MASK_SUFFIX = "_lossmask"
# A units array as json.dumps writes it, "[12, 345]" or "[12,345]" (possessive quantifiers: no backtracking;
# leading zeros, which JSON forbids, slip through). See parse_line.
_UNIT_ARRAY = re.compile(rb'"units": ?\[([0-9]++(?:, ?+[0-9]++)*+)\]')
BLOCK_RECORDS = 256  # records whose text is tokenized in one call
_SCAN_BLOCK = 1 << 24


@dataclass(frozen=True)
class Shard:
    """Lines of `path` in bytes [start, end) (end None: to EOF); `first_line` numbers the first of them."""

    path: str
    start: int = 0
    end: int | None = None
    first_line: int = 1


@dataclass
class DocStats:
    """Token accounting; text_tokens are base-vocabulary ids (incl. EOD), special_tokens are ours (sosp, ...)."""

    documents: int = 0
    tokens: int = 0
    text_tokens: int = 0
    unit_tokens: int = 0
    special_tokens: int = 0
    masked_tokens: int = 0
    by_source: Counter = field(default_factory=Counter)
    by_lang: Counter = field(default_factory=Counter)
    tokens_by_source: Counter = field(default_factory=Counter)
    skips: SkipCounter = field(default_factory=SkipCounter)
    uses_loss_mask: bool = False
    max_token_id: int = -1  # recorded in <prefix>.meta.json: training checks ids without reading the .bin
    speech: IdentityJoin = field(default_factory=IdentityJoin)  # the documents' one speech tokenizer (or none)

    def add(self, ids: np.ndarray, mask: np.ndarray | None, record: dict, tokenizer: SpeechTextTokenizer,
            path: str | None = None, line: int | None = None) -> None:
        units, specials = tokenizer.count_speech_tokens(ids)  # through the tokenizer's unit layout
        source = record.get("source", "")
        self.skips.written += 1
        self.documents += 1
        self.tokens += ids.size
        self.unit_tokens += units
        self.special_tokens += specials
        self.text_tokens += ids.size - units - specials
        self.masked_tokens += 0 if mask is None else int(mask.size - np.count_nonzero(mask))
        self.by_source[source] += 1
        self.tokens_by_source[source] += ids.size
        self.by_lang[record.get("lang", "")] += 1
        if ids.size:
            self.max_token_id = max(self.max_token_id, int(ids.max()))
        if units:
            self.speech.add(record.get(IDENTITY_KEY), f"{path}:{line}", path, line)

    def merge(self, other: "DocStats") -> None:
        for name in ("documents", "tokens", "text_tokens", "unit_tokens", "special_tokens", "masked_tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.by_source.update(other.by_source)
        self.by_lang.update(other.by_lang)
        self.tokens_by_source.update(other.tokens_by_source)
        self.skips.merge(other.skips)
        self.uses_loss_mask |= other.uses_loss_mask
        self.max_token_id = max(self.max_token_id, other.max_token_id)
        self.speech.merge(other.speech)


def expand_inputs(patterns: Sequence[str | os.PathLike]) -> list[str]:
    """Files named or matched by glob patterns, in the order given (each glob sorted); missing ones are errors."""
    paths: list[str] = []
    for pattern in map(str, patterns):
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches or not all(os.path.isfile(m) for m in matches):
            raise DataError(pattern, None, "--input", "matches no file" if glob.has_magic(pattern) else
                            "not found (or not a file)", reason="missing")
        paths += matches
    return paths


def plan_input_shards(paths: Sequence[str], shard_bytes: int | None) -> list[Shard]:
    """Split plain files into ~shard_bytes pieces at line starts, numbering lines in the same single pass."""
    shards = []
    for path in paths:
        if shard_bytes is None or path.endswith(".gz") or os.path.getsize(path) <= shard_bytes:
            shards.append(Shard(path))
            continue
        starts, newlines, offset, cut = [(0, 1)], 0, 0, shard_bytes  # newlines: counted before offset + counted
        with open(path, "rb") as f:
            while block := f.read(_SCAN_BLOCK):
                counted = 0
                while cut < offset + len(block):
                    nl = block.find(b"\n", max(cut - offset, 0))
                    if nl < 0:
                        break  # the cut's line ends in a later block
                    newlines += block.count(b"\n", counted, nl + 1)
                    counted = nl + 1
                    starts.append((offset + counted, newlines + 1))
                    cut = offset + counted + shard_bytes
                newlines += block.count(b"\n", counted)
                offset += len(block)
        if starts[-1][0] >= offset:
            starts.pop()
        ends = [s for s, _ in starts[1:]] + [None]
        shards += [Shard(path, s, e, line) for (s, line), e in zip(starts, ends)]
    return shards


def iter_shard_lines(shard: Shard) -> Iterator[tuple[int, bytes]]:
    """Stream (line number, raw line) of one shard."""
    opener = gzip.open if shard.path.endswith(".gz") else open
    with opener(shard.path, "rb") as f:
        f.seek(shard.start)
        pos, line = shard.start, shard.first_line
        while shard.end is None or pos < shard.end:
            try:
                raw = f.readline()
            except (EOFError, gzip.BadGzipFile, OSError) as e:  # a truncated or corrupt .gz
                raise DataError(shard.path, line, None, f"unreadable compressed data ({e})",
                                reason="unreadable") from None
            if not raw:
                return
            pos += len(raw)
            yield line, raw
            line += 1


def parse_line(raw: bytes, path: str, line: int) -> dict:
    """The JSON object on a line; a located CslmError for non-UTF-8, malformed JSON or a non-object.

    Unit arrays are most of a speech corpus's bytes, and json.loads would build a Python int per unit that
    numpy then converts again. So arrays spelled the way json.dumps writes them are cut out of the line and
    parsed by numpy (segments[i].units becomes an int64 array); any other line takes plain json.loads.
    """
    # A NUL can only come from a "\u0000" escape; without one, NUL-prefixed strings are surely our placeholders.
    if b'"units"' in raw and b"\\u0000" not in raw:
        arrays: list[np.ndarray] = []

        def cut(m: re.Match) -> bytes:
            arrays.append(np.fromstring(m.group(1), dtype=np.int64, sep=","))
            return b'"units": "\\u0000%d"' % (len(arrays) - 1)

        reduced = _UNIT_ARRAY.sub(cut, raw)
        if arrays:
            try:
                record = json.loads(reduced)
            except ValueError:
                record = None  # the general path below reports it, with the right column
            if isinstance(record, dict) and _restore_units(record, arrays):
                return record
    return _loads(raw, path, line)


def _restore_units(record: dict, arrays: list[np.ndarray]) -> bool:
    """Put the cut arrays back; False unless each placeholder sits, in order, in a segments[i].units."""
    segments = record.get("segments")
    if not isinstance(segments, list):
        return False
    found = 0
    for seg in segments:
        units = seg.get("units") if isinstance(seg, dict) else None
        if isinstance(units, str) and units.startswith("\0"):
            if units != f"\0{found}":
                return False
            seg["units"] = arrays[found]
            found += 1
    return found == len(arrays)


def _loads(raw: bytes, path: str, line: int) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(path, line, None, f"not valid UTF-8 ({e.reason} at byte {e.start} of the line)",
                        reason="not_utf8") from None
    return parse_json_line(path, line, text)


def document_segments(record: dict, path: str, line: int | None) -> tuple[list, list[bool]]:
    """A record's segments and each one's loss flag, with everything but the segment contents validated."""
    if "segments" in record:
        if "text" in record:
            raise DataError(path, line, "text", "a record has either 'segments' or 'text', not both",
                            reason="wrong_type")
        segments = record["segments"]
        if not isinstance(segments, list):
            raise DataError(path, line, "segments", f"expected list, got {type(segments).__name__}",
                            reason="wrong_type")
        if not segments:
            raise DataError(path, line, "segments", "empty list", reason="empty")
    elif "text" in record:
        segments = [{"text": record["text"]}]
    else:
        raise DataError(path, line, "segments", "missing (a record needs 'segments' or 'text')",
                        reason="missing_field")
    for tag in ("source", "lang"):
        if tag in record and not isinstance(record[tag], str):
            raise DataError(path, line, tag, f"expected str, got {type(record[tag]).__name__}", reason="wrong_type")
    losses = [seg.get("loss", True) if isinstance(seg, dict) else True for seg in segments]
    for i, loss in enumerate(losses):
        if not isinstance(loss, bool):
            raise DataError(path, line, f"segments[{i}].loss", f"expected bool, got {type(loss).__name__}",
                            reason="wrong_type")
    return segments, losses


def _assemble(parts: list[np.ndarray], losses: list[bool], eod: int | None,
              dtype: type) -> tuple[np.ndarray, np.ndarray | None]:
    if eod is not None:
        parts, losses = parts + [np.array([eod])], losses + [True]
    ids = np.concatenate(parts, dtype=dtype, casting="unsafe")  # every id < vocab_size, which dtype holds
    if all(losses):
        return ids, None
    return ids, np.repeat(np.array(losses, dtype=np.uint8), [p.size for p in parts])


def encode_document(record: dict, tokenizer: SpeechTextTokenizer, append_eod: bool, dtype: type,
                    path: str = "<record>", line: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Token ids of one record (in `dtype`) and its loss mask (uint8), or None if no segment has loss=false."""
    segments, losses = document_segments(record, path, line)
    try:
        parts = tokenizer.encode_each_segment(segments, as_arrays=True)
    except CslmError as e:  # a bad segment, named by field: add the place
        field = e.field if "segments" in record else "text"
        raise DataError(path, line, field, e.message, reason=e.reason) from None
    return _assemble(parts, losses, tokenizer.eod_id if append_eod else None, dtype)


def encode_documents(records: list[tuple[int, dict]], tokenizer: SpeechTextTokenizer, append_eod: bool,
                     dtype: type, path: str) -> list[tuple[np.ndarray, np.ndarray | None] | CslmError]:
    """`encode_document` for (line, record) pairs, with all their text in one tokenizer call.

    Per-call overhead of the text tokenizer dominates short transcripts, so batching a block of records is
    what keeps text from being the bottleneck. Bad records come back as CslmError values, in order.
    """
    results: list = [None] * len(records)
    flat, spans = [], []
    for k, (line, record) in enumerate(records):
        try:
            segments, losses = document_segments(record, path, line)
        except CslmError as e:
            results[k] = e
            continue
        spans.append((k, len(flat), len(segments), losses))
        flat += segments
    try:
        parts = tokenizer.encode_each_segment(flat, as_arrays=True)
    except CslmError:  # rare: redo record by record to locate the bad segment(s)
        for k, *_ in spans:
            line, record = records[k]
            try:
                results[k] = encode_document(record, tokenizer, append_eod, dtype, path, line)
            except CslmError as e:
                results[k] = e
        return results
    eod = tokenizer.eod_id if append_eod else None
    for k, start, n, losses in spans:
        results[k] = _assemble(parts[start:start + n], losses, eod, dtype)
    return results


class _PartWriter:
    """Token and loss-mask builders for one output (partial or final) with a shared document layout."""

    def __init__(self, prefix: str, dtype: type):
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.prefix = prefix
        self.tokens = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
        # Always written (1 byte/token) and dropped at the end if no record masks anything: simpler and cheaper
        # than back-filling masks for all documents before the first masked one, in every shard.
        self.mask = IndexedDatasetBuilder(prefix + LOSS_MASK_SUFFIX + ".bin", dtype=np.uint8)

    def add(self, ids: np.ndarray, mask: np.ndarray) -> None:
        self.tokens.add_document(ids, [ids.size])
        self.mask.add_document(mask, [mask.size])

    def add_part(self, prefix: str) -> None:
        self.tokens.add_index(prefix)
        self.mask.add_index(prefix + LOSS_MASK_SUFFIX)

    def finalize(self) -> None:
        self.tokens.finalize(self.prefix + ".idx")
        self.mask.finalize(self.prefix + LOSS_MASK_SUFFIX + ".idx")


def tokenize_shard(shard: Shard, part_prefix: str, tokenizer: SpeechTextTokenizer, append_eod: bool,
                   skip_bad_records: bool, dtype: type) -> DocStats:
    """Tokenize one shard into the partial dataset `part_prefix`; bad records raise CslmError or are counted."""
    stats = DocStats(speech=IdentityJoin(tokenizer.num_units, "the tokenizer (--num-units)"))
    writer = _PartWriter(part_prefix, dtype)
    lines = ((line, raw) for line, raw in iter_shard_lines(shard) if raw.strip())
    while block := list(itertools.islice(lines, BLOCK_RECORDS)):
        parsed = []
        for line, raw in block:
            try:
                parsed.append((line, parse_line(raw, shard.path, line)))
            except CslmError as e:
                parsed.append((line, e))
        encoded = iter(encode_documents([(n, r) for n, r in parsed if not isinstance(r, CslmError)], tokenizer,
                                        append_eod, dtype, shard.path))
        for line, record in parsed:
            stats.skips.read += 1
            result = record if isinstance(record, CslmError) else next(encoded)
            if isinstance(result, CslmError):
                if not skip_bad_records:
                    raise result
                stats.skips.skip(result.reason, str(result))
                continue
            ids, mask = result
            stats.uses_loss_mask |= mask is not None
            writer.add(ids, np.ones(ids.size, dtype=np.uint8) if mask is None else mask)
            stats.add(ids, mask, record, tokenizer, shard.path, line)
    writer.finalize()
    return stats


_worker_state: dict = {}


def _init_worker(state: dict) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    # A forked worker inherits its parent's handlers; the pool ends workers with SIGTERM, so it must kill them
    # (a parent that records SIGTERM, e.g. a trainer, would otherwise leave the pool's terminate() waiting forever).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _worker_state.update(state)


def _run_shard(job: tuple[Shard, str]) -> DocStats:
    return tokenize_shard(*job, **_worker_state)


def preprocess(inputs: Sequence[str | os.PathLike], output_prefix: str | os.PathLike,
               tokenizer: SpeechTextTokenizer, workers: int = 1, append_eod: bool = True,
               skip_bad_records: bool = False, shard_bytes: int | None = None, progress: bool = True) -> dict:
    """Tokenize JSONL(.gz) `inputs` (paths or globs) into `<output_prefix>.bin/.idx` (+ loss mask); return stats.

    `shard_bytes` sets the work unit (default: inputs split evenly into 8 shards per worker, at least 1 MiB).
    Stats are also written to `<output_prefix>.stats.json`.
    """
    from megatron.core.datasets.indexed_dataset import DType
    from tqdm import tqdm

    paths = expand_inputs(inputs)
    prefix = str(output_prefix)
    out_dir = Path(prefix).parent
    make_dirs(out_dir)
    if shard_bytes is None and workers > 1:
        shard_bytes = max(1 << 20, sum(os.path.getsize(p) for p in paths) // (8 * workers))
    shards = plan_input_shards(paths, shard_bytes)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)  # uint16 below 65,500 ids, else int32 (megatron's rule)
    state = dict(tokenizer=tokenizer, append_eod=append_eod, skip_bad_records=skip_bad_records, dtype=dtype)
    tmp = tempfile.mkdtemp(prefix=f".{Path(prefix).name}.", suffix=".tmp", dir=out_dir)
    # The collector skips frozen objects: add_index's gc.collect() per part costs ~0.3 s otherwise (tokenizer and
    # torch loaded), and forked workers don't copy-on-write pages just to scan them.
    gc.freeze()
    pool = multiprocessing.get_context("fork").Pool(workers, _init_worker, (state,)) if workers > 1 else None
    try:
        jobs = [(shard, os.path.join(tmp, f"part{i:06d}")) for i, shard in enumerate(shards)]
        results = pool.imap(_run_shard, jobs) if pool else (tokenize_shard(*job, **state) for job in jobs)
        stats, merged = DocStats(), _PartWriter(os.path.join(tmp, "merged"), dtype)
        for (_, part), part_stats in tqdm(zip(jobs, results), total=len(jobs), unit="shard", disable=not progress,
                                          desc="preprocess"):
            stats.merge(part_stats)
            merged.add_part(part)  # in input order, as parts arrive: peak disk stays ~ one output
            for suffix in (".bin", ".idx", LOSS_MASK_SUFFIX + ".bin", LOSS_MASK_SUFFIX + ".idx"):
                os.remove(part + suffix)
        merged.finalize()
        mask_prefix = prefix + LOSS_MASK_SUFFIX
        for ext in (".idx", ".bin"):  # never leave a stale mask next to new data
            if os.path.exists(mask_prefix + ext):
                os.remove(mask_prefix + ext)
        if stats.uses_loss_mask:
            os.replace(merged.prefix + LOSS_MASK_SUFFIX + ".bin", mask_prefix + ".bin")
            os.replace(merged.prefix + LOSS_MASK_SUFFIX + ".idx", mask_prefix + ".idx")
        os.replace(merged.prefix + ".bin", prefix + ".bin")
        os.replace(merged.prefix + ".idx", prefix + ".idx")
    finally:
        gc.unfreeze()
        if pool:
            pool.terminate()
        shutil.rmtree(tmp, ignore_errors=True)
    result = _stats_dict(stats, paths, prefix, dtype, tokenizer)
    write_json(prefix + ".stats.json", result)
    write_dataset_metadata(prefix, tokenizer, stats.max_token_id, documents=stats.documents, tokens=stats.tokens,
                           speech_tokenizer=stats.speech.identity)
    return result


def _stats_dict(stats: DocStats, paths: list[str], prefix: str, dtype: type, tokenizer: SpeechTextTokenizer) -> dict:
    return {
        "inputs": paths, "output_prefix": prefix, "dtype": np.dtype(dtype).name,
        "vocab_size": tokenizer.vocab_size, "num_units": tokenizer.num_units,
        "documents": stats.documents, "tokens": stats.tokens, "text_tokens": stats.text_tokens,
        "unit_tokens": stats.unit_tokens, "special_tokens": stats.special_tokens,
        "loss_mask": stats.uses_loss_mask, "masked_tokens": stats.masked_tokens,
        "by_source": {k: {"documents": v, "tokens": stats.tokens_by_source[k]} for k, v in
                      sorted(stats.by_source.items())},
        "by_lang": dict(sorted(stats.by_lang.items())),
        IDENTITY_KEY: stats.speech.identity.to_dict() if stats.speech.identity else None,
        **stats.skips.as_dict(),
    }
