"""Audio -> CosyVoice S3 speech units: decoding (audio), sources (manifests, Lhotse, HF datasets), the batched
extractor (extract) and the sharded, resumable runner (sharded)."""
from megatron_cslm.speech.audio import REJECT_REASONS, SAMPLE_RATE, AudioLimits, AudioRejected, read_audio, to_16k
from megatron_cslm.speech.extract import UNITS_PER_SECOND, UnitExtractor, load_s3_state_dict

__all__ = ["REJECT_REASONS", "SAMPLE_RATE", "AudioLimits", "AudioRejected", "read_audio", "to_16k",
           "UNITS_PER_SECOND", "UnitExtractor", "load_s3_state_dict"]
