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
        v = self.vocab
        is_unit = (tokens >= v.unit_offset) & (tokens < v.unit_offset + v.num_units)
        return (tokens == v.sosp) | (in_speech & is_unit)


def sample(logits: torch.Tensor, config: SamplingConfig, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row of `logits` [batch, vocab] (float32), row i drawing from generators[i]."""
    if config.temperature == 0:
        return logits.argmax(-1)
    logits = logits / config.temperature
    if config.top_k:
        kth = logits.topk(min(config.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass before it already does.
        drop = probs.cumsum(-1) - probs >= config.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])
