#!/usr/bin/env python
"""Offline best-fit-decreasing packing vs the CSLM authors' per-batch padding, on SFT-like lengths.

Lengths only (no tokenizer): a spoken question of U(2, 20) s at 50 units/s, its transcript, and an answer
of U(50, 400) words as text (1.3 Llama-3 tokens/word, <sosp>/<eosp> per 7-word chunk) plus its speech at
2.5 words/s = 20 units/word; `dedup` scales units by 0.6 (deduplicated S3 units), plus ~30 chat-template
tokens. Both methods see the same samples truncated to --seq-length positions.

Baseline (same process): shuffled batches of --micro-batch-size, each padded to its longest sample rounded
up to a multiple of 8. Printed per scenario: non-pad fraction of the tokens computed on, real tokens per
step and steps per epoch at the same micro-batch, with packing/padding ratios, plus the best fill any
whole-sample packing could reach (`packing_bound`), to show how far BFD is from optimal.

    python bench/packing.py            # 200k samples
    python bench/packing.py --quick    # 5k samples, seconds
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_cslm.packing import best_fit_decreasing  # noqa: E402

TEMPLATE_TOKENS = 30  # BOS, role headers, instruction, <|eot_id|> x2, [question], [answer]
TOKENS_PER_WORD = 1.3  # Llama-3 BPE on English
WORDS_PER_SECOND = 2.5  # speaking rate
UNITS_PER_SECOND = 50  # CosyVoice S3 tokenizer
CHUNK_WORDS = 7  # interleaved layout: <sosp> ... <eosp> per chunk


def sample_lengths(n: int, rng: np.random.Generator, unit_ratio: float, question_s: tuple[float, float],
                   answer_words: tuple[float, float]) -> np.ndarray:
    """Token count of n interleaved-layout SFT samples (see module docstring)."""
    q_s = rng.uniform(*question_s, n)
    words = rng.uniform(*answer_words, n)
    question = np.round(q_s * UNITS_PER_SECOND * unit_ratio) + 2 + np.round(q_s * WORDS_PER_SECOND * TOKENS_PER_WORD)
    answer = (np.round(words * TOKENS_PER_WORD) + 2 * np.ceil(words / CHUNK_WORDS)
              + np.round(words / WORDS_PER_SECOND * UNITS_PER_SECOND * unit_ratio))
    return (TEMPLATE_TOKENS + question + answer).astype(np.int64)


def padded_batches(positions: np.ndarray, batch: int, multiple: int, rng: np.random.Generator) -> tuple[int, int]:
    """(non-pad, computed) tokens when shuffled batches are padded to their longest, rounded to `multiple`."""
    order = rng.permutation(len(positions))
    computed = 0
    for k in range(0, len(order), batch):
        rows = positions[order[k:k + batch]]
        computed += len(rows) * int(-(-rows.max() // multiple) * multiple)
    return int(positions.sum()), computed


def packing_bound(positions: np.ndarray, seq_length: int) -> float:
    """Upper bound on the fill of any whole-sample packing: every sample over half a bin needs its own bin,
    and one too long to share with even the shortest sample leaves its bin's rest empty."""
    total = positions.sum()
    alone = positions > seq_length - positions.min()
    bins = max((positions > seq_length // 2).sum(), alone.sum() + np.ceil(positions[~alone].sum() / seq_length),
               np.ceil(total / seq_length))
    return float(total / (bins * seq_length))


def run(name: str, lengths: np.ndarray, args: argparse.Namespace) -> float:
    s, mbs = args.seq_length, args.micro_batch_size
    positions = np.minimum(lengths, s + 1) - 1  # a sample of n+1 tokens trains n positions
    t0 = time.perf_counter()
    bins = best_fit_decreasing(positions, s, args.seed)
    pack_s = time.perf_counter() - t0
    fill = positions.sum() / (len(bins) * s)
    real, computed = padded_batches(positions, mbs, args.pad_multiple, np.random.default_rng(args.seed))
    pad_frac = real / computed
    pad_steps, pack_steps = -(-len(positions) // mbs), -(-len(bins) // mbs)
    pad_tps, pack_tps = real / pad_steps, real / pack_steps
    print(f"\n[{name}] {len(lengths)} samples, median {int(np.median(lengths))} tokens, "
          f"{(lengths > s + 1).mean():.1%} longer than {s} (truncated for both methods)")
    print(f"  non-pad fraction   packing {fill:.4f}   padding {pad_frac:.4f}   ratio {fill / pad_frac:.3f}x"
          f"   (whole-sample packing bound {packing_bound(positions, s):.4f})")
    print(f"  real tokens/step   packing {pack_tps:,.0f}   padding {pad_tps:,.0f}   ratio {pack_tps / pad_tps:.3f}x"
          f"   (micro-batch {mbs}: {mbs} bins of {s} vs {mbs} samples)")
    print(f"  steps/epoch        packing {pack_steps:,}   padding {pad_steps:,}   ratio "
          f"{pack_steps / pad_steps:.3f}x")
    print(f"  best-fit-decreasing planned {len(positions):,} samples into {len(bins):,} bins in {pack_s:.2f} s")
    return fill


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="5,000 samples instead of --num-samples")
    p.add_argument("--num-samples", type=int, default=200_000, help="samples per scenario (default: 200000)")
    p.add_argument("--seq-length", type=int, default=4096, help="tokens per bin / max sample length (default: 4096)")
    p.add_argument("--micro-batch-size", type=int, default=4, help="rows per step for both methods (default: 4)")
    p.add_argument("--pad-multiple", type=int, default=8, help="baseline pads batches to a multiple (default: 8)")
    p.add_argument("--question-seconds", type=float, nargs=2, default=(2.0, 20.0),
                   help="spoken question duration range, seconds, uniform (default: 2 20)")
    p.add_argument("--answer-words", type=float, nargs=2, default=(50.0, 400.0),
                   help="answer length range, words, uniform (default: 50 400)")
    p.add_argument("--dedup-ratio", type=float, default=0.6, help="units kept by deduplication (default: 0.6)")
    p.add_argument("--seed", type=int, default=0, help="seed for lengths, packing and batches (default: 0)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = get_args(argv)
    n = 5_000 if args.quick else args.num_samples
    rng = np.random.default_rng(args.seed)
    spans = (tuple(args.question_seconds), tuple(args.answer_words))
    for name, ratio in (("units", 1.0), (f"dedup units (x{args.dedup_ratio})", args.dedup_ratio)):
        run(name, sample_lengths(n, rng, ratio, *spans), args)


if __name__ == "__main__":
    main()
