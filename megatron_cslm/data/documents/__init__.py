"""Continual-pretraining data recipes: ASR/TTS/interleaved speech-text, translation, cross-lingual speech and
instruction replay documents built from source corpora (see `pretrain_data`)."""
from megatron_cslm.data.documents.build import (
                                                 RECIPES,
                                                 RecipeConfig,
                                                 asr_document,
                                                 build_pretrain_data,
                                                 cross_speech_document,
                                                 interleave_document,
                                                 replay_document,
                                                 translate_document,
                                                 tts_document,
)
from megatron_cslm.data.documents.records import (
                                                 InstructionRecord,
                                                 ParallelRecord,
                                                 SpeechRecord,
                                                 guess_lang,
                                                 parse_instruction,
                                                 parse_parallel,
                                                 parse_speech,
)
from megatron_cslm.data.documents.templates import DEFAULT_TEMPLATES, Templates, check_template, render

__all__ = [
    "RECIPES", "RecipeConfig", "asr_document", "build_pretrain_data", "cross_speech_document",
    "interleave_document", "replay_document", "translate_document", "tts_document",
    "InstructionRecord", "ParallelRecord", "SpeechRecord", "guess_lang", "parse_instruction", "parse_parallel",
    "parse_speech", "DEFAULT_TEMPLATES", "Templates", "check_template", "render",
]
