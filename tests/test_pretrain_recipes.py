"""Continual-pretraining recipes on the toy corpus and on hand-made edge cases, with the real Llama-3 tokenizer."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from megatron_cslm.cli import run_tool
from megatron_cslm.data.chunking import split_pieces
from megatron_cslm.data.documents import (
    DEFAULT_TEMPLATES,
    RECIPES,
    RecipeConfig,
    Templates,
    build_pretrain_data,
    check_template,
    interleave_document,
    parse_instruction,
    parse_speech,
    replay_document,
)
from megatron_cslm.data.documents.interleave import interleave_chunks
from megatron_cslm.fileio import DataError, iter_jsonl
from megatron_cslm.toy.corpus import make_toy_corpus
from tests.helpers.files import load_tool

pytestmark = pytest.mark.timeout(60)


def _load(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def _write(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def _texts(doc):
    return [s["text"] for s in doc["segments"] if "text" in s]


def _units(doc):
    return [s["units"] for s in doc["segments"] if "units" in s]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    make_toy_corpus(out, num_units=4096, seed=0, speakers=2)
    return out


@pytest.fixture(scope="module")
def built(toy, tmp_path_factory):
    """All six recipes over the toy corpus; returns (out_dir, counters)."""
    out = tmp_path_factory.mktemp("pretrain")
    counters = build_pretrain_data(out, [toy / "manifest.jsonl"], [toy / "parallel.jsonl"], [toy / "instruct.jsonl"],
                                   RecipeConfig(seed=3, mask_prompt=True))
    return out, counters


def _speech(toy):
    return {r["id"]: r for r in _load(toy / "manifest.jsonl")}


def test_outputs_counts_and_determinism(toy, built, tmp_path):
    out, counters = built
    stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))
    for recipe in RECIPES:
        docs = _load(out / f"{recipe}.jsonl")
        c = stats["recipes"][recipe]
        assert c["read"] == c["written"] + c["skipped_total"] == counters[recipe].read
        assert c["written"] == len(docs) > 0
        assert all(d["source"] == recipe and d["segments"] for d in docs)
    again = tmp_path / "again"
    build_pretrain_data(again, [toy / "manifest.jsonl"], [toy / "parallel.jsonl"], [toy / "instruct.jsonl"],
                        RecipeConfig(seed=3, mask_prompt=True))
    for recipe in RECIPES:
        assert (again / f"{recipe}.jsonl").read_bytes() == (out / f"{recipe}.jsonl").read_bytes()
    # A recipe's output depends on the seed, not on which other recipes run alongside it.
    alone = tmp_path / "alone"
    build_pretrain_data(alone, [toy / "manifest.jsonl"], config=RecipeConfig(recipes=("interleave",), seed=3))
    assert (alone / "interleave.jsonl").read_bytes() == (out / "interleave.jsonl").read_bytes()
    other = tmp_path / "other"
    build_pretrain_data(other, [toy / "manifest.jsonl"], config=RecipeConfig(recipes=("interleave", "asr"), seed=4))
    assert (other / "interleave.jsonl").read_bytes() != (out / "interleave.jsonl").read_bytes()
    assert (other / "asr.jsonl").read_bytes() != (out / "asr.jsonl").read_bytes()


def test_keep_probability(toy, tmp_path):
    counters = build_pretrain_data(tmp_path, [toy / "manifest.jsonl"], config=RecipeConfig(
        recipes=("asr", "tts"), p={"asr": 0.3, "tts": 0.0}))
    asr, tts = counters["asr"], counters["tts"]
    assert 0.2 * asr.read < asr.written < 0.4 * asr.read
    assert asr.skipped["sampled_out"] == asr.read - asr.written
    assert tts.written == 0 and tts.skipped["sampled_out"] == tts.read
    assert _load(tmp_path / "tts.jsonl") == []


def test_asr_tts_documents(toy, built):
    out, _ = built
    speech = _speech(toy)
    for recipe in ("asr", "tts"):
        docs = _load(out / f"{recipe}.jsonl")
        used = set()
        for d in docs:
            rec = speech[d["id"].split(":", 1)[1]]
            assert d["lang"] == rec["lang"] and _units(d) == [rec["units"]]
            text = "".join(_texts(d))
            if recipe == "asr":  # speech first, the transcript is the last thing in the document
                assert d["segments"][-1]["text"].endswith(rec["text"])
            else:
                assert "units" in d["segments"][-1] and rec["text"] in text
            # The prompt is worded in the utterance's language: it is one of that language's templates.
            matches = [t for t in DEFAULT_TEMPLATES[recipe][rec["lang"]]
                       if t.replace("{speech}", "").replace("{text}", rec["text"]) == text]
            assert len(matches) == 1
            used.add(matches[0])
        assert len(used) == sum(len(v) for v in DEFAULT_TEMPLATES[recipe].values())  # wording varies


def _recover(doc, rec):
    """Walk an interleaved doc against the record's words: text pieces are the next words of the transcript,
    unit pieces are exactly the timestamp spans of the next words. Returns (recovered text, chunk sizes)."""
    pieces = split_pieces(rec["text"])
    spoken = [i for i, p in enumerate(pieces) if any(c.isalnum() for c in p)] + [len(pieces)]
    words, k, recovered, sizes = rec["words"], 0, "", []
    for seg in doc["segments"]:
        start = spoken[k] if k else 0  # pieces before the first word belong to the first chunk
        if "text" in seg:
            m = k + sum(any(c.isalnum() for c in p) for p in split_pieces(seg["text"]))
            assert seg["text"] == "".join(pieces[start:spoken[m]])
        else:
            m = next(m for m in range(k + 1, len(words) + 1)
                     if rec["units"][words[k]["start"]:words[m - 1]["end"]] == seg["units"])
        recovered += "".join(pieces[start:spoken[m]])
        sizes.append(m - k)
        k = m
    assert k == len(words)
    return recovered, sizes


def test_interleave_with_timestamps_switches_at_word_spans(toy, built):
    out, _ = built
    speech = _speech(toy)
    docs = _load(out / "interleave.jsonl")
    assert len(docs) == len(speech)  # every toy sentence has at least two words
    starts = set()
    for d in docs:
        rec = speech[d["id"].split(":", 1)[1]]
        kinds = ["units" if "units" in s else "text" for s in d["segments"]]
        assert {"units", "text"} <= set(kinds)
        assert all(a != b for a, b in zip(kinds, kinds[1:]))  # strictly alternating
        starts.add(kinds[0])
        recovered, sizes = _recover(d, rec)
        assert recovered == rec["text"]
        if len(rec["words"]) > 8:
            assert all(3 <= s <= 8 for s in sizes[:-1]) and 1 <= sizes[-1] <= 8
    assert starts == {"text", "units"}


def test_interleave_timestamps_with_gaps_keep_pauses_with_the_word_before():
    units = list(range(100, 130))
    words = [{"word": w, "start": s, "end": e} for w, s, e in
             [("one", 2, 6), ("two", 8, 12), ("three", 12, 18), ("four", 21, 25), ("five", 25, 28)]]
    rec = parse_speech({"text": "One, two three four five.", "units": units, "words": words, "lang": "en"}, "m", 1,
                       4096)
    for seed in range(20):
        chunks = interleave_chunks(rec.text, rec.units, rec.words, (1, 2), random.Random(seed))
        assert "".join(c.text for c in chunks) == rec.text
        assert [u for c in chunks for u in c.units] == units  # leading/trailing and gap units are kept
        pos = 0
        for chunk in chunks[:-1]:  # every later chunk starts at its first word's start
            pos += len(chunk.units)
            assert pos in {8, 12, 21, 25}
        assert chunks[0].units[:2] == [100, 101]  # the units before the first word open the first chunk
    doc = interleave_document(rec, random.Random(0), (1, 2))
    assert {"units", "text"} <= {k for s in doc["segments"] for k in s}


def test_interleave_without_timestamps_is_proportional(toy):
    speech = list(_speech(toy).values())
    for rec in speech[::7]:
        n, text = len(rec["units"]), rec["text"]
        chunks = interleave_chunks(text, rec["units"], None, (1, 3), random.Random(1))
        assert len(chunks) >= 2 and "".join(c.text for c in chunks) == text
        assert [u for c in chunks for u in c.units] == rec["units"]
        total = sum(not ch.isspace() for ch in text)
        chars = units = 0
        for c in chunks:
            chars += sum(not ch.isspace() for ch in c.text)
            units += len(c.units)
            assert abs(units - n * chars / total) <= 0.5 + 1e-9
    # Through the recipe: word boundaries from the text, both modalities, ordered contiguous unit slices.
    rec = dict(speech[3])
    del rec["words"]
    doc = interleave_document(parse_speech(rec, "m", 1, 4096), random.Random(5), (1, 2))
    assert _texts(doc) and _units(doc)
    flat = rec["units"]
    pos = 0
    for piece in _units(doc):
        at = next(i for i in range(pos, len(flat)) if flat[i:i + len(piece)] == piece)
        pos = at + len(piece)
    assert all(t in rec["text"] for t in _texts(doc))
    short = parse_speech({"text": "Hello.", "units": [1, 2, 3]}, "m", 1, 4096)
    assert interleave_document(short, random.Random(0)) is None


def test_translation_both_directions(toy, built):
    out, _ = built
    pairs = {p["id"]: p for p in _load(toy / "parallel.jsonl")}
    docs = _load(out / "translate.jsonl")
    directions = {"zh-en": 0, "en-zh": 0}
    for d in docs:
        src, tgt = d["lang"].split("-")
        p = pairs[d["id"].split(":", 1)[1]]
        directions[d["lang"]] += 1
        (text,) = _texts(d)
        assert text.endswith("\n" + p[tgt]) or text.endswith(" " + p[tgt]) or text.endswith("：" + p[tgt])
        assert p[src] in text[:-len(p[tgt])]
        assert not _units(d)
    assert min(directions.values()) > 0.3 * len(docs)


def test_cross_lingual_speech(toy, built, tmp_path):
    out, _ = built
    pairs = {p["id"]: p for p in _load(toy / "parallel.jsonl")}
    docs = _load(out / "cross_speech.jsonl")
    assert {d["lang"] for d in docs} == {"zh-en", "en-zh"}
    for d in docs:
        src, tgt = d["lang"].split("-")
        p = pairs[d["id"].split(":", 1)[1]]
        assert _units(d) == [p[f"{src}_units"]]  # speech in the source language ...
        assert d["segments"][-1]["text"].endswith(p[tgt])  # ... text in the other comes last
    # Only one side with speech: it is always the source; no speech at all: skipped and counted.
    records = [{"id": "a", "zh": "你好。", "en": "Hello.", "en_units": [5, 6, 7]},
               {"id": "b", "translation": {"zh": "谢谢。", "en": "Thanks."}}]
    counters = build_pretrain_data(tmp_path, parallel=[_write(tmp_path / "p.jsonl", records)],
                                   config=RecipeConfig(recipes=("cross_speech", "translate")))
    (doc,) = _load(tmp_path / "cross_speech.jsonl")
    assert doc["lang"] == "en-zh" and _units(doc) == [[5, 6, 7]] and doc["segments"][-1]["text"].endswith("你好。")
    assert counters["cross_speech"].skipped["no_speech"] == 1 and counters["translate"].written == 2


def test_replay_chat_template_and_mask(speech_tokenizer, tmp_path):
    import jinja2

    from megatron_cslm.text.tokenizer import LLAMA31_CHAT_TEMPLATE

    records = [
        {"prompt": "What is two plus two?", "response": "Four."},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "你好吗？"},
                      {"role": "assistant", "content": "我很好。"}]},
        {"conversations": [{"from": "human", "value": "Name a color."}, {"from": "gpt", "value": "Blue."}]},
    ]
    template = jinja2.Environment().from_string(LLAMA31_CHAT_TEMPLATE)
    for i, raw in enumerate(records):
        conv = parse_instruction(raw, "i.jsonl", i + 1)
        messages = [{"role": r, "content": c} for r, c in conv.turns]
        expected = template.render(messages=messages, bos_token="<|begin_of_text|>", add_generation_prompt=False)
        plain, masked = replay_document(conv), replay_document(conv, mask_prompt=True)
        assert "".join(_texts(plain)) == "".join(_texts(masked)) == expected
        assert all("loss" not in s for s in plain["segments"])
        replies = [c + "<|eot_id|>" for r, c in conv.turns if r == "assistant"]
        assert [s["text"] for s in masked["segments"] if "loss" not in s] == replies
        assert all(s["loss"] is False and s["text"].endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
                   for s in masked["segments"] if "loss" in s)
        # With the real tokenizer, the in-loss tokens are exactly the replies and their <|eot_id|>.
        per_seg = speech_tokenizer.encode_each_segment(masked["segments"])
        eot = speech_tokenizer.encode_text("<|eot_id|>")
        assert len(eot) == 1 and per_seg[0][0] == speech_tokenizer.bos_id
        trained = [ids for s, ids in zip(masked["segments"], per_seg) if s.get("loss", True)]
        assert [speech_tokenizer.decode(ids) for ids in trained] == replies
        assert all(ids[-1] == eot[0] for ids in trained)
    assert parse_instruction(records[0], "i", 1).lang == "en"
    assert parse_instruction({"prompt": "天空是什么颜色？", "response": "蓝色。"}, "i", 1).lang == "zh"


def test_templates_override_and_validation(toy, tmp_path):
    for recipe, by_lang in DEFAULT_TEMPLATES.items():
        for templates in by_lang.values():
            for t in templates:
                check_template(recipe, t)
    override = tmp_path / "t.yaml"
    override.write_text("asr:\n  en: ['Heard: {speech} => {text}']\n  zh: ['听到：{speech}=>{text}']\n"
                        "lang_names:\n  en: {zh: Mandarin}\n", encoding="utf-8")
    templates = Templates.from_file(override)
    assert templates.lang_name("zh", "en") == "Mandarin" and templates.lang_name("en", "en") == "English"
    out = tmp_path / "out"
    build_pretrain_data(out, [toy / "manifest.jsonl"], [toy / "parallel.jsonl"],
                        config=RecipeConfig(recipes=("asr", "translate"), templates=templates))
    for d in _load(out / "asr.jsonl"):
        assert d["segments"][0]["text"] == ("Heard: " if d["lang"] == "en" else "听到：")
        assert d["segments"][2]["text"].lstrip().startswith("=>")
    translations = [d for d in _load(out / "translate.jsonl") if d["lang"] == "en-zh"]
    assert any("Mandarin" in d["segments"][0]["text"] for d in translations)
    bad = tmp_path / "bad.json"
    for spec, field, msg in [({"asr": {"en": ["{text} {speech}"]}}, "asr.en[0]", "must be the last"),
                             ({"tts": {"zh": ["{text} {voice} {speech}"]}}, "tts.zh[0]", "unknown placeholder"),
                             ({"asr": {"en": ["{speech}"]}}, "asr.en[0]", "exactly once"),
                             ({"summarize": {"en": ["x"]}}, "summarize", "unknown recipe")]:
        bad.write_text(json.dumps(spec), encoding="utf-8")
        with pytest.raises(DataError) as e:
            Templates.from_file(bad)
        assert e.value.field == field and msg in str(e.value) and str(bad) in str(e.value)


def test_reads_tokenize_speech_output(tmp_path):
    """tools/tokenize_speech.py lines: no timestamps, "lang" empty when unknown, extra bookkeeping fields."""
    line = {"id": "u1", "audio": "a.wav", "text": "今天天气很好。", "lang": "", "units": [7, 7, 8, 9, 9, 10, 11],
            "num_frames": 7, "sample_rate": 16000, "tokenizer": "speech_tokenizer_v1", "duration_s": 0.14}
    counters = build_pretrain_data(tmp_path, [_write(tmp_path / "u.jsonl", [line])],
                                   config=RecipeConfig(recipes=("asr", "interleave")))
    assert counters["asr"].written == counters["interleave"].written == 1
    (asr,) = _load(tmp_path / "asr.jsonl")
    assert asr["lang"] == "zh" and asr["segments"][-1]["text"].endswith(line["text"])
    assert any(ch in "".join(_texts(asr)) for ch in "转写语音文本录音")  # a Chinese prompt for Chinese speech


BAD_SPEECH = [
    ({"units": [1, 2]}, "text", "missing"),
    ({"text": "  ", "units": [1, 2]}, "text", "empty text"),
    ({"text": "hi", "units": [1, "2"]}, "units", "element 1"),
    ({"text": "hi", "units": [1, 2.0]}, "units", "not an integer"),
    ({"text": "hi", "units": [1, 5000]}, "units", "outside [0, 4096)"),
    ({"text": "hi", "units": []}, "units", "non-empty"),
    ({"text": "hi there", "units": [1, 2, 3], "words": [{"word": "hi", "start": 0, "end": 9}]}, "words", "within"),
]


@pytest.mark.parametrize("record,field,msg", BAD_SPEECH)
def test_bad_speech_records_are_located(tmp_path, record, field, msg):
    good = {"text": "hello there friend", "units": [1, 2, 3, 4]}
    path = _write(tmp_path / "m.jsonl", [good, good, record])
    with pytest.raises(DataError) as e:
        build_pretrain_data(tmp_path / "out", [path], config=RecipeConfig(recipes=("asr", "tts")))
    assert (e.value.path, e.value.line, e.value.field) == (str(path), 3, field) and msg in e.value.message
    assert not (tmp_path / "out" / "asr.jsonl").exists()  # atomic: nothing half-written


def test_skip_bad_records_counts(tmp_path):
    good = {"text": "hello there friend", "units": [1, 2, 3, 4]}
    misaligned = {"text": "hello there", "units": [1, 2, 3, 4],
                  "words": [{"word": "hello", "start": 0, "end": 2}, {"word": "world", "start": 2, "end": 4}]}
    manifest = _write(tmp_path / "m.jsonl", [good] + [r for r, _, _ in BAD_SPEECH] + [misaligned, good])
    instruct = _write(tmp_path / "i.jsonl", [{"prompt": "q", "response": "a"}, {"prompt": "q"},
                                             {"messages": [{"role": "user", "content": "q"}]},
                                             {"messages": [{"role": "robot", "content": "q"}]}])
    # Without skipping, the misaligned timestamps are a located error of the interleave recipe.
    with pytest.raises(DataError) as e:
        build_pretrain_data(tmp_path / "o1", [_write(tmp_path / "x.jsonl", [misaligned])],
                            config=RecipeConfig(recipes=("interleave",)))
    assert e.value.line == 1 and e.value.field == "words" and "'world' not found" in str(e.value)
    counters = build_pretrain_data(tmp_path / "out", [manifest], instruct=[instruct],
                                   config=RecipeConfig(recipes=("asr", "interleave", "replay"), skip_bad_records=True))
    n_bad = len(BAD_SPEECH)
    assert counters["asr"].as_dict()["skipped"] == {"bad_record": n_bad}
    assert counters["asr"].written == 3  # the misaligned record is still fine for ASR
    assert counters["interleave"].as_dict()["skipped"] == {"bad_record": n_bad + 1}
    assert counters["interleave"].written == 2
    assert counters["replay"].read == 4 and counters["replay"].written == 1
    assert counters["replay"].skipped["bad_record"] == 3
    stats = json.loads((tmp_path / "out" / "stats.json").read_text(encoding="utf-8"))
    assert "m.jsonl:2: field 'text' missing" in stats["recipes"]["asr"]["first_example_per_reason"]["bad_record"]
    for c in counters.values():
        assert c.read == c.written + sum(c.skipped.values())


def test_every_document_encodes_with_the_speech_tokenizer(built, speech_tokenizer):
    out, _ = built
    tok = speech_tokenizer
    for recipe in RECIPES:
        for _, doc in list(iter_jsonl(out / f"{recipe}.jsonl"))[::5]:
            ids = tok.encode_segments(doc["segments"])
            units = [u for seg in doc["segments"] if "units" in seg for u in seg["units"]]
            assert [i - tok.unit_offset for i in ids if tok.is_unit(i)] == units
            assert ids.count(tok.sosp_id) == ids.count(tok.eosp_id) == len(_units(doc))
            assert max(ids) < tok.vocab_size
            pieces = tok.split(ids)
            assert [p.units for p in pieces if p.kind == "units"] == _units(doc)


def test_cli(toy, tmp_path, capsys):
    cli = load_tool("build_pretrain_data")
    out = tmp_path / "out"
    assert cli.main(["--asr", str(toy / "manifest.jsonl"), "--parallel", str(toy / "parallel.jsonl"),
                     "--out-dir", str(out), "--interleave-chunk-words", "2-4", "--p-tts", "0.5", "--seed", "9"]) == 0
    printed = capsys.readouterr().out
    assert "interleave: read=" in printed and "replay" not in printed
    stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))
    assert set(stats["recipes"]) == {"asr", "tts", "interleave", "translate", "cross_speech"}
    assert stats["config"]["chunk_words"] == [2, 4] and stats["config"]["p"]["tts"] == 0.5
    assert not (out / "replay.jsonl").exists()
    bad = _write(tmp_path / "bad.jsonl", [{"text": "x", "units": [1, "a"]}])
    assert run_tool(cli.main, ["--asr", str(bad), "--out-dir", str(tmp_path / "o2")]) == 1  # one line, exit 1
    assert f"{bad}:1: field 'units'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--asr", str(bad), "--recipes", "replay", "--out-dir", str(tmp_path / "o3")])
    with pytest.raises(SystemExit):
        cli.main(["--asr", str(bad), "--interleave-chunk-words", "5-2", "--out-dir", str(tmp_path / "o3")])
