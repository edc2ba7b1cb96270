"""Listening to the spoken answer: ASR with a local Whisper directory, and UTMOS with a local model file.

Why: the paper's speech-text consistency is the error rate between the text answer and an ASR transcript of the
spoken answer, and its speech quality is UTMOS. Both take audio, not units, so they work on whatever produced
the waveforms (`cslm synthesize`, or any other vocoder): answers come as wav files keyed by item id or as
in-memory waveforms.

Loading contracts (nothing is downloaded):
- ASR: a local directory that transformers' ``pipeline("automatic-speech-recognition", model=DIR)`` loads
  (config, weights and the processor: a Whisper checkpoint saved with its WhisperProcessor, or any other ASR
  model the pipeline supports). Audio is resampled to the feature extractor's rate.
- UTMOS: a TorchScript file (``torch.jit.save``; any suffix but ``.onnx``) or an ONNX file (``.onnx``) that maps
  a float32 batch of 16 kHz mono waveforms, shape (batch, samples), to one MOS per waveform, shape (batch,) or
  (batch, 1). One waveform is scored at a time, so no padding changes a score.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from megatron_cslm.errors import CslmError
from megatron_cslm.speech.audio import SAMPLE_RATE, read_audio, to_16k

log = logging.getLogger(__name__)

Wave = tuple[np.ndarray, int]  # mono samples, sample rate


def answer_wavs(folder: str | os.PathLike, ids: Sequence[str]) -> dict[str, Path]:
    """The ``<id>.wav`` files of `ids` found in `folder` (items without one are left out and logged)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CslmError(folder, None, "--answer-audio-dir", "is not a directory of <id>.wav files", kind="io",
                        reason="missing_input")
    found = {i: folder / f"{i}.wav" for i in ids if (folder / f"{i}.wav").is_file()}
    if len(found) < len(ids):
        log.warning("%s: %d of %d items have no <id>.wav; they get no ASR or UTMOS score", folder,
                    len(ids) - len(found), len(ids))
    return found


def load_waves(sources: Mapping[str, str | os.PathLike | Wave]) -> dict[str, Wave]:
    """{id: (mono float32 samples, rate)} from wav paths or in-memory (samples, rate) pairs."""
    waves = {}
    for key, src in sources.items():
        if isinstance(src, tuple):
            audio, rate = src
        else:
            audio, rate = read_audio(src)
        audio = np.asarray(audio, dtype=np.float32)
        waves[key] = (audio.mean(axis=1) if audio.ndim == 2 else audio, int(rate))
    return waves


def _model_dir(path: str | os.PathLike, flag: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise CslmError(path, None, flag, "does not exist (give a local model; nothing is downloaded)",
                        kind="io", reason="missing_input")
    return path


class PipelineAsr:
    """Transcribes waveforms with a local transformers ASR model directory (Whisper or any pipeline model)."""

    def __init__(self, model_dir: str | os.PathLike, language: str | None = None, batch_size: int = 8,
                 max_new_tokens: int = 128, device: str = "cpu"):
        from transformers import pipeline

        self.model_dir = _model_dir(model_dir, "--asr-model")
        self.pipe = pipeline("automatic-speech-recognition", model=str(self.model_dir), device=device)
        self.rate = getattr(self.pipe.feature_extractor, "sampling_rate", SAMPLE_RATE)
        tokenizer = getattr(self.pipe, "tokenizer", None)
        # the pipeline batches only with a pad token (real Whisper tokenizers have one)
        self.batch_size = batch_size if tokenizer is None or tokenizer.pad_token_id is not None else 1
        limit = getattr(self.pipe.model.config, "max_target_positions", None)  # Whisper: 448 with the prompt
        self.generate_kwargs = {"max_new_tokens": max_new_tokens if limit is None else min(max_new_tokens, limit - 4)}
        if language and getattr(self.pipe.model.generation_config, "lang_to_id", None):  # a multilingual Whisper
            self.generate_kwargs.update(language=language, task="transcribe")

    def __call__(self, waves: Sequence[Wave]) -> list[str]:
        inputs = [{"raw": self._resample(audio, rate), "sampling_rate": self.rate} for audio, rate in waves]
        if not inputs:
            return []
        kwargs = {"generate_kwargs": self.generate_kwargs} if self.pipe.model.can_generate() else {}
        outputs = self.pipe(inputs, batch_size=self.batch_size, **kwargs)
        return [o["text"].strip() for o in outputs]

    def _resample(self, audio: np.ndarray, rate: int) -> np.ndarray:
        if rate == self.rate:
            return audio
        import torch
        import torchaudio.functional as AF

        return AF.resample(torch.as_tensor(audio), rate, self.rate).numpy()


class Utmos:
    """A MOS predictor loaded from a TorchScript or ONNX file (see the module docstring for the contract)."""

    def __init__(self, path: str | os.PathLike):
        self.path = _model_dir(path, "--utmos-model")
        if self.path.suffix == ".onnx":
            import onnxruntime as ort

            self.session = ort.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
            self.input = self.session.get_inputs()[0].name
            self.module = None
        else:
            import torch

            self.module = torch.jit.load(str(self.path), map_location="cpu").eval()

    def __call__(self, waves: Sequence[Wave]) -> list[float]:
        scores = []
        for audio, rate in waves:
            wave = to_16k(audio, rate)[None, :]
            if self.module is not None:
                import torch

                with torch.inference_mode():
                    out = np.asarray(self.module(wave).detach().cpu(), dtype=np.float64)
            else:
                out = np.asarray(self.session.run(None, {self.input: wave.numpy()})[0], dtype=np.float64)
            if out.size != 1:
                raise CslmError(self.path, None, "--utmos-model",
                                f"returned shape {list(out.shape)} for one waveform; expected (1,) or (1, 1)",
                                kind="compat", reason="incompatible")
            scores.append(float(out.reshape(())))
        return scores
