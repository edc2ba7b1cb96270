"""The paper's speech-to-speech benchmarks: question language, answer language and size of each layout.

Why: the paper reports InstructS2S-Eval (English, 199 spoken questions) and BELLE-eval-S2S (Chinese, 250), and
their cross-lingual versions, where the same spoken questions are answered in the other language. A layout fixes
the question language (the speech tokenizer and TQ metrics), the expected answer language (the off-target
ratio) and the item count (a short manifest is reported, not refused: `--limit` runs are normal). Both
benchmarks are read from the same manifest format (`inference.inputs.read_benchmark_list`: ``id<TAB>text``
with a header, audio in ``wav/<id>.wav``); convert the released files to it once.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Benchmark:
    title: str
    lang: str  # language of the spoken questions
    answer_lang: str  # language the answers must be in (off-target otherwise)
    items: int


BENCHMARKS = {
    "instructs2s-eval": Benchmark("InstructS2S-Eval", "en", "en", 199),
    "instructs2s-eval-x": Benchmark("InstructS2S-Eval, cross-lingual (answers in Chinese)", "en", "zh", 199),
    "belle-eval-s2s": Benchmark("BELLE-eval-S2S", "zh", "zh", 250),
    "belle-eval-s2s-x": Benchmark("BELLE-eval-S2S, cross-lingual (answers in English)", "zh", "en", 250),
}


def resolve_languages(name: str | None, lang: str | None, answer_lang: str | None) -> tuple[str | None, str | None]:
    """(question, answer) language: explicit flags first, then the layout's, then the answer follows the question."""
    bench = BENCHMARKS[name] if name else None
    lang = lang or (bench.lang if bench else None)
    answer_lang = answer_lang or (bench.answer_lang if bench else None) or lang
    if bench and lang != bench.lang:
        log.warning("%s questions are %s, but --lang %s was given", bench.title, bench.lang, lang)
    return lang, answer_lang


def check_size(name: str | None, items: int) -> None:
    if name and items != BENCHMARKS[name].items:
        log.warning("%s has %d items; this run evaluates %d", BENCHMARKS[name].title, BENCHMARKS[name].items, items)
