"""Parsing generated ids into TQ/TA/SA chunks: well-formed, malformed in every short arrangement, incremental.

Ids come from the real Llama-3 tokenizer extended with speech units. The exhaustive check compares the parser
against an independent statement of the trained grammar: an output raises no warning exactly when it is
`[question] text* [answer] (text* <sosp> unit+ <eosp>)+ text* <stop>`.
"""
from __future__ import annotations

import itertools
import json
import random
import re

import pytest

from megatron_cslm.fileio import DataError
from megatron_cslm.inference.durations import expand_units, load_duration_table
from megatron_cslm.inference.inputs import parse_unit_line, read_benchmark_list, read_unit_file
from megatron_cslm.inference.parse import ResponseParser, parse_response
from megatron_cslm.inference.vocab import Vocab


@pytest.fixture(scope="module")
def classes(speech_tokenizer):
    """One representative id per token class, keyed by a letter of the grammar."""
    tok, v = speech_tokenizer, Vocab.of(speech_tokenizer)
    return {
        "t": tok.encode_text("Hi")[0], "u": tok.unit_offset + 17, "s": v.sosp, "e": v.eosp, "q": v.question,
        "a": v.answer, "z": 128009, "c": 128006,  # <|eot_id|>, <|start_header_id|>
        "p": v.size + 3,  # an embedding padding row
    }


WELL_FORMED = re.compile(r"qt*a(t*su+e)+t*z")


@pytest.mark.timeout(60)
def test_well_formed_interleaved(speech_tokenizer):
    tok = speech_tokenizer
    ids = tok.encode_text("[question]What is it?[answer]It is<sosp><1><2><eosp> a cat.<sosp><3><eosp><|eot_id|>")
    p = parse_response(tok, ids)
    assert not p.warnings and p.stopped and p.num_tokens == len(ids)
    assert [(c.kind, c.index) for c in p.chunks] == [("tq", 0), ("ta", 0), ("sa", 0), ("ta", 1), ("sa", 1)]
    assert p.question_text == "What is it?" and p.answer_text == "It is a cat."
    assert [c.units for c in p.of_kind("sa")] == [[1, 2], [3]] and p.speech_units == [1, 2, 3]
    ta = p.of_kind("ta")
    assert ta[1].text == " a cat."  # whitespace kept so chunks concatenate to the answer
    assert ta[0].end_token == ids.index(tok.sosp_id) + 1  # complete when speech starts
    assert p.chunks[2].end_token == ids.index(tok.eosp_id) + 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("text, warnings, kinds", [
    ("[answer]A<sosp><1><eosp><|eot_id|>", {"missing_question": 1}, ["ta", "sa"]),
    ("Q?[answer]A<sosp><1><eosp><|eot_id|>", {"missing_question": 1}, ["tq", "ta", "sa"]),
    ("[question]Q?<sosp><1><eosp><|eot_id|>", {"missing_answer": 1}, ["tq", "sa"]),
    ("[question]Q?[answer]A<sosp><1><2>", {"unclosed_sosp": 1, "no_stop": 1}, ["tq", "ta", "sa"]),
    ("[question]Q?[answer]A<sosp><1>[answer]B<sosp><2><eosp><|eot_id|>", {"unclosed_sosp": 1, "repeated_answer": 1},
     ["tq", "ta", "sa", "ta", "sa"]),
    ("[question]Q?[answer]A<1><sosp><2><eosp><|eot_id|>", {"unit_outside_speech": 1}, ["tq", "ta", "sa"]),
    ("[question]Q?[answer]A<sosp><1> word<2><eosp><|eot_id|>", {"text_inside_speech": 1}, ["tq", "ta", "sa"]),
    ("[question]Q?[answer]A<eosp><sosp><1><sosp><2><eosp><|eot_id|>", {"stray_eosp": 1, "nested_sosp": 1},
     ["tq", "ta", "sa"]),
    ("[question]Q?[answer]A<sosp><eosp><|eot_id|>", {"empty_speech": 1, "no_speech": 1}, ["tq", "ta"]),
    ("[question]Q?[question][answer]A<|start_header_id|><sosp><1><eosp><|eot_id|>",
     {"repeated_question": 1, "stray_special": 1}, ["tq", "ta", "sa"]),
    ("[question]Q?[answer]A<sosp><1><eosp><|eot_id|>B<sosp><2><eosp>", {"tokens_after_stop": 1}, ["tq", "ta", "sa"]),
    ("[question]Q?[answer]A<sosp><1><|eot_id|>", {"unclosed_sosp": 1}, ["tq", "ta", "sa"]),
    ("", {"missing_answer": 1, "no_stop": 1, "no_speech": 1}, []),
])
def test_malformed_outputs_are_repaired_and_counted(speech_tokenizer, text, warnings, kinds):
    p = parse_response(speech_tokenizer, speech_tokenizer.encode_text(text))
    assert dict(p.warnings) == warnings
    assert [c.kind for c in p.chunks] == kinds


@pytest.mark.timeout(60)
def test_every_short_arrangement(speech_tokenizer, classes):
    """All 9^5 sequences of up to five token classes (and random longer ones): never an exception, warnings
    exactly when the grammar is violated, chunks only with content, streaming == offline."""
    letters = "".join(classes)
    vocab = Vocab.of(speech_tokenizer)
    sequences = [s for n in range(6) for s in itertools.product(letters, repeat=n)]
    rng = random.Random(0)
    sequences += [tuple(rng.choice(letters) for _ in range(rng.randrange(6, 20))) for _ in range(3000)]
    sequences += [tuple("qtats" + "u" * k + "e" + "tsue" * j + "z") for k in (1, 3) for j in (0, 2)]
    for seq in sequences:
        ids = [classes[c] for c in seq]
        parser = ResponseParser(speech_tokenizer, vocab)
        streamed = [c for t in ids for c in parser.feed(t)] + parser.finish()
        p = parser.result()
        assert streamed == p.chunks
        assert bool(p.warnings) != bool(WELL_FORMED.fullmatch("".join(seq))), seq
        assert all(c.units if c.kind == "sa" else c.text.strip() for c in p.chunks), seq
        assert all(0 < c.end_token <= len(ids) for c in p.chunks)
        assert p.stopped == ("z" in seq)


@pytest.mark.timeout(60)
def test_parser_rejects_misuse(speech_tokenizer):
    parser = ResponseParser(speech_tokenizer)
    with pytest.raises(RuntimeError, match="before finish"):
        parser.result()
    parser.finish()
    with pytest.raises(RuntimeError, match="after finish"):
        parser.feed(1)


@pytest.mark.timeout(60)
def test_expand_units_fixed_and_mean_durations(tmp_path):
    assert expand_units([3, 1], 2) == [3, 3, 1, 1]
    table = [1.0] * 8
    table[3], table[1] = 2.5, 1.5  # boundaries at 2.5, 4, 6.5 frames round to 3, 4, 7
    assert expand_units([3, 1, 3], table) == [3, 3, 3, 1, 3, 3, 3]
    assert len(expand_units([3] * 10, table)) == 25
    with pytest.raises(ValueError):
        expand_units([1], 0)
    path = tmp_path / "dur.json"
    path.write_text(json.dumps({"3": 2.5, "1": 1.5}))
    assert load_duration_table(path, 8)[:4] == [1.0, 1.5, 1.0, 2.5]
    path.write_text(json.dumps({"3": -1}))
    with pytest.raises(DataError, match=r"dur\.json: field '3' duration must be a positive"):
        load_duration_table(path, 8)
    path.write_text(json.dumps([2.0] * 7))
    with pytest.raises(DataError, match="expected 8 durations, got 7"):
        load_duration_table(path, 8)


@pytest.mark.timeout(60)
def test_unit_lines_and_manifests(tmp_path):
    for line in ("<sosp><12><7><eosp>", "<12> <7>", "12 7", " <sosp> <12><7> <eosp> "):
        assert parse_unit_line(line, 4096, "f", 1) == [12, 7]
    for line, msg in (("<12><x>", "expected <sosp>"), ("12 x", "expected space-separated integers"),
                      ("<sosp><eosp>", "no units"), ("4096", r"unit 4096 out of range")):
        with pytest.raises(DataError, match=f"f:3: field 'units' {msg}"):
            parse_unit_line(line, 4096, "f", 3)
    units = tmp_path / "u.txt"
    units.write_text("1 2\n\n<3>\n", encoding="utf-8")
    assert [(q.id, q.units) for q in read_unit_file(units, 4096)] == [("1", [1, 2]), ("3", [3])]

    (tmp_path / "wav").mkdir()
    (tmp_path / "wav" / "a.wav").write_bytes(b"")
    (tmp_path / "b.wav").write_bytes(b"")
    manifest = tmp_path / "m.tsv"
    manifest.write_text("id\ttext\taudio\na\tQ one\t\nb\t\tb.wav\n", encoding="utf-8")
    got = read_benchmark_list(manifest)
    assert [(q.id, q.audio, q.reference) for q in got] == [
        ("a", tmp_path / "wav" / "a.wav", "Q one"), ("b", tmp_path / "b.wav", None)]
    manifest.write_text("id\ttext\nc\tQ\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"m\.tsv:2: field 'audio' audio file .*c\.wav not found"):
        read_benchmark_list(manifest)
    manifest.write_text("name\ttext\n", encoding="utf-8")
    with pytest.raises(DataError, match="field 'id'"):
        read_benchmark_list(manifest)
