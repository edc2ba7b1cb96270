"""Text metrics for speech-to-speech evaluation: script-based language id and error rates.

Language id only needs to tell the two answer languages apart (a Chinese answer to an English instruction
is the typical cross-lingual failure), so it compares CJK characters with Latin words: no model needed.
Error rates are computed on normalised text (NFKC, lower case, no punctuation). WER counts each CJK character
as a word (Chinese has no spaces; this is the usual mixed error rate), CER ignores whitespace.
"""
from __future__ import annotations

import re
import unicodedata
from typing import Sequence

import jiwer

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_CJK_CHAR = re.compile(f"[{_CJK}]")
_LATIN_WORD = re.compile(r"[a-zA-Z\u00c0-\u024f]+")
_TOKEN = re.compile(f"[{_CJK}]|[^\\s{_CJK}]+")


def script_language(text: str) -> str | None:
    """"zh" if CJK characters outnumber Latin words, "en" if not, None for text with neither."""
    cjk, latin = len(_CJK_CHAR.findall(text)), len(_LATIN_WORD.findall(text))
    if cjk == latin == 0:
        return None
    return "zh" if cjk > latin else "en"


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
