"""Speech-text tokenizer: a text tokenizer plus a contiguous block of speech-unit ids and four specials.

Vocabulary layout: ``base text vocab | unit 0 .. unit N-1 | <sosp> <eosp> [question] [answer]``.
Units never go through BPE: unit k is id ``unit_offset + k`` (arithmetic), which is what makes
unit-heavy corpora cheap to tokenize. The CSLM authors' released data writes units as text
(``<sosp><12><345><eosp>``); `encode_text` recognises that form, and the specials, and gives the same ids,
matching what Hugging Face added tokens do, so a saved tokenizer loaded by `transformers.AutoTokenizer`
produces identical ids.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Sequence

import numpy as np

from megatron_cslm.fileio import atomic_path, write_json

# Llama-3.1 chat format; content is trimmed like Meta's template so HF apply_chat_template matches it.
LLAMA31_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
META_FILE = "cslm_tokenizer.json"


@dataclass(frozen=True)
class SpecialTokens:
    """Strings of the four speech/dialogue specials (configurable to match other releases)."""

    sosp: str = "<sosp>"
    eosp: str = "<eosp>"
    question: str = "[question]"
    answer: str = "[answer]"

    def as_list(self) -> list[str]:
        return [self.sosp, self.eosp, self.question, self.answer]


@dataclass
class Segment:
    """A run of text or of speech units, as produced by `SpeechTextTokenizer.split`."""

    kind: Literal["text", "units"]
    text: str = ""
    units: list[int] = field(default_factory=list)


class SegmentError(ValueError):
    """A malformed segment. `field` names it (e.g. ``segments[2].units``) so callers can locate the error;
    `kind` ("wrong_type", "missing_field", "empty", "bad_units") lets tools count skipped records by reason."""

    def __init__(self, field: str, kind: str, message: str):
        self.field, self.kind, self.reason = field, kind, message
        super().__init__(f"{field}: {message}")

    def __reduce__(self):  # picklable across worker pools (the default would call __init__ with the message only)
        return SegmentError, (self.field, self.kind, self.reason)


class _HFText:
    """Hugging Face `tokenizers` backend (tokenizer.json); base specials such as <|eot_id|> are its added tokens."""

    markers: dict[str, int] = {}  # the tokenizer parses its own specials

    def __init__(self, path: Path, ours: set[str]):
        from tokenizers import Tokenizer

        self.path = path
        self.tok = Tokenizer.from_file(str(path))
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        saved = [i for i, t in self.tok.get_added_tokens_decoder().items() if t.content in ours]
        if saved:
            # A saved SpeechTextTokenizer: units and specials sit on top of the base vocabulary. They can stay in
            # this backend, since encode_text extracts them before any text reaches it.
            if sorted(saved) != list(range(min(saved), self.vocab_size)):
                raise ValueError(f"{path}: unit/special tokens are not the contiguous top of the vocabulary")
            self.vocab_size = min(saved)
        config = path.parent / "tokenizer_config.json"
        self.config = json.loads(config.read_text(encoding="utf-8")) if config.exists() else {}
        self.eod_id = self._first_id("<|end_of_text|>", self._config_token("eos_token"), "</s>")
        if self.eod_id is None:
            raise ValueError(f"{path}: cannot find an end-of-document token (<|end_of_text|>, eos_token or </s>)")
        self.bos_id = self._first_id("<|begin_of_text|>", self._config_token("bos_token"), "<s>")
        self.control_ids = frozenset(i for i, t in self.tok.get_added_tokens_decoder().items()
                                     if t.special and i < self.vocab_size)

    def _config_token(self, key: str) -> str | None:
        value = self.config.get(key)
        return value.get("content") if isinstance(value, dict) else value

    def _first_id(self, *tokens: str | None) -> int | None:
        ids = [self.tok.token_to_id(t) for t in tokens if t is not None]
        return next((i for i in ids if i is not None), None)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if len(texts) == 1:
            return [self.tok.encode(texts[0], add_special_tokens=False).ids]
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)


class _SPText:
    """SentencePiece backend. It drops control pieces (<s>, </s>) when decoding and never produces them from
    text, so they are `markers`: rendered and parsed by SpeechTextTokenizer like its own specials."""

    def __init__(self, path: Path):
        import sentencepiece as spm

        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self.sp.get_piece_size()
        self.markers = {self.sp.id_to_piece(i): i for i in range(self.vocab_size) if self.sp.is_control(i)}
        self.control_ids = frozenset(self.markers.values())
        if self.sp.eos_id() < 0:
            raise ValueError(f"{path}: SentencePiece model has no eos piece to use as end-of-document")
        self.eod_id = self.sp.eos_id()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts, out_type=int)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


class SpeechTextTokenizer:
    """Text tokenizer (HF tokenizer.json or SentencePiece) extended with speech units and specials.

    Args:
        text_tokenizer: HF tokenizer directory or tokenizer.json file, or a SentencePiece .model file.
        num_units: number of discrete speech units (4,096 for the CosyVoice S3 tokenizer).
        specials: strings of <sosp>, <eosp>, [question], [answer].
    """

    chat_template: str = LLAMA31_CHAT_TEMPLATE

    def __init__(self, text_tokenizer: str | Path, num_units: int = 4096, specials: SpecialTokens = SpecialTokens()):
        if num_units <= 0:
            raise ValueError(f"num_units must be positive, got {num_units}")
        self.num_units = num_units
        self.specials = specials
        path = Path(text_tokenizer)
        if path.is_dir():
            if (path / "tokenizer.json").exists():
                path = path / "tokenizer.json"
            elif (path / "tokenizer.model").exists():
                path = path / "tokenizer.model"
            else:
                raise FileNotFoundError(f"{path}: no tokenizer.json or tokenizer.model in this directory")
        elif not path.exists():
            raise FileNotFoundError(f"{path}: tokenizer file not found")
        ours = set(specials.as_list()) | {f"<{k}>" for k in range(num_units)}
        self.text = _HFText(path, ours) if path.suffix == ".json" else _SPText(path)

        self.base_vocab_size = self.text.vocab_size
        self.unit_offset = self.base_vocab_size
        self.sosp_id, self.eosp_id, self.question_id, self.answer_id = range(
            self.unit_offset + num_units, self.unit_offset + num_units + 4)
        self.vocab_size = self.unit_offset + num_units + 4
        self.eod_id, self.bos_id = self.text.eod_id, self.text.bos_id
        # Strings encoded to one id without BPE (besides "<k>" units), and their ids.
        ours_ids = dict(zip(specials.as_list(), range(self.sosp_id, self.vocab_size)))
        self._marker_ids = {**self.text.markers, **ours_ids}
        self._marker_strs = {v: k for k, v in self._marker_ids.items()}
        # Longest alternative first so e.g. "<sosp>" never loses to a shorter marker at the same position.
        alts = [re.escape(s) for s in sorted(self._marker_ids, key=len, reverse=True)]
        self._marker_re = re.compile("|".join(alts + [r"<(0|[1-9][0-9]{0,8})>"]))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "SpeechTextTokenizer":
        """Restore a tokenizer written by `save_pretrained`."""
        path = Path(path)
        meta_path = path / META_FILE
        if not meta_path.exists():
            raise FileNotFoundError(f"{meta_path} not found: {path} was not written by SpeechTextTokenizer."
                                    "save_pretrained (use SpeechTextTokenizer(path) for a plain text tokenizer)")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        tok = cls(path / meta["text_tokenizer"], meta["num_units"], SpecialTokens(**meta["specials"]))
        if tok.base_vocab_size != meta["base_vocab_size"]:
            raise ValueError(f"{path}: base vocab has {tok.base_vocab_size} ids, {META_FILE} says "
                             f"{meta['base_vocab_size']}")
        return tok

    @classmethod
    def load(cls, path: str | Path, num_units: int | None = None) -> "SpeechTextTokenizer":
        """A saved SpeechTextTokenizer directory (num_units, if given, must match it), or a plain text tokenizer
        extended with `num_units` (default 4,096) units."""
        if (Path(path) / META_FILE).exists():
            tok = cls.from_pretrained(path)
            if num_units is not None and tok.num_units != num_units:
                raise ValueError(f"{path} was saved with {tok.num_units} units, but num_units={num_units}")
            return tok
        return cls(path, 4096 if num_units is None else num_units)

    @property
    def control_ids(self) -> frozenset[int]:
        """Control tokens of the text vocabulary (chat headers, <|eot_id|>, reserved specials, <s>): never text."""
        return self.text.control_ids

    def padded_vocab_size(self, multiple: int) -> int:
        """Vocab size rounded up to `multiple` (Megatron pads embeddings for tensor-parallel splits)."""
        return -(-self.vocab_size // multiple) * multiple

    def is_unit(self, token_id: int) -> bool:
        return self.unit_offset <= token_id < self.unit_offset + self.num_units

    def encode_text(self, text: str) -> list[int]:
        """Tokenize text (no BOS); "<k>" unit strings and special strings map to their ids."""
        return self._encode_texts([text])[0]

    def _encode_texts(self, texts: list[str]) -> list[list[int]]:
        """Split each text at unit/special markers, BPE all plain pieces in one batch call, reassemble."""
        plans: list[list[int | None]] = []  # token ids, with None where the next BPE'd piece goes
        pieces: list[str] = []
        for text in texts:
            plan, pos = [], 0
            for m in self._marker_re.finditer(text):
                unit = m.group(1)
                if unit is not None and int(unit) >= self.num_units:
                    continue  # not one of our tokens: stays text, as it would with HF added tokens
                if m.start() > pos:
                    pieces.append(text[pos:m.start()])
                    plan.append(None)
                plan.append(self.unit_offset + int(unit) if unit is not None else self._marker_ids[m.group()])
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
        """Unit ids by arithmetic; raises ValueError for non-integers or units outside [0, num_units)."""
        return self._unit_ids(units, wrap).tolist()

    def _unit_ids(self, units: Sequence[int], wrap: bool) -> np.ndarray:
        arr = np.asarray(units)
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise ValueError(f"units must be a flat list of integers, got dtype {arr.dtype}")
        if arr.size and (arr.min() < 0 or arr.max() >= self.num_units):
            bad = int(arr[(arr < 0) | (arr >= self.num_units)][0])
            raise ValueError(f"unit {bad} out of range [0, {self.num_units})")
        ids = np.empty(arr.size + 2 * wrap, dtype=np.int64)
        np.add(arr, self.unit_offset, out=ids[wrap:ids.size - wrap])
        if wrap:
            ids[0], ids[-1] = self.sosp_id, self.eosp_id
        return ids

    def encode_each_segment(self, segments: Iterable[dict],
                            as_arrays: bool = False) -> list[list[int] | np.ndarray]:
        """Ids of each segment ({"text": str} or {"units": [int, ...]}, units wrapped in sosp/eosp).

        Text segments are tokenized in one batch call. `as_arrays` returns int64 arrays instead of lists, which
        saves bulk pipelines two conversions per unit. Raises SegmentError naming the bad segment.
        """
        segments = list(segments)
        out: list[list[int] | None] = [None] * len(segments)
        texts, where = [], []
        for i, seg in enumerate(segments):
            if not isinstance(seg, dict):
                raise SegmentError(f"segments[{i}]", "wrong_type", f"expected an object, got {type(seg).__name__}")
            if "units" in seg:
                units = seg["units"]
                if not isinstance(units, (list, np.ndarray)):
                    raise SegmentError(f"segments[{i}].units", "wrong_type", "expected a list of unit ids")
                if not len(units):
                    raise SegmentError(f"segments[{i}].units", "empty", "expected a non-empty list of unit ids")
                try:
                    out[i] = self._unit_ids(units, wrap=True)
                except ValueError as e:
                    raise SegmentError(f"segments[{i}].units", "bad_units", str(e)) from None
            elif "text" in seg:
                text = seg["text"]
                if not isinstance(text, str):
                    raise SegmentError(f"segments[{i}].text", "wrong_type", "expected a string")
                if not text:
                    raise SegmentError(f"segments[{i}].text", "empty", "expected a non-empty string")
                texts.append(text)
                where.append(i)
            else:
                raise SegmentError(f"segments[{i}]", "missing_field", "needs a 'text' or a 'units' field")
        for i, ids in zip(where, self._encode_texts(texts) if texts else []):
            out[i] = np.array(ids, dtype=np.int64) if as_arrays else ids
        if not as_arrays:
            out = [ids.tolist() if isinstance(ids, np.ndarray) else ids for ids in out]
        return out

    def encode_segments(self, segments: Iterable[dict]) -> list[int]:
        """Concatenated ids of `segments` (see `encode_each_segment`)."""
        return [i for ids in self.encode_each_segment(segments) for i in ids]

    def _check_id(self, token_id: int) -> None:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} out of range [0, {self.vocab_size})")

    def decode(self, ids: Sequence[int]) -> str:
        """Text with units rendered as "<k>" and specials as their strings (inverse of `encode_text`)."""
        out, run = [], []
        for i in map(int, ids):
            if 0 <= i < self.base_vocab_size and i not in self._marker_strs:
                run.append(i)
                continue
            self._check_id(i)
            if run:
                out.append(self.text.decode(run))
                run = []
            out.append(f"<{i - self.unit_offset}>" if self.is_unit(i) else self._marker_strs[i])
        if run:
            out.append(self.text.decode(run))
        return "".join(out)

    def split(self, ids: Sequence[int]) -> list[Segment]:
        """Text and unit segments; a run of units loses the <sosp>/<eosp> that directly enclose it."""
        ids = [int(i) for i in ids]
        segments: list[Segment] = []
        text_run: list[int] = []
        i, n = 0, len(ids)
        while i < n:
            start = i + 1 if ids[i] == self.sosp_id else i
            j = start
            while j < n and self.is_unit(ids[j]):
                j += 1
            if j > start:  # a unit run starting at `start`, possibly wrapped
                if text_run:
                    segments.append(Segment("text", text=self.decode(text_run)))
                    text_run = []
                segments.append(Segment("units", units=[t - self.unit_offset for t in ids[start:j]]))
                i = j + 1 if j < n and ids[j] == self.eosp_id else j
            else:
                self._check_id(ids[i])
                text_run.append(ids[i])
                i += 1
        if text_run:
            segments.append(Segment("text", text=self.decode(text_run)))
        return segments

    def save_pretrained(self, path: str | Path) -> None:
        """Write HF tokenizer files (AutoTokenizer loads them unchanged) plus cslm_tokenizer.json for us."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = {"format": 1, "num_units": self.num_units, "specials": asdict(self.specials),
                "base_vocab_size": self.base_vocab_size}
        if isinstance(self.text, _SPText):
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
        tok.add_tokens([AddedToken(f"<{k}>", normalized=False, special=False) for k in range(self.num_units)])
        tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in self.specials.as_list()])
        got = [tok.token_to_id(s) for s in ("<0>", self.specials.answer)]
        if got != [self.unit_offset, self.vocab_size - 1]:
            raise RuntimeError(f"added tokens got ids {got}, expected {[self.unit_offset, self.vocab_size - 1]}: "
                               "the base vocabulary is not contiguous")
        with atomic_path(path / "tokenizer.json") as tmp:
            tok.save(str(tmp))
        src = self.text.config
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": src.get("bos_token", None if self.bos_id is None else tok.id_to_token(self.bos_id)),
            "eos_token": src.get("eos_token", tok.id_to_token(self.eod_id)),
            "clean_up_tokenization_spaces": False,  # HF's cleanup would rewrite text ("a ." -> "a.")
            "model_max_length": src.get("model_max_length", 131072),
            "chat_template": self.chat_template,
        }
        if "pad_token" in src:
            config["pad_token"] = src["pad_token"]
        write_json(path / "tokenizer_config.json", config)
