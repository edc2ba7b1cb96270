"""SpeechTextTokenizer: vocabulary layout, textual unit form, round trips (Llama-3 and SentencePiece), HF parity."""
from __future__ import annotations

import random

import pytest

from megatron_cslm.errors import CslmError
from megatron_cslm.fileio import DataError
from megatron_cslm.text.tokenizer import Segment, SpecialTokens, SpeechTextTokenizer

from conftest import EN, ZH


def random_segments(rng: random.Random, num_units: int, n: int = 8) -> list[dict]:
    """Alternating text (mixed Chinese/English) and unit segments, like chain-of-modality answers."""
    segs = []
    for i in range(n):
        if i % 2 == 0:
            segs.append({"text": rng.choice(EN) + rng.choice(ZH)})
        else:
            segs.append({"units": [rng.randrange(num_units) for _ in range(rng.randint(1, 40))]})
    return segs


@pytest.mark.timeout(60)
def test_vocabulary_layout(speech_tokenizer):
    tok = speech_tokenizer
    assert tok.base_vocab_size == 128256 and tok.unit_offset == 128256 and tok.num_units == 4096
    assert [tok.sosp_id, tok.eosp_id, tok.question_id, tok.answer_id] == [132352, 132353, 132354, 132355]
    assert tok.vocab_size == 132356 and tok.padded_vocab_size(128) == 132480 and tok.padded_vocab_size(4) == 132356
    assert (tok.eod_id, tok.bos_id) == (128001, 128000)
    assert not tok.is_unit(128255) and tok.is_unit(128256) and tok.is_unit(132351) and not tok.is_unit(132352)


@pytest.mark.timeout(60)
def test_textual_unit_form_matches_arithmetic(speech_tokenizer):
    tok = speech_tokenizer
    assert tok.encode_text("<sosp><12><345><eosp>") == tok.encode_units([12, 345]) \
        == [tok.sosp_id, tok.unit_offset + 12, tok.unit_offset + 345, tok.eosp_id]
    assert tok.encode_units([0, 4095], wrap=False) == [128256, 132351]
    assert tok.encode_text("[question]你好[answer]") == [tok.question_id, *tok.encode_text("你好"), tok.answer_id]
    assert tok.encode_text("<|eot_id|>") == [128009]
    # Out-of-range or non-canonical unit strings are ordinary text, as with HF added tokens.
    for text in ("<4096>", "<012>", "<-1>", "< 5>"):
        assert not any(tok.is_unit(i) for i in tok.encode_text(text))
        assert tok.decode(tok.encode_text(text)) == text


@pytest.mark.timeout(60)
def test_round_trip_llama3(speech_tokenizer):
    tok = speech_tokenizer
    rng = random.Random(1)
    for _ in range(20):
        segs = random_segments(rng, tok.num_units)
        ids = tok.encode_segments(segs)
        assert tok.encode_text(tok.decode(ids)) == ids
        assert tok.split(ids) == [Segment("text", text=s["text"]) if "text" in s else Segment("units", units=s["units"])
                                  for s in segs]
    ids = tok.encode_text("[question]你好<|eot_id|>") + tok.encode_units([7, 7, 8], wrap=False) + [tok.eod_id]
    assert tok.encode_text(tok.decode(ids)) == ids
    assert [s.kind for s in tok.split(ids)] == ["text", "units", "text"]


@pytest.mark.timeout(60)
def test_round_trip_sentencepiece(sp_model_path, tmp_path):
    tok = SpeechTextTokenizer(sp_model_path, num_units=50, specials=SpecialTokens(sosp="<speech>", eosp="</speech>"))
    assert (tok.base_vocab_size, tok.unit_offset, tok.vocab_size) == (300, 300, 354)
    assert tok.eod_id == 2 and tok.bos_id == 1
    assert tok.encode_text("<speech><3><49></speech>") == [350, 303, 349, 351]
    rng = random.Random(2)
    for _ in range(20):
        ids = tok.encode_segments(random_segments(rng, tok.num_units)) + [tok.eod_id]
        assert tok.encode_text(tok.decode(ids)) == ids
    tok.save_pretrained(tmp_path / "saved")
    again = SpeechTextTokenizer.from_pretrained(tmp_path / "saved")
    assert (again.vocab_size, again.specials, again.encode_text("<speech><3></speech>hi")) == \
        (354, tok.specials, tok.encode_text("<speech><3></speech>hi"))


@pytest.mark.timeout(120)
def test_hf_autotokenizer_parity(speech_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tok = speech_tokenizer
    tok.save_pretrained(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert len(hf) == tok.vocab_size
    rng = random.Random(3)
    texts = ["<sosp><12><345><eosp>", "[question]中国有多少个省？[answer]China has 34 provincial-level divisions.",
             "Hello 你好<sosp><0><4095><eosp> world<|eot_id|><4096>"]
    texts += [tok.decode(tok.encode_segments(random_segments(rng, tok.num_units))) for _ in range(5)]
    for text in texts:
        ids = tok.encode_text(text)
        assert hf(text, add_special_tokens=False)["input_ids"] == ids
        assert hf.decode(ids) == tok.decode(ids) == text
    rendered = hf.apply_chat_template([{"role": "user", "content": "hi <sosp><1><eosp>"}], tokenize=False,
                                      add_generation_prompt=True)
    assert rendered == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi <sosp><1><eosp><|eot_id|>"
                        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    # from_pretrained restores the same object, and a plain load() of the directory does too.
    # The saved directory holds the units in its vocabulary: nothing is appended when it is read back.
    again = SpeechTextTokenizer.from_pretrained(tmp_path)
    assert (again.base_vocab_size, again.vocab_size, again.eod_id) == (tok.vocab_size, tok.vocab_size, tok.eod_id)
    assert again.layout == tok.layout and again.special_ids == tok.special_ids
    assert again.identity() == tok.identity()
    assert again.encode_text(texts[2]) == tok.encode_text(texts[2])
    with pytest.raises(DataError, match="holds 4096 units, but num_units is 1024"):
        SpeechTextTokenizer.load(tmp_path, num_units=1024)


@pytest.mark.timeout(60)
def test_errors_name_the_segment(speech_tokenizer):
    tok = speech_tokenizer
    cases = [([{"text": "a"}, {"units": [1, 4096]}], "segments[1].units", "out of range"),
             ([{"units": [1.5]}], "segments[0].units", "not an integer"),
             ([{"units": []}], "segments[0].units", "non-empty"),
             ([{"text": ""}], "segments[0].text", "non-empty"),
             ([{"txt": "a"}], "segments[0]", "'text' or a 'units'"),
             (["a"], "segments[0]", "expected an object")]
    for segs, field, msg in cases:
        with pytest.raises(CslmError, match=msg) as e:
            tok.encode_segments(segs)
        assert e.value.field == field
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="out of range"):
        tok.encode_units([-1])


@pytest.mark.timeout(60)
def test_cache_of_an_older_save_is_checked_against_the_vocabulary(sp_model_path, tmp_path):
    """cslm_tokenizer.json written before the layout was read from the vocabulary (format 1: units at
    base_vocab_size + k) still loads, and a cache that disagrees stops naming both values."""
    import json

    from megatron_cslm.text.tokenizer import META_FILE

    tok = SpeechTextTokenizer(sp_model_path, num_units=50)
    tok.save_pretrained(tmp_path)
    old = {"format": 1, "num_units": 50, "specials": json.loads((tmp_path / META_FILE).read_text())["specials"],
           "base_vocab_size": 300, "text_tokenizer": "tokenizer.model"}
    (tmp_path / META_FILE).write_text(json.dumps(old))
    assert SpeechTextTokenizer.from_pretrained(tmp_path).layout == tok.layout
    (tmp_path / META_FILE).write_text(json.dumps({**old, "base_vocab_size": 299}))
    with pytest.raises(DataError, match="says 353 ids, the vocabulary has 354"):
        SpeechTextTokenizer.from_pretrained(tmp_path)
