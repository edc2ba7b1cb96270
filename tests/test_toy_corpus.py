"""The toy corpus: deterministic, speech truly aligned with text, formats as documented."""
from __future__ import annotations

import json

import pytest

from megatron_cslm.data.chunking import dedup_units, split_pieces
from megatron_cslm.data.documents import guess_lang
from megatron_cslm.toy.corpus import (
    ASSISTANT_SPEAKER,
    PAUSE_MARKS,
    SILENCE_UNIT,
    TOY_UNIT_RANGE,
    ToySpeech,
    bare_word,
    is_heldout,
    make_toy_corpus,
    parallel_sentences,
    qa_pairs,
)
from tests.helpers.files import load_tool

FILES = ("manifest.jsonl", "parallel.jsonl", "instruct.jsonl", "dialogue_sft.jsonl", "heldout.jsonl", "info.json")


def _load(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    make_toy_corpus(out, num_units=4096, seed=0, speakers=4)
    return out


def _expected_dedup(tts: ToySpeech, piece: str, gap_after: bool) -> list[int]:
    """What a word must sound like, durations aside: its graphemes' units, silence at punctuation, and the short
    silence between space-separated words when another word follows after a space."""
    seq = []
    for char in piece:
        if char in PAUSE_MARKS:
            seq.append(SILENCE_UNIT)
        seq += tts.grapheme_units(char)
    return dedup_units(seq + [SILENCE_UNIT] * gap_after)


def _check_aligned(tts: ToySpeech, text: str, units: list[int], words: list[dict]) -> None:
    # Timestamps tile the utterance, so the words' units concatenate to exactly the utterance's units.
    assert words[0]["start"] == 0 and words[-1]["end"] == len(units)
    for a, b in zip(words, words[1:]):
        assert a["end"] == b["start"]
    assert [u for w in words for u in units[w["start"]:w["end"]]] == units
    # One word per spoken piece (a space-separated word or a CJK character), in order, named without punctuation.
    pieces = [p for p in split_pieces(text) if any(c.isalnum() for c in p)]
    assert [w["word"] for w in words] == [bare_word(p) for p in pieces]
    for i, (w, piece) in enumerate(zip(words, pieces)):
        assert w["end"] > w["start"]
        gap_after = i + 1 < len(pieces) and pieces[i + 1][:1].isspace()
        assert dedup_units(units[w["start"]:w["end"]]) == _expected_dedup(tts, piece, gap_after), (text, w)


@pytest.mark.timeout(60)
def test_deterministic_and_seed_dependent(toy, tmp_path):
    again = tmp_path / "again"
    make_toy_corpus(again, num_units=4096, seed=0, speakers=4)
    for name in FILES:
        assert (again / name).read_bytes() == (toy / name).read_bytes(), name
    other = tmp_path / "other"
    make_toy_corpus(other, num_units=4096, seed=1, speakers=4)
    assert (other / "manifest.jsonl").read_bytes() != (toy / "manifest.jsonl").read_bytes()
    # The seed changes voices and durations, never what a word sounds like.
    a, b = _load(toy / "manifest.jsonl")[5], _load(other / "manifest.jsonl")[5]
    assert a["text"] == b["text"] and [w["word"] for w in a["words"]] == [w["word"] for w in b["words"]]
    strip = lambda units: [u for u in dedup_units(units) if u != SILENCE_UNIT]  # noqa: E731
    assert strip(a["units"]) == strip(b["units"])


@pytest.mark.timeout(60)
def test_manifest_is_aligned_and_in_range(toy):
    info = json.loads((toy / "info.json").read_text(encoding="utf-8"))
    assert info["synthetic"] is True and "SYNTHETIC" in info["description"]
    records = _load(toy / "manifest.jsonl")
    pairs = parallel_sentences()
    assert len(pairs) >= 150 and len(records) == len(pairs) * 2 * 4 == info["files"]["manifest.jsonl"]
    tts = ToySpeech(num_units=4096, num_speakers=4, seed=0)
    assert {r["speaker"] for r in records} == {v.name for v in tts.voices}
    assert len({r["id"] for r in records}) == len(records)
    for r in records:
        assert set(r) == {"id", "text", "lang", "speaker", "units", "words", "speech_tokenizer"}
        assert all(0 <= u < TOY_UNIT_RANGE for u in r["units"])
        assert guess_lang(r["text"]) == r["lang"]
        _check_aligned(tts, r["text"], r["units"], r["words"])
    zh = next(r for r in records if r["lang"] == "zh")
    assert all(len(w["word"]) == 1 for w in zh["words"])  # Chinese timestamps are per character
    # Speakers differ in durations: the same sentence has different lengths across voices.
    same = [r for r in records if r["id"].startswith("toy-en-010-")]
    assert len({len(r["units"]) for r in same}) > 1


def test_graphemes_have_distinct_units():
    tts = ToySpeech()
    chars = {c.lower() for en, zh in parallel_sentences() for c in en + zh if c.isalnum()}
    seqs = {tts.grapheme_units(c) for c in chars}
    assert len(seqs) == len(chars)  # no two graphemes sound alike, so ASR is learnable
    assert tts.grapheme_units("A") == tts.grapheme_units("a") and tts.grapheme_units("，") == ()


def test_small_unit_vocab_and_errors():
    tts = ToySpeech(num_units=64, num_speakers=2, seed=3)
    units, words = tts.speak("Hello, world.", 1, "k")
    assert all(0 <= u < 64 for u in units)
    _check_aligned(tts, "Hello, world.", units, words)
    assert tts.speak("Hello, world.", 1, "k") == (units, words)
    # A lone punctuation piece is silence that joins the word before it.
    units, words = tts.speak("wait - what", 0, "k")
    assert [w["word"] for w in words] == ["wait", "what"] and words[-1]["end"] == len(units)
    with pytest.raises(ValueError, match="at least 16 units"):
        ToySpeech(num_units=8)
    with pytest.raises(ValueError, match="nothing to say"):
        tts.speak("...", 0, "k")


def test_parallel_instruct_and_dialogue_formats(toy):
    tts = ToySpeech(num_units=4096, num_speakers=4, seed=0)
    parallel = _load(toy / "parallel.jsonl")
    assert len(parallel) == len(parallel_sentences())
    for p in parallel:
        assert guess_lang(p["zh"]) == "zh" and guess_lang(p["en"]) == "en"
        for lang in ("zh", "en"):
            assert [u for u in dedup_units(p[f"{lang}_units"]) if u != SILENCE_UNIT] == \
                [u for u in dedup_units([x for c in p[lang] for x in tts.grapheme_units(c)]) if u != SILENCE_UNIT]

    instruct = _load(toy / "instruct.jsonl")
    assert len(instruct) == 2 * len(qa_pairs())
    assert {r["lang"] for r in instruct} == {"en", "zh"}
    assert all(r["prompt"].strip() and r["response"].strip() for r in instruct)

    dialogues = _load(toy / "dialogue_sft.jsonl")
    n_turns = {len(d["turns"]) for d in dialogues}
    assert n_turns == {2, 4}  # single- and two-turn dialogues
    for d in dialogues:
        assert set(d) == {"id", "lang", "turns", "speech_tokenizer"}
        roles = [t["role"] for t in d["turns"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2)
        for t in d["turns"]:
            assert guess_lang(t["text"]) == d["lang"] and t["units"]
            if t["role"] == "assistant":
                assert t["speaker"] == tts.voices[ASSISTANT_SPEAKER].name
                _check_aligned(tts, t["text"], t["units"], t["words"])
            else:
                assert "words" not in t and t["speaker"] != tts.voices[ASSISTANT_SPEAKER].name

    # Held-out spoken questions: never spoken anywhere a training stage reads; their text Q/A is in instruct.
    heldout = _load(toy / "heldout.jsonl")
    held = {qa[lang] for i, qa in enumerate(qa_pairs()) if is_heldout(i) for lang in ("en", "zh")}
    assert {(h["question"], h["answer"]) for h in heldout} == held and len(heldout) == len(held) >= 16
    spoken = {t["text"] for d in dialogues for t in d["turns"]} | {r["text"] for r in _load(toy / "manifest.jsonl")}
    assert not spoken & {q for q, _ in held}
    assert {(r["prompt"], r["response"]) for r in instruct} >= held
    for h in heldout:
        assert [u for u in dedup_units(h["units"]) if u != SILENCE_UNIT] == \
            [u for u in dedup_units([x for c in h["question"] for x in tts.grapheme_units(c)]) if u != SILENCE_UNIT]


def test_cli(tmp_path, capsys):
    cli = load_tool("make_toy_corpus")
    assert cli.main(["--out", str(tmp_path), "--num-units", "100", "--speakers", "2", "--seed", "7"]) == 0
    assert "SYNTHETIC" in capsys.readouterr().out
    info = json.loads((tmp_path / "info.json").read_text(encoding="utf-8"))
    assert info["unit_range"] == 100 and len(info["speakers"]) == 2 and info["seed"] == 7
    assert all(max(r["units"]) < 100 for r in _load(tmp_path / "manifest.jsonl"))
