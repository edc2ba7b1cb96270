"""Command-line arguments shared by `tools/decode.py` and `tools/eval_s2s.py`, and what they build."""
from __future__ import annotations

import argparse

import torch

from megatron_cslm.argtypes import nonnegative_float, nonnegative_int, positive_float, positive_int
from megatron_cslm.data.sft import INSTRUCTIONS, SFTConfig, SFTEncoder
from megatron_cslm.errors import CslmError
from megatron_cslm.inference.durations import load_duration_table
from megatron_cslm.inference.generate import SpeechLM
from megatron_cslm.inference.prompts import PROMPT_STYLES, AuthorsPrompt
from megatron_cslm.inference.sampling import SamplingConfig
from megatron_cslm.speech.extract import UNITS_PER_SECOND

LANGUAGES = tuple(INSTRUCTIONS)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_decoding_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("decoding")
    g.add_argument("--lang", choices=LANGUAGES, required=True,
                   help="language of the spoken questions; also the answer language unless --answer-lang is given")
    g.add_argument("--answer-lang", choices=LANGUAGES, default=None,
                   help="answer language, chosen independently of the question's: selects the instruction that "
                        "asks for it (default: --lang)")
    g.add_argument("--tokenizer", default=None,
                   help="SpeechTextTokenizer directory (default: the model directory)")
    g.add_argument("--dedup-units", action="store_true",
                   help="the model was trained on deduplicated units: collapse repeats in the question's units")
    g.add_argument("--system-prompt", default=None, help="system turn, if the model was trained with one")
    g.add_argument("--prompt-style", choices=PROMPT_STYLES, default="cslm",
                   help="cslm: the prompt of this project's SFT layout (default); cslm-authors / cslm-authors-cross: "
                        "the CSLM authors' released models, prompted as their decode_general.py / "
                        "decode_general_cross.py do ('{prompt} This is input: <sosp>{units}<eosp>.' or the Chinese "
                        "template, through the model's own chat template); sample them with the authors' "
                        "temperature 1.0 and top-p 0.7 (the defaults)"),
    g.add_argument("--max-len-input", type=positive_int, default=2048,
                   help="longest prompt in tokens; a longer one is an error (default: 2048)")
    g.add_argument("--max-new-tokens", type=positive_int, default=2048,
                   help="generated tokens per answer (default: 2048)")
    g.add_argument("--temperature", type=nonnegative_float, default=1.0,
                   help="sampling temperature; 0 = greedy (default: 1.0, as the CSLM authors)")
    g.add_argument("--top-p", type=positive_float, default=0.7,
                   help="nucleus sampling mass (default: 0.7, as the authors)")
    g.add_argument("--top-k", type=nonnegative_int, default=0,
                   help="sample among the k likeliest tokens; 0 = off (default)")
    g.add_argument("--constrained", action="store_true",
                   help="only units and <eosp> inside <sosp>...<eosp>, no units outside (hides malformed output)")
    g.add_argument("--seed", type=int, default=0, help="item i is sampled with seed SEED+i (default: 0)")
    g.add_argument("--batch-size", type=positive_int, default=1, help="prompts decoded together (default: 1)")
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--dtype", choices=DTYPES, default=None,
                   help="model precision (default: bfloat16 on GPU, float32 on CPU)")
    d = parser.add_argument_group("speech output").add_mutually_exclusive_group()
    d.add_argument("--unit-duration", type=positive_int, default=None,
                   help="model emits deduplicated units: repeat each unit this many frames (1/50 s each for "
                        "speech_tokenizer_v1) in speech_units.txt (default: units written as generated)")
    d.add_argument("--unit-duration-table", default=None,
                   help="JSON list (or {unit: frames} object) of each unit's mean duration in frames, measured on "
                        "training data, to re-expand deduplicated units")
    s = parser.add_argument_group("audio input (speech tokenizer)")
    s.add_argument("--speech-tokenizer", default=None, choices=sorted(UNITS_PER_SECOND),
                   help="S3 tokenizer for audio questions: speech_tokenizer_v1 (50 units/s), speech_tokenizer_v1_25hz "
                        "(25 units/s) or speech_tokenizer_v2_25hz (25 units/s, 6,561 codes). Default: the one the "
                        "model records (config.json speech_tokenizer); required for a model without a record, and "
                        "refused when it differs from the model's")
    w = s.add_mutually_exclusive_group()
    w.add_argument("--tokenizer-weights", default=None, help="S3 tokenizer weights (.onnx, .pt or .safetensors)")
    w.add_argument("--random-init", action="store_true",
                   help="randomly initialised S3 tokenizer: meaningless units, for tests and debugging only")


def sampling_config(args: argparse.Namespace) -> SamplingConfig:
    return SamplingConfig(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          max_new_tokens=args.max_new_tokens, constrained=args.constrained)


def durations(args: argparse.Namespace, num_units: int) -> int | list[float] | None:
    if args.unit_duration_table:
        return load_duration_table(args.unit_duration_table, num_units)
    return args.unit_duration


def load_model(path: str, args: argparse.Namespace) -> tuple[SpeechLM, SFTEncoder | AuthorsPrompt]:
    """The model and what builds its prompts (`encode_prompt(units, lang)`), per --prompt-style."""
    lm = SpeechLM.from_pretrained(path, args.tokenizer, args.device, DTYPES.get(args.dtype))
    if args.prompt_style != "cslm":
        return lm, AuthorsPrompt(lm.tok, args.tokenizer or path, args.prompt_style, args.dedup_units,
                                 args.system_prompt)
    encoder = SFTEncoder(lm.tok, SFTConfig(dedup_units=args.dedup_units, system_prompt=args.system_prompt))
    return lm, encoder


def unit_extractor(args: argparse.Namespace, device: torch.device):
    """The S3 tokenizer for audio questions; demands weights or an explicit --random-init."""
    from megatron_cslm.speech.extract import UnitExtractor

    if not args.tokenizer_weights and not args.random_init:
        raise CslmError.usage("audio input needs --tokenizer-weights (the S3 tokenizer's weights) or --random-init",
                              "--tokenizer-weights")
    return UnitExtractor(args.speech_tokenizer, weights=args.tokenizer_weights, random_init=args.random_init,
                         device=device)
