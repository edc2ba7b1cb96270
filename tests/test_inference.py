"""Inference on tiny Llama models trained here, in plain torch, to answer three spoken questions.

The questions are three of BELLE-eval-S2S's. Their audio is written by the tests (22.05 kHz like the
benchmark's, a voiced contour derived from each question's text), or, opt-in, is the benchmark's own when
BELLE_EVAL_S2S names its folder. The questions' units come from the real S3 tokenizer code with random-init
weights (deterministic), so the decode and eval tools, which tokenize the same wavs, give the models exactly
the prompts they were trained on.
Each model learns `[question] TQ [answer] TA1 <sosp>SA1<eosp> TA2 ...` in both answer languages; one model
is trained on the interleaved layout, one on the sequential layout (the latency baseline).

The helpers here are imported by test_eval.py; the trained checkpoints are cached in the session's base
temporary directory so they are trained once per run.
"""
from __future__ import annotations

import json
import math
import random
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

from megatron_cslm.data.sft import SFTConfig, SFTEncoder, parse_record
from megatron_cslm.fileio import DataError
from megatron_cslm.inference import SamplingConfig, SpeechLM
from megatron_cslm.inference.sampling import ModalityConstraint
from megatron_cslm.inference.vocab import Vocab
from tests.helpers.belle import BELLE_DIR
from tests.helpers.files import load_tool

QUESTIONS = {"0": "中国有多少个省？", "3": "人类存在的意义是什么？", "4": "为什么太阳会发光？"}
ANSWERS = {  # answer chunks by question id and answer language
    "0": {"zh": ["中国有三十四个", "省级行政区。"], "en": ["China has thirty-four", " provincial regions."]},
    "3": {"zh": ["人类存在的意义", "在于创造和爱。"], "en": ["The meaning of life", " is to create and love."]},
    "4": {"zh": ["太阳发光是因为", "核聚变释放能量。"],
          "en": ["The sun shines", " because nuclear fusion", " releases energy."]},
}
LAYOUTS = ("interleaved", "sequential")

QUESTION_RATE = 22050  # BELLE-eval-S2S's sample rate; the tools resample to the tokenizer's 16 kHz


def chunk_units(text: str, n: int = 8) -> list[int]:
    """The toy 'speech' of a text chunk: n units derived from the text (a toy ASR can invert it)."""
    rng = random.Random(zlib.crc32(text.encode("utf-8")))
    return [rng.randrange(4096) for _ in range(n)]


def answer_units(qid: str, lang: str) -> list[int]:
    return [u for c in ANSWERS[qid][lang] for u in chunk_units(c)]


def write_question_wavs(wav_dir: Path) -> Path:
    """Spoken-question stand-ins, `wav_dir/<id>.wav` (mono 16-bit PCM at 22.05 kHz): one voiced syllable per
    character, pitch and length drawn from a seed of the question's text, so each question has its own units."""
    wav_dir.mkdir(parents=True, exist_ok=True)
    for qid, text in QUESTIONS.items():
        rng = np.random.default_rng(zlib.crc32(text.encode("utf-8")))
        syllables = []
        for _ in text:
            n = int(QUESTION_RATE * rng.uniform(0.15, 0.3))
            t = np.arange(n) / QUESTION_RATE
            f0 = rng.uniform(110, 260) * (1 + rng.uniform(-0.2, 0.2) * t / t[-1])  # a rising or falling tone
            phase = 2 * np.pi * np.cumsum(f0) / QUESTION_RATE
            voiced = sum(np.sin(h * phase) / h for h in range(1, 9)) * np.hanning(n)
            syllables += [voiced, np.zeros(int(QUESTION_RATE * rng.uniform(0.02, 0.08)))]
        audio = np.concatenate(syllables) + rng.normal(0, 0.003, sum(map(len, syllables)))
        sf.write(wav_dir / f"{qid}.wav", (0.3 * audio / np.abs(audio).max()).astype(np.float32), QUESTION_RATE,
                 subtype="PCM_16")
    return wav_dir


def question_audio_dir(tmp_path_factory) -> Path:
    """The questions' wav folder: BELLE-eval-S2S's own (opt-in), else written once per session."""
    if BELLE_DIR is not None:
        return BELLE_DIR / "wav"
    wav_dir = tmp_path_factory.getbasetemp() / "questions" / "wav"
    return wav_dir if wav_dir.is_dir() else write_question_wavs(wav_dir)


def belle_manifest(directory: Path) -> Path:
    """The three questions in the BELLE-eval-S2S list format, `id<TAB>text` (audio: `<audio dir>/<id>.wav`)."""
    path = directory / "test.tsv"
    path.write_text("id\ttext\n" + "".join(f"{k}\t{v}\n" for k, v in QUESTIONS.items()), encoding="utf-8")
    return path


def question_units(wav_dir: Path) -> dict[str, list[int]]:
    """S3 units of the three wavs, through the same library calls the tools use (random-init weights)."""
    from megatron_cslm.inference.inputs import Question
    from megatron_cslm.inference.runner import tokenize_audio
    from megatron_cslm.speech.extract import UnitExtractor

    questions = [Question(k, k, audio=wav_dir / f"{k}.wav") for k in QUESTIONS]
    tokenize_audio(questions, UnitExtractor(random_init=True), progress=False)
    return {q.id: q.units for q in questions}


def toy_records(units: dict[str, list[int]]) -> list[dict]:
    return [{"id": f"{k}-{lang}", "lang": lang,
             "turns": [{"role": "user", "units": units[k], "text": QUESTIONS[k]},
                       {"role": "assistant", "chunks": [{"text": c, "units": chunk_units(c)} for c in chunks]}]}
            for k, by_lang in ANSWERS.items() for lang, chunks in by_lang.items()]


def train_tiny(tok, records: list[dict], layout: str, out: Path, steps: int = 300) -> None:
    """Train a tiny LlamaForCausalLM (full expanded vocab) on `records` and save it with the tokenizer.

    Only the embedding and output rows of tokens in the data are trained; the other output rows are zero, so
    their logits are exactly 0 and the full-vocabulary softmax is the softmax over the data's tokens plus one
    constant column log(#other tokens). That keeps a step at a few milliseconds despite 132k ids.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_cslm.models.llama import ARCHS

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**ARCHS["tiny"].with_vocab(tok.vocab_size).to_hf_config()))
    encoder = SFTEncoder(tok, SFTConfig(layout=layout))
    samples = [encoder.encode(parse_record(r, tok.num_units)) for r in records]
    width = max(len(s.tokens) for s in samples)
    ids = torch.full((len(samples), width), tok.eod_id)
    labels = torch.full((len(samples), width), -100)
    for i, s in enumerate(samples):
        t = torch.as_tensor(s.tokens, dtype=torch.long)
        ids[i, :len(t)] = t
        labels[i, :len(t)] = torch.where(torch.as_tensor(s.modality > 0), t, -100)
    active = torch.unique(ids)
    local = torch.full((tok.vocab_size,), -1)
    local[active] = torch.arange(len(active))
    emb = torch.nn.Parameter(model.model.embed_tokens.weight.detach()[active].clone())
    head = torch.nn.Parameter(model.lm_head.weight.detach()[active].clone())
    body = [p for n, p in model.named_parameters() if n not in ("model.embed_tokens.weight", "lm_head.weight")]
    inputs, targets = local[ids[:, :-1]], labels[:, 1:]
    trained = targets != -100
    target_local = local[targets[trained]]
    rest = math.log(tok.vocab_size - len(active))
    opt = torch.optim.Adam(body + [emb, head], lr=1e-2)
    for _ in range(steps):
        hidden = model.model(inputs_embeds=emb[inputs]).last_hidden_state[trained]
        logits = torch.cat([hidden @ head.T, hidden.new_full((len(hidden), 1), rest)], dim=1)
        loss = F.cross_entropy(logits, target_local)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 2e-3:
            break
    assert loss.item() < 0.05, f"tiny {layout} model did not learn the toy data (loss {loss.item():.3f})"
    with torch.no_grad():
        model.model.embed_tokens.weight[active] = emb
        model.lm_head.weight.zero_()
        model.lm_head.weight[active] = head
    model.save_pretrained(out)
    tok.save_pretrained(out)


def tiny_models(tmp_path_factory, tok) -> dict:
    """{"units": question units, "audio_dir": their wavs, "interleaved": dir, "sequential": dir}, trained once
    per session."""
    root = tmp_path_factory.getbasetemp() / "tiny_cslm"
    meta = root / "units.json"
    audio_dir = question_audio_dir(tmp_path_factory)
    if not meta.exists():
        units = question_units(audio_dir)
        for layout in LAYOUTS:
            train_tiny(tok, toy_records(units), layout, root / layout)
        meta.write_text(json.dumps(units), encoding="utf-8")
    return {"units": json.loads(meta.read_text(encoding="utf-8")), "audio_dir": audio_dir,
            **{k: root / k for k in LAYOUTS}}


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
