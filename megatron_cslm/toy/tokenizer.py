"""A small byte-level BPE text tokenizer in Llama-3's format, trained on the toy corpus.

Why: a tiny CPU model cannot afford Llama-3's 128,256-row softmax, but the pipeline should exercise the
same code as the real run. This tokenizer is a real Hugging Face `tokenizer.json` (byte-level BPE, Llama-3's
special tokens and chat markers), so SpeechTextTokenizer, preprocessing, SFT templates, export and
`AutoTokenizer` take exactly the path they take with Meta's tokenizer. Deterministic for a given text.

With ``characters=True`` every character is its own pre-token, so BPE only merges the bytes of one character:
the vocabulary is the corpus's characters (a CJK character is one id, not three bytes). The quickstart uses it
because a 64-wide model learns to *read* synthetic speech (which spells graphemes) into characters from a few
hundred steps, while word-level merges make every unseen word a new mapping to memorise.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from megatron_cslm.fileio import atomic_open, write_json

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eot_id|>", "<|finetune_right_pad_id|>"]


def train_toy_text_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 1024,
                             characters: bool = False) -> Path:
    """Train byte-level BPE on `texts` (merges within single characters only with `characters`: `vocab_size` is
    then a cap); write tokenizer.json + tokenizer_config.json into `out_dir`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=not characters)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Split(Regex("."), behavior="isolated"), byte_level])
                         if characters else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=LLAMA3_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer=trainer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_open(out / "tokenizer.json") as f:
        f.write(tok.to_str())
    write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>", "pad_token": "<|finetune_right_pad_id|>", "model_max_length": 131072,
        "clean_up_tokenization_spaces": False})
    return out


def toy_texts(corpus_dir: str | Path) -> list[str]:
    """All text of a toy corpus directory (sentences, Q/A), the tokenizer's training material."""
    corpus_dir = Path(corpus_dir)
    texts = []
    for name, keys in (("parallel.jsonl", ("en", "zh")), ("instruct.jsonl", ("prompt", "response"))):
        for line in (corpus_dir / name).read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            texts += [record[k] for k in keys if isinstance(record.get(k), str)]
    return texts
