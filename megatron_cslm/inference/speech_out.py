"""Spoken answers to audio: SA chunks -> durations -> frame-rate units -> CosyVoice audio, chunk by chunk.

Why here (inference/, not speech/): it joins the decode loop's SA chunks (inference/parse.py), the duration
sources of inference/durations.py and the synthesizer of speech/synthesis.py. `cslm synthesize` (from decode
outputs) and `cslm decode --synthesize` (while decoding: each SA chunk is synthesized as soon as it completes)
use the same `SpeechOut`.

Invariants: before any audio is made, the duration predictor, the units' speech tokenizer and the CosyVoice flow
must agree on the unit count and the frame rate (a 25 Hz flow fed 50 Hz units speaks at half speed), else a
`compat` error names both values; the audio of an utterance is the concatenation of its chunks' audio.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from megatron_cslm.errors import CslmError
from megatron_cslm.fileio import atomic_open
from megatron_cslm.inference.durations import repeat_units, unit_durations
from megatron_cslm.speech.duration_model import DurationPredictor
from megatron_cslm.speech.identity import SpeechTokenizerId
from megatron_cslm.speech.synthesis import CosyVoiceSynthesizer, SpeakerPrompt, SynthesisStream, write_wav

log = logging.getLogger(__name__)


def check_speech_out(synth: CosyVoiceSynthesizer, durations, identity: SpeechTokenizerId | None,
                     where: str) -> None:
    """Unit count and frame rate of (duration predictor, units' tokenizer) against the CosyVoice flow."""
    if isinstance(durations, DurationPredictor):
        cfg = durations.config
        if cfg.num_units != synth.num_units:
            raise CslmError.compat(f"the duration predictor has {cfg.num_units} units but the CosyVoice flow "
                                   f"({synth.source}) has {synth.num_units}", field="--duration-model")
        identity = identity or cfg.identity()
    if identity is not None:
        if identity.num_codes != synth.num_units:
            raise CslmError.compat(f"{where} has units of {identity.describe()} but the CosyVoice flow "
                                   f"({synth.source}) has {synth.num_units} units", field="units")
        if float(identity.units_per_second) != float(synth.units_per_second):
            raise CslmError.compat(f"{where} has units of {identity.describe()} but the CosyVoice flow "
                                   f"({synth.source}) reads {synth.units_per_second:g} units/s: use the CosyVoice "
                                   "model of that tokenizer", field="units")


@dataclass
class ChunkAudio:
    index: int
    units: int  # deduplicated units in
    frames: int  # frame-rate units synthesized
    samples: int
    seconds_to_synthesize: float


@dataclass
class Utterance:
    stream: SynthesisStream
    audio: list[torch.Tensor] = field(default_factory=list)
    chunks: list[ChunkAudio] = field(default_factory=list)


class SpeechOut:
    """Synthesizes utterances SA chunk by SA chunk; `durations` as in inference/durations.py (None: the units are
    already at frame rate)."""

    def __init__(self, synth: CosyVoiceSynthesizer, durations: int | Sequence[float] | DurationPredictor | None,
                 speaker: SpeakerPrompt | None = None, duration_speaker: str | None = None, rounding: str = "mean"):
        self.synth, self.durations, self.speaker = synth, durations, speaker
        self.duration_speaker, self.rounding = duration_speaker, rounding
        self._open: dict[str, Utterance] = {}

    def frames(self, units: Sequence[int]) -> list[int]:
        """Frame-rate units of one chunk of (deduplicated) units."""
        if self.durations is None:
            return list(units)
        return repeat_units(units, unit_durations(units, self.durations, self.duration_speaker, self.rounding))

    def push(self, key: str, units: Sequence[int]) -> torch.Tensor:
        """One SA chunk of utterance `key`: its audio, made now."""
        utt = self._open.get(key)
        if utt is None:
            utt = self._open[key] = Utterance(self.synth.stream(self.speaker))
        start = time.perf_counter()
        frames = self.frames(units)
        audio = utt.stream.push(frames)
        utt.audio.append(audio)
        utt.chunks.append(ChunkAudio(len(utt.chunks), len(units), len(frames), audio.numel(),
                                     round(time.perf_counter() - start, 4)))
        return audio

    def finish(self, key: str, wav_path: str | os.PathLike | None = None) -> dict:
        """Close utterance `key`; write its WAV when a path is given; return its summary."""
        utt = self._open.pop(key, None)
        audio = torch.cat(utt.audio) if utt and utt.audio else torch.zeros(0)
        if wav_path is not None:
            write_wav(wav_path, audio, self.synth.sample_rate)
        return {"id": key, "wav": None if wav_path is None else str(wav_path), "sample_rate": self.synth.sample_rate,
                "samples": audio.numel(), "seconds": round(audio.numel() / self.synth.sample_rate, 3),
                "chunks": [c.__dict__ for c in (utt.chunks if utt else [])]}


    def on_chunk(self, question, chunk) -> torch.Tensor | None:
        """The decode loop's `on_chunk`: synthesize each SA chunk as soon as it completes (returns its audio)."""
        if chunk.kind == "sa" and chunk.units:
            return self.push(question.id, chunk.units)
        return None

    def write_answers(self, questions: Sequence, responses: Sequence, output_dir: str | os.PathLike) -> list[dict]:
        """Finish every answer (SA chunks not streamed through `on_chunk` are synthesized now, in order) into
        <output_dir>/wav/<id>.wav and append the summaries to <output_dir>/synthesis.jsonl."""
        summaries = []
        for q, r in zip(questions, responses):
            if q.id not in self._open:
                for c in r.parsed.of_kind("sa"):
                    if c.units:
                        self.push(q.id, c.units)
            summaries.append(self.finish(q.id, wav_name(output_dir, q.id)))
        append_summaries(output_dir, summaries)
        return summaries


def append_summaries(output_dir: str | os.PathLike, summaries: Sequence[dict]) -> None:
    path = Path(output_dir) / "synthesis.jsonl"
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    with atomic_open(path) as f:
        f.write(old + "".join(json.dumps(s) + "\n" for s in summaries))


def wav_name(output_dir: str | os.PathLike, key: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
    return Path(output_dir) / "wav" / f"{safe}.wav"
