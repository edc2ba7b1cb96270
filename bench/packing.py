#!/usr/bin/env python
"""Offline best-fit-decreasing packing vs the CSLM authors' per-batch padding, on SFT-like lengths.

Lengths only (no tokenizer): a spoken question of U(2, 20) s at --units-per-second (50: speech_tokenizer_v1,
the default here, as the README's figures; 25: the v1_25hz / v2_25hz tokenizers), its transcript, and an answer
of U(50, 400) words as text (1.3 Llama-3 tokens/word, <sosp>/<eosp> per 7-word chunk) plus its speech at
2.5 words/s = 20 units/word at 50 units/s; `dedup` scales units by 0.6 (deduplicated S3 units), plus ~30
chat-template tokens. The longest such sample has ~9,700 positions with raw units, ~6,100 with deduplicated ones
at 50 units/s; ~5,200 with raw units at 25 units/s. The figures printed state the rate they assume.

The authors' collator trains whole samples, so the headline compares at the bin size that holds every
sample whole (`whole_sample_seq_length`: the power of two over the longest). Shorter bins (--seq-lengths)
are printed too: there both methods see the same samples truncated, and no whole-sample packing can beat
`bound` (every sample over half a bin needs a bin of its own).

Baseline (same process): shuffled batches of --micro-batch-size, each padded to its longest sample rounded
up to a multiple of 8. Per bin size: non-pad fraction of the positions computed on, and real tokens per
step at the same micro-batch (rows of a bin vs rows of a sample; `positions/step` shows the cost).

Packed attention cost (last lines): one attention layer of the `small` arch (fp32, CPU, forward + backward)
on real packed bins of --attention-seq-length positions holding several samples: the local spec's per-sample
SDPA (`SampleSDPAttention`, sum of each sample's length squared) vs megatron-core's `DotProductAttention`
with the dense block-diagonal mask (bin length squared), in the same process.

    python bench/packing.py            # 200k samples; attention at bins of 8192
    python bench/packing.py --quick    # 5k samples, attention at bins of 2048, seconds
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from megatron_cslm.cli import run_tool
from megatron_cslm.data.packing import best_fit_decreasing, packing_bound, whole_sample_seq_length

TEMPLATE_TOKENS = 30  # BOS, role headers, instruction, <|eot_id|> x2, [question], [answer]
TOKENS_PER_WORD = 1.3  # Llama-3 BPE on English
WORDS_PER_SECOND = 2.5  # speaking rate
UNITS_PER_SECOND = 50  # speech_tokenizer_v1 (the README's figures); --units-per-second 25 for the 25 Hz tokenizers
CHUNK_WORDS = 7  # interleaved layout: <sosp> ... <eosp> per chunk


def sample_lengths(n: int, rng: np.random.Generator, unit_ratio: float, question_s: tuple[float, float],
                   answer_words: tuple[float, float], units_per_second: int = UNITS_PER_SECOND) -> np.ndarray:
    """Token count of n interleaved-layout SFT samples (see module docstring)."""
    q_s = rng.uniform(*question_s, n)
    words = rng.uniform(*answer_words, n)
    question = np.round(q_s * units_per_second * unit_ratio) + 2 + np.round(q_s * WORDS_PER_SECOND * TOKENS_PER_WORD)
    answer = (np.round(words * TOKENS_PER_WORD) + 2 * np.ceil(words / CHUNK_WORDS)
              + np.round(words / WORDS_PER_SECOND * units_per_second * unit_ratio))
    return (TEMPLATE_TOKENS + question + answer).astype(np.int64)


def padded_batches(positions: np.ndarray, batch: int, multiple: int, rng: np.random.Generator) -> tuple[int, int]:
    """(non-pad, computed) tokens when shuffled batches are padded to their longest, rounded to `multiple`."""
    order = rng.permutation(len(positions))
    computed = 0
    for k in range(0, len(order), batch):
        rows = positions[order[k:k + batch]]
        computed += len(rows) * int(-(-rows.max() // multiple) * multiple)
    return int(positions.sum()), computed


def compare(lengths: np.ndarray, s: int, args: argparse.Namespace) -> dict:
    """Packing vs padding of `lengths` (tokens) at bin size `s`, both on the same samples cut to s positions."""
    mbs = args.micro_batch_size
    positions = np.minimum(lengths, s + 1) - 1  # a sample of n+1 tokens trains n positions
    t0 = time.perf_counter()
    bins = best_fit_decreasing(positions, s, args.seed)
    seconds = time.perf_counter() - t0
    real, computed = padded_batches(positions, mbs, args.pad_multiple, np.random.default_rng(args.seed))
    pad_steps, pack_steps = -(-len(positions) // mbs), -(-len(bins) // mbs)
    return {"s": s, "cut": float((lengths > s + 1).mean()), "bins": len(bins), "seconds": seconds,
            "pack": real / (len(bins) * s), "bound": packing_bound(positions, s), "pad": real / computed,
            "pack_tps": real / pack_steps, "pad_tps": real / pad_steps,
            "pack_pps": mbs * s, "pad_pps": computed / pad_steps}


def report(name: str, lengths: np.ndarray, args: argparse.Namespace) -> dict:
    """Print the table for one scenario; return the whole-sample row."""
    whole = whole_sample_seq_length(int(lengths.max()) - 1)
    rows = [compare(lengths, s, args) for s in sorted({*args.seq_lengths, whole})]
    print(f"\n[{name}] {len(lengths):,} samples, median {int(np.median(lengths)):,} tokens, longest "
          f"{int(lengths.max()):,} -> whole-sample bin {whole:,}")
    print(f"  {'seq':>6} {'cut':>6} | {'non-pad: packing':>16} {'bound':>6} {'padding':>8} {'ratio':>7} | "
          f"{'real tokens/step: packing':>25} {'padding':>8} {'ratio':>7} | {'positions/step':>17} | BFD")
    for r in rows:
        mark = "*" if r["s"] == whole else " "
        print(f" {mark}{r['s']:>6} {r['cut']:>6.1%} | {r['pack']:>16.4f} {r['bound']:>6.4f} {r['pad']:>8.4f} "
              f"{r['pack'] / r['pad']:>6.3f}x | {r['pack_tps']:>25,.0f} {r['pad_tps']:>8,.0f} "
              f"{r['pack_tps'] / r['pad_tps']:>6.3f}x | {r['pack_pps']:>8,} {r['pad_pps']:>8,.0f} | "
              f"{r['bins']:,} bins in {r['seconds']:.2f} s")
    return next(r for r in rows if r["s"] == whole)


def attention_cost(lengths: np.ndarray, s: int, repeats: int, seed: int) -> dict:
    """Seconds per forward+backward of one attention layer on a packed bin of `s`: per-sample vs dense mask."""
    import torch
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_cslm.data.packing import block_causal_mask
    from megatron_cslm.distributed import parallel
    from megatron_cslm.models import llama
    from megatron_cslm.models.attention import SampleSDPAttention, bin_packed_seq_params

    positions = np.minimum(lengths, s + 1) - 1
    bins = best_fit_decreasing(positions, s, seed)
    b = max(bins, key=len)  # the bin holding the most samples
    cu = torch.tensor(np.unique(np.concatenate([[0], np.cumsum(positions[b]), [s]])), dtype=torch.int32)
    if not torch.distributed.is_initialized():
        parallel.initialize(parallel.ParallelConfig(), device="cpu", seed=seed)
    arch = llama.ARCHS["small"]
    config = llama.transformer_config(arch, spec="local", precision=llama.PrecisionConfig(dtype="fp32"))
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(s, 1, arch.num_attention_heads, arch.head_dim, generator=gen)
    kv = [torch.randn(s, 1, arch.num_query_groups, arch.head_dim, generator=gen) for _ in range(2)]
    runs = {"sample": (SampleSDPAttention(config, 1, AttnMaskType.causal, "self"),
                       {"attention_mask": None, "packed_seq_params": bin_packed_seq_params(cu[None])}),
            "mask": (DotProductAttention(config, 1, AttnMaskType.causal, "self"),
                     {"attention_mask": block_causal_mask(cu, s)[None]})}
    seconds = {}
    for name, (module, kwargs) in runs.items():
        times = []
        for _ in range(repeats + 1):  # the first run warms up
            x = [t.clone().requires_grad_() for t in (q, *kv)]
            t0 = time.perf_counter()
            module(*x, **kwargs).sum().backward()
            times.append(time.perf_counter() - t0)
        seconds[name] = statistics.median(times[1:])
    return {"s": s, "samples": len(b), **seconds}


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="5,000 samples instead of --num-samples")
    p.add_argument("--num-samples", type=int, default=200_000, help="samples per scenario (default: 200000)")
    p.add_argument("--seq-lengths", type=int, nargs="+", default=[4096, 8192, 16384],
                   help="bin sizes (positions) to compare besides the whole-sample one (default: 4096 8192 16384)")
    p.add_argument("--micro-batch-size", type=int, default=4, help="rows per step for both methods (default: 4)")
    p.add_argument("--pad-multiple", type=int, default=8, help="baseline pads batches to a multiple (default: 8)")
    p.add_argument("--question-seconds", type=float, nargs=2, default=(2.0, 20.0),
                   help="spoken question duration range, seconds, uniform (default: 2 20)")
    p.add_argument("--answer-words", type=float, nargs=2, default=(50.0, 400.0),
                   help="answer length range, words, uniform (default: 50 400)")
    p.add_argument("--units-per-second", type=int, choices=(25, 50), default=UNITS_PER_SECOND,
                   help="speech units per second of audio: 50 (speech_tokenizer_v1; default) or 25 "
                        "(speech_tokenizer_v1_25hz / v2_25hz)")
    p.add_argument("--dedup-ratio", type=float, default=0.6, help="units kept by deduplication (default: 0.6)")
    p.add_argument("--attention-seq-length", type=int, default=8192,
                   help="bin size (positions) of the packed-attention cost lines (default: 8192; 2048 with --quick)")
    p.add_argument("--attention-repeats", type=int, default=3, help="timed runs per attention path (default: 3)")
    p.add_argument("--seed", type=int, default=0, help="seed for lengths, packing and batches (default: 0)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = get_args(argv)
    n = 5_000 if args.quick else args.num_samples
    rng = np.random.default_rng(args.seed)
    spans = (tuple(args.question_seconds), tuple(args.answer_words))
    print(f"speech at {args.units_per_second} units/s (--units-per-second); "
          "* = the whole-sample bin (nothing cut); cut = samples truncated to the bin, for both methods")
    headline = {name: report(name, sample_lengths(n, rng, ratio, *spans, args.units_per_second), args)
                for name, ratio in (("units", 1.0), (f"dedup units (x{args.dedup_ratio})", args.dedup_ratio))}
    print(f"\nwhole samples, micro-batch {args.micro_batch_size}, {args.units_per_second} units/s")
    for name, r in headline.items():
        print(f"  {name:<22} seq {r['s']:>6,}: non-pad packing {r['pack']:.4f} vs padding {r['pad']:.4f} "
              f"({r['pack'] / r['pad']:.3f}x); real tokens/step {r['pack_tps'] / r['pad_tps']:.3f}x")
    s = 2048 if args.quick else args.attention_seq_length
    lengths = sample_lengths(1000, np.random.default_rng(args.seed), args.dedup_ratio, *spans, args.units_per_second)
    a = attention_cost(lengths, s, args.attention_repeats, args.seed)
    print(f"\npacked attention, one `small` layer, fp32 fwd+bwd, a bin of {s:,} holding {a['samples']} samples "
          f"(dedup units): per-sample SDPA {a['sample'] * 1e3:.1f} ms vs dense block mask {a['mask'] * 1e3:.1f} ms")
    print(f"packed attention at bins of {s}: per-sample vs mask {a['mask'] / a['sample']:.2f}x faster")


if __name__ == "__main__":
    raise SystemExit(run_tool(main))
