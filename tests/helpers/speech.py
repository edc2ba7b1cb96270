"""Short real-speech clips for the speech-source tests, cut from the two 16 kHz wavs that s3tokenizer ships."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf


def speech(seconds_total: float = 8.0) -> np.ndarray:
    """Both assets end to end (float32 from PCM_16, so writing it back as PCM_16 is lossless)."""
    import s3tokenizer

    waves = [sf.read(p, dtype="float32")[0] for p in sorted((Path(s3tokenizer.__file__).parent / "assets")
                                                          .glob("*.wav"))]
    return np.concatenate(waves)[: int(seconds_total * 16000)]


def clips(n: int, seconds: tuple[float, float] = (0.6, 1.4)) -> list[np.ndarray]:
    """n clips of varying length (deterministic), each a different stretch of speech."""
    audio = speech()
    lengths = np.linspace(*seconds, n)
    starts = np.linspace(0, audio.size - int(seconds[1] * 16000) - 1, n).astype(int)
    return [audio[s: s + int(sec * 16000)] for s, sec in zip(starts, lengths)]
