"""Model FLOPs per token of Llama-3.1-8B with the CSLM vocabulary, and the MFU a throughput implies.

    python bench/flops.py [--tokens-per-s-per-gpu 3000] [--seq-length 1024 4096]

Same formula as the training log (megatron_cslm.models.flops). Prints the speech-vocabulary overhead as a ratio
against the text-only Llama-3.1-8B computed in the same process.
"""
from __future__ import annotations

import argparse

from megatron_cslm.cli import run_tool
from megatron_cslm.models.flops import PEAK_TFLOPS, forward_flops_per_token, mfu, train_flops_per_token
from megatron_cslm.models.llama import ARCHS, padded_vocab_size

BASE_VOCAB, UNITS, SPECIALS = 128256, 4096, 4


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens-per-s-per-gpu", type=float, nargs="+", default=[4000.0, 8000.0, 12000.0],
                   help="training throughput per GPU to convert into MFU")
    p.add_argument("--seq-length", type=int, nargs="+", default=[1024, 4096], help="pretraining / SFT lengths")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (vocab padding is 128 x TP)")
    p.add_argument("--peak", default="h100-bf16", choices=sorted(PEAK_TFLOPS))
    args = p.parse_args()
    arch = ARCHS["llama3.1-8b"]
    vocab = padded_vocab_size(BASE_VOCAB + UNITS + SPECIALS, args.tp)
    peak = PEAK_TFLOPS[args.peak]
    print(f"Llama-3.1-8B + {UNITS} units + {SPECIALS} specials: vocab {BASE_VOCAB + UNITS + SPECIALS} "
          f"(padded {vocab} at TP={args.tp}); peak {peak} TFLOP/s ({args.peak})")
    for seq in args.seq_length:
        base = train_flops_per_token(arch, seq, BASE_VOCAB)
        ours = train_flops_per_token(arch, seq, vocab)
        print(f"seq {seq}: forward {forward_flops_per_token(arch, seq, vocab) / 1e9:.2f} GFLOP/token, "
              f"train {ours / 1e9:.2f} GFLOP/token (x{ours / base:.4f} vs text-only vocab), "
              f"with full recompute {train_flops_per_token(arch, seq, vocab, True) / 1e9:.2f}")
        for tps in args.tokens_per_s_per_gpu:
            print(f"    {tps:7.0f} tokens/s/GPU -> {tps * ours / 1e12:6.1f} TFLOP/s/GPU, "
                  f"MFU {100 * mfu(tps, ours, peak):.1f}%")


if __name__ == "__main__":
    raise SystemExit(run_tool(lambda argv: main()))
