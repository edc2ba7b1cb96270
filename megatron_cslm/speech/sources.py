"""Speech corpora as users hold them: TSV/JSONL manifests, Lhotse manifests and Shar, Hugging Face datasets.

Each source yields `SpeechItem`s in a fixed order (the order that sharded runs split and merge by) and decodes one
item's audio with `load`. Formats that a library reads are read by it: Lhotse manifests with `load_manifest_lazy`
/ `CutSet.from_manifests` / `CutSet.from_shar`, Hugging Face datasets with `load_from_disk` /
`load_dataset("parquet")`; only the project's own TSV/JSONL manifest is parsed here.

Invariants: an item's id is unique within its source (resume and merge key on it); a Lhotse cut is decoded from
its own span of the recording, never the whole recording; text, language, speaker and the source's ids travel with
the item into the units JSONL. Sources are opened in the parent process and inherited by forked decode workers,
so `load` may run in any process.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from megatron_cslm.fileio import DataError, iter_jsonl, require
from megatron_cslm.speech.audio import (
    AudioLimits,
    AudioRejected,
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
        self.path = Path(path)
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


class LhotseSource:
    """Lhotse cuts: a CutSet manifest, a RecordingSet + SupervisionSet pair (one cut per supervision, so long
    recordings with segment timestamps give one item per segment), or a Shar directory.

    `trim_to_supervisions` also splits the cuts of a CutSet or Shar into one cut per supervision.
    """

    def __init__(self, cuts: str | os.PathLike | None = None, recordings: str | os.PathLike | None = None,
                 supervisions: str | os.PathLike | None = None, shar_dir: str | os.PathLike | None = None,
                 trim_to_supervisions: bool = False):
        from lhotse import CutSet, load_manifest
        from lhotse.serialization import load_manifest_lazy_or_eager

        if sum(x is not None for x in (cuts, recordings, shar_dir)) != 1 or (recordings is None) != (
                supervisions is None):
            raise ValueError("give one of: cuts, recordings + supervisions, shar_dir")
        if cuts is not None:
            self.where = str(cuts)
            self.cuts = load_manifest_lazy_or_eager(cuts) or CutSet()
        elif recordings is not None:
            self.where = f"{recordings} + {supervisions}"
            self.cuts = CutSet.from_manifests(recordings=load_manifest(recordings),
                                              supervisions=load_manifest(supervisions))
            trim_to_supervisions = True
        else:
            self.where = str(shar_dir)
            self.cuts = CutSet.from_shar(in_dir=shar_dir)
        if not isinstance(self.cuts, CutSet):
            raise DataError(self.where, None, None, f"is a {type(self.cuts).__name__}, not a CutSet; give "
                                                    "recordings and supervisions as a pair")
        if trim_to_supervisions:
            self.cuts = self.cuts.trim_to_supervisions(keep_overlapping=False)

    def __len__(self) -> int:
        raise TypeError("a lazy CutSet's length is only known by reading it")

    def __iter__(self) -> Iterator[SpeechItem]:
        for index, cut in enumerate(self.cuts):
            sups = cut.supervisions
            text = " ".join(s.text for s in sups if s.text)
            first = sups[0] if sups else None
            where = cut.recording.sources[0].source if cut.has_recording and cut.recording.sources[0].type == "file" \
                else cut.recording_id
            yield SpeechItem(index, cut.id, str(where), text, (first.language or "") if first else "",
                             (first.speaker or "") if first else "",
                             {"recording_id": cut.recording_id, "start_s": round(cut.start, 6)}, ref=cut)

    def load(self, item: SpeechItem, limits: AudioLimits) -> tuple[np.ndarray, int]:
        return load_cut(item.ref, limits)


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
    for source in rec.sources:
        if source.type == "file":
            rate = file_sample_rate(source.source)
            if rate != rec.sampling_rate:
                raise AudioRejected("rate_mismatch", f"{source.source} is {rate} Hz, the manifest says "
                                                     f"{rec.sampling_rate} Hz")
    limits.check_duration(cut.duration)
    try:
        audio = cut.load_audio()  # (channels, samples), the cut's span only
    except Exception as e:  # noqa: BLE001 - any decoder failure is this item's problem, not the run's
        raise AudioRejected("unreadable", f"{type(e).__name__}: {e}") from None
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
        p = Path(path)
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
                       trim_to_supervisions: bool = False, **hf_columns):
    """The source named by exactly one of the arguments (the tool's input flags)."""
    if manifest:
        return SpeechManifestSource(manifest)
    if lhotse_cuts or lhotse_recordings or lhotse_shar:
        return LhotseSource(lhotse_cuts, lhotse_recordings, lhotse_supervisions, lhotse_shar, trim_to_supervisions)
    if hf_dataset:
        return HFAudioSource(hf_dataset, **hf_columns)
    raise ValueError("no speech source given")


def source_size(source) -> int | None:
    """Item count when the source knows it without reading everything (progress bars), else None."""
    try:
        return len(source)
    except TypeError:
        return None
