"""Token classes the parser, the sampler and the constraint agree on: units, markers, control tokens, stops.

A chat-tuned Llama ends its turn with <|eot_id|> while pretraining data ends with <|end_of_text|>; a
response may stop at either, so both are stop tokens. Control tokens of the text vocabulary (headers,
reserved specials, <s>) are never answer text, which is how the parser recognises them as stray.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_cslm.text.tokenizer import SpeechTextTokenizer

_TURN_END = "<|eot_id|>"


@dataclass(frozen=True)
class Vocab:
    """Id classes of a SpeechTextTokenizer, precomputed once per model."""

    size: int  # unpadded: ids >= size are embedding padding and never valid
    unit_offset: int
    num_units: int
    sosp: int
    eosp: int
    question: int
    answer: int
    stops: frozenset[int]
    control: frozenset[int]  # text-vocabulary control tokens, stops included

    @classmethod
    def of(cls, tok: SpeechTextTokenizer) -> "Vocab":
        stops = {tok.eod_id}
        turn_end = tok.encode_text(_TURN_END)
        if len(turn_end) == 1:  # a single id only where the text vocabulary has the token
            stops.add(turn_end[0])
        return cls(size=tok.vocab_size, unit_offset=tok.unit_offset, num_units=tok.num_units, sosp=tok.sosp_id,
                   eosp=tok.eosp_id, question=tok.question_id, answer=tok.answer_id, stops=frozenset(stops),
                   control=tok.control_ids | stops)

    @property
    def pad(self) -> int:
        """Id fed for padding and finished rows (masked out, so any valid id works)."""
        return min(self.stops)

    def is_unit(self, token_id: int) -> bool:
        return self.unit_offset <= token_id < self.unit_offset + self.num_units

    def unit_mask(self, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Boolean mask over `n` logits (the model's padded vocab) that is True at unit ids."""
        mask = torch.zeros(n, dtype=torch.bool, device=device)
        mask[self.unit_offset:self.unit_offset + self.num_units] = True
        return mask
