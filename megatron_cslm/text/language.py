"""The one language-identification rule and the one CJK character range of the project.

Only the two answer languages need telling apart (a Chinese answer to an English instruction is the typical
cross-lingual failure), so a script count is enough, no model: CJK characters (each one a word, Chinese has
no spaces) against Latin words. Chunking, error rates, record language guessing and the evaluation's
off-target ratio all count words the same way because they all use `CJK`.
"""
from __future__ import annotations

import re

# Scripts written without spaces between words (kana, CJK ideographs incl. extensions A-F and compatibility
# ideographs): each character counts as one word.
CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef"
_CJK_CHAR = re.compile(f"[{CJK}]")
_LATIN_WORD = re.compile(r"[a-zA-Z\u00c0-\u024f]+")


def script_language(text: str) -> str | None:
    """"zh" if CJK characters outnumber Latin words, "en" if not, None for text with neither."""
    cjk, latin = len(_CJK_CHAR.findall(text)), len(_LATIN_WORD.findall(text))
    if cjk == latin == 0:
        return None
    return "zh" if cjk > latin else "en"


def guess_lang(text: str, default: str = "en") -> str:
    """`script_language`, or `default` for text with neither script (used when a record has no "lang")."""
    return script_language(text) or default
