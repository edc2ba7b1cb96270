"""`eval-s2s`'s paper scores as flags: ASR (local model dir), UTMOS (local file), judge (chat endpoint).

Why a module of its own: the eval tool's flags for the benchmark and decoding live with the tool; these flags,
building the scorers from them and rendering their tables are one concern, kept here so the tool only calls
`add_score_args` and `score_and_render`. Scorers are optional and independent: a flag not given leaves its
columns empty ("-"), never fails the run.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from megatron_cslm.argtypes import nonnegative_int, positive_int
from megatron_cslm.errors import CslmError
from megatron_cslm.inference.asr import PipelineAsr, Utmos, answer_wavs, load_waves
from megatron_cslm.inference.benchmarks import BENCHMARKS, check_size, resolve_languages
from megatron_cslm.inference.evaluate import (
    add_speech_scores,
    paper_table,
    render_model_markdown,
    render_paper_markdown,
)
from megatron_cslm.inference.inputs import Question
from megatron_cslm.inference.judge import Judge, JudgeConfig


def add_score_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("the paper's scores (each optional)")
    g.add_argument("--benchmark", choices=sorted(BENCHMARKS), default=None,
                   help="benchmark layout: sets the default --answer-lang (the -x variants are cross-lingual) and "
                        "checks the item count (default: none)")
    g.add_argument("--answer-audio-dir", default=None,
                   help="spoken answers as <id>.wav (16 kHz or any rate; e.g. from `cslm synthesize`), in "
                        "<dir>/<model label>/ when that folder exists, else in <dir>/ (default: no audio scores)")
    g.add_argument("--asr-model", default=None,
                   help="local transformers ASR model directory (e.g. Whisper with its processor) for the WER/CER "
                        "of the spoken answer against the text answer; needs --answer-audio-dir")
    g.add_argument("--asr-batch-size", type=positive_int, default=8, help="waveforms per ASR batch (default: 8)")
    g.add_argument("--utmos-model", default=None,
                   help="local UTMOS model: TorchScript file, or .onnx; (batch, samples) 16 kHz -> (batch,) MOS")
    g.add_argument("--judge-url", default=None,
                   help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 (vLLM) or "
                        "https://api.openai.com/v1 (default: no judge score)")
    g.add_argument("--judge-model", default=None, help="judge model name at --judge-url, e.g. gpt-4o")
    g.add_argument("--judge-api-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the judge's API key (default: OPENAI_API_KEY; unset: none)")
    g.add_argument("--judge-cache", default=None,
                   help="JSONL cache of judge scores keyed by model + prompt hash; a rerun asks only for new "
                        "items (default: <output-dir>/judge_cache.jsonl)")
    g.add_argument("--judge-retries", type=nonnegative_int, default=3,
                   help="retries of a failing judge request, with exponential backoff from 1 s (default: 3)")


def _check(args: argparse.Namespace) -> None:
    if (args.asr_model or args.utmos_model) and not args.answer_audio_dir:
        raise argparse.ArgumentTypeError("--asr-model and --utmos-model score the spoken answer: give "
                                         "--answer-audio-dir")
    if bool(args.judge_url) != bool(args.judge_model):
        raise argparse.ArgumentTypeError("--judge-url and --judge-model go together")


@dataclass
class Scorers:
    asr: PipelineAsr | None
    utmos: Utmos | None
    judge: Judge | None


def build_scorers(args: argparse.Namespace, out: str | os.PathLike) -> Scorers:
    """The scorers the flags ask for, loaded now (a missing model directory stops before any decoding)."""
    try:
        _check(args)
    except argparse.ArgumentTypeError as e:
        raise CslmError.usage(str(e)) from None
    answer_lang = resolve_languages(args.benchmark, args.lang, args.answer_lang)[1]
    asr = PipelineAsr(args.asr_model, language=answer_lang, batch_size=args.asr_batch_size) if args.asr_model else None
    utmos = Utmos(args.utmos_model) if args.utmos_model else None
    judge = None
    if args.judge_url:
        cache = args.judge_cache or Path(out) / "judge_cache.jsonl"
        judge = Judge(JudgeConfig(args.judge_url, args.judge_model, args.judge_api_key_env, cache,
                                  retries=args.judge_retries))
    return Scorers(asr, utmos, judge)


def score_and_render(args: argparse.Namespace, questions: Sequence[Question], reports: dict[str, dict],
                     scorers: Scorers) -> tuple[str, dict]:
    """Score `reports` ({label: report}) in place; returns (Markdown tables, extra report.json fields)."""
    check_size(args.benchmark, len(questions))
    asr, utmos, judge = scorers.asr, scorers.utmos, scorers.judge
    ids = [q.id for q in questions]
    for label, report in reports.items():
        waves = None
        if args.answer_audio_dir:
            folder = Path(args.answer_audio_dir)
            waves = load_waves(answer_wavs(folder / label if (folder / label).is_dir() else folder, ids))
        add_speech_scores(report, questions, waves, asr, utmos, judge)
    md = "\n## The paper's table\n\n" + render_paper_markdown(reports) + "\n"
    md += "\n".join(render_model_markdown(label, report) for label, report in reports.items())
    config = {"benchmark": args.benchmark, "answer_audio_dir": args.answer_audio_dir, "asr_model": args.asr_model,
              "utmos_model": args.utmos_model, "judge_url": args.judge_url, "judge_model": args.judge_model,
              "judge_requests": judge.requests if judge else None}
    return md, {"config": config, "paper_table": paper_table(reports)}
