"""The `--verify` flags both converter commands share, and what `--verify` prints and returns.

Why here: argument groups are command-line policy (cli/), while `convert/verify.py` is the library that
compares logits; the converters' library code never imports argparse groups from cli/ or the trainer.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from megatron_cslm.argtypes import positive_float
from megatron_cslm.convert.verify import DEFAULT_ATOL, run_verify


def add_verify_args(parser: argparse.ArgumentParser, hf_role: str) -> None:
    """The `--verify` flags shared by both converter CLIs."""
    g = parser.add_argument_group("verification")
    g.add_argument("--verify", action="store_true",
                   help=f"Compare logits of the {hf_role} HF model and the megatron-core model on a few prompts "
                        "(float32, TP=PP=1 in this process: needs RAM/GPU memory for two float32 copies).")
    g.add_argument("--verify-atol", type=positive_float, default=DEFAULT_ATOL,
                   help="Largest absolute logit difference accepted by --verify.")


def verify_exit_code(hf_dir: str | Path, megatron_dir: str | Path, atol: float) -> int:
    """Run `--verify`, print its table, and return the CLI's exit code (1 when the models disagree)."""
    result = run_verify(hf_dir, megatron_dir, atol=atol)
    print(result.table())
    return 0 if result.ok else 1
