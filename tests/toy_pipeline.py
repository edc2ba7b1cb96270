"""Build the toy corpus, toy tokenizer and pretraining .bin/.idx through the library (what the tools call)."""
from __future__ import annotations

from pathlib import Path

TOY_UNITS = 512  # the toy speech uses units [0, 512); a small unit block keeps the CPU softmax cheap


def build_toy_pretrain(out: Path) -> dict:
    from megatron_cslm.data.indexed import preprocess
    from megatron_cslm.data.documents.build import RecipeConfig, build_pretrain_data
    from megatron_cslm.text.tokenizer import SpeechTextTokenizer
    from megatron_cslm.toy.corpus import make_toy_corpus
    from megatron_cslm.toy.tokenizer import toy_texts, train_toy_text_tokenizer

    corpus = out / "corpus"
    make_toy_corpus(corpus, num_units=TOY_UNITS, seed=0, speakers=4)
    train_toy_text_tokenizer(toy_texts(corpus), out / "text_tokenizer", vocab_size=1024)
    tokenizer = SpeechTextTokenizer(out / "text_tokenizer", num_units=TOY_UNITS)
    tokenizer.save_pretrained(out / "tokenizer")
    build_pretrain_data(out / "docs", speech=[corpus / "manifest.jsonl"], parallel=[corpus / "parallel.jsonl"],
                        instruct=[corpus / "instruct.jsonl"],
                        config=RecipeConfig(recipes=("asr", "tts", "interleave", "replay"), num_units=TOY_UNITS,
                                            mask_prompt=True))
    prefixes = {}
    for name in ("asr", "tts", "interleave", "replay"):
        prefixes[name] = str(out / "bin" / name)
        preprocess([out / "docs" / f"{name}.jsonl"], prefixes[name], tokenizer, workers=1, progress=False)
    return {"root": out, "corpus": corpus, "tokenizer": out / "tokenizer", "prefixes": prefixes,
            "vocab_size": tokenizer.vocab_size}


def build_toy_sft(toy: dict, seq_length: int = 512) -> str:
    """Pack the toy spoken dialogues (interleaved chain of modality) with the toy tokenizer; returns the prefix."""
    from megatron_cslm.data.sft import SFTConfig, build_sft_data
    from megatron_cslm.text.tokenizer import SpeechTextTokenizer

    prefix = str(toy["root"] / "sft" / "interleaved")
    build_sft_data([toy["corpus"] / "dialogue_sft.jsonl"], SpeechTextTokenizer.from_pretrained(toy["tokenizer"]),
                   SFTConfig(layout="interleaved"), prefix, seq_length=seq_length, progress=False)
    return prefix
