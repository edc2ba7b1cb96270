"""Latency to the first speech chunk, in generated tokens and in seconds.

The point of interleaving is that speech can start after the first text chunk instead of after the whole
text answer. Tokens are the device-independent measure (each costs one decoding step); seconds are what a
user waits on this hardware. Both are taken when the first SA chunk is complete, i.e. when its units could
be handed to the vocoder.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from statistics import mean
from typing import Iterable

from megatron_cslm.inference.parse import ParsedResponse


@dataclass(frozen=True)
class Latency:
    prompt_tokens: int
    generated_tokens: int
    total_s: float | None
    first_speech_tokens: int | None  # generated tokens until the first SA chunk completed; None: no speech
    first_speech_s: float | None
    text_chunks_before_speech: int  # TA chunks completed before the first SA chunk
    text_tokens_before_speech: int  # their tokens (all TA tokens when there is no speech)
    answer_text_tokens: int
    speech_units: int

    def as_dict(self) -> dict:
        return asdict(self)


def measure(parsed: ParsedResponse, prompt_tokens: int, total_s: float | None = None) -> Latency:
    """Latency figures of one parsed response."""
    first_sa = next((c for c in parsed.chunks if c.kind == "sa"), None)
    ta = parsed.of_kind("ta")
    before = [c for c in ta if first_sa is None or c.end_token < first_sa.end_token]
    return Latency(
        prompt_tokens=prompt_tokens,
        generated_tokens=parsed.num_tokens,
        total_s=total_s,
        first_speech_tokens=first_sa.end_token if first_sa else None,
        first_speech_s=first_sa.time_s if first_sa else None,
        text_chunks_before_speech=len(before),
        text_tokens_before_speech=sum(c.num_tokens for c in before),
        answer_text_tokens=sum(c.num_tokens for c in ta),
        speech_units=len(parsed.speech_units),
    )


def summarize(latencies: Iterable[Latency]) -> dict:
    """Means over items; first-speech means are over the items that produced speech (counted separately)."""
    rows = list(latencies)
    out: dict = {"items": len(rows), "items_with_speech": sum(r.first_speech_tokens is not None for r in rows)}
    for name in ("generated_tokens", "total_s", "first_speech_tokens", "first_speech_s",
                 "text_chunks_before_speech", "text_tokens_before_speech", "answer_text_tokens", "speech_units"):
        values = [getattr(r, name) for r in rows if getattr(r, name) is not None]
        out[f"mean_{name}"] = mean(values) if values else None
    return out
