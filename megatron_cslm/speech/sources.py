"""Speech corpora as users hold them: TSV/JSONL manifests, Lhotse manifests and Shar, Hugging Face datasets.

Each source yields `SpeechItem`s in a fixed order (the order that sharded runs split and merge by) and decodes one
item's audio with `load`. Formats that a library reads are read by it: Lhotse manifests with `load_manifest_lazy`
/ `CutSet.from_manifests` / `CutSet.from_shar`, Hugging Face datasets with `load_from_disk` /
`load_dataset("parquet")`; only the project's own TSV/JSONL manifest is parsed here.

Invariants: an item's id is unique within its source (resume and merge key on it); a Lhotse cut is decoded from
its own span of the recording, never the whole recording; text, language, speaker and the source's ids travel with
the item into the units JSONL. Sources are opened in the parent process and inherited by forked decode workers,
so `load` may run in any process. A fault of one item (a segment past its recording's end, a supervision
without its recording, an undecodable file) is that item's reject with a reason and one short line, so
read = written + rejected counts everything given; a fault of the input as a whole (a missing or truncated
manifest, an empty Shar folder, manifests swapped) is a one-line CslmError before any work.
"""
from __future__ import annotations

import gzip
import itertools
import logging
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from megatron_cslm.errors import CslmError
from megatron_cslm.fileio import DataError, iter_jsonl, require
from megatron_cslm.speech.audio import (
    AudioLimits,
    AudioRejected,
    cause_line,
    check_waveform,
    decode_audio_bytes,
    file_sample_rate,
    read_audio,
)

log = logging.getLogger(__name__)


@dataclass
class SpeechItem:
    """One utterance to tokenize. `ref` is what the source's `load` needs (a path, a Lhotse cut, a row number)."""

    index: int  # position in the source's order
    id: str
    audio: str  # where the audio is, for people: a path, a recording id, a dataset row
    text: str = ""
    lang: str = ""
    speaker: str = ""
    extra: dict = field(default_factory=dict)  # source-specific fields kept in the output (recording_id, start_s)
    ref: Any = None


class SpeechManifestSource:
    """The project's manifest: TSV `id<TAB>audio[<TAB>text[<TAB>lang]]` or JSONL(.gz) {"id","audio","text","lang",
    "speaker"}; relative audio paths are relative to the manifest's directory."""

    def __init__(self, path: str | os.PathLike):
        self.path = require_input(path, "--manifest")
        self.items = read_speech_manifest(self.path)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[SpeechItem]:
        return iter(self.items)

    def load(self, item: SpeechItem, limits: AudioLimits) -> tuple[np.ndarray, int]:
        return read_audio(item.ref, limits)


def read_speech_manifest(path: str | os.PathLike) -> list[SpeechItem]:
    """Items of a .jsonl(.gz) or .tsv speech manifest, with errors located by file, line and field.

    A TSV header row starting with "id<TAB>audio" is skipped. Duplicate ids are an error (resume relies on ids).
    """
    path = Path(path)
    base = path.parent
    items: list[SpeechItem] = []
    seen: dict[str, int] = {}

    def add(line: int, id_: str, audio: str, text: str, lang: str, speaker: str = "") -> None:
        if not id_:
            raise DataError(path, line, "id", "empty")
        if not audio:
            raise DataError(path, line, "audio", "empty")
        if id_ in seen:
            raise DataError(path, line, "id", f"duplicate id {id_!r} (first on line {seen[id_]})")
        seen[id_] = line
        items.append(SpeechItem(len(items), id_, audio, text, lang, speaker, ref=str(base / audio)))

    if path.suffix == ".tsv":
        with open(path, "rb") as f:
            for line, raw in enumerate(f, 1):
                try:
                    row = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(path, line, None, f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
                cols = row.rstrip("\r\n").split("\t")
                if line == 1 and cols[0] == "id":  # a header: a benchmark list such as id<TAB>text has no audio
                    if cols[:2] != ["id", "audio"]:
                        raise DataError(path, 1, "audio", f"header {cols} has no 'audio' second column; a speech "
                                        "manifest is id<TAB>audio[<TAB>text[<TAB>lang]]")
                    continue
                if not row.strip():
                    continue
                if len(cols) < 2 or len(cols) > 4:
                    raise DataError(path, line, None, f"expected 2-4 tab-separated columns "
                                                      f"(id, audio, text, lang), got {len(cols)}")
                add(line, *cols, *[""] * (4 - len(cols)))
    else:
        for line, rec in iter_jsonl(path):
            id_ = require(rec, "id", (str, int), path, line)
            optional = [require(rec, k, str, path, line) if k in rec else "" for k in ("text", "lang", "speaker")]
            add(line, str(id_), require(rec, "audio", str, path, line), *optional)
    return items


PAST_END_TOLERANCE_S = 0.05  # WenetSpeech/GigaSpeech segments end a few ms past their recording: clipped, counted


def require_input(path: str | os.PathLike, flag: str) -> Path:
    """`path` as given to `flag`, which must exist: a one-line error (kind io, exit 5) instead of a traceback."""
    path = Path(path)
    if not path.exists():
        raise CslmError(path, None, flag, "does not exist", kind="io", reason="missing_input")
    return path


def _require_complete(path: Path, flag: str) -> None:
    """A .gz input is read to its end once before any work: a truncated download stops the run up front,
    before hours of tokenizing, instead of deep inside Lhotse's lazy reader (gzip inflates at ~100s of MB/s)."""
    if path.suffix != ".gz":
        return
    try:
        with gzip.open(path, "rb") as f:
            while f.read(1 << 24):
                pass
    except (EOFError, OSError, zlib.error) as e:
        raise DataError(path, None, flag, f"is truncated or corrupt ({cause_line(e)}); nothing was tokenized",
                        reason="unreadable") from None


_LHOTSE_READ_ERRORS = (ValueError, KeyError, TypeError, AttributeError, EOFError, OSError, zlib.error)


def _lhotse_manifest(path: str | os.PathLike, flag: str, expected: str):
    """The Lhotse manifest at `path` (lazily where Lhotse can), checked to be a `expected` ("CutSet", ...)."""
    from lhotse.serialization import NotALhotseManifest, load_manifest_lazy_or_eager

    path = require_input(path, flag)
    if path.is_dir():
        raise DataError(path, None, flag, f"is a directory; give the {expected} manifest file (.jsonl.gz)",
                        reason="unreadable")
    _require_complete(path, flag)
    try:
        manifest = load_manifest_lazy_or_eager(path)
    except (NotALhotseManifest, *_LHOTSE_READ_ERRORS) as e:
        raise DataError(path, None, flag, f"is not a Lhotse manifest ({cause_line(e)})", reason="unreadable") from e
    return manifest, (type(manifest).__name__ if manifest is not None else expected)


def _read_lhotse(items, where: str | os.PathLike, flag: str, by_line: bool) -> Iterator:
    """Iterate a (lazy) Lhotse manifest; a record that Lhotse cannot read stops the run with one located line.

    `by_line`: a .jsonl manifest holds one item per line, so the item's number is its line number."""
    it = iter(items)
    for number in itertools.count(1):
        try:
            item = next(it)
        except StopIteration:
            return
        except CslmError:
            raise
        except _LHOTSE_READ_ERRORS as e:  # the full message stays in the chain (--debug shows it)
            raise DataError(where, number if by_line else None, flag,
                            f"{'' if by_line else f'item {number}: '}unreadable Lhotse record ({cause_line(e)})",
                            reason="unreadable") from e
        yield item


class LhotseSource:
    """Lhotse cuts: a CutSet manifest, a RecordingSet + SupervisionSet pair (one item per supervision, in the
    supervision manifest's order), or a Shar directory. `trim_to_supervisions` also splits the cuts of a CutSet
    or Shar into one item per supervision (as Lhotse's `trim_to_supervisions(keep_overlapping=False)`).

    Per-item faults are rejects, never a stopped run (read = written + rejected counts every supervision given):
    a supervision whose recording is not in the recordings manifest is `missing_recording`; a span that ends
    past its recording by at most `past_end_tolerance` seconds is clipped to the recording's end (the record
    carries `clipped_to_end_s`), beyond it `past_end`, on every route alike. Whole-input mistakes (a missing or
    truncated manifest, an empty Shar folder, recordings and supervisions swapped) stop before any work.
    """

    def __init__(self, cuts: str | os.PathLike | None = None, recordings: str | os.PathLike | None = None,
                 supervisions: str | os.PathLike | None = None, shar_dir: str | os.PathLike | None = None,
                 trim_to_supervisions: bool = False, past_end_tolerance: float = PAST_END_TOLERANCE_S):
        from lhotse import CutSet

        if sum(x is not None for x in (cuts, recordings, shar_dir)) != 1 or (recordings is None) != (
                supervisions is None):
            raise ValueError("give one of: cuts, recordings + supervisions, shar_dir")
        self.past_end_tolerance = past_end_tolerance
        self.trim = trim_to_supervisions
        self.recordings: dict | None = None
        if cuts is not None:
            self.where, self.flag, self.by_line = str(cuts), "--lhotse-cuts", True
            self.cuts, kind = _lhotse_manifest(cuts, self.flag, "CutSet")
            self.cuts = self.cuts if self.cuts is not None else CutSet()
            if kind != "CutSet":
                raise CslmError(cuts, None, self.flag, f"holds a {kind}, not a CutSet; give a RecordingSet and a "
                                                       "SupervisionSet as --lhotse-recordings/--lhotse-supervisions",
                                kind="usage", reason="usage")
        elif recordings is not None:
            self._open_pair(recordings, supervisions)
        else:
            self.where, self.flag, self.by_line = str(shar_dir), "--lhotse-shar", False
            self.cuts = self._open_shar(shar_dir)

    def _open_pair(self, recordings: str | os.PathLike, supervisions: str | os.PathLike) -> None:
        recs, rec_kind = _lhotse_manifest(recordings, "--lhotse-recordings", "RecordingSet")
        self.cuts, sup_kind = _lhotse_manifest(supervisions, "--lhotse-supervisions", "SupervisionSet")
        if (rec_kind, sup_kind) == ("SupervisionSet", "RecordingSet"):
            raise CslmError.usage(f"{recordings} holds supervisions and {supervisions} recordings: swap "
                                  "--lhotse-recordings and --lhotse-supervisions")
        for path, flag, kind, expected in ((recordings, "--lhotse-recordings", rec_kind, "RecordingSet"),
                                           (supervisions, "--lhotse-supervisions", sup_kind, "SupervisionSet")):
            if kind != expected:
                raise CslmError(path, None, flag, f"holds a {kind}, not a {expected}", kind="usage", reason="usage")
        self.where, self.flag, self.by_line = str(supervisions), "--lhotse-supervisions", True
        self.recordings_path = str(recordings)
        recs = [] if recs is None else recs  # None: an empty manifest (`or` would count a lazy set's lines)
        self.recordings = {rec.id: rec for rec in _read_lhotse(recs, recordings, "--lhotse-recordings", True)}
        self.cuts = [] if self.cuts is None else self.cuts

    @staticmethod
    def _open_shar(shar_dir: str | os.PathLike):
        from lhotse import CutSet

        path = require_input(shar_dir, "--lhotse-shar")
        shards = sorted(path.glob("cuts.*.jsonl*")) if path.is_dir() else []
        if not shards:
            raise DataError(path, None, "--lhotse-shar", "is not a Lhotse Shar folder: it holds no cuts.*.jsonl.gz "
                                                         "shards (CutSet.to_shar writes them)", reason="unreadable")
        for shard in shards:
            _require_complete(shard, "--lhotse-shar")
        return CutSet.from_shar(in_dir=path)

    def __len__(self) -> int:
        raise TypeError("a lazy CutSet's length is only known by reading it")

    def _cuts(self) -> Iterator:
        """The source's cuts in order; a supervision whose recording is missing comes as the supervision."""
        from lhotse.cut.data import DataCut

        items = _read_lhotse(self.cuts, self.where, self.flag, self.by_line)
        if self.recordings is not None:
            for sup in items:
                rec = self.recordings.get(sup.recording_id)
                yield sup if rec is None else supervision_cut(sup, rec)
        elif not self.trim:
            yield from items
        else:
            for cut in items:
                if isinstance(cut, DataCut) and cut.has_recording:
                    yield from (supervision_cut(sup, cut.recording, cut) for sup in cut.supervisions)
                else:
                    yield from cut.trim_to_supervisions(keep_overlapping=False)

    def __iter__(self) -> Iterator[SpeechItem]:
        from lhotse import SupervisionSegment

        for index, cut in enumerate(self._cuts()):
            if isinstance(cut, SupervisionSegment):
                yield SpeechItem(index, cut.id, cut.recording_id, cut.text or "", cut.language or "",
                                 cut.speaker or "", {"recording_id": cut.recording_id, "start_s": round(cut.start, 6)},
                                 ref=AudioRejected("missing_recording", f"recording {cut.recording_id!r} is not in "
                                                                        f"{self.recordings_path}"))
                continue
            sups = cut.supervisions
            text = " ".join(s.text for s in sups if s.text)
            first = sups[0] if sups else None
            where = cut.recording.sources[0].source if cut.has_recording and cut.recording.sources[0].type == "file" \
                else cut.recording_id
            extra = {"recording_id": cut.recording_id, "start_s": round(cut.start, 6)}
            try:
                ref, clipped = fit_to_recording(cut, self.past_end_tolerance)
                if clipped:
                    extra["clipped_to_end_s"] = clipped
            except AudioRejected as e:
                ref = e
            yield SpeechItem(index, cut.id, str(where), text, (first.language or "") if first else "",
                             (first.speaker or "") if first else "", extra, ref=ref)

    def load(self, item: SpeechItem, limits: AudioLimits) -> tuple[np.ndarray, int]:
        if isinstance(item.ref, AudioRejected):  # found while reading the manifest
            raise item.ref
        return load_cut(item.ref, limits)


def supervision_cut(sup, recording, cut=None):
    """The cut of exactly one supervision's span of `recording` (within `cut` when given): Lhotse's
    `trim_to_supervisions` would silently clip a span that runs past the end (or assert), where we clip or reject
    by `fit_to_recording`. The supervision moves to the cut's start; the cut takes the supervision's id."""
    from lhotse.cut import MonoCut, MultiCut
    from lhotse.utils import fastcopy

    start = sup.start + (cut.start if cut is not None else 0.0)
    own = [fastcopy(sup, start=0.0)]
    if cut is not None:
        return fastcopy(cut, id=sup.id, start=start, duration=sup.duration, supervisions=own)
    if isinstance(sup.channel, list) and len(sup.channel) > 1:
        return MultiCut(sup.id, start, sup.duration, channel=sup.channel, recording=recording, supervisions=own)
    channel = sup.channel[0] if isinstance(sup.channel, list) else sup.channel
    return MonoCut(sup.id, start, sup.duration, channel=channel, recording=recording, supervisions=own)


def fit_to_recording(cut, tolerance: float = PAST_END_TOLERANCE_S):
    """(cut, seconds clipped): a span ending past its recording by at most `tolerance` seconds is clipped to the
    recording's end; further, or starting before 0 or after the end, is rejected as `past_end`. An overrun of
    up to one sample is rounding of the manifest's float times and passes unchanged."""
    from lhotse.utils import fastcopy

    if not cut.has_recording:
        return cut, 0.0
    rec = cut.recording
    over = cut.end - rec.duration
    if cut.start < 0 or cut.start >= rec.duration or over > tolerance + 1e-9:
        raise AudioRejected("past_end", f"cut [{cut.start:.3f}, {cut.end:.3f}) s runs past recording {rec.id} "
                                        f"({rec.duration:.3f} s) by more than {tolerance} s")
    if over <= 1.0 / rec.sampling_rate:
        return cut, 0.0
    return fastcopy(cut, duration=rec.duration - cut.start), round(over, 6)


def load_cut(cut, limits: AudioLimits) -> tuple[np.ndarray, int]:
    """A cut's own span as mono float32 at the cut's rate, checked against its recording first.

    A span past the recording's end, or a declared rate that the file's header contradicts, would otherwise be
    padded or resampled into wrong units without a word: both are rejected.
    """
    if not cut.has_recording:
        raise AudioRejected("missing_audio", "cut has no recording")
    rec = cut.recording
    if cut.start < 0 or cut.end > rec.duration + 1.0 / rec.sampling_rate:
        raise AudioRejected("past_end", f"cut [{cut.start:.3f}, {cut.end:.3f}) s runs past recording "
                                        f"{rec.id} ({rec.duration:.3f} s)")
    where = rec.id
    for source in rec.sources:
        if source.type == "file":
            where = source.source
            rate = file_sample_rate(source.source)
            if rate != rec.sampling_rate:
                raise AudioRejected("rate_mismatch", f"{source.source} is {rate} Hz, the manifest says "
                                                     f"{rec.sampling_rate} Hz")
    limits.check_duration(cut.duration)
    try:
        audio = cut.load_audio()  # (channels, samples), the cut's span only
    except Exception as e:  # noqa: BLE001 - any decoder failure is this item's problem, not the run's
        raise AudioRejected("unreadable", f"{where}: {cause_line(e)}") from None
    return check_waveform(np.asarray(audio).T, cut.sampling_rate, limits), cut.sampling_rate


class HFAudioSource:
    """A Hugging Face dataset on local disk (a `save_to_disk` folder, or parquet files / a folder of them) with
    an Audio column (or a column of file paths). Columns are named by the caller; the id column must exist,
    text/lang/speaker columns are optional. Audio cells are decoded here (soundfile), not by `datasets`."""

    def __init__(self, path: str | os.PathLike, audio_column: str = "audio", id_column: str = "id",
                 text_column: str = "text", lang_column: str = "lang", speaker_column: str = "speaker",
                 split: str = "train", cache_dir: str | None = None):
        import datasets

        self.where = str(path)
        p = require_input(path, "--hf-dataset")
        if p.is_dir() and any((p / f).exists() for f in ("state.json", "dataset_dict.json", "dataset_info.json")):
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(path, None, None, f"no split {split!r}; it has {sorted(ds)}")
                ds = ds[split]
        else:
            files = sorted(str(f) for f in p.rglob("*.parquet")) if p.is_dir() else [str(p)]
            if not files:
                raise DataError(path, None, None, "no parquet files and not a save_to_disk folder")
            ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=cache_dir)
        columns = list(ds.column_names)
        for role, name in (("audio", audio_column), ("id", id_column)):
            if name not in columns:
                raise DataError(path, None, name, f"no {role} column {name!r}; the dataset has {columns} "
                                                  f"(name it with --{role}-column)")
        feature = ds.features[audio_column]
        if isinstance(feature, datasets.Audio):
            ds = ds.cast_column(audio_column, datasets.Audio(decode=False))  # bytes + path; we decode ourselves
        self.audio_column, self.id_column = audio_column, id_column
        self.meta_columns = {"text": text_column, "lang": lang_column, "speaker": speaker_column}
        self.meta = ds.select_columns([id_column] + [c for c in self.meta_columns.values() if c in columns])
        self.audio = ds.select_columns([audio_column])

    def __len__(self) -> int:
        return len(self.meta)

    def __iter__(self) -> Iterator[SpeechItem]:
        for index, row in enumerate(self.meta):
            fields = {k: str(row[c]) if row.get(c) is not None else "" for k, c in self.meta_columns.items()}
            id_ = row[self.id_column]
            if id_ is None or id_ == "":
                raise DataError(self.where, index, self.id_column, "empty id")
            yield SpeechItem(index, str(id_), f"{self.where}#{index}", **fields, ref=index)

    def load(self, item: SpeechItem, limits: AudioLimits) -> tuple[np.ndarray, int]:
        cell = self.audio[item.ref][self.audio_column]
        if isinstance(cell, str):
            return read_audio(cell, limits)
        if not cell or (not cell.get("bytes") and not cell.get("path")):
            raise AudioRejected("missing_audio", f"row {item.ref}: column {self.audio_column!r} is empty")
        if cell.get("bytes"):
            return decode_audio_bytes(cell["bytes"], limits)
        return read_audio(cell["path"], limits)


def open_speech_source(manifest: str | None = None, lhotse_cuts: str | None = None,
                       lhotse_recordings: str | None = None, lhotse_supervisions: str | None = None,
                       lhotse_shar: str | None = None, hf_dataset: str | None = None,
                       trim_to_supervisions: bool = False, past_end_tolerance: float = PAST_END_TOLERANCE_S,
                       **hf_columns):
    """The source named by exactly one of the arguments (the tool's input flags)."""
    if manifest:
        return SpeechManifestSource(manifest)
    if lhotse_cuts or lhotse_recordings or lhotse_shar:
        return LhotseSource(lhotse_cuts, lhotse_recordings, lhotse_supervisions, lhotse_shar, trim_to_supervisions,
                            past_end_tolerance)
    if hf_dataset:
        return HFAudioSource(hf_dataset, **hf_columns)
    raise ValueError("no speech source given")


def source_size(source) -> int | None:
    """Item count when the source knows it without reading everything (progress bars), else None."""
    try:
        return len(source)
    except TypeError:
        return None
