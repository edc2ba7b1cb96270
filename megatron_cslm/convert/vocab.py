"""Rows for new vocabulary entries (speech units, specials) and for Megatron's TP padding.

New rows are drawn from N(mean, s * diag(var)) of the existing rows, s = 1e-5 by default. This follows
`transformers`' `resize_token_embeddings(mean_resizing=True)` (mean + 1e-5 x covariance noise), with the
covariance restricted to its diagonal: the full matrix costs an O(V * H^2) product (~4e12 flops for
Llama-3-8B, minutes on a CPU) and a Cholesky that fails on rank-deficient embeddings, while at this scale
the noise only has to make rows distinct. Starting at the mean keeps the model's text distribution intact:
a new input row looks like an average token, and a new output row gives an average logit, so no unit
dominates sampling before training (an all-zero output row would give logit 0, far above typical logits).

Padding rows (up to a multiple of 128 x TP) are zero in both matrices. They are never valid ids: the
tokenizer cannot produce them, inference masks ids >= vocab_size, and the HF export drops them.

The number of unit rows follows the speech tokenizer (`expansion_units`): 4,096 for CosyVoice's v1 tokenizers,
6,561 for CosyVoice 2's; an explicit count that disagrees stops, naming both.
"""
from __future__ import annotations

import torch

from megatron_cslm.errors import CslmError
from megatron_cslm.speech.identity import DEFAULT_S3_TOKENIZER, S3_TOKENIZERS

NOISE_SCALE = 1e-5


def expansion_units(num_units: int | None, speech_tokenizer: str | None) -> int:
    """Unit rows to add: the code count of `speech_tokenizer` (an S3 name; default the paper's), which an
    explicit `num_units` must equal."""
    name = speech_tokenizer or DEFAULT_S3_TOKENIZER
    if name not in S3_TOKENIZERS:
        raise CslmError.usage(f"unknown speech tokenizer {name!r}; choose from {sorted(S3_TOKENIZERS)}",
                              "--speech-tokenizer")
    codes = S3_TOKENIZERS[name][1]
    if num_units is not None and num_units != codes and speech_tokenizer is not None:
        raise CslmError(None, None, "--num-units", f"is {num_units} but --speech-tokenizer {name} has {codes} codes: "
                        "the vocabulary must hold exactly the tokenizer's units (drop --num-units)", kind="compat",
                        reason="speech_tokenizer_mismatch")
    return codes if num_units is None else num_units


def row_moments(weight: torch.Tensor, block_rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column mean and (population) variance of `weight` rows in float64, a block of rows at a time.

    The two float64 block buffers are reused (fresh 128 MB allocations per block cost as much as the sums:
    2-2.5x slower on a Llama-3 embedding); the sums are the same ops on the same blocks, bit for bit."""
    total = torch.zeros(weight.shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    buffer = torch.empty(min(block_rows, weight.shape[0]), weight.shape[1], dtype=torch.float64)
    squares = torch.empty_like(buffer)
    for start in range(0, weight.shape[0], block_rows):
        rows = min(block_rows, weight.shape[0] - start)
        block = buffer[:rows].copy_(weight[start:start + rows])
        total += block.sum(0)
        total_sq += torch.square(block, out=squares[:rows]).sum(0)
    mean = total / weight.shape[0]
    return mean, (total_sq / weight.shape[0] - mean.square()).clamp_min(0)


def new_rows(weight: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` rows ~ N(mean, NOISE_SCALE * diag(var)) of `weight`'s rows, in `weight`'s dtype."""
    mean, var = row_moments(weight)
    noise = torch.randn(count, weight.shape[1], generator=generator, dtype=torch.float64)
    return (mean + noise * (NOISE_SCALE * var).sqrt()).to(weight.dtype)


def tail_rows(weight: torch.Tensor, new_count: int, padded_rows: int, seed: int) -> torch.Tensor | None:
    """Rows that follow `weight` up to `padded_rows`: `new_count` initialised rows, then zero padding.

    Returned separately (None when there are none) so a 1 GB embedding is never copied to be extended.
    """
    pad = padded_rows - weight.shape[0] - new_count
    if pad < 0:
        raise ValueError(f"padded_rows {padded_rows} < {weight.shape[0]} existing + {new_count} new rows")
    if new_count + pad == 0:
        return None
    generator = torch.Generator().manual_seed(seed)
    parts = [new_rows(weight, new_count, generator)] if new_count else []
    parts.append(weight.new_zeros(pad, weight.shape[1]))
    return torch.cat(parts)
