"""SFT records -> token sequences with per-token modality masks, in a chain-of-modality layout.

Two input forms are accepted (one JSON object per line):

* speech-aware: ``{"id", "lang", "turns": [{"role": "user", "text", "units"}, {"role": "assistant", "text",
  "units", "words"?: [{"word", "start", "end"}], "chunks"?: [{"text", "units"}]}, ...]}``; an optional
  leading ``{"role": "system", "text"}`` turn. User ``text`` is the question transcript (TQ); word
  timestamps are unit indices into the assistant's raw units.
* the CSLM authors': ``{"prompt": str | [str], "response": str | [str]}`` with units written as text
  (``<sosp><12><345><eosp>``). A prompt that is a bare unit span gets the authors' instruction around it, any
  other prompt is used verbatim; the response is parsed into ``[question] TQ [answer]`` and text/unit spans,
  so the same data can be re-laid out (a response already in the interleaved layout round-trips).

Each assistant turn is laid out as (`[question] TQ` dropped with ``with_tq=False``):

* ``interleaved`` (CSLM): ``[question] TQ [answer] TA1 <sosp>SA1<eosp> TA2 <sosp>SA2<eosp> ...``
* ``sequential`` (SpeechGPT-style baseline): ``[question] TQ [answer] TA <sosp>SA<eosp>``
* ``text``: ``[question] TQ [answer] TA``

inside the Llama-3.1 chat format. Loss is on the assistant side only; every trained token carries its
modality (TQ, TA, SA; markers belong to what they open, ``<|eot_id|>`` counts as TA), so the training loop can
weight modalities from the mask alone. Untrained tokens have modality 0 ("none").

A record may carry ``"speech_tokenizer"`` (speech/identity.py, as units files and the toy corpus write it): the
records of one SFT set must agree (the build stops naming both otherwise) and `.meta.json` records the identity;
records without one are accepted with a warning.
"""
from __future__ import annotations

import re
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from megatron_cslm.data.chunking import AnswerChunk, chunk_answer, cut_kind, dedup_units, rechunk, word_count
from megatron_cslm.data.metadata import write_dataset_metadata
from megatron_cslm.data.packing import MODALITIES, modality_prefix, pack_dataset, token_dtype
from megatron_cslm.errors import CslmError
from megatron_cslm.fileio import SkipCounter, iter_jsonl, make_dirs, write_json
from megatron_cslm.speech.identity import IDENTITY_KEY, IdentityJoin
from megatron_cslm.text import chat
from megatron_cslm.text.markup import MarkupError, bare_speech, parse_unit_span, split_speech
from megatron_cslm.text.tokenizer import SpecialTokens, SpeechTextTokenizer
from megatron_cslm.text.units import UnitListError, check_units

LAYOUTS = ("interleaved", "sequential", "text")

# The CSLM authors' instruction prompts (their inference script), keyed by answer language:
# (instruction, text before the spoken question's <sosp>, text after its <eosp>).
INSTRUCTIONS = {
    "en": ("Please answer the questions in the user's speech in English.", " This is input: ", "."),
    "zh": ("用中文回答用户语音中的问题。", " 这是输入: ", "。"),
}


@dataclass(frozen=True)
class SFTConfig:
    """How conversations become token sequences."""

    layout: str = "interleaved"
    with_tq: bool = True
    chunk_words: int = 7  # target TA chunk size in words (a CJK character counts as a word)
    chunk_tokens: int | None = None  # target TA chunk size in tokens instead of words
    dedup_units: bool = False  # collapse repeated units, to match deduplicated pretraining data
    system_prompt: str | None = None
    default_lang: str = "en"  # instruction language for records without "lang"

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.chunk_words < 1 or (self.chunk_tokens is not None and self.chunk_tokens < 1):
            raise ValueError("chunk sizes must be >= 1")
        if self.default_lang not in INSTRUCTIONS:
            raise ValueError(f"no instruction for language {self.default_lang!r} (known: {sorted(INSTRUCTIONS)})")


@dataclass
class UserTurn:
    units: list[int] | None  # the spoken question
    transcript: str | None  # TQ
    content: str | None = None  # a verbatim prompt (authors' form), used instead of the instruction


@dataclass
class AssistantTurn:
    text: str
    units: list[int] | None
    words: list[dict] | None = None
    chunks: list[AnswerChunk] | None = None  # given pre-chunked
    where: str = "response"  # the record field it came from, for error messages


@dataclass
class Conversation:
    lang: str
    turns: list[tuple[UserTurn, AssistantTurn]] = field(default_factory=list)
    system: str | None = None


@dataclass
class Sample:
    """One tokenized conversation: ids and the modality of every token (0 = not trained)."""

    tokens: np.ndarray  # int32 [n]
    modality: np.ndarray  # uint8 [n]


# ---------------------------------------------------------------------------------------------- parsing


def _units(value, where: str, num_units: int) -> list[int]:
    if not isinstance(value, list):
        raise CslmError.in_field(where, "expected a list of integer unit ids")
    try:
        check_units(value, num_units, allow_empty=True, strict=True)
    except UnitListError as e:
        raise CslmError.in_field(where, e.message, "unit_out_of_range" if e.reason == "out_of_range"
                                 else "invalid_record") from None
    return value


def _text(value, where: str) -> str:
    if not isinstance(value, str):
        raise CslmError.in_field(where, f"expected a string, got {type(value).__name__}")
    return value


def _parse_speech_aware(record: dict, num_units: int) -> tuple[list[tuple[UserTurn, AssistantTurn]], str | None]:
    turns = record["turns"]
    if not isinstance(turns, list) or not turns:
        raise CslmError.in_field("turns", "expected a non-empty list of turns")
    system, pairs, user = None, [], None
    for k, turn in enumerate(turns):
        where = f"turns[{k}]"
        if not isinstance(turn, dict):
            raise CslmError.in_field(where, "expected an object")
        role = turn.get("role")
        if role == "system" and k == 0:
            system = _text(turn.get("text"), f"{where}.text")
        elif role == "user" and user is None:
            if "units" not in turn and "text" not in turn:
                raise CslmError.in_field(where, "a user turn needs 'units' (spoken question) and/or 'text'")
            units = _units(turn["units"], f"{where}.units", num_units) if "units" in turn else None
            text = _text(turn["text"], f"{where}.text").strip() if "text" in turn else None
            if not units and not text:
                raise CslmError.in_field(where, "empty question: no units and no text")
            user = UserTurn(units=units or None, transcript=text or None, content=None if units else text)
        elif role == "assistant" and user is not None:
            pairs.append((user, _parse_assistant(turn, where, num_units)))
            user = None
        else:
            expected = "'user'" if user is None else "'assistant'"
            raise CslmError.in_field(f"{where}.role", f"got {role!r}, expected {expected} (turns alternate user/"
                                                      "assistant, after an optional leading system turn)")
    if user is not None or not pairs:
        raise CslmError.in_field("turns", "must end with an assistant turn")
    return pairs, system


def _parse_assistant(turn: dict, where: str, num_units: int) -> AssistantTurn:
    words = turn.get("words")
    if words is not None and not isinstance(words, list):
        raise CslmError.in_field(f"{where}.words", "expected a list of {word, start, end}")
    if "chunks" in turn:
        raw = turn["chunks"]
        if not isinstance(raw, list) or not raw:
            raise CslmError.in_field(f"{where}.chunks", "expected a non-empty list of {text, units}")
        chunks = []
        for j, c in enumerate(raw):
            if not isinstance(c, dict):
                raise CslmError.in_field(f"{where}.chunks[{j}]", "expected an object {text, units}")
            chunks.append(AnswerChunk(_text(c.get("text"), f"{where}.chunks[{j}].text"),
                                _units(c.get("units", []), f"{where}.chunks[{j}].units", num_units)))
        text, units = "".join(c.text for c in chunks), [u for c in chunks for u in c.units]
        for name, value in (("text", text), ("units", units)):
            if name in turn and turn[name] != value:
                raise CslmError.in_field(f"{where}.{name}", f"differs from the concatenation of {where}.chunks")
        return AssistantTurn(text, units, None, chunks, where)
    if "text" not in turn:
        raise CslmError.in_field(f"{where}.text", "missing")
    units = _units(turn["units"], f"{where}.units", num_units) if "units" in turn else None
    return AssistantTurn(_text(turn["text"], f"{where}.text"), units, words, None, where)


def _span_units(span: str, where: str, num_units: int) -> list[int]:
    try:
        units = parse_unit_span(span)
    except MarkupError as e:
        raise CslmError.in_field(where, str(e)) from None
    return _units(units, where, num_units)


def _parse_response(text: str, where: str, specials: SpecialTokens, num_units: int) -> tuple[str | None, AssistantTurn]:
    """Split an authors' response into the TQ and the answer's text/unit spans."""
    q, a = re.escape(specials.question), re.escape(specials.answer)
    tq = None
    m = re.match(rf"\s*(?:{q}(.*?))?{a}", text, re.S)  # "[question] TQ [answer]" or just "[answer]"
    if m:
        tq, text = (m.group(1).strip() if m.group(1) is not None else None), text[m.end():]
    if specials.question in text or specials.answer in text:
        raise CslmError.in_field(where, f"expected '{specials.question} TQ {specials.answer} answer' at the start")
    texts, spans = split_speech(text, specials)  # text, units, text, units, ..., text
    if not spans:
        return tq, AssistantTurn(text.strip(), None, where=where)
    units = [_span_units(s, where, num_units) for s in spans]
    if len(spans) == 1 and not texts[1].strip():  # one answer, then its speech: not chunked
        return tq, AssistantTurn(texts[0].strip(), units[0], where=where)
    chunks = [AnswerChunk(t, u) for t, u in zip(texts, units)]
    chunks += [AnswerChunk(texts[-1], [])] if texts[-1].strip() else []
    chunks[0] = AnswerChunk(chunks[0].text.lstrip(), chunks[0].units)
    return tq, AssistantTurn("".join(c.text for c in chunks), [u for c in chunks for u in c.units],
                             chunks=chunks, where=where)


def _parse_authors(record: dict, specials: SpecialTokens, num_units: int) -> list[tuple[UserTurn, AssistantTurn]]:
    prompts, responses = record["prompt"], record.get("response")
    if isinstance(prompts, str) and isinstance(responses, str):
        prompts, responses, names = [prompts], [responses], (["prompt"], ["response"])
    elif isinstance(prompts, list) and isinstance(responses, list) and len(prompts) == len(responses) and prompts:
        names = ([f"prompt[{k}]" for k in range(len(prompts))], [f"response[{k}]" for k in range(len(prompts))])
    else:
        raise CslmError.in_field("response", "'prompt' and 'response' must both be strings, or lists of strings "
                                             "of the same (non-zero) length")
    pairs = []
    for prompt, response, p_name, r_name in zip(prompts, responses, *names):
        _text(prompt, p_name)
        span = bare_speech(prompt, specials)
        m = span is not None
        units = _span_units(span, p_name, num_units) if m else None
        if m and not units:
            raise CslmError.in_field(p_name, "empty unit span")
        tq, assistant = _parse_response(_text(response, r_name), r_name, specials, num_units)
        pairs.append((UserTurn(units, tq, None if m else prompt.strip()), assistant))
    return pairs


def parse_record(record: dict, num_units: int, specials: SpecialTokens = SpecialTokens(),
                 default_lang: str = "en") -> Conversation:
    """Parse either input form into a Conversation; raises CslmError naming the bad field (no file yet)."""
    lang = record.get("lang", default_lang)
    if lang not in INSTRUCTIONS:
        raise CslmError.in_field("lang", f"no instruction for language {lang!r} (known: {sorted(INSTRUCTIONS)})")
    if "turns" in record:
        pairs, system = _parse_speech_aware(record, num_units)
    elif "prompt" in record:
        pairs, system = _parse_authors(record, specials, num_units), None
    else:
        raise CslmError.in_field("turns", "missing: expected 'turns' (speech-aware form) or 'prompt'/'response' (CSLM "
                                 "authors' form)")
    for _, answer in pairs:  # an answer without text would train the model to say nothing
        if not answer.text.strip():
            raise CslmError.in_field(f"{answer.where}.text", "empty answer text", "empty_answer")
    return Conversation(lang, pairs, system)


# ---------------------------------------------------------------------------------------------- encoding


class SFTEncoder:
    """Lays out and tokenizes conversations for one tokenizer and config (template ids are encoded once)."""

    def __init__(self, tokenizer: SpeechTextTokenizer, config: SFTConfig):
        self.tok, self.cfg = tokenizer, config
        enc = tokenizer.encode_text
        self.bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
        self.header = {r: enc(chat.header(r)) for r in chat.ROLES}
        self.eot = enc(chat.EOT)
        self.instruction = {lang: (enc(prompt + before), enc(after))
                            for lang, (prompt, before, after) in INSTRUCTIONS.items()}
        if config.chunk_tokens is not None:
            self.chunk_target, self.chunk_count = config.chunk_tokens, lambda piece: len(enc(piece))
        else:
            self.chunk_target, self.chunk_count = config.chunk_words, word_count

    def _units(self, units: list[int]) -> list[int]:
        return dedup_units(units) if self.cfg.dedup_units else units

    def _chunks(self, turn: AssistantTurn) -> list[AnswerChunk]:
        if turn.chunks is not None:
            return rechunk(turn.chunks, self.cfg.dedup_units)
        try:
            return chunk_answer(turn.text.strip(), turn.units, words=turn.words, target=self.chunk_target,
                                count=self.chunk_count, dedup=self.cfg.dedup_units)
        except ValueError as e:
            raise CslmError.in_field(f"{turn.where}.words", str(e), "bad_timestamps") from None

    def _assistant(self, user: UserTurn, turn: AssistantTurn) -> list[tuple[list[int] | dict, int]]:
        tq, ta, sa = MODALITIES["tq"], MODALITIES["ta"], MODALITIES["sa"]
        parts: list[tuple[list[int] | dict, int]] = []
        if self.cfg.with_tq:
            if user.transcript is None:
                raise CslmError.in_field(turn.where, "no question transcript (TQ) for this turn: give the user turn "
                                                     "a 'text', or build without TQ", "missing_transcript")
            parts += [([self.tok.question_id], tq), ({"text": user.transcript}, tq)]
        parts.append(([self.tok.answer_id], ta))
        if self.cfg.layout != "text" and not turn.units:
            raise CslmError.in_field(f"{turn.where}.units",
                                     f"the {self.cfg.layout} layout needs the answer's speech units", "missing_units")
        if self.cfg.layout == "interleaved":
            for c in self._chunks(turn):
                parts += [({"text": c.text}, ta), ({"units": c.units}, sa)]
        else:
            parts.append(({"text": turn.text.strip()}, ta))
            if self.cfg.layout == "sequential":
                parts.append(({"units": self._units(turn.units)}, sa))
        return parts

    def _user(self, lang: str, user: UserTurn) -> list[tuple[list[int] | dict, int]]:
        if user.content is not None:
            return [({"text": user.content}, 0)]
        before, after = self.instruction[lang]
        return [(before, 0), ({"units": self._units(user.units)}, 0), (after, 0)]

    def _opening(self, system: str | None) -> list[tuple[list[int] | dict, int]]:
        none = MODALITIES["none"]
        parts: list[tuple[list[int] | dict, int]] = [(self.bos, none)]
        if system:
            parts += [(self.header["system"], none), ({"text": system.strip()}, none), (self.eot, none)]
        return parts

    def _user_turn(self, lang: str, user: UserTurn) -> list[tuple[list[int] | dict, int]]:
        none = MODALITIES["none"]
        return [(self.header["user"], none), *self._user(lang, user), (self.eot, none),
                (self.header["assistant"], none)]

    def _render(self, parts: list[tuple[list[int] | dict, int]]) -> Sample:
        # Empty text/unit parts (an empty chunk) are dropped; the rest is tokenized in one batch call.
        parts = [(p, m) for p, m in parts if p and (not isinstance(p, dict) or next(iter(p.values())))]
        encoded = iter(self.tok.encode_each_segment([p for p, _ in parts if isinstance(p, dict)]))
        tokens, modality = [], []
        for p, m in parts:
            ids = next(encoded) if isinstance(p, dict) else p
            tokens += ids
            modality += [m] * len(ids)
        return Sample(np.asarray(tokens, dtype=np.int32), np.asarray(modality, dtype=np.uint8))

    def encode(self, conv: Conversation) -> Sample:
        """Token ids and modality mask of a conversation."""
        parts = self._opening(conv.system if conv.system is not None else self.cfg.system_prompt)
        for user, assistant in conv.turns:
            parts += [*self._user_turn(conv.lang, user), *self._assistant(user, assistant),
                      (self.eot, MODALITIES["ta"])]
        return self._render(parts)

    def encode_prompt(self, units: Sequence[int], lang: str) -> list[int]:
        """The inference prompt for a spoken question: exactly what `encode` puts before the assistant's
        answer, ending with the assistant header. `lang` picks the instruction, which names the answer language."""
        if lang not in INSTRUCTIONS:
            raise ValueError(f"no instruction for answer language {lang!r} (known: {sorted(INSTRUCTIONS)})")
        user = UserTurn(units=list(units), transcript=None)
        return self._render(self._opening(self.cfg.system_prompt) + self._user_turn(lang, user)).tokens.tolist()


# ---------------------------------------------------------------------------------------------- building


def build_sft_data(inputs: Sequence[str | Path], tokenizer: SpeechTextTokenizer, config: SFTConfig,
                   output_prefix: str | Path, seq_length: int, overlong: str = "truncate", seed: int = 0,
                   skip_bad_records: bool = False, progress: bool = True) -> dict:
    """Tokenize SFT JSONL files and pack them into `<output_prefix>` bins (see `packing.pack_dataset`).

    Samples are first written unpacked to a temporary IndexedDataset beside the output, so memory stays flat
    however large the corpus. Writes `<output_prefix>.stats.json` last and returns the same stats.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder  # lazy: see data/packing.py

    output_prefix = Path(output_prefix)
    make_dirs(output_prefix.parent)
    counter = SkipCounter()
    answer_cuts: Counter[str] = Counter()  # answers cut at word timestamps / proportionally / pre-chunked
    speech_ids = IdentityJoin(tokenizer.num_units, "the tokenizer (--num-units)")
    with tempfile.TemporaryDirectory(dir=output_prefix.parent, prefix=f".{output_prefix.name}.unpacked.") as tmp:
        src = str(Path(tmp) / "samples")
        tokens = IndexedDatasetBuilder(src + ".bin", dtype=token_dtype(tokenizer.vocab_size))
        modality = IndexedDatasetBuilder(modality_prefix(src) + ".bin", dtype=np.uint8)
        encoder = SFTEncoder(tokenizer, config)
        max_token_id = -1  # recorded in <prefix>.meta.json: training checks ids without reading the bins
        for path in inputs:
            records = iter_jsonl(path, counter if skip_bad_records else None)  # malformed lines: counted too
            for line, record in tqdm(records, desc=f"tokenizing {Path(path).name}", unit=" records",
                                     disable=not progress):
                counter.read += 1
                try:
                    conv = parse_record(record, tokenizer.num_units, tokenizer.specials, config.default_lang)
                    sample = encoder.encode(conv)
                except CslmError as e:
                    if not skip_bad_records:
                        raise e.located(path, line) from None
                    counter.skip(e.reason, str(e.located(path, line)))
                    continue
                if tokenizer.count_speech_tokens(sample.tokens)[0]:
                    speech_ids.add(record.get(IDENTITY_KEY), f"{path}:{line}", path, line)
                tokens.add_item(torch.from_numpy(sample.tokens))
                max_token_id = max(max_token_id, int(sample.tokens.max()) if sample.tokens.size else -1)
                modality.add_item(torch.from_numpy(sample.modality))
                tokens.end_document()
                modality.end_document()
                if config.layout == "interleaved":  # how each answer's speech was cut (chunking.cut_kind)
                    answer_cuts.update(cut_kind(a.words, a.chunks) for _, a in conv.turns)
        tokens.finalize(src + ".idx")
        modality.finalize(modality_prefix(src) + ".idx")
        stats = pack_dataset(src, str(output_prefix), seq_length, overlong, seed, progress=progress)
    stats["answer_cuts"] = dict(answer_cuts)
    for reason, count in stats["dropped"].items():
        counter.skipped[reason] += count
    counter.written = stats["samples"]
    stats = {"records": counter.as_dict(), **stats,
             IDENTITY_KEY: speech_ids.identity.to_dict() if speech_ids.identity else None,
             "config": {**asdict(config), "inputs": [str(p) for p in inputs], "vocab_size": tokenizer.vocab_size}}
    write_json(str(output_prefix) + ".stats.json", stats)
    write_dataset_metadata(output_prefix, tokenizer, max_token_id, speech_ids.identity, samples=stats["samples"],
                           bins=stats["bins"])
    return stats
