"""Issue 25 part 4: the parts the quickstart uses to learn to read, each checked on its own (no training here).

- `--dedup-units` for pretraining documents: runs collapse and word timestamps move with them, so interleaved
  chunks still pair each text chunk with exactly its speech;
- `--mask-inputs`: one-way recipes train on their target alone, the others are unchanged;
- the toy corpus's read speech and repeat-after-me dialogues (no held-out question spoken; SFT-ready);
- the character-level toy tokenizer (one id per CJK character, `AutoTokenizer` round trip);
- `hf-to-megatron --new-row-noise`: the spread of the new vocabulary rows.
"""
from __future__ import annotations

import json
import random

import pytest
import torch

from megatron_cslm.data.chunking import dedup_units, split_pieces
from megatron_cslm.data.documents import RecipeConfig, build_pretrain_data, parse_speech
from megatron_cslm.data.documents.interleave import interleave_chunks
from megatron_cslm.inference.metrics import normalize
from megatron_cslm.toy.corpus import REPEAT_INSTRUCTIONS, SILENCE_UNIT, make_toy_corpus

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("reading") / "toy"
    info = make_toy_corpus(out, num_units=512, reading=40, reading_dialogues=10)
    return out, info


def _jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_deduplicated_records_keep_words_on_their_units(corpus):
    out, _ = corpus
    for raw in _jsonl(out / "reading.jsonl")[:20]:
        rec = parse_speech(raw, "reading.jsonl", 1, 512)
        short = rec.deduplicated()
        assert short.units == dedup_units(rec.units) and len(short.units) < len(rec.units)
        assert short.words[0]["start"] == 0 and short.words[-1]["end"] == len(short.units)
        for a, b in zip(short.words, short.words[1:]):  # still tiling, in the collapsed indices
            assert a["end"] == b["start"]
        # every word's collapsed units are its raw units collapsed (a run cut by a word boundary stays left)
        for raw_word, word in zip(rec.words, short.words):
            mine = dedup_units(rec.units[raw_word["start"]:raw_word["end"]])
            assert short.units[word["start"]:word["end"]] in (mine, mine[1:])
        chunks = interleave_chunks(short.text, short.units, short.words, (1, 2), random.Random(0))
        assert [u for c in chunks for u in c.units] == short.units
        assert "".join(c.text for c in chunks) == short.text


def test_build_collapses_units_and_masks_inputs(corpus, tmp_path):
    out, _ = corpus
    config = RecipeConfig(recipes=("asr", "tts", "interleave", "translate", "cross_speech"), num_units=512,
                          dedup_units=True, mask_inputs=True)
    build_pretrain_data(tmp_path, speech=[out / "reading.jsonl"], parallel=[out / "parallel.jsonl"], config=config)
    stats = json.loads((tmp_path / "stats.json").read_text())["config"]
    assert stats["dedup_units"] is True and stats["mask_inputs"] is True
    raw = {r["id"]: r["units"] for r in _jsonl(out / "reading.jsonl")}
    for recipe in ("asr", "tts", "cross_speech"):
        for doc in _jsonl(tmp_path / f"{recipe}.jsonl"):
            *inputs, target = doc["segments"]
            assert all(s.get("loss") is False for s in inputs) and "loss" not in target, (recipe, doc)
            for seg in doc["segments"]:
                if "units" in seg:
                    assert seg["units"] == dedup_units(seg["units"])
            if recipe != "cross_speech":
                spoken = next(s["units"] for s in doc["segments"] if "units" in s)
                assert spoken == dedup_units(raw[doc["id"].split(":", 1)[1]])
    for recipe in ("interleave", "translate"):
        assert all("loss" not in s for d in _jsonl(tmp_path / f"{recipe}.jsonl") for s in d["segments"])


def test_read_speech_and_repeat_dialogues(corpus):
    out, info = corpus
    assert info["files"]["reading.jsonl"] == 40 and info["files"]["repeat_dialogue.jsonl"] == 10
    read = _jsonl(out / "reading.jsonl")
    held = {normalize(r["question"]) for r in _jsonl(out / "heldout.jsonl")}
    assert not held & {normalize(r["text"]) for r in read}
    assert {r["lang"] for r in read} == {"en", "zh"}
    # a short silence between space-separated words, inside the word before it
    en = next(r for r in read if r["lang"] == "en")
    for word in en["words"][:-1]:
        assert en["units"][word["end"] - 1] == SILENCE_UNIT
    for dialogue, rec in zip(_jsonl(out / "repeat_dialogue.jsonl"), read):
        system, user, assistant = dialogue["turns"]
        assert system == {"role": "system", "text": REPEAT_INSTRUCTIONS[rec["lang"]]}
        assert user["units"] == rec["units"] and assistant["text"] == rec["text"] == user["text"]
        assert assistant["speaker"] == "toy_spk0" and assistant["words"][-1]["end"] == len(assistant["units"])
    with pytest.raises(ValueError, match="reading_dialogues"):
        make_toy_corpus(out.parent / "bad", reading=2, reading_dialogues=3)


def test_character_tokenizer_has_one_id_per_character(tmp_path):
    from transformers import AutoTokenizer

    from megatron_cslm.toy.tokenizer import train_toy_text_tokenizer

    texts = ["What season comes after winter?", "冬天之后是什么季节？", "Spring comes after winter."] * 3
    train_toy_text_tokenizer(texts, tmp_path, vocab_size=4096, characters=True)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    for text in ("冬天之后是什么季节？", "Winter comes after spring."):
        ids = tok.encode(text, add_special_tokens=False)
        assert len(ids) == len(text) and tok.decode(ids) == text
    assert len(tok) < 256 + 40  # the bytes, the characters of the texts and the specials: no word merges


def test_new_row_noise_spreads_the_new_rows():
    from megatron_cslm.convert.vocab import NOISE_SCALE, tail_rows

    weight = torch.randn(5000, 16, dtype=torch.float64) * 0.02 + 0.5
    for scale in (NOISE_SCALE, 1.0):
        new = tail_rows(weight, 3000, 8192, seed=3, noise_scale=scale)[:3000]
        ratio = (new.std(0) / weight.std(0)).mean().item()
        assert abs(ratio - scale ** 0.5) < 0.05 * scale ** 0.5, (scale, ratio)
        assert torch.allclose(new.mean(0), weight.mean(0), atol=4 * 0.02 * scale ** 0.5 / 3000 ** 0.5 + 1e-9)
    assert torch.equal(tail_rows(weight, 10, 5120, seed=3), tail_rows(weight, 10, 5120, seed=3, noise_scale=1e-5))


def test_split_pieces_tile_read_speech_text(corpus):
    out, _ = corpus
    for rec in _jsonl(out / "reading.jsonl"):
        assert "".join(split_pieces(rec["text"])) == rec["text"]
