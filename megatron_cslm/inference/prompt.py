"""Inference prompts laid out exactly as SFT laid out the user turn (`megatron_cslm.sft_data`).

The instruction names the answer language ("... in English." / "用中文..."), so cross-lingual answering is
choosing the instruction of the answer language, independently of the language spoken in the question.
The prompt ends with the assistant header: the model continues with `[question] TQ [answer] ...`.
"""
from __future__ import annotations

from typing import Sequence

from megatron_cslm.chunking import dedup_units
from megatron_cslm.sft_data import INSTRUCTIONS, SFTEncoder

LANGUAGES = tuple(INSTRUCTIONS)


def build_prompt(encoder: SFTEncoder, units: Sequence[int], answer_lang: str) -> list[int]:
    """Token ids of the prompt for a spoken question given as units (deduplicated if the SFT config did)."""
    if answer_lang not in INSTRUCTIONS:
        raise ValueError(f"no instruction for answer language {answer_lang!r} (known: {list(LANGUAGES)})")
    tok, cfg = encoder.tok, encoder.cfg
    ids = list(encoder.bos)
    if cfg.system_prompt:
        ids += encoder.header["system"] + tok.encode_text(cfg.system_prompt.strip()) + encoder.eot
    before, after = encoder.instruction[answer_lang]
    question = dedup_units(units) if cfg.dedup_units else list(units)
    return ids + encoder.header["user"] + before + tok.encode_units(question) + after + encoder.eot \
        + encoder.header["assistant"]
