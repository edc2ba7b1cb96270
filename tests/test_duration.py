"""Issue 25 part 1: the duration predictor for deduplicated units (speech/duration_model.py, `cslm train-duration`).

The toy corpus's speakers stretch every unit by their own rate with known noise, and pause for their own length,
so a predictor that reads the speaker and the unit (silence or not) can reach the noise floor (0.37 frames mean
absolute error); one that ignores them cannot get below ~0.5. Trained once per module (~2-4 s).
"""
from __future__ import annotations

import json
import statistics

import pytest
import torch
from safetensors.torch import load_file

from megatron_cslm.errors import CslmError
from megatron_cslm.inference.durations import check_predictor, expand_units, predicted_durations, repeat_units
from megatron_cslm.speech.duration_model import WEIGHTS_NAME, load_predictor, read_config
from megatron_cslm.speech.duration_training import (
    TrainSettings,
    build_config,
    read_examples,
    split_heldout,
    train_duration,
)
from megatron_cslm.speech.identity import IDENTITY_KEY, SpeechTokenizerId
from megatron_cslm.speech.runs import unit_runs
from megatron_cslm.toy.corpus import make_toy_corpus

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy(one_thread, tmp_path_factory):
    out = tmp_path_factory.mktemp("duration")
    make_toy_corpus(out / "toy")
    manifest = out / "toy" / "manifest.jsonl"
    examples, identity, counts = read_examples([manifest])
    train, held = split_heldout(examples, 0.1)
    config = build_config(train, identity, 4096, dim=32, num_layers=2)
    model, metrics = train_duration(train, config, TrainSettings(train_iters=150, batch_size=16, log_interval=0),
                                    save=out / "pred", heldout=held)
    raw = {json.loads(line)["id"]: json.loads(line)["units"] for line in manifest.read_text().splitlines()}
    return dict(out=out, train=train, held=held, model=model, metrics=metrics, raw=raw, counts=counts)


@pytest.mark.timeout(120)
def test_predictor_learns_the_toy_speakers_durations(toy):
    m, held = toy["metrics"], toy["held"]
    assert toy["counts"].read == toy["counts"].written == len(toy["train"]) + len(held) == 1280
    assert m["utterances"] == len(held) > 50
    # an oracle knowing each speaker's rate and pause scores 0.37 frames (the noise floor); < 0.5 is the bar
    assert m["mae_frames"] < 0.5, m
    # what ignoring speaker and neighbours gives: the best single duration for every unit
    true = [d for e in toy["train"] for d in e.durations]
    best = statistics.median(true)
    baseline = sum(abs(best - d) for e in held for d in e.durations) / m["units"]
    assert m["mae_frames"] < baseline - 0.05, (m["mae_frames"], baseline)
    # expansion durations keep each utterance's length (means accumulated), unlike medians
    assert m["total_length_error"] < 0.1 and m["total_length_error"] < m["total_length_error_median"], m
    # the saved predictor (safetensors + JSON) predicts what the trained one does, and records what it read
    loaded = load_predictor(toy["out"] / "pred")
    config, extra = read_config(toy["out"] / "pred")
    first = json.loads((toy["out"] / "toy" / "manifest.jsonl").read_text().splitlines()[0])
    assert config.speech_tokenizer == first.get(IDENTITY_KEY)  # the units' tokenizer, as the manifest names it
    assert config.num_units == 4096 and extra["step"] == 150
    assert extra["heldout"]["mae_frames"] == pytest.approx(m["mae_frames"])
    e = held[0]
    assert loaded.predict(e.units, e.speaker) == toy["model"].predict(e.units, e.speaker)


@pytest.mark.timeout(60)
def test_expansion_with_true_durations_restores_the_unit_stream(toy):
    for e in toy["held"]:
        assert repeat_units(e.units, e.durations) == toy["raw"][e.id]
        assert unit_runs(toy["raw"][e.id]) == (e.units, e.durations)
    e, model = toy["held"][0], toy["model"]
    median, mean = model.predict(e.units, e.speaker)
    frames = predicted_durations(e.units, model, e.speaker)
    assert min(frames) >= 1 and sum(frames) == round(sum(mean))  # accumulated: the total of the means
    assert predicted_durations(e.units, model, e.speaker, "median") == median
    assert len(expand_units(e.units, model)) == sum(predicted_durations(e.units, model))  # unknown speaker
    with pytest.raises(CslmError, match="outside the duration predictor's 4096 units"):
        model.predict([4096])
    v1 = SpeechTokenizerId.s3("speech_tokenizer_v1", "random-init:seed=0")
    with pytest.raises(CslmError, match="duration predictor has 4096 units but the model has 6561"):
        check_predictor(model, 6561, None, "the model")
    model.config.speech_tokenizer = SpeechTokenizerId.s3("speech_tokenizer_v1_25hz", "random-init:seed=0").to_dict()
    try:
        with pytest.raises(CslmError, match="speech_tokenizer_v1 .50 units/s"):
            check_predictor(model, 4096, v1, "the units")
    finally:
        model.config.speech_tokenizer = None


@pytest.mark.timeout(120)
def test_resume_gives_the_uninterrupted_weights(toy, tmp_path):
    train, held = toy["train"][:200], toy["held"][:20]
    config = build_config(train, None, 4096, dim=16, num_layers=1)
    settings = TrainSettings(train_iters=12, batch_size=8, log_interval=0)
    train_duration(train, config, settings, save=tmp_path / "a", heldout=held)
    train_duration(train, config, settings, save=tmp_path / "b", heldout=held, stop_after=5)
    assert read_config(tmp_path / "b")[1]["step"] == 5
    train_duration(train, config, settings, save=tmp_path / "b", heldout=held)
    a, b = load_file(tmp_path / "a" / WEIGHTS_NAME), load_file(tmp_path / "b" / WEIGHTS_NAME)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = build_config(train, None, 4096, dim=8, num_layers=1)
    with pytest.raises(CslmError, match=r"field 'dim' the saved predictor differs.*dim: saved \[16\], now \[8\]"):
        train_duration(train, other, settings, save=tmp_path / "b")


@pytest.mark.timeout(120)
def test_train_duration_cli_reads_dedup_records_and_their_tokenizer(tmp_path, capsys):
    from megatron_cslm.cli.train_duration import main
    from megatron_cslm.tool import run_tool

    ident = SpeechTokenizerId.s3("speech_tokenizer_v1_25hz", "sha256:0123456789abcdef").to_dict()
    records = []
    for i in range(40):  # what `tokenize-speech --dedup` writes: merged units, run lengths, frames, identity
        raw = [u for k in range(12) for u in [(i * 7 + k) % 50] * (1 + (k + i) % 3)]
        units, durations = unit_runs(raw)
        records.append({"id": f"utt{i}", "speaker": f"spk{i % 2}", "units": units, "durations": durations,
                        "num_frames": len(raw), IDENTITY_KEY: ident})
    data = tmp_path / "units.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    argv = ["--input", str(data), "--save", str(tmp_path / "dur"), "--train-iters", "3", "--hidden-size", "8",
            "--num-layers", "1", "--valid-fraction", "0.2"]
    assert run_tool(main, argv) == 0
    config, extra = read_config(tmp_path / "dur")
    assert config.speech_tokenizer == ident and config.num_units == 4096 and config.speakers == ["spk0", "spk1"]
    assert extra["step"] == 3 and extra["heldout"]["utterances"] > 0
    assert "held-out: MAE" in capsys.readouterr().out

    records[3]["durations"] = records[3]["durations"][:-1]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert run_tool(main, argv[:2] + ["--save", str(tmp_path / "bad")]) == 1
    assert f"error: {data}:4: field 'durations' must be" in capsys.readouterr().err
    records[3] = {**records[4], "id": "x", IDENTITY_KEY: SpeechTokenizerId.s3("speech_tokenizer_v1", "sha256:0"
                                                                               "123456789abcdef").to_dict()}
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert run_tool(main, argv[:2] + ["--save", str(tmp_path / "bad")]) == 3
    assert "units from two speech tokenizers" in capsys.readouterr().err
