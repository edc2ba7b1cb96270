"""Rows for new vocabulary entries (speech units, specials) and for Megatron's TP padding.

New rows are drawn from N(mean, s * diag(var)) of the existing rows, s = 1e-5 by default (`noise_scale`;
`hf-to-megatron --new-row-noise`). This follows
`transformers`' `resize_token_embeddings(mean_resizing=True)` (mean + 1e-5 x covariance noise), with the
covariance restricted to its diagonal: the full matrix costs an O(V * H^2) product (~4e12 flops for
Llama-3-8B, minutes on a CPU) and a Cholesky that fails on rank-deficient embeddings, while at this scale
the noise only has to make rows distinct. Starting at the mean keeps the model's text distribution intact:
a new input row looks like an average token, and a new output row gives an average logit, so no unit
dominates sampling before training (an all-zero output row would give logit 0, far above typical logits).
The price is that new input rows start nearly equal, so the model must first tell the units apart: with
billions of tokens that is free, but a short run on a tiny model (the quickstart's 800 steps) learns to read
speech far sooner from rows as spread as the text rows (s = 1: held-out ASR CER 0.02 against 0.16, measured).

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
BLOCK_ROWS = 64  # rows per block of the moments' sums (fixes their rounding; 1 MB of float32 at width 4096)


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


class RowMoments:
    """Per-column mean and (population) variance of a matrix's rows in float64, fed rows in order.

    Why streaming: the converter computes the moments of the embedding and head as their rows go by on the
    way to the output (no second read, no whole-matrix float64 copy). The sums run over fixed blocks of
    `block_rows` rows: a block's column sums are taken in float64 straight from the stored dtype, and its
    squares in one reused buffer that stays in the CPU cache (float32 for 16-bit rows, whose squares it holds
    exactly; float64 otherwise), so the cost is one read of the rows, and any feeding that cuts the rows at
    block multiples gives the same sums bit for bit as one pass over the whole matrix.
    """

    def __init__(self, width: int, scratch: torch.Tensor | None = None, block_rows: int = BLOCK_ROWS):
        self.block_rows, self.rows, self.width = block_rows, 0, width
        self.scratch = scratch if scratch is not None else moment_scratch(width, 0, block_rows)
        self.total = torch.zeros(width, dtype=torch.float64)
        self.total_sq = torch.zeros_like(self.total)
        self._partial = False

    def add(self, rows: torch.Tensor) -> None:
        """Fold in the next rows; only the last call may end off a block boundary."""
        exact = torch.float32 if rows.dtype in (torch.bfloat16, torch.float16) else torch.float64
        squares = self.scratch.view(-1).view(torch.uint8).view(exact)
        for start in range(0, rows.shape[0], self.block_rows):
            n = min(self.block_rows, rows.shape[0] - start)
            if self._partial or n * self.width > squares.numel():
                raise ValueError(f"rows after a partial block, or a block of {n} rows for a scratch of "
                                 f"{squares.numel() // self.width}: feed whole blocks of rows until the last call")
            block = rows[start:start + n]
            self.total += block.sum(0, dtype=torch.float64)
            square = squares[:n * self.width].view(n, self.width).copy_(block).square_()
            self.total_sq += square.sum(0, dtype=torch.float64)
            self._partial = n < self.block_rows
        self.rows += rows.shape[0]

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.total / self.rows
        return mean, (self.total_sq / self.rows - mean.square()).clamp_min(0)


def moment_scratch(width: int, new_count: int, block_rows: int = BLOCK_ROWS) -> torch.Tensor:
    """One float64 buffer for a moments block's squares and, after, `new_count` rows of noise (one allocation,
    reused)."""
    return torch.empty(max(block_rows, new_count), width, dtype=torch.float64)


def row_moments(weight: torch.Tensor, block_rows: int = BLOCK_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column mean and (population) variance of `weight`'s rows in float64 (`RowMoments` in one call)."""
    moments = RowMoments(weight.shape[1], block_rows=block_rows)
    moments.add(weight)
    return moments.result()


def draw_new_rows(mean: torch.Tensor, var: torch.Tensor, count: int, generator: torch.Generator,
                  scratch: torch.Tensor | None = None, noise_scale: float = NOISE_SCALE) -> torch.Tensor:
    """`count` float64 rows ~ N(mean, noise_scale * diag(var)), drawn in place in `scratch`'s first rows."""
    noise = scratch[:count] if scratch is not None else None
    noise = torch.randn(count, mean.shape[0], generator=generator, dtype=torch.float64, out=noise)
    return noise.mul_((noise_scale * var).sqrt()).add_(mean)


def new_rows(weight: torch.Tensor, count: int, generator: torch.Generator,
             noise_scale: float = NOISE_SCALE) -> torch.Tensor:
    """`count` rows ~ N(mean, noise_scale * diag(var)) of `weight`'s rows, in `weight`'s dtype."""
    return draw_new_rows(*row_moments(weight), count, generator, noise_scale=noise_scale).to(weight.dtype)


def tail_rows(weight: torch.Tensor, new_count: int, padded_rows: int, seed: int,
              noise_scale: float = NOISE_SCALE) -> torch.Tensor | None:
    """Rows that follow `weight` up to `padded_rows`: `new_count` initialised rows, then zero padding.

    Returned separately (None when there are none) so a 1 GB embedding is never copied to be extended.
    """
    pad = padded_rows - weight.shape[0] - new_count
    if pad < 0:
        raise ValueError(f"padded_rows {padded_rows} < {weight.shape[0]} existing + {new_count} new rows")
    if new_count + pad == 0:
        return None
    generator = torch.Generator().manual_seed(seed)
    parts = [new_rows(weight, new_count, generator, noise_scale)] if new_count else []
    parts.append(weight.new_zeros(pad, weight.shape[1]))
    return torch.cat(parts)
