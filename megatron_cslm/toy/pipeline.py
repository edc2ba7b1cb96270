"""The toy corpus through the pipeline's library calls: corpus -> tokenizer -> pretraining documents -> .bin/.idx.

What the quickstart does with the tools, as one function for the tests and the benchmarks that need a real
(small) pretraining blend. The toy speech uses units [0, TOY_UNITS): a small unit block keeps the CPU softmax cheap.
"""
from __future__ import annotations

from pathlib import Path

TOY_UNITS = 512
TOY_SOURCES = ("asr", "tts", "interleave", "replay")


def build_toy_pretrain(out: Path, bin_dir: str = "bin", sources: tuple[str, ...] = TOY_SOURCES) -> dict:
    """Write the toy blend under `out`; returns root, corpus, tokenizer dir, {source: prefix} and vocab size."""
    from megatron_cslm.data.documents.build import RecipeConfig, build_pretrain_data
    from megatron_cslm.data.indexed import preprocess
    from megatron_cslm.text.tokenizer import SpeechTextTokenizer
    from megatron_cslm.toy.corpus import make_toy_corpus
    from megatron_cslm.toy.tokenizer import toy_texts, train_toy_text_tokenizer

    out = Path(out)
    corpus = out / "corpus"
    make_toy_corpus(corpus, num_units=TOY_UNITS, seed=0, speakers=4)
    train_toy_text_tokenizer(toy_texts(corpus), out / "text_tokenizer", vocab_size=1024)
    tokenizer = SpeechTextTokenizer(out / "text_tokenizer", num_units=TOY_UNITS)
    tokenizer.save_pretrained(out / "tokenizer")
    build_pretrain_data(out / "docs", speech=[corpus / "manifest.jsonl"], parallel=[corpus / "parallel.jsonl"],
                        instruct=[corpus / "instruct.jsonl"],
                        config=RecipeConfig(recipes=sources, num_units=TOY_UNITS, mask_prompt=True))
    prefixes = {}
    for name in sources:
        prefixes[name] = str(out / bin_dir / name)
        preprocess([out / "docs" / f"{name}.jsonl"], prefixes[name], tokenizer, workers=1, progress=False)
    return {"root": out, "corpus": corpus, "tokenizer": out / "tokenizer", "prefixes": prefixes,
            "vocab_size": tokenizer.vocab_size}
