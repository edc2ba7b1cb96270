"""Text metrics for speech-to-speech evaluation: language id and error rates.

Language id is the project's one rule (`text.language.script_language`: CJK characters against Latin words).
Error rates are computed on normalised text (NFKC, lower case, no punctuation). WER counts each CJK character
as a word (Chinese has no spaces; this is the usual mixed error rate), CER ignores whitespace.
"""
from __future__ import annotations

import re
import unicodedata
from typing import Sequence

import jiwer

from megatron_cslm.text.language import CJK, script_language

__all__ = ["error_rates", "normalize", "script_language"]

_TOKEN = re.compile(f"[{CJK}]|[^\\s{CJK}]+")


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if unicodedata.category(c)[0] in "PS" else c for c in text)
    return " ".join(text.split())


def _words(text: str) -> str:
    return " ".join(_TOKEN.findall(normalize(text)))


def error_rates(references: Sequence[str], hypotheses: Sequence[str]) -> dict | None:
    """Corpus WER and CER over the pairs whose normalised reference is not empty (None if there are none)."""
    pairs = [(r, h) for r, h in zip(references, hypotheses) if _words(r)]
    if not pairs:
        return None
    refs, hyps = [_words(r) for r, _ in pairs], [_words(h) for _, h in pairs]
    return {"wer": jiwer.wer(refs, hyps), "cer": jiwer.cer([r.replace(" ", "") for r in refs],
                                                          [h.replace(" ", "") for h in hyps]),
            "pairs": len(pairs)}
