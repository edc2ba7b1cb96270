"""Audio -> discrete speech units with the CosyVoice S3 tokenizer (4,096 codes).

Audio of any rate/channels that soundfile reads is downmixed, resampled to 16 kHz and turned into units,
batched by length. Audio longer than the model's 30 s context is tokenized in overlapping windows cut at the
overlap midpoints, so the unit count always equals that of the unwindowed rate (50 or 25 units/s). Bad items
are rejected with a reason instead of stopping a multi-day run, and runs resume from what was written.
"""
from __future__ import annotations

import functools
import json
import math
import multiprocessing
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from megatron_cslm.data.chunking import unit_runs
from megatron_cslm.fileio import DataError, SkipCounter, atomic_open, iter_jsonl, require, write_json

SAMPLE_RATE = 16000
HOP = 160  # mel hop in samples: 100 mel frames per second
MAX_WINDOW_FRAMES = 3000  # 30 s: the S3 encoder's positional context
UNITS_PER_SECOND = {"speech_tokenizer_v1": 50, "speech_tokenizer_v1_25hz": 25}
REJECT_REASONS = ("unreadable", "wrong_format", "truncated", "empty", "silent", "too_short", "too_long")


class AudioRejected(Exception):
    """An item that cannot be tokenized; `reason` is one of REJECT_REASONS."""

    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")

    def __reduce__(self):  # crosses the worker pool: the default would call __init__ with the message only
        return AudioRejected, (self.reason, self.detail)


@dataclass(frozen=True)
class AudioLimits:
    """Acceptance limits: duration in seconds, `min_peak` = max |sample| (full scale 1.0) below which it is silence."""

    min_seconds: float = 0.1
    max_seconds: float = 600.0
    min_peak: float = 1e-3


def _wav_truncated(path: str) -> bool:
    """True if a RIFF/WAVE file's data chunk declares more bytes than the file holds.

    libsndfile silently returns the samples that are there, so a cut-off download would otherwise pass.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        riff = f.read(12)
        if riff[:4] != b"RIFF" or riff[8:12] != b"WAVE":
            return False
        while True:
            header = f.read(8)
            if len(header) < 8:
                return False
            chunk, length = header[:4], struct.unpack("<I", header[4:])[0]
            if chunk == b"data":
                return length != 0xFFFFFFFF and f.tell() + length > size
            f.seek(length + (length & 1), os.SEEK_CUR)


def read_audio(path: str | os.PathLike, limits: AudioLimits = AudioLimits()) -> tuple[np.ndarray, int]:
    """Decode to mono float32 at the file's own rate; raise AudioRejected with a reason for unusable files."""
    import soundfile as sf

    path = str(path)
    if not os.path.isfile(path):
        raise AudioRejected("unreadable", "file not found")
    try:
        info = sf.info(path)
    except sf.LibsndfileError as e:
        raise AudioRejected("wrong_format", str(e.error_string)) from None
    except OSError as e:
        raise AudioRejected("unreadable", str(e)) from None
    if info.format in ("WAV", "WAVEX", "RF64") and _wav_truncated(path):
        raise AudioRejected("truncated", "WAV data chunk is longer than the file")
    if info.frames == 0:
        raise AudioRejected("empty", "no samples")
    seconds = info.frames / info.samplerate
    if seconds < limits.min_seconds:
        raise AudioRejected("too_short", f"{seconds:.3f} s < {limits.min_seconds} s")
    if seconds > limits.max_seconds:
        raise AudioRejected("too_long", f"{seconds:.1f} s > {limits.max_seconds} s")
    try:
        audio, rate = sf.read(path, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise AudioRejected("unreadable", str(e)) from None
    audio = audio.mean(axis=1) if audio.shape[1] > 1 else audio[:, 0]
    if audio.size == 0:
        raise AudioRejected("empty", "no samples decoded")
    peak = float(np.abs(audio).max())
    if peak < limits.min_peak:
        raise AudioRejected("silent", f"peak {peak:.2e} < {limits.min_peak:.0e}")
    return np.ascontiguousarray(audio), rate


def to_16k(audio: np.ndarray | torch.Tensor, rate: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """Resample mono audio to 16 kHz (torchaudio's windowed-sinc resampler)."""
    import torchaudio.functional as AF

    wave = torch.as_tensor(audio, dtype=torch.float32, device=device)
    return wave if rate == SAMPLE_RATE else AF.resample(wave, rate, SAMPLE_RATE)


def load_s3_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """S3 weights from the released ONNX file, a converted torch state dict or safetensors."""
    path = str(path)
    if path.endswith(".onnx"):
        from s3tokenizer.utils import onnx2torch

        return onnx2torch(path, None, False)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


class UnitExtractor:
    """Batched S3 tokenizer on CPU or GPU.

    Args:
        model: "speech_tokenizer_v1" (50 units/s) or "speech_tokenizer_v1_25hz" (25 units/s).
        weights: ONNX / .pt / .safetensors weights; None requires `random_init` (tests and debugging only).
        batch_seconds: padded audio seconds per forward pass (bounds memory).
        window_frames, overlap_frames: long-audio windows in 10 ms mel frames (30 s / 4 s).
    """

    def __init__(self, model: str = "speech_tokenizer_v1", weights: str | os.PathLike | None = None,
                 random_init: bool = False, device: str | torch.device = "cpu", batch_seconds: float = 300.0,
                 window_frames: int = MAX_WINDOW_FRAMES, overlap_frames: int = 400, seed: int = 0):
        from s3tokenizer.model import ModelConfig, S3Tokenizer

        if model not in UNITS_PER_SECOND:
            raise ValueError(f"unknown S3 tokenizer {model!r}; choose from {sorted(UNITS_PER_SECOND)}")
        if (weights is None) == (not random_init):
            raise ValueError("pass exactly one of weights=<file> or random_init=True")
        self.frames_per_unit = 100 // UNITS_PER_SECOND[model]
        if not (0 <= overlap_frames < window_frames <= MAX_WINDOW_FRAMES) or window_frames % self.frames_per_unit \
                or overlap_frames % self.frames_per_unit:
            raise ValueError(f"need 0 <= overlap < window <= {MAX_WINDOW_FRAMES} frames, window a multiple of "
                             f"{self.frames_per_unit}, overlap too")
        self.name = model
        self.units_per_second = UNITS_PER_SECOND[model]
        self.device = torch.device(device)
        self.batch_frames = int(batch_seconds * 100)
        self.window, self.overlap = window_frames, overlap_frames
        torch.manual_seed(seed)
        net = S3Tokenizer(model, ModelConfig(use_sdpa=True))
        if random_init:
            print(f"WARNING: {model} is RANDOMLY INITIALISED: its units are meaningless (tests/debugging only)",
                  file=sys.stderr)
            # Unit-norm codes: the quantizer compares normalised features by Euclidean distance, so random codes
            # of unequal norm would all lose to the shortest one and every frame would get the same unit.
            embed = net.quantizer._codebook.embed
            embed.copy_(torch.nn.functional.normalize(torch.randn_like(embed), dim=-1))
            self.label = f"{model}+random-init"
        else:
            net.load_state_dict(load_s3_state_dict(weights), strict=True)
            self.label = model
        self.net = net.to(self.device).eval()

    def num_units(self, num_samples: int) -> int:
        """Units for `num_samples` of 16 kHz audio (the encoder's conv arithmetic)."""
        return math.ceil((num_samples // HOP) / self.frames_per_unit)

    def _windows(self, frames: int) -> list[tuple[int, int, int, int]]:
        """(start, end) mel frames of each window and the [keep_from, keep_to) unit range it contributes."""
        if frames <= self.window:
            return [(0, frames, 0, math.ceil(frames / self.frames_per_unit))]
        fpu, hop = self.frames_per_unit, self.window - self.overlap
        n = math.ceil((frames - self.window) / hop) + 1
        starts = [i * hop for i in range(n - 1)] + [math.ceil((frames - self.window) / fpu) * fpu]
        ends = [min(s + self.window, frames) for s in starts]
        # Cut each overlap at its midpoint (a unit boundary), so every unit comes from the window where it
        # has the most context on both sides.
        cuts = [0] + [(starts[i + 1] + ends[i]) // (2 * fpu) for i in range(n - 1)] + [math.ceil(frames / fpu)]
        return [(s, e, cuts[i], cuts[i + 1]) for i, (s, e) in enumerate(zip(starts, ends))]

    @torch.inference_mode()
    def __call__(self, waves: Sequence[torch.Tensor]) -> list[list[int]]:
        """Units of each 16 kHz mono waveform."""
        from s3tokenizer.utils import log_mel_spectrogram

        pieces = []  # (item, mel window, keep range in window-local units)
        for item, wave in enumerate(waves):
            mel = log_mel_spectrogram(wave.to(self.device, torch.float32), n_mels=128)
            for start, end, keep_from, keep_to in self._windows(mel.shape[1]):
                offset = start // self.frames_per_unit
                pieces.append((item, mel[:, start:end], keep_from - offset, keep_to - offset))
        codes: list[torch.Tensor | None] = [None] * len(pieces)
        order = sorted(range(len(pieces)), key=lambda i: pieces[i][1].shape[1])
        for batch in self._batches([pieces[i][1].shape[1] for i in order]):
            idx = [order[b] for b in batch]
            mels = [pieces[i][1] for i in idx]
            lengths = torch.tensor([m.shape[1] for m in mels], device=self.device)
            padded = torch.nn.utils.rnn.pad_sequence([m.t() for m in mels], batch_first=True).transpose(1, 2)
            batch_codes, batch_lens = self.net.quantize(padded, lengths)
            for row, i in enumerate(idx):
                codes[i] = batch_codes[row, :batch_lens[row]].cpu()
        out: list[list[int]] = [[] for _ in waves]
        for (item, _, keep_from, keep_to), piece_codes in zip(pieces, codes):  # an item's pieces are in time order
            out[item] += piece_codes[keep_from:keep_to].tolist()
        return out

    def _batches(self, sorted_lengths: list[int]) -> Iterator[list[int]]:
        """Positions into `sorted_lengths` grouped so that padded frames per batch stay within budget."""
        batch: list[int] = []
        for pos, length in enumerate(sorted_lengths):
            if batch and length * (len(batch) + 1) > self.batch_frames:
                yield batch
                batch = []
            batch.append(pos)
        if batch:
            yield batch


@dataclass(frozen=True)
class ManifestItem:
    id: str
    audio: str  # as written in the manifest
    path: str  # resolved: relative paths are relative to the manifest's directory
    text: str
    lang: str


def read_manifest(path: str | os.PathLike) -> list[ManifestItem]:
    """Items of a .jsonl(.gz) ({"id","audio","text"?,"lang"?}) or .tsv (id, audio[, text[, lang]]) manifest.

    A TSV header row starting with "id<TAB>audio" is skipped. Duplicate ids are an error (resume relies on ids).
    """
    path = Path(path)
    base = path.parent
    items: list[ManifestItem] = []
    seen: dict[str, int] = {}

    def add(line: int, id_: str, audio: str, text: str, lang: str) -> None:
        if not id_:
            raise DataError(path, line, "id", "empty")
        if not audio:
            raise DataError(path, line, "audio", "empty")
        if id_ in seen:
            raise DataError(path, line, "id", f"duplicate id {id_!r} (first on line {seen[id_]})")
        seen[id_] = line
        items.append(ManifestItem(id_, audio, str(base / audio), text, lang))

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
            add(line, str(id_), require(rec, "audio", str, path, line),
                require(rec, "text", str, path, line) if "text" in rec else "",
                require(rec, "lang", str, path, line) if "lang" in rec else "")
    return items


def _done_ids(output: Path, label: str) -> set[str]:
    """Ids already in `output`; drops a partial last line left by a killed run and refuses to mix tokenizers."""
    if not output.exists():
        return set()
    with open(output, "rb+") as f:
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
            print(f"{output}: dropping an incomplete last line ({size - end} bytes) from an interrupted run",
                  file=sys.stderr)
            f.truncate(end)
    done = set()
    for line, rec in iter_jsonl(output):
        if rec.get("tokenizer") != label:
            raise DataError(output, line, "tokenizer", f"{rec.get('tokenizer')!r} differs from this run's {label!r}: "
                                                       "resuming would mix units of two tokenizers")
        done.add(rec["id"])
    return done


def _load(item: ManifestItem, limits: AudioLimits) -> tuple[np.ndarray, int] | AudioRejected:
    """Worker-side decode; returns the rejection instead of raising so one bad file can't stop the pool."""
    try:
        return read_audio(item.path, limits)
    except AudioRejected as e:
        return e
    except Exception as e:  # noqa: BLE001 - any decoder failure is this item's problem, not the run's
        return AudioRejected("unreadable", f"{type(e).__name__}: {e}")


def _record(item: ManifestItem, units: list[int], num_samples: int, dedup: bool, label: str) -> dict:
    rec = {"id": item.id, "audio": item.audio, "text": item.text, "lang": item.lang}
    if dedup:
        merged, durations = unit_runs(units)
        rec.update(units=merged, durations=durations)
    else:
        rec["units"] = units
    rec.update(num_frames=len(units), sample_rate=SAMPLE_RATE, tokenizer=label,
               duration_s=round(num_samples / SAMPLE_RATE, 4))
    return rec


def tokenize_manifest(manifest: str | os.PathLike, output: str | os.PathLike, extractor: UnitExtractor,
                      workers: int = 0, dedup: bool = False, limits: AudioLimits = AudioLimits(),
                      rejects: str | os.PathLike | None = None, chunk_items: int = 64,
                      progress: bool = True) -> dict:
    """Tokenize every manifest item not yet in `output` (JSONL, appended chunk by chunk, so runs resume).

    `workers` processes decode the next chunk of files while the model runs on this one. Rejected items go to
    `rejects` (TSV id, path, reason, detail; default `<output>.rejects.tsv`) and are retried on the next run.
    Returns stats (also written to `<output>.stats.json`): read = written + skipped by reason.
    """
    from tqdm import tqdm

    output = Path(output)
    rejects = Path(rejects) if rejects else output.with_name(output.name + ".rejects.tsv")
    items = read_manifest(manifest)
    output.parent.mkdir(parents=True, exist_ok=True)
    done = _done_ids(output, extractor.label)
    todo = [it for it in items if it.id not in done]
    chunks = [todo[i:i + chunk_items] for i in range(0, len(todo), chunk_items)]
    counter, rejected = SkipCounter(), []
    seconds = units_total = 0
    load = functools.partial(_load, limits=limits)
    # Workers only decode files (numpy/libsndfile); torch work stays in this process, so fork is safe.
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 0 else None

    def decode(chunk: list[ManifestItem]):  # at most one chunk decoded ahead: memory stays bounded
        return pool.map_async(load, chunk) if pool else [load(it) for it in chunk]

    try:
        pending = decode(chunks[0]) if chunks else None
        with open(output, "a", encoding="utf-8") as out, \
                tqdm(total=len(todo), unit="file", desc="tokenize", disable=not progress) as bar:
            for k, chunk in enumerate(chunks):
                results = pending.get() if pool else pending
                if k + 1 < len(chunks):
                    pending = decode(chunks[k + 1])
                counter.read += len(chunk)
                good = []
                for it, r in zip(chunk, results):
                    if isinstance(r, AudioRejected):
                        counter.skip(r.reason, f"{it.id}: {r.detail}")
                        rejected.append((it.id, it.path, r.reason, r.detail))
                    else:
                        good.append((it, to_16k(*r, extractor.device)))
                recs = [_record(it, units, wave.numel(), dedup, extractor.label)
                        for (it, wave), units in zip(good, extractor([wave for _, wave in good]))]
                out.writelines(json.dumps(rec, ensure_ascii=False) + "\n" for rec in recs)
                out.flush()  # whole lines per chunk, synced: a crash loses at most this chunk
                os.fsync(out.fileno())
                counter.written += len(recs)
                seconds += sum(rec["duration_s"] for rec in recs)
                units_total += sum(rec["num_frames"] for rec in recs)
                bar.update(len(chunk))
    finally:
        if pool:
            pool.terminate()
    with atomic_open(rejects) as f:
        f.write("id\tpath\treason\tdetail\n")
        f.writelines("\t".join(str(c).replace("\t", " ").replace("\n", " ") for c in r) + "\n" for r in rejected)
    stats = {**counter.as_dict(), "already_done": len(items) - len(todo), "audio_seconds": round(seconds, 3),
             "unit_frames": units_total, "tokenizer": extractor.label}
    write_json(output.with_name(output.name + ".stats.json"), stats)
    return stats
