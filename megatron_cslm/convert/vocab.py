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
"""
from __future__ import annotations

import torch

NOISE_SCALE = 1e-5


def row_moments(weight: torch.Tensor, block_rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column mean and (population) variance of `weight` rows in float64, a block of rows at a time."""
    total = torch.zeros(weight.shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for start in range(0, weight.shape[0], block_rows):
        block = weight[start:start + block_rows].to(torch.float64)
        total += block.sum(0)
        total_sq += block.square().sum(0)
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
