"""Speech-text tokenizer: a text tokenizer plus speech units and four specials, read from its own vocabulary.

Units never go through BPE: unit k is looked up in the vocabulary's `UnitLayout` (arithmetic `offset + k`
when the unit ids are contiguous, a vectorised table otherwise), which is what makes unit-heavy corpora
cheap to tokenize. The CSLM authors' released data writes units as text (``<sosp><12><345><eosp>``);
`encode_text` recognises that form, and the specials, and gives the same ids as Hugging Face added tokens do,
so a saved tokenizer loaded by `transformers.AutoTokenizer` produces identical ids.

Where the units and specials come from (the invariant that keeps ids right):
- A tokenizer that already holds `<k>` unit tokens and/or `<sosp>` `<eosp>` `[question]` `[answer]` (a
  released speech LM, or one saved by `save_pretrained`) is read as it is, in whatever order its training
  added them. A partial unit set (`<12>` missing), a duplicated token or a second spelling (`<012>`) is
  refused, naming the first offending token: guessing would give silently wrong ids.
- A plain text tokenizer is extended: units `<0>`..`<N-1>` then the missing specials are appended after
  its vocabulary (``base vocab | units | <sosp> <eosp> [question] [answer]``).
- `cslm_tokenizer.json` is a cache of what was read (unit ids, special ids, vocabulary size), checked
  against the vocabulary on load; a mismatch stops naming both values. It is never the only source.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Sequence

import numpy as np

from megatron_cslm.errors import CslmError
from megatron_cslm.fileio import atomic_path, write_json
from megatron_cslm.text.backends import (
    CHAT_TEMPLATE_FILE,
    HFTextBackend,
    SentencePieceBackend,
    incompatible,
    open_backend,
)
from megatron_cslm.text.chat import LLAMA31_CHAT_TEMPLATE
from megatron_cslm.text.markup import SpecialTokens
from megatron_cslm.text.units import UNIT_TOKEN, UnitLayout, UnitListError, check_units, unit_token
from megatron_cslm.text.vocabulary import Vocabulary, resolve_vocabulary

__all__ = ["CHAT_TEMPLATE_FILE", "LLAMA31_CHAT_TEMPLATE", "META_FILE", "Segment", "SpecialTokens",
           "SpeechTextTokenizer", "TOKENIZER_FILES"]

logger = logging.getLogger(__name__)
META_FILE = "cslm_tokenizer.json"
META_FORMAT = 2
# What a tokenizer directory may hold, copied as they are when a checkpoint or model directory carries its tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   CHAT_TEMPLATE_FILE, META_FILE)


@dataclass
class Segment:
    """A run of text or of speech units, as produced by `SpeechTextTokenizer.split`."""

    kind: Literal["text", "units"]
    text: str = ""
    units: list[int] = field(default_factory=list)


class SpeechTextTokenizer:
    """Text tokenizer (HF tokenizer.json or SentencePiece) with speech units and specials (see module docstring).

    Args:
        text_tokenizer: HF tokenizer directory or tokenizer.json file, or a SentencePiece .model file.
        num_units: number of discrete speech units. Read from the vocabulary when it holds units (a different
            value is refused); appended otherwise (default 4,096, the CosyVoice S3 tokenizer's).
        specials: strings of <sosp>, <eosp>, [question], [answer].
    """

    chat_template: str = LLAMA31_CHAT_TEMPLATE  # what an extended plain tokenizer is saved with

    def __init__(self, text_tokenizer: str | Path, num_units: int | None = None,
                 specials: SpecialTokens = SpecialTokens()):
        self.specials = specials
        self.text = open_backend(text_tokenizer, frozenset(specials.as_list()))
        path = self.text.path
        self.base_vocab_size = self.text.vocab_size  # ids the text tokenizer's own files define
        vocab = resolve_vocabulary(self.base_vocab_size, self.text.added, specials, num_units, path)
        self.units_in_vocabulary = vocab.units_in_vocabulary
        self._check_lookups_agree(vocab, path)
        self.vocab_size = vocab.vocab_size
        self.layout = UnitLayout(vocab.unit_ids, self.vocab_size)
        self.num_units = self.layout.num_units
        special_ids = list(vocab.special_ids)
        self.sosp_id, self.eosp_id, self.question_id, self.answer_id = special_ids
        if vocab.units_in_vocabulary and vocab.appended_specials:
            logger.warning("%s holds speech units but not %s: appended at ids %d..%d", path,
                           list(vocab.appended_specials), self.base_vocab_size, self.vocab_size - 1)
        self.eod_id, self.bos_id = self.text.eod_id, self.text.bos_id
        ours = set(special_ids)
        self._control_ids = frozenset(i for i in self.text.special_added
                                      if i not in ours and not self.layout.is_unit(i))
        # Strings encoded to one id without BPE (besides "<k>" units), and their ids.
        self._marker_ids = {**self.text.markers, **dict(zip(specials.as_list(), special_ids))}
        self._marker_strs = {v: k for k, v in self._marker_ids.items()}
        # Longest alternative first so e.g. "<sosp>" never loses to a shorter marker at the same position.
        alts = [re.escape(s) for s in sorted(self._marker_ids, key=len, reverse=True)]
        self._marker_re = re.compile("|".join(alts + [UNIT_TOKEN.pattern]))
        self._identity: dict | None = None
        if isinstance(self.text, HFTextBackend):
            self._check_backend_agrees(path)

    def _check_lookups_agree(self, vocab: Vocabulary, path: Path) -> None:
        """The backend's own lookup finds each unit and special at the id its added-token list gives (a
        duplicated entry that the library silently collapsed would not)."""
        held = [(unit_token(k), int(i)) for k, i in enumerate(vocab.unit_ids)] if vocab.units_in_vocabulary else []
        held += [(s, i) for s, i in zip(self.specials.as_list(), vocab.special_ids)
                 if s not in vocab.appended_specials]
        for content, token_id in held:
            if self.text.token_id(content) != token_id:
                raise incompatible(path, f"token {content!r} is duplicated (ids {token_id} and "
                                         f"{self.text.token_id(content)}): which one the model learned is ambiguous")

    def _check_backend_agrees(self, path: Path) -> None:
        """Tokens the text tokenizer itself holds must encode as it encodes them (an added token with lstrip,
        rstrip or normalisation would not): one probe string through both, compared id for id."""
        held = [t for t in (self.specials.as_list() + [unit_token(0), unit_token(self.num_units - 1)])
                if self.text.tok.token_to_id(t) is not None and self.text.tok.token_to_id(t) < self.base_vocab_size]
        if not held:
            return
        probe = "a " + " b ".join(held) + " c"
        theirs = self.text.tok.encode(probe, add_special_tokens=False).ids
        ours = self.encode_text(probe)
        if theirs != ours:
            raise incompatible(path, f"{probe!r} encodes to {theirs} through the tokenizer but to {ours} as "
                                      "separate tokens: its speech tokens strip or normalise surrounding text")

    # ------------------------------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "SpeechTextTokenizer":
        """A tokenizer directory that speaks units: one written by `save_pretrained`, or any HF tokenizer whose
        vocabulary holds the unit tokens (a released speech LM). `cslm_tokenizer.json`, when present, is
        checked against what the vocabulary says."""
        path = Path(path)
        meta_path = path / META_FILE
        if not meta_path.exists():
            tok = cls(path)
            if not tok.units_in_vocabulary:
                raise incompatible(path, f"holds no speech unit tokens ({unit_token(0)}...) and no {META_FILE}: "
                                          "a plain text tokenizer; extend it with SpeechTextTokenizer(path) or "
                                          "SpeechTextTokenizer.load(path, num_units)")
            return tok
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        tok = cls(path / meta.get("text_tokenizer", "tokenizer.json"), meta["num_units"],
                  SpecialTokens(**meta["specials"]))
        tok._check_cache(meta, meta_path)
        return tok

    @classmethod
    def load(cls, path: str | Path, num_units: int | None = None) -> "SpeechTextTokenizer":
        """A tokenizer that speaks units (num_units, if given, must match it), or a plain text tokenizer
        extended with `num_units` (default 4,096) units."""
        if (Path(path) / META_FILE).exists():
            tok = cls.from_pretrained(path)
            if num_units is not None and tok.num_units != num_units:
                raise incompatible(path, f"holds {tok.num_units} units, but num_units is {num_units}", "num_units")
            return tok
        return cls(path, num_units)

    def _cache(self) -> dict:
        units = ({"offset": self.layout.offset} if self.layout.offset is not None
                 else {"ids": self.layout.ids.tolist()})
        return {"format": META_FORMAT, "num_units": self.num_units, "specials": asdict(self.specials),
                "vocab_size": self.vocab_size, "unit_ids": units,
                "special_ids": dict(zip(self.specials.as_list(), self.special_ids))}

    def _check_cache(self, meta: dict, where: Path) -> None:
        """Stop if the cache disagrees with what the vocabulary says, naming both values."""
        if meta.get("format", 1) == 1:  # units at base_vocab_size + k, then the four specials
            offset = meta["base_vocab_size"]
            meta = {"vocab_size": offset + meta["num_units"] + 4, "unit_ids": {"offset": offset},
                    "special_ids": dict(zip(self.specials.as_list(), range(offset + meta["num_units"],
                                                                           offset + meta["num_units"] + 4)))}
        read = self._cache()
        if meta["vocab_size"] != read["vocab_size"]:
            raise incompatible(where, f"says {meta['vocab_size']} ids, the vocabulary has {read['vocab_size']}",
                                "vocab_size")
        cached = meta["unit_ids"]
        cached_ids = (np.arange(cached["offset"], cached["offset"] + self.num_units) if "offset" in cached
                      else np.asarray(cached["ids"], dtype=np.int64))
        if cached_ids.shape != self.layout.ids.shape or not np.array_equal(cached_ids, self.layout.ids):
            k = next((k for k in range(min(cached_ids.size, self.num_units)) if cached_ids[k] != self.layout.ids[k]),
                     min(cached_ids.size, self.num_units))
            said = int(cached_ids[k]) if k < cached_ids.size else "no id"
            has = int(self.layout.ids[k]) if k < self.num_units else "no id"
            raise incompatible(where, f"says unit {unit_token(k)} is id {said}, the vocabulary has {has}",
                                "unit_ids")
        for name, token_id in meta["special_ids"].items():
            if read["special_ids"].get(name) != token_id:
                raise incompatible(where, f"says {name} is id {token_id}, the vocabulary has "
                                           f"{read['special_ids'].get(name)}", "special_ids")

    # ------------------------------------------------------------------------------------------ ids

    @property
    def special_ids(self) -> tuple[int, int, int, int]:
        """Ids of <sosp>, <eosp>, [question], [answer]."""
        return self.sosp_id, self.eosp_id, self.question_id, self.answer_id

    @property
    def unit_offset(self) -> int:
        """Id of unit 0 when the unit ids are contiguous; arithmetic on it is wrong for any other layout, so
        it raises there (use `unit_id`, `unit_of`, `layout`)."""
        if self.layout.offset is None:
            raise ValueError(f"unit ids are not contiguous ({self.layout.describe()}): map units through "
                             "tokenizer.layout, not an offset")
        return self.layout.offset

    @property
    def control_ids(self) -> frozenset[int]:
        """Control tokens of the text vocabulary (chat headers, <|eot_id|>, reserved specials, <s>): never text."""
        return self._control_ids

    def padded_vocab_size(self, multiple: int) -> int:
        """Vocab size rounded up to `multiple` (Megatron pads embeddings for tensor-parallel splits)."""
        return -(-self.vocab_size // multiple) * multiple

    def unit_id(self, unit: int) -> int:
        """Token id of unit `unit` (in [0, num_units))."""
        if not 0 <= unit < self.num_units:
            raise ValueError(f"unit {unit} out of range [0, {self.num_units})")
        return self.layout.id_of(unit)

    def unit_of(self, token_id: int) -> int:
        """Unit of a token id, -1 when it is not a unit."""
        return self.layout.unit_of(token_id)

    def is_unit(self, token_id: int) -> bool:
        return self.layout.unit_of(token_id) >= 0

    def count_speech_tokens(self, ids: np.ndarray) -> tuple[int, int]:
        """(unit tokens, special tokens of ours) among `ids`, vectorised, whatever the layout."""
        units = int(np.count_nonzero(self.layout.mask(ids)))
        specials = sum(int(np.count_nonzero(ids == s)) for s in self.special_ids)
        return units, specials

    def token_string(self, token_id: int) -> str:
        """The vocabulary entry of an id: the text tokenizer's piece, or the appended unit/special string."""
        self._check_id(token_id)
        if token_id < self.base_vocab_size:
            return self.text.piece(token_id)
        unit = self.layout.unit_of(token_id)
        return unit_token(unit) if unit >= 0 else self._marker_strs[token_id]

    def identity(self) -> dict:
        """Vocabulary size, unit layout, EOD and a fingerprint of every vocabulary entry in id order: equal for
        the same vocabulary however its files are written, different for any change of ids."""
        if self._identity is None:
            h = hashlib.sha256()
            for i in range(self.vocab_size):
                h.update(self.token_string(i).encode("utf-8", "surrogatepass") + b"\0")
            h.update(json.dumps({"eod_id": self.eod_id, "specials": self.specials.as_list()}).encode())
            self._identity = {"vocab_size": self.vocab_size, "num_units": self.num_units,
                              "unit_offset": self.layout.offset, "eod_id": self.eod_id,
                              "fingerprint": "sha256:" + h.hexdigest()}
        return self._identity

    # ------------------------------------------------------------------------------------------ encoding

    def encode_text(self, text: str) -> list[int]:
        """Tokenize text (no BOS); "<k>" unit strings and special strings map to their ids."""
        return self._encode_texts([text])[0]

    def _encode_texts(self, texts: list[str]) -> list[list[int]]:
        """Split each text at unit/special markers, BPE all plain pieces in one batch call, reassemble."""
        plans: list[list[int | None]] = []  # token ids, with None where the next BPE'd piece goes
        pieces: list[str] = []
        unit_ids = self.layout.id_of
        for text in texts:
            plan, pos = [], 0
            for m in self._marker_re.finditer(text):
                unit = m.group(1)
                if unit is not None and int(unit) >= self.num_units:
                    continue  # not one of our tokens: stays text, as it would with HF added tokens
                if m.start() > pos:
                    pieces.append(text[pos:m.start()])
                    plan.append(None)
                plan.append(unit_ids(int(unit)) if unit is not None else self._marker_ids[m.group()])
                pos = m.end()
            if pos < len(text):
                pieces.append(text[pos:])
                plan.append(None)
            plans.append(plan)
        encoded = iter(self.text.encode_batch(pieces) if pieces else [])
        out = []
        for plan in plans:
            ids: list[int] = []
            for p in plan:
                if p is None:
                    ids += next(encoded)
                else:
                    ids.append(p)
            out.append(ids)
        return out

    def encode_units(self, units: Sequence[int], wrap: bool = True) -> list[int]:
        """Unit ids (through the layout); raises ValueError for non-integers or units outside [0, num_units)."""
        return self._unit_ids(units, wrap).tolist()

    def _unit_ids(self, units: Sequence[int], wrap: bool, allow_empty: bool = True) -> np.ndarray:
        arr = check_units(units, self.num_units, allow_empty=allow_empty)
        ids = np.empty(arr.size + 2 * wrap, dtype=np.int64)
        self.layout.ids_of(arr, out=ids[wrap:ids.size - wrap])
        if wrap:
            ids[0], ids[-1] = self.sosp_id, self.eosp_id
        return ids

    def encode_each_segment(self, segments: Iterable[dict],
                            as_arrays: bool = False) -> list[list[int] | np.ndarray]:
        """Ids of each segment ({"text": str} or {"units": [int, ...]}, units wrapped in sosp/eosp).

        Text segments are tokenized in one batch call. `as_arrays` returns int64 arrays instead of lists, which
        saves bulk pipelines two conversions per unit. Raises CslmError naming the bad segment's field.
        """
        segments = list(segments)
        out: list[list[int] | None] = [None] * len(segments)
        texts, where = [], []
        for i, seg in enumerate(segments):
            if not isinstance(seg, dict):
                raise CslmError.in_field(f"segments[{i}]", f"expected an object, got {type(seg).__name__}",
                                         "wrong_type")
            if "units" in seg:
                try:
                    out[i] = self._unit_ids(seg["units"], wrap=True, allow_empty=False)
                except UnitListError as e:
                    kind = e.reason if e.reason in ("wrong_type", "empty") else "bad_units"
                    raise CslmError.in_field(f"segments[{i}].units", e.message, kind) from None
            elif "text" in seg:
                text = seg["text"]
                if not isinstance(text, str):
                    raise CslmError.in_field(f"segments[{i}].text", "expected a string", "wrong_type")
                if not text:
                    raise CslmError.in_field(f"segments[{i}].text", "expected a non-empty string", "empty")
                texts.append(text)
                where.append(i)
            else:
                raise CslmError.in_field(f"segments[{i}]", "needs a 'text' or a 'units' field", "missing_field")
        for i, ids in zip(where, self._encode_texts(texts) if texts else []):
            out[i] = np.array(ids, dtype=np.int64) if as_arrays else ids
        if not as_arrays:
            out = [ids.tolist() if isinstance(ids, np.ndarray) else ids for ids in out]
        return out

    def encode_segments(self, segments: Iterable[dict]) -> list[int]:
        """Concatenated ids of `segments` (see `encode_each_segment`)."""
        return [i for ids in self.encode_each_segment(segments) for i in ids]

    # ------------------------------------------------------------------------------------------ decoding

    def _check_id(self, token_id: int) -> None:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} out of range [0, {self.vocab_size})")

    def decode(self, ids: Sequence[int]) -> str:
        """Text with units rendered as "<k>" and specials as their strings (inverse of `encode_text`)."""
        out, run = [], []
        for i in map(int, ids):
            self._check_id(i)
            unit = self.layout.unit_of(i)
            if unit < 0 and i not in self._marker_strs:
                run.append(i)
                continue
            if run:
                out.append(self.text.decode(run))
                run = []
            out.append(unit_token(unit) if unit >= 0 else self._marker_strs[i])
        if run:
            out.append(self.text.decode(run))
        return "".join(out)

    def split(self, ids: Sequence[int]) -> list[Segment]:
        """Text and unit segments; a run of units loses the <sosp>/<eosp> that directly enclose it."""
        ids = [int(i) for i in ids]
        unit_of = self.layout.unit_of
        segments: list[Segment] = []
        text_run: list[int] = []
        i, n = 0, len(ids)
        while i < n:
            start = i + 1 if ids[i] == self.sosp_id else i
            j = start
            units = []
            while j < n and (u := unit_of(ids[j])) >= 0:
                units.append(u)
                j += 1
            if j > start:  # a unit run starting at `start`, possibly wrapped
                if text_run:
                    segments.append(Segment("text", text=self.decode(text_run)))
                    text_run = []
                segments.append(Segment("units", units=units))
                i = j + 1 if j < n and ids[j] == self.eosp_id else j
            else:
                self._check_id(ids[i])
                text_run.append(ids[i])
                i += 1
        if text_run:
            segments.append(Segment("text", text=self.decode(text_run)))
        return segments

    # ------------------------------------------------------------------------------------------ saving

    def save_pretrained(self, path: str | Path) -> None:
        """Write HF tokenizer files (AutoTokenizer loads them unchanged) plus the cslm_tokenizer.json cache."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = self._cache()
        if isinstance(self.text, SentencePieceBackend):
            # transformers converts SentencePiece models to tokenizer.json only per model family, so a saved
            # SentencePiece tokenizer is for from_pretrained, not AutoTokenizer.
            with atomic_path(path / "tokenizer.model") as tmp:
                shutil.copyfile(self.text.path, tmp)
            meta["text_tokenizer"] = "tokenizer.model"
        else:
            self._save_hf(path)
            meta["text_tokenizer"] = "tokenizer.json"
        write_json(path / META_FILE, meta)

    def _save_hf(self, path: Path) -> None:
        from tokenizers import AddedToken, Tokenizer

        tok = Tokenizer.from_str(self.text.tok.to_str())
        appended = [self.token_string(i) for i in range(self.base_vocab_size, self.vocab_size)]
        units = [t for t in appended if UNIT_TOKEN.fullmatch(t)]
        tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in units])
        tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in appended[len(units):]])
        got = [tok.token_to_id(t) for t in appended]
        expected = list(range(self.base_vocab_size, self.vocab_size))
        if got != expected:
            bad = next(k for k, (g, e) in enumerate(zip(got, expected)) if g != e)
            raise RuntimeError(f"added token {appended[bad]!r} got id {got[bad]}, expected {expected[bad]}: the "
                               "base vocabulary is not contiguous")
        with atomic_path(path / "tokenizer.json") as tmp:
            tok.save(str(tmp))
        src = self.text.config
        # A tokenizer that already spoke units keeps its own chat template (the format its model was trained
        # with); an extended text tokenizer gets the Llama-3.1 template our SFT layout uses.
        template = self.text.chat_template if self.units_in_vocabulary and self.text.chat_template \
            else self.chat_template
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": src.get("bos_token", None if self.bos_id is None else tok.id_to_token(self.bos_id)),
            "eos_token": src.get("eos_token", tok.id_to_token(self.eod_id)),
            "clean_up_tokenization_spaces": False,  # HF's cleanup would rewrite text ("a ." -> "a.")
            "model_max_length": src.get("model_max_length", 131072),
            "chat_template": template,
        }
        if "pad_token" in src:
            config["pad_token"] = src["pad_token"]
        write_json(path / "tokenizer_config.json", config)
