"""`cslm`: one command whose subcommands are the project's tools (`cslm preprocess-data --help` ...).

Why: installed console scripts work from any directory and any checkout, where `python tools/x.py` needs
the repository. Every subcommand runs under the shared error policy of `megatron_cslm.cli.run_tool`.
Modules are imported only when their subcommand runs, so `cslm --help` is fast.
"""
from __future__ import annotations

import importlib
import sys
from typing import Sequence

from megatron_cslm.cli import run_tool
from megatron_cslm.errors import EXIT_CODES_HELP

# subcommand -> ("module[:function]" whose function(argv) runs it, default `main`; one-line summary), in pipeline order
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "make-toy-corpus": ("megatron_cslm.cli.make_toy_corpus", "write the embedded SYNTHETIC bilingual toy corpus"),
    "make-toy-tokenizer": ("megatron_cslm.cli.make_toy_tokenizer", "train the quickstart's small tokenizer"),
    "make-toy-base-model": ("megatron_cslm.cli.make_toy_base_model",
                            "train the quickstart's tiny base LM (the Llama stand-in), saved as HF"),
    "tokenize-speech": ("megatron_cslm.cli.tokenize_speech", "audio manifest -> S3 speech units (JSONL)"),
    "align-words": ("megatron_cslm.cli.align_words", "units JSONL + audio -> word timestamps (CTC forced alignment)"),
    "hf-to-megatron": ("megatron_cslm.cli.hf_to_megatron", "HF Llama -> megatron-core checkpoint (+ vocab expansion)"),
    "build-pretrain-data": ("megatron_cslm.cli.build_pretrain_data", "source corpora -> pretraining documents"),
    "preprocess-data": ("megatron_cslm.cli.preprocess_data", "documents -> megatron-core .bin/.idx"),
    "pretrain": ("megatron_cslm.cli.pretrain", "continual pretraining (run under torchrun for several processes)"),
    "build-sft-data": ("megatron_cslm.cli.build_sft_data", "spoken dialogue -> packed SFT .bin/.idx"),
    "sft": ("megatron_cslm.cli.sft", "supervised fine-tuning on packed SFT data"),
    "megatron-to-hf": ("megatron_cslm.cli.megatron_to_hf", "megatron-core checkpoint -> HF Llama directory"),
    "decode": ("megatron_cslm.cli.decode", "answer spoken questions with streaming interleaved decoding"),
    "eval-s2s": ("megatron_cslm.cli.eval_s2s", "evaluate checkpoints on a speech-to-speech benchmark"),
    "train-duration": ("megatron_cslm.cli.train_duration", "units JSONL -> duration predictor for deduplicated units"),
    "synthesize": ("megatron_cslm.cli.synthesize", "speech units -> waveform (CosyVoice flow + HiFi-GAN), streamed"),
    "plan": ("megatron_cslm.cli.plan", "per-GPU memory, fit and layouts ranked by step time, before launch"),
}


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = [f"  {name:<{width}}  {summary}" for name, (_, summary) in SUBCOMMANDS.items()]
    return ("usage: cslm <command> [options]   (cslm <command> --help for its options)\n\ncommands:\n"
            + "\n".join(lines) + f"\n\n{EXIT_CODES_HELP}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        print(f"{usage()}\n\ncslm: error: unknown command {command!r}", file=sys.stderr)
        return 2
    module, _, function = SUBCOMMANDS[command][0].partition(":")
    tool_main = getattr(importlib.import_module(module), function or "main")
    sys.argv[0] = f"cslm {command}"  # argparse's usage line names the subcommand
    return run_tool(tool_main, rest)


if __name__ == "__main__":
    raise SystemExit(main())
