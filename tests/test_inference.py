"""Inference on tiny Llama models trained here, in plain torch, to answer three spoken questions.

The questions are three of BELLE-eval-S2S's. Their audio is written by the tests (22.05 kHz like the
benchmark's, a voiced contour derived from each question's text), or, opt-in, is the benchmark's own when
BELLE_EVAL_S2S names its folder. The questions' units come from the real S3 tokenizer code with random-init
weights (deterministic), so the decode and eval tools, which tokenize the same wavs, give the models exactly
the prompts they were trained on.
Each model learns `[question] TQ [answer] TA1 <sosp>SA1<eosp> TA2 ...` in both answer languages; one model
is trained on the interleaved layout, one on the sequential layout (the latency baseline).

The questions, answers and tiny models are tests/helpers/spoken_qa.py's (test_eval.py uses them too); the
trained checkpoints are cached in the session's base temporary directory so they are trained once per run.
"""
from __future__ import annotations

import json

import pytest
import torch

from megatron_cslm.data.sft import SFTConfig, SFTEncoder, parse_record
from megatron_cslm.fileio import DataError
from megatron_cslm.inference import SamplingConfig, SpeechLM
from megatron_cslm.inference.sampling import ModalityConstraint
from megatron_cslm.inference.vocab import Vocab
from tests.helpers.files import load_tool
from tests.helpers.spoken_qa import (
    ANSWERS,
    LAYOUTS,
    QUESTIONS,
    answer_units,
    belle_manifest,
    chunk_units,
    tiny_models,
)


@pytest.fixture(scope="module")
def models(tmp_path_factory, speech_tokenizer):
    return tiny_models(tmp_path_factory, speech_tokenizer)


@pytest.fixture(scope="module")
def lm(models):
    return SpeechLM.from_pretrained(models["interleaved"])


# ---------------------------------------------------------------------------------------------- prompt


@pytest.mark.timeout(60)
def test_prompt_is_the_sft_user_turn(speech_tokenizer):
    """The inference prompt is exactly the prefix SFT trained on, up to the assistant header."""
    units = [5, 5, 9, 4095, 0]
    for lang in ("zh", "en"):
        for dedup in (False, True):
            encoder = SFTEncoder(speech_tokenizer, SFTConfig(dedup_units=dedup))
            record = {"lang": lang, "turns": [{"role": "user", "units": units, "text": "q"},
                                              {"role": "assistant", "text": "a b", "units": [1, 2]}]}
            full = encoder.encode(parse_record(record, speech_tokenizer.num_units)).tokens.tolist()
            prompt = encoder.encode_prompt(units, lang)
            assert full[:len(prompt)] == prompt
            assert full[len(prompt)] == speech_tokenizer.question_id
            text = speech_tokenizer.decode(prompt)
            assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
            assert ("<5><9>" if dedup else "<5><5><9>") in text
    assert "in English" in speech_tokenizer.decode(encoder.encode_prompt(units, "en"))
    with pytest.raises(ValueError, match="answer language 'fr'"):
        encoder.encode_prompt(units, "fr")


# ---------------------------------------------------------------------------------------------- generation


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_trained_models_answer_as_trained(models, speech_tokenizer):
    """Both layouts, both answer languages (cross-lingual for these Chinese questions), authors' sampling."""
    for layout in LAYOUTS:
        lm = SpeechLM.from_pretrained(models[layout])
        encoder = SFTEncoder(lm.tok, SFTConfig())
        keys = [(k, lang) for k in QUESTIONS for lang in ("zh", "en")]
        prompts = [encoder.encode_prompt(models["units"][k], lang) for k, lang in keys]
        responses = lm.generate(prompts, SamplingConfig(max_new_tokens=80), seeds=list(range(len(keys))))
        for (k, lang), r in zip(keys, responses):
            p = r.parsed
            assert not p.warnings, (layout, k, lang, p.warnings)
            assert p.question_text == QUESTIONS[k]
            assert p.answer_text == "".join(ANSWERS[k][lang])
            assert p.speech_units == answer_units(k, lang)
            if layout == "interleaved":
                assert [c.text for c in p.of_kind("ta")] == ANSWERS[k][lang]
                assert [c.kind for c in p.chunks] == ["tq"] + ["ta", "sa"] * len(ANSWERS[k][lang])
            else:
                assert [c.kind for c in p.chunks] == ["tq", "ta", "sa"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_stream_chunks_equal_generate_output(lm, models):
    """Same seed, same ids; the stream's chunks concatenate to the batch output; SA1 arrives mid-generation."""
    encoder = SFTEncoder(lm.tok, SFTConfig())
    trained = encoder.encode_prompt(models["units"]["4"], "en")
    unknown = encoder.encode_prompt([7, 7, 300, 12, 4000, 81], "zh")  # not in training: output is random
    hot = SamplingConfig(temperature=1.5, top_p=1.0, max_new_tokens=40)
    for prompt, config in ((trained, SamplingConfig(max_new_tokens=80)), (unknown, hot)):
        for seed in (0, 1):
            stream = lm.stream(prompt, config, seed)
            chunks, seen_before_end = [], []
            for chunk in stream:
                chunks.append(chunk)
                seen_before_end.append(stream.response is None)
            assert all(seen_before_end)
            batch = lm.generate([prompt], config, [seed])[0]
            assert stream.response.ids == batch.ids
            assert [(c.kind, c.text, c.units, c.end_token) for c in chunks] == \
                   [(c.kind, c.text, c.units, c.end_token) for c in batch.parsed.chunks]
            assert stream.response.parsed.warnings == batch.parsed.warnings
    # Seeds matter on the unknown prompt, so the equality above is not trivially true.
    a, b = lm.generate([unknown, unknown], hot, [0, 1])
    assert a.ids != b.ids

    stream = lm.stream(trained, SamplingConfig(max_new_tokens=80), 0)
    first_sa = next(c for c in stream if c.kind == "sa")
    assert stream.response is None  # generation is still running
    rest = list(stream)
    assert rest and rest[-1].end_token > first_sa.end_token
    latency = stream.response.latency
    assert latency.first_speech_tokens == first_sa.end_token < latency.generated_tokens
    assert latency.first_speech_s is not None and latency.first_speech_s <= latency.total_s
    assert latency.text_chunks_before_speech == 1


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_batched_generation_matches_single(lm, models):
    encoder = SFTEncoder(lm.tok, SFTConfig())
    prompts = [encoder.encode_prompt(models["units"][k], lang) for k, lang in (("0", "zh"), ("4", "en"), ("3", "en"))]
    assert len({len(p) for p in prompts}) == 3  # left padding is exercised
    config = SamplingConfig(max_new_tokens=80)
    batch = lm.generate(prompts, config, [10, 11, 12])
    for prompt, seed, r in zip(prompts, (10, 11, 12), batch):
        assert lm.generate([prompt], config, [seed])[0].ids == r.ids


@pytest.mark.timeout(60)
def test_constraint_masks(speech_tokenizer):
    v = Vocab.of(speech_tokenizer)
    n = v.size + 60  # padded embedding rows
    constraint = ModalityConstraint(v, n, "cpu")
    out = constraint.apply(torch.zeros(2, n), torch.tensor([True, False]))
    speech_ok = torch.isfinite(out[0]).nonzero().flatten().tolist()
    assert speech_ok == list(range(v.unit_offset, v.unit_offset + v.num_units)) + [v.eosp]
    text_ok = torch.isfinite(out[1])
    assert not text_ok[v.unit_offset:v.unit_offset + v.num_units].any() and not text_ok[v.eosp]
    assert text_ok[[0, 1000, v.sosp, v.question, v.answer, *v.stops]].all()
    tokens = torch.tensor([v.sosp, v.unit_offset + 3, v.eosp, 1000])
    state = constraint.advance(torch.tensor([False, True, True, False]), tokens)
    assert state.tolist() == [True, True, False, False]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_constrained_decoding_keeps_modalities_apart(lm):
    """At a high temperature the model mixes text and units; the constraint removes exactly that."""
    encoder = SFTEncoder(lm.tok, SFTConfig())
    prompt = encoder.encode_prompt([1, 2, 3, 4, 5, 6, 7, 8], "en")
    mixing = ("unit_outside_speech", "text_inside_speech", "stray_eosp", "nested_sosp", "unclosed_sosp")
    free = SamplingConfig(temperature=3.0, top_p=1.0, max_new_tokens=60)
    seeds = list(range(8))
    unconstrained = lm.generate([prompt] * len(seeds), free, seeds)
    constrained = lm.generate([prompt] * len(seeds), SamplingConfig(temperature=3.0, top_p=1.0, max_new_tokens=60,
                                                                    constrained=True), seeds)
    assert sum(r.parsed.warnings[w] for r in unconstrained for w in mixing) > 0
    for r in constrained:
        bad = {w: r.parsed.warnings[w] for w in mixing if r.parsed.warnings[w] and w != "unclosed_sosp"}
        assert not bad, bad
        # Only the length limit may leave speech open.
        assert r.parsed.warnings["unclosed_sosp"] <= int(not r.parsed.stopped)


# ---------------------------------------------------------------------------------------------- tools


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_decode_tool_units_file(models, tmp_path):
    units = models["units"]
    lines = ["<sosp>" + "".join(f"<{u}>" for u in units["0"]) + "<eosp>",  # authors' form
             " ".join(f"<{u}>" for u in units["3"]),
             " ".join(map(str, units["4"]))]
    unit_file = tmp_path / "units.txt"
    unit_file.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    out = tmp_path / "out"
    decode = load_tool("decode")
    decode.main(["--lang", "zh", "--unit", str(unit_file), "--model-name-or-path", str(models["interleaved"]),
                 "--output-dir", str(out), "--max-new-tokens", "80", "--batch-size", "2"])
    responses = json.loads((out / "responses.json").read_text(encoding="utf-8"))
    assert [r["question"] for r in responses] == lines
    first = responses[0]
    assert list(first)[:2] == ["question", "response"]
    tagged = lambda c: "<sosp>" + "".join(f"<{u}>" for u in chunk_units(c)) + "<eosp>"  # noqa: E731
    assert first["response"] == "[question]中国有多少个省？[answer]" + "".join(
        c + tagged(c) for c in ANSWERS["0"]["zh"])
    assert [r["ta"] for r in responses] == ["".join(ANSWERS[k]["zh"]) for k in QUESTIONS]
    unit_lines = (out / "speech_units.txt").read_text(encoding="utf-8").splitlines()
    assert [list(map(int, line.split())) for line in unit_lines] == [answer_units(k, "zh") for k in QUESTIONS]

    # Cross-lingual, streamed, units re-expanded to 2 frames each: appended after the first run's items.
    decode.main(["--lang", "zh", "--answer-lang", "en", "--unit", str(unit_file), "--model-name-or-path",
                 str(models["interleaved"]), "--output-dir", str(out), "--stream", "--unit-duration", "2",
                 "--max-new-tokens", "80"])
    responses = json.loads((out / "responses.json").read_text(encoding="utf-8"))
    assert len(responses) == 6 and [r["answer_lang"] for r in responses] == ["zh"] * 3 + ["en"] * 3
    assert [r["ta"] for r in responses[3:]] == ["".join(ANSWERS[k]["en"]) for k in QUESTIONS]
    unit_lines = (out / "speech_units.txt").read_text(encoding="utf-8").splitlines()
    assert [list(map(int, line.split())) for line in unit_lines[3:]] == \
           [[u for u in answer_units(k, "en") for _ in range(2)] for k in QUESTIONS]
    records = [json.loads(line) for line in (out / "decode.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(records) == 6
    latency = records[5]["latency"]
    assert latency["text_chunks_before_speech"] == 1 and latency["first_speech_s"] > 0
    assert [c["kind"] for c in records[5]["chunks"]] == ["tq"] + ["ta", "sa"] * 3

    unit_file.write_text("<sosp><12><x><eosp>\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"units\.txt:1: field 'units'"):
        decode.main(["--lang", "zh", "--unit", str(unit_file), "--model-name-or-path", str(models["interleaved"]),
                     "--output-dir", str(tmp_path / "bad")])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_decode_tool_benchmark_audio(models, tmp_path):
    """The BELLE-eval-S2S layout: a question list `id<TAB>text`, audio at 22.05 kHz in `--audio-dir`."""
    manifest = belle_manifest(tmp_path)
    out = tmp_path / "out"
    audio_dir = models["audio_dir"]
    load_tool("decode").main(["--lang", "zh", "--manifest", str(manifest), "--audio-dir", str(audio_dir),
                              "--random-init", "--speech-tokenizer", "speech_tokenizer_v1_25hz",  # as trained
                              "--model-name-or-path", str(models["interleaved"]),
                              "--output-dir", str(out), "--max-new-tokens", "80", "--batch-size", "3"])
    responses = json.loads((out / "responses.json").read_text(encoding="utf-8"))
    assert [r["question"] for r in responses] == [str(audio_dir / f"{k}.wav") for k in QUESTIONS]
    assert [r["tq"] for r in responses] == list(QUESTIONS.values())
    assert all(r["response"].startswith("[question]") and not r["warnings"] for r in responses)


@pytest.mark.timeout(60)
def test_sampling():
    from megatron_cslm.inference.sampling import sample, top_p_filter

    torch.manual_seed(0)
    for top_p in (0.1, 0.7, 0.99):
        for scale in (1.0, 3.0, 20.0):  # flat to peaked: the candidate set is widened when needed
            logits = torch.randn(3, 20000) * scale
            ordered, order = logits.sort(dim=-1, descending=True)
            probs = ordered.double().softmax(-1)
            reference = logits.scatter(-1, order, ordered.masked_fill(probs.cumsum(-1) - probs >= top_p,
                                                                      float("-inf")))
            assert torch.equal(top_p_filter(logits, top_p, first_k=64), reference)
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0]])
    draw = lambda config, seed: sample(logits, config, [torch.Generator().manual_seed(seed)]).item()  # noqa: E731
    assert draw(SamplingConfig(temperature=0), 0) == 1
    assert {draw(SamplingConfig(top_p=0.3), s) for s in range(20)} == {1}
    assert {draw(SamplingConfig(top_k=2, top_p=1.0), s) for s in range(40)} == {1, 2}
    assert [draw(SamplingConfig(top_p=1.0), s) for s in range(10)] == [draw(SamplingConfig(top_p=1.0), s)
                                                                        for s in range(10)]
    with pytest.raises(ValueError):
        SamplingConfig(top_p=0)
