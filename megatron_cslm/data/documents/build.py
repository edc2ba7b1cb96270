"""Continual-pretraining data recipes: source corpora -> documents for ``tools/preprocess_data.py``.

CSLM's continual pretraining aligns speech with text inside the LLM before any dialogue SFT. Each recipe
turns one kind of source record into one document (or none) of the form::

    {"id": str, "source": recipe, "lang": str, "segments": [{"text": str} | {"units": [int]}, ...]}

where a segment may carry ``"loss": false`` to keep it out of the loss. The recipes:

* ``asr``: speech -> transcript, ``tts``: transcript -> speech (prompt wording from `templates`),
* ``interleave``: one utterance alternating text and speech at word boundaries (see `interleave`),
* ``translate``: text -> text translation, direction drawn per pair (so each pair is seen once per epoch),
* ``cross_speech``: speech in one language -> text in the other (a side with units is the source),
* ``replay``: instruction data in the Llama-3.1 chat format, so the chat ability survives pretraining;
  with ``mask_prompt`` everything but the assistant replies (and their ``<|eot_id|>``) is masked.

With ``mask_inputs``, the one-way recipes (`MASKABLE`: asr, tts, cross_speech) train on their target alone,
the last segment (the transcript, the speech, the translation), and keep the prompt and the input as context:
predicting a transcript's speech units from nothing teaches nothing, and on the quickstart's tiny model that
loss crowds out learning to read (see examples/quickstart_cpu.sh).

``lang`` is the record's language (``src-tgt`` for the two translation recipes). Every record of a source
is offered to every enabled recipe of that source; each recipe keeps it with probability ``p[recipe]``. All
randomness comes from ``random.Random(f"{seed}|{recipe}|{record id}")``, so the output depends only on the
seed and the inputs, not on file order or which other recipes run.

Speech tokenizer: every units record's ``speech_tokenizer`` (speech/identity.py) must be the same over all
inputs (the build stops naming both otherwise, before anything is written); a document holding units carries it
as ``"speech_tokenizer"`` and ``stats.json`` records it. Records without one (older units files) are accepted
with a warning; documents without speech (translate, replay) carry none.
"""
from __future__ import annotations

import contextlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from tqdm import tqdm

from megatron_cslm.data.documents.interleave import interleave_chunks, interleave_segments
from megatron_cslm.data.documents.records import (
    InstructionRecord,
    ParallelRecord,
    SpeechRecord,
    parse_instruction,
    parse_parallel,
    parse_speech,
)
from megatron_cslm.data.documents.templates import Templates, render
from megatron_cslm.fileio import DataError, SkipCounter, atomic_open, iter_jsonl, write_json
from megatron_cslm.speech.identity import IDENTITY_KEY, IdentityJoin
from megatron_cslm.text.chat import BOS, EOT, header

# recipe -> the input kind it reads
RECIPES: dict[str, str] = {"asr": "speech", "tts": "speech", "interleave": "speech",
                           "translate": "parallel", "cross_speech": "parallel", "replay": "instruct"}


@dataclass(frozen=True)
class RecipeConfig:
    """What to build and how. `p` maps recipe -> keep probability (default 1.0 for each)."""

    recipes: tuple[str, ...] = tuple(RECIPES)
    p: dict[str, float] = field(default_factory=dict)
    chunk_words: tuple[int, int] = (3, 8)
    langs: tuple[str, str] = ("zh", "en")
    mask_prompt: bool = False
    num_units: int = 4096
    dedup_units: bool = False  # collapse repeated units of every input (records already collapsed are unchanged)
    mask_inputs: bool = False  # asr, tts, cross_speech: loss on the last segment (the target) only
    seed: int = 0
    skip_bad_records: bool = False
    templates: Templates = field(default_factory=Templates.default)

    def __post_init__(self):
        unknown = sorted(set(self.recipes) - set(RECIPES)) + sorted(set(self.p) - set(RECIPES))
        if unknown:
            raise ValueError(f"unknown recipe(s) {unknown}; choose from {list(RECIPES)}")
        bad_p = {r: v for r, v in self.p.items() if not 0.0 <= v <= 1.0}
        if bad_p:
            raise ValueError(f"probabilities must be in [0, 1], got {bad_p}")
        lo, hi = self.chunk_words
        if not 1 <= lo <= hi:
            raise ValueError(f"chunk_words must be 1 <= min <= max, got {self.chunk_words}")
        if len(self.langs) != 2 or self.langs[0] == self.langs[1]:
            raise ValueError(f"langs must be two different language keys, got {self.langs}")


def _doc(recipe: str, rid: str, lang: str, segments: list[dict]) -> dict:
    return {"id": f"{recipe}:{rid}", "source": recipe, "lang": lang, "segments": segments}


def asr_document(rec: SpeechRecord, templates: Templates, rng: random.Random) -> dict:
    """Speech -> transcript, prompt worded in the utterance's language."""
    template, _ = templates.pick("asr", rec.lang, rng)
    return _doc("asr", rec.id, rec.lang, render(template, {"speech": rec.units, "text": rec.text}))


def tts_document(rec: SpeechRecord, templates: Templates, rng: random.Random) -> dict:
    """Transcript -> speech, prompt worded in the utterance's language."""
    template, _ = templates.pick("tts", rec.lang, rng)
    return _doc("tts", rec.id, rec.lang, render(template, {"speech": rec.units, "text": rec.text}))


def interleave_document(rec: SpeechRecord, rng: random.Random, chunk_words: tuple[int, int] = (3, 8)) -> dict | None:
    """The utterance as alternating text/speech chunks of `chunk_words` words; None if it is too short."""
    try:
        chunks = interleave_chunks(rec.text, rec.units, rec.words, chunk_words, rng)
    except ValueError as e:  # timestamps that do not match the transcript
        raise DataError(rec.path, rec.line, "words", str(e)) from None
    segments = interleave_segments(chunks, rng) if chunks else None
    return _doc("interleave", rec.id, rec.lang, segments) if segments else None


def _direction(sides: list[str], langs: tuple[str, str], rng: random.Random) -> tuple[str, str]:
    src = rng.choice(sides)
    return src, langs[1] if src == langs[0] else langs[0]


def _pair_values(pair: ParallelRecord, src: str, tgt: str, in_lang: str, templates: Templates) -> dict:
    return {"src": pair.text[src], "tgt": pair.text[tgt], "src_lang": templates.lang_name(src, in_lang),
            "tgt_lang": templates.lang_name(tgt, in_lang)}


def translate_document(pair: ParallelRecord, templates: Templates, rng: random.Random,
                       langs: tuple[str, str] = ("zh", "en")) -> dict:
    """Text translation in a random direction, prompt worded in the source language."""
    src, tgt = _direction(list(langs), langs, rng)
    template, in_lang = templates.pick("translate", src, rng)
    values = _pair_values(pair, src, tgt, in_lang, templates)
    return _doc("translate", pair.id, f"{src}-{tgt}", render(template, values))


def cross_speech_document(pair: ParallelRecord, templates: Templates, rng: random.Random,
                          langs: tuple[str, str] = ("zh", "en")) -> dict | None:
    """Speech in one language -> text in the other; None if neither side has units."""
    sides = [lang for lang in langs if lang in pair.units]
    if not sides:
        return None
    src, tgt = _direction(sides, langs, rng)
    template, in_lang = templates.pick("cross_speech", src, rng)
    values = {"speech": pair.units[src], **_pair_values(pair, src, tgt, in_lang, templates)}
    return _doc("cross_speech", pair.id, f"{src}-{tgt}", render(template, values))


def replay_document(conv: InstructionRecord, mask_prompt: bool = False) -> dict:
    """Llama-3.1 chat rendering (the tokenizer's ``chat_template``, no system prompt added). Prompt segments
    are everything up to and including each ``assistant`` header; replies are separate segments."""
    segments, prompt = [], BOS
    for role, content in conv.turns:
        prompt += header(role)
        if role == "assistant":
            segments.append({"text": prompt, "loss": False} if mask_prompt else {"text": prompt})
            segments.append({"text": content + EOT})
            prompt = ""
        else:
            prompt += content + EOT
    return _doc("replay", conv.id, conv.lang, segments)


def _builders(config: RecipeConfig) -> dict[str, Callable]:
    t = config.templates
    return {
        "asr": lambda rec, rng: asr_document(rec, t, rng),
        "tts": lambda rec, rng: tts_document(rec, t, rng),
        "interleave": lambda rec, rng: interleave_document(rec, rng, config.chunk_words),
        "translate": lambda rec, rng: translate_document(rec, t, rng, config.langs),
        "cross_speech": lambda rec, rng: cross_speech_document(rec, t, rng, config.langs),
        "replay": lambda rec, rng: replay_document(rec, config.mask_prompt),
    }


MASKABLE = ("asr", "tts", "cross_speech")  # recipes with one input and one target (the last segment)


def mask_inputs(doc: dict) -> dict:
    """`doc` with every segment but the last (its target) marked ``"loss": false``."""
    for segment in doc["segments"][:-1]:
        segment["loss"] = False
    return doc


# Why a recipe returned no document.
NO_DOC_REASON = {"interleave": "too_short", "cross_speech": "no_speech"}


def build_pretrain_data(out_dir: str | Path, speech: Iterable[str | Path] = (), parallel: Iterable[str | Path] = (),
                        instruct: Iterable[str | Path] = (), config: RecipeConfig = RecipeConfig(),
                        progress: bool = False) -> dict[str, SkipCounter]:
    """Write ``<recipe>.jsonl`` for every recipe in `config` and ``stats.json``; returns the counters.

    Per recipe, ``read == written + skipped`` where skip reasons are ``sampled_out`` (probability), ``too_short``
    (interleave: under two words), ``no_speech`` (cross_speech: no side has units), and ``bad_record``,
    ``malformed_json`` and ``not_utf8`` (only with ``skip_bad_records``; otherwise the first bad record raises
    DataError and nothing is written).
    """
    out_dir = Path(out_dir)
    inputs = {"speech": [str(p) for p in speech], "parallel": [str(p) for p in parallel],
              "instruct": [str(p) for p in instruct]}
    missing = [r for r in config.recipes if not inputs[RECIPES[r]]]
    if missing:
        raise ValueError(f"recipe(s) {missing} need {sorted({RECIPES[r] for r in missing})} input files")
    def collapsed(record):  # speech and parallel records, with --dedup-units
        return record.deduplicated() if config.dedup_units else record

    parsers = {"speech": lambda raw, path, line: collapsed(parse_speech(raw, path, line, config.num_units)),
               "parallel": lambda raw, path, line: collapsed(
                   parse_parallel(raw, path, line, config.langs, config.num_units)),
               "instruct": parse_instruction}
    builders = _builders(config)
    counters = {r: SkipCounter() for r in config.recipes}
    speech_ids = IdentityJoin(config.num_units, "--num-units")

    def bad(recipes: list[str], err: DataError) -> None:
        if not config.skip_bad_records:
            raise err
        for r in recipes:
            counters[r].skip("bad_record", str(err))

    with contextlib.ExitStack() as stack:
        outs = {r: stack.enter_context(atomic_open(out_dir / f"{r}.jsonl")) for r in config.recipes}
        for kind, paths in inputs.items():
            recipes = [r for r in config.recipes if RECIPES[r] == kind]
            if not recipes:
                continue
            for path in paths:
                unreadable = SkipCounter() if config.skip_bad_records else None  # malformed JSON / not UTF-8 lines
                # progress bars on a terminal only (disable=None): piped logs keep one line per event
                for line, raw in tqdm(iter_jsonl(path, unreadable), desc=Path(path).name, unit=" rec",
                                      disable=None if progress else True):
                    for r in recipes:
                        counters[r].read += 1
                    try:
                        rec = parsers[kind](raw, path, line)
                    except DataError as e:
                        bad(recipes, e)
                        continue
                    has_speech = kind == "speech" or (kind == "parallel" and bool(rec.units))
                    ident = speech_ids.add(raw.get(IDENTITY_KEY), f"{path}:{line}", path, line, has_speech) \
                        if kind != "instruct" else None
                    for r in recipes:
                        rng = random.Random(f"{config.seed}|{r}|{rec.id}")
                        if rng.random() >= config.p.get(r, 1.0):
                            counters[r].skip("sampled_out")
                            continue
                        try:
                            doc = builders[r](rec, rng)
                        except DataError as e:
                            bad([r], e)
                            continue
                        if doc is None:
                            counters[r].skip(NO_DOC_REASON[r], rec.id)
                            continue
                        if config.mask_inputs and r in MASKABLE:
                            mask_inputs(doc)
                        if ident is not None and any("units" in seg for seg in doc["segments"]):
                            doc[IDENTITY_KEY] = ident.to_dict()
                        outs[r].write(json.dumps(doc, ensure_ascii=False) + "\n")
                        counters[r].written += 1
                for r in recipes if unreadable is not None else ():
                    counters[r].merge(unreadable)
    write_json(out_dir / "stats.json", {
        "inputs": inputs,
        "config": {"recipes": list(config.recipes), "p": {r: config.p.get(r, 1.0) for r in config.recipes},
                   "chunk_words": list(config.chunk_words), "langs": list(config.langs),
                   "mask_prompt": config.mask_prompt, "num_units": config.num_units,
                   "dedup_units": config.dedup_units, "mask_inputs": config.mask_inputs, "seed": config.seed,
                   "skip_bad_records": config.skip_bad_records},
        "recipes": {r: c.as_dict() for r, c in counters.items()},
        IDENTITY_KEY: speech_ids.identity.to_dict() if speech_ids.identity else None,
    })
    return counters
