"""Text-tokenizer backends behind `SpeechTextTokenizer`: Hugging Face `tokenizers` (tokenizer.json) and
SentencePiece (.model), one class each with the same small surface.

Why a module of their own: the speech-text tokenizer (text/tokenizer.py) only needs ids, pieces, the added
tokens in id order and the end-of-document id; which library provides them is this module's concern, and a new
backend is one class here plus one line in `open_backend`. Invariants: `added` lists the vocabulary file's own
(id, content) entries (duplicates included, so they can be refused); `encode_batch` never matches the
speech units and specials (they are cut out of the text before BPE); `markers` are pieces the backend drops or
never produces from text, which SpeechTextTokenizer renders and parses itself.
"""
from __future__ import annotations

import json
from pathlib import Path

from megatron_cslm.fileio import DataError
from megatron_cslm.text.chat import END_OF_TEXT
from megatron_cslm.text.units import UNIT_LIKE

CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers >= 4.43 saves a tokenizer's chat template


def incompatible(path: str | Path, message: str, field: str | None = None) -> DataError:
    """The error of a vocabulary that cannot be read as a speech-text vocabulary (exit code of kind compat)."""
    return DataError(path, None, field, message, kind="compat", reason="incompatible")


class HFTextBackend:
    """Hugging Face `tokenizers` backend (tokenizer.json); base specials such as <|eot_id|> are its added tokens."""

    markers: dict[str, int] = {}  # the tokenizer parses its own specials

    def __init__(self, path: Path, ours: frozenset[str]):
        from tokenizers import Tokenizer

        self.path = path
        self.tok = Tokenizer.from_file(str(path))
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        decoder = self.tok.get_added_tokens_decoder()
        # From the file, not the loaded tokenizer: `tokenizers` silently keeps one of two entries with the same
        # content, and which id the model learned for it is then unknowable (see text/vocabulary.py:find_speech_tokens).
        spec = json.loads(path.read_text(encoding="utf-8"))
        raw = spec.get("added_tokens") or []
        self.added = sorted((int(t["id"]), t["content"]) for t in raw)
        # Units and specials are cut out of the text before BPE, so text is encoded by a copy without them:
        # matching thousands of added tokens in every text piece would cost more than the BPE itself.
        text_only = [t for t in raw if t["content"] not in ours and not UNIT_LIKE.fullmatch(t["content"])]
        self.encoder = self.tok if len(text_only) == len(raw) else \
            Tokenizer.from_str(json.dumps({**spec, "added_tokens": text_only}))
        self.special_added = frozenset(i for i, t in decoder.items() if t.special)
        config = path.parent / "tokenizer_config.json"
        self.config = json.loads(config.read_text(encoding="utf-8")) if config.exists() else {}
        template = path.parent / CHAT_TEMPLATE_FILE
        self.chat_template = self.config.get("chat_template") or (
            template.read_text(encoding="utf-8") if template.exists() else None)
        self.eod_id = self._first_id(END_OF_TEXT, self._config_token("eos_token"), "</s>")
        if self.eod_id is None:
            raise incompatible(path, "cannot find an end-of-document token (<|end_of_text|>, eos_token or </s>)")
        self.bos_id = self._first_id("<|begin_of_text|>", self._config_token("bos_token"), "<s>")

    def _config_token(self, key: str) -> str | None:
        value = self.config.get(key)
        return value.get("content") if isinstance(value, dict) else value

    def _first_id(self, *tokens: str | None) -> int | None:
        ids = [self.tok.token_to_id(t) for t in tokens if t is not None]
        return next((i for i in ids if i is not None), None)

    def piece(self, token_id: int) -> str:
        return self.tok.id_to_token(token_id) or ""

    def token_id(self, content: str) -> int | None:
        return self.tok.token_to_id(content)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if len(texts) == 1:
            return [self.encoder.encode(texts[0], add_special_tokens=False).ids]
        return [e.ids for e in self.encoder.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)


class SentencePieceBackend:
    """SentencePiece backend. It drops control pieces (<s>, </s>) when decoding and never produces them from
    text, so they are `markers`: rendered and parsed by SpeechTextTokenizer like its own specials. A
    SentencePiece model holds no added tokens, so its units and specials are always appended."""

    added: list[tuple[int, str]] = []
    chat_template = None

    def __init__(self, path: Path):
        import sentencepiece as spm

        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self.sp.get_piece_size()
        self.markers = {self.sp.id_to_piece(i): i for i in range(self.vocab_size) if self.sp.is_control(i)}
        self.special_added = frozenset(self.markers.values())
        if self.sp.eos_id() < 0:
            raise incompatible(path, "SentencePiece model has no eos piece to use as end-of-document")
        self.eod_id = self.sp.eos_id()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None

    def piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id)

    def token_id(self, content: str) -> int | None:
        token_id = self.sp.piece_to_id(content)
        return None if token_id == self.sp.unk_id() and content != self.sp.id_to_piece(token_id) else token_id

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts, out_type=int)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


def resolve_tokenizer_file(text_tokenizer: str | Path) -> Path:
    path = Path(text_tokenizer)
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).exists():
                return path / name
        raise DataError(path, None, None, "no tokenizer.json or tokenizer.model in this directory",
                        kind="compat", reason="unreadable")
    if not path.exists():
        raise DataError(path, None, None, "tokenizer file not found", kind="compat", reason="unreadable")
    return path


def open_backend(text_tokenizer: str | Path, ours: frozenset[str]) -> HFTextBackend | SentencePieceBackend:
    """The backend of a tokenizer directory or file; `ours` are the speech specials to keep out of BPE."""
    path = resolve_tokenizer_file(text_tokenizer)
    return HFTextBackend(path, ours) if path.suffix == ".json" else SentencePieceBackend(path)
