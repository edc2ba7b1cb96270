"""Next-token selection: temperature / top-k / top-p sampling with per-item seeds, and modality constraints.

Each item draws from its own generator seeded from the item, so an item's answer does not depend on
which other items share its batch (up to floating-point differences of batched matmuls).
The constraint enforces the chain-of-modality grammar token by token: inside `<sosp> ... <eosp>` only units
and `<eosp>` may follow, outside it no unit may (nor a stray `<eosp>`). It removes the malformed outputs a
small or undertrained model produces, at the price of hiding them from evaluation, so it is opt-in.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_cslm.inference.vocab import Vocab


@dataclass(frozen=True)
class SamplingConfig:
    """Decoding parameters; the defaults are the CSLM authors' (temperature 1.0, top-p 0.7)."""

    temperature: float = 1.0  # 0 selects greedy decoding
    top_p: float = 0.7
    top_k: int = 0  # 0 disables top-k
    max_new_tokens: int = 2048
    constrained: bool = False

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.max_new_tokens < 1:
            raise ValueError(f"invalid sampling config {self}")


class ModalityConstraint:
    """Masks logits so text and speech cannot mix; `in_speech` is tracked by `advance`."""

    def __init__(self, vocab: Vocab, num_logits: int, device: torch.device | str):
        units = vocab.unit_mask(num_logits, device)
        self.is_unit = units  # indexed by sampled ids: the checkpoint's own unit layout, contiguous or not
        self.speech_allowed = units.clone()
        self.speech_allowed[vocab.eosp] = True
        self.text_allowed = ~units
        self.text_allowed[vocab.eosp] = False
        self.vocab = vocab

    def apply(self, logits: torch.Tensor, in_speech: torch.Tensor) -> torch.Tensor:
        allowed = torch.where(in_speech[:, None], self.speech_allowed, self.text_allowed)
        return logits.masked_fill(~allowed, float("-inf"))

    def advance(self, in_speech: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """State after `tokens`: speech starts at <sosp> and lasts while units follow."""
        return (tokens == self.vocab.sosp) | (in_speech & self.is_unit[tokens])


def top_p_filter(logits: torch.Tensor, top_p: float, first_k: int = 1024) -> torch.Tensor:
    """Keep the smallest set of likeliest tokens whose probability reaches `top_p`; the rest get -inf.

    Only the top `first_k` candidates are sorted (widened until they hold `top_p` of the mass): a full sort of
    a 132k vocabulary costs more than the rest of a decoding step of a small model, and gives the same set.
    """
    probs = logits.double().softmax(-1)  # float64 so the boundary does not depend on summation order
    k = min(first_k, logits.shape[-1])
    while True:
        top, index = probs.topk(k, dim=-1)
        mass = top.cumsum(-1)
        if k == logits.shape[-1] or bool((mass[:, -1] >= top_p).all()):
            break
        k = min(8 * k, logits.shape[-1])
    drop = mass - top >= top_p  # the mass before this token already reaches top_p
    kept = logits.gather(-1, index).masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, index, kept)


def sample(logits: torch.Tensor, config: SamplingConfig, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row of `logits` [batch, vocab] (float32), row i drawing from generators[i]."""
    if config.temperature == 0:
        return logits.argmax(-1)
    logits = logits / config.temperature
    if config.top_k:
        kth = logits.topk(min(config.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1:
        logits = top_p_filter(logits, config.top_p)
    # Inverse-CDF draw: one uniform per row from that row's generator (torch.multinomial is ~50x slower on a
    # 132k vocabulary on CPU). right=True never lands on a zero-probability token.
    cdf = logits.softmax(-1).double().cumsum(-1)
    u = torch.stack([torch.rand((), generator=g, device=g.device, dtype=torch.float64) for g in generators])
    index = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    return index.clamp(max=logits.shape[-1] - 1)
