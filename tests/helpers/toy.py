"""Build the toy corpus, toy tokenizer and pretraining .bin/.idx through the library (what the tools call)."""
from __future__ import annotations

from megatron_cslm.toy.pipeline import TOY_UNITS, build_toy_pretrain  # noqa: F401 (re-exported)


def build_toy_sft(toy: dict, seq_length: int = 512) -> str:
    """Pack the toy spoken dialogues (interleaved chain of modality) with the toy tokenizer; returns the prefix."""
    from megatron_cslm.data.sft import SFTConfig, build_sft_data
    from megatron_cslm.text.tokenizer import SpeechTextTokenizer

    prefix = str(toy["root"] / "sft" / "interleaved")
    build_sft_data([toy["corpus"] / "dialogue_sft.jsonl"], SpeechTextTokenizer.from_pretrained(toy["tokenizer"]),
                   SFTConfig(layout="interleaved"), prefix, seq_length=seq_length, progress=False)
    return prefix
