"""Audio -> CosyVoice S3 speech units: decoding (audio), sources (manifests, Lhotse, HF datasets), the batched
extractor (extract), the sharded, resumable runner (sharded) and the identity every unit artifact carries
(identity).

Names are resolved lazily: `megatron_cslm.speech.identity` is read by every artifact reader and must not pull
in torch or torchaudio through this package's import.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "REJECT_REASONS": "audio", "SAMPLE_RATE": "audio", "AudioLimits": "audio", "AudioRejected": "audio",
    "read_audio": "audio", "to_16k": "audio",
    "UNITS_PER_SECOND": "extract", "UnitExtractor": "extract", "load_s3_state_dict": "extract",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
