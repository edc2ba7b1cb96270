"""Decoding audio for the speech tokenizer: files, spans of long recordings and in-memory bytes.

Every route ends in the same `check_waveform` (mono float32, silence/duration limits) and `to_16k`, so a corpus
given as a TSV of files, a Lhotse manifest or a Hugging Face dataset yields the same samples for the same audio.
Unusable audio raises `AudioRejected` with a reason from `REJECT_REASONS`; a multi-day run records it and goes
on instead of stopping. Spans are read by seeking (`start`, `frames`), never by decoding the whole recording.
"""
from __future__ import annotations

import io
import os
import re
import struct
from dataclasses import dataclass

import numpy as np
import torch

from megatron_cslm.errors import CslmError

SAMPLE_RATE = 16000
REJECT_REASONS = ("unreadable", "wrong_format", "truncated", "empty", "silent", "too_short", "too_long",
                  "past_end", "rate_mismatch", "missing_audio", "missing_recording")
CAUSE_CHARS = 200  # a reject's cause is one short line; decoders' messages run to kilobytes (tried backends, ...)


class AudioRejected(CslmError):
    """An item that cannot be tokenized; `reason` is one of REJECT_REASONS, `detail` says why in words.

    A thin subclass of the project's one error type (errors.py), kept for its (reason, detail) constructor used
    across speech/; picklable through CslmError."""

    def __init__(self, reason: str, detail: str):
        super().__init__(None, None, None, f"{reason}: {detail}", reason=reason)
        self.detail = detail


def cause_line(error: BaseException, limit: int = CAUSE_CHARS) -> str:
    """`Type: first line of the message`, cut to `limit` characters: what a rejects TSV or an error line shows.

    A first line that only announces details ("Reading audio from '<file>' failed. Details:", Lhotse's audio
    errors) gives way to the next one, and `<class 'a.b.Name'>` is shortened to `Name`."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    first = lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0] if lines else ""
    text = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", f"{type(error).__name__}: {first}".rstrip(": "))
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class AudioLimits:
    """Acceptance limits: duration in seconds, `min_peak` = max |sample| (full scale 1.0) below which it is silence."""

    min_seconds: float = 0.1
    max_seconds: float = 600.0
    min_peak: float = 1e-3

    def check_duration(self, seconds: float) -> None:
        if seconds < self.min_seconds:
            raise AudioRejected("too_short", f"{seconds:.3f} s < {self.min_seconds} s")
        if seconds > self.max_seconds:
            raise AudioRejected("too_long", f"{seconds:.1f} s > {self.max_seconds} s")


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


def check_waveform(audio: np.ndarray, rate: int, limits: AudioLimits) -> np.ndarray:
    """Downmix 2-D (samples, channels) input and apply the limits; mono float32 out."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 2:
        audio = audio.mean(axis=1) if audio.shape[1] > 1 else audio[:, 0]
    if audio.size == 0:
        raise AudioRejected("empty", "no samples decoded")
    limits.check_duration(audio.size / rate)
    peak = float(np.abs(audio).max())
    if peak < limits.min_peak:
        raise AudioRejected("silent", f"peak {peak:.2e} < {limits.min_peak:.0e}")
    return np.ascontiguousarray(audio)


def file_sample_rate(path: str) -> int:
    """The rate in the file's header; AudioRejected for missing or undecodable files."""
    import soundfile as sf

    if not os.path.isfile(path):
        raise AudioRejected("unreadable", f"file not found: {path}")
    try:
        return sf.info(path).samplerate
    except sf.LibsndfileError as e:
        raise AudioRejected("wrong_format", str(e.error_string)) from None
    except OSError as e:
        raise AudioRejected("unreadable", str(e)) from None


def read_audio(path: str | os.PathLike, limits: AudioLimits = AudioLimits(), start: int = 0,
               frames: int | None = None) -> tuple[np.ndarray, int]:
    """Decode samples [start, start + frames) of a file (all by default) to mono float32 at the file's own rate.

    Raises AudioRejected with a reason for unusable files, and "past_end" for a span the file does not hold.
    """
    import soundfile as sf

    path = str(path)
    file_sample_rate(path)
    info = sf.info(path)
    if info.format in ("WAV", "WAVEX", "RF64") and _wav_truncated(path):
        raise AudioRejected("truncated", "WAV data chunk is longer than the file")
    if info.frames == 0:
        raise AudioRejected("empty", "no samples")
    if frames is None:
        frames = info.frames - start
    if start < 0 or start + frames > info.frames:
        raise AudioRejected("past_end", f"samples [{start}, {start + frames}) run past the file's {info.frames} "
                                        f"({(start + frames) / info.samplerate:.3f} s > "
                                        f"{info.frames / info.samplerate:.3f} s)")
    limits.check_duration(frames / info.samplerate)  # before decoding: a 3-hour file is refused unread
    try:
        audio, rate = sf.read(path, start=start, frames=frames, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise AudioRejected("unreadable", str(e)) from None
    return check_waveform(audio, rate, limits), rate


def decode_audio_bytes(data: bytes, limits: AudioLimits = AudioLimits()) -> tuple[np.ndarray, int]:
    """Decode an encoded audio file held in memory (a Hugging Face Audio cell's "bytes")."""
    import soundfile as sf

    try:
        audio, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as e:
        raise AudioRejected("wrong_format", str(getattr(e, "error_string", e))) from None
    return check_waveform(audio, rate, limits), rate


def to_16k(audio: np.ndarray | torch.Tensor, rate: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """Resample mono audio to 16 kHz (torchaudio's windowed-sinc resampler)."""
    import torchaudio.functional as AF

    wave = torch.as_tensor(audio, dtype=torch.float32, device=device)
    return wave if rate == SAMPLE_RATE else AF.resample(wave, rate, SAMPLE_RATE)
