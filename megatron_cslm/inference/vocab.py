"""Token classes the parser, the sampler and the constraint agree on: units, markers, control tokens, stops.

A chat-tuned Llama ends its turn with <|eot_id|> while pretraining data ends with <|end_of_text|>; a
response may stop at either, so both are stop tokens. Control tokens of the text vocabulary (headers,
reserved specials, <s>) are never answer text, which is how the parser recognises them as stray.
Units are classified through the tokenizer's `UnitLayout` (read from the checkpoint's vocabulary), never
by an offset, so a checkpoint whose units are not one contiguous block decodes correctly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_cslm.text.chat import EOT
from megatron_cslm.text.tokenizer import SpeechTextTokenizer
from megatron_cslm.text.units import UnitLayout


@dataclass(frozen=True)
class Vocab:
    """Id classes of a SpeechTextTokenizer, precomputed once per model."""

    size: int  # unpadded: ids >= size are embedding padding and never valid
    units: UnitLayout
    sosp: int
    eosp: int
    question: int
    answer: int
    stops: frozenset[int]
    control: frozenset[int]  # text-vocabulary control tokens, stops included

    @classmethod
    def of(cls, tok: SpeechTextTokenizer) -> "Vocab":
        stops = {tok.eod_id}
        turn_end = tok.encode_text(EOT)
        if len(turn_end) == 1:  # a single id only where the text vocabulary has the token
            stops.add(turn_end[0])
        return cls(size=tok.vocab_size, units=tok.layout, sosp=tok.sosp_id,
                   eosp=tok.eosp_id, question=tok.question_id, answer=tok.answer_id, stops=frozenset(stops),
                   control=tok.control_ids | stops)

    @property
    def pad(self) -> int:
        """Id fed for padding and finished rows (masked out, so any valid id works)."""
        return min(self.stops)

    @property
    def num_units(self) -> int:
        return self.units.num_units

    @property
    def unit_offset(self) -> int:
        """Id of unit 0 for a contiguous layout (ValueError otherwise: use `unit_of`)."""
        if self.units.offset is None:
            raise ValueError(f"unit ids are not contiguous ({self.units.describe()})")
        return self.units.offset

    def is_unit(self, token_id: int) -> bool:
        return self.units.unit_of(token_id) >= 0

    def unit_of(self, token_id: int) -> int:
        """Unit of a token id, -1 when it is not a unit."""
        return self.units.unit_of(token_id)

    def unit_mask(self, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Boolean mask over `n` logits (the model's padded vocab) that is True at unit ids."""
        return self.units.token_mask(n, device)
