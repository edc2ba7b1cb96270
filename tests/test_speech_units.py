"""Audio -> S3 units: rates on real 16 kHz and 22.05 kHz speech, rejects with reasons, resume, dedup, windows.

The S3 model has its real architecture (~123M parameters) with random weights: units are meaningless but their
count, batching and bookkeeping are exactly those of the released tokenizer.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from megatron_cslm.fileio import DataError
from megatron_cslm.speech import (
    REJECT_REASONS,
    AudioLimits,
    AudioRejected,
    UnitExtractor,
    load_s3_state_dict,
    read_audio,
    to_16k,
)
from megatron_cslm.speech.runs import unit_runs
from megatron_cslm.speech.sharded import tokenize_speech
from megatron_cslm.speech.sources import SpeechManifestSource, read_speech_manifest
from tests.helpers.belle import BELLE_DIR as BELLE
from tests.helpers.files import load_tool


@pytest.fixture(scope="module")
def assets() -> list[Path]:
    import s3tokenizer

    return sorted((Path(s3tokenizer.__file__).parent / "assets").glob("*.wav"))


@pytest.fixture(scope="module")
def extractor() -> UnitExtractor:
    return UnitExtractor("speech_tokenizer_v1", random_init=True)


def tokenize_manifest(manifest, output, extractor, **options) -> dict:
    """One process over a TSV/JSONL manifest: parts, then the merged output."""
    return tokenize_speech(SpeechManifestSource(manifest), output, extractor, **options)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.timeout(120)
def test_50_units_per_second_on_16k_and_22k_speech(assets, extractor, tmp_path):
    clips = [(p.stem, str(p), "", "zh") for p in assets]
    if BELLE is not None:  # opt-in (BELLE_EVAL_S2S): the authors' benchmark audio (22.05 kHz), with transcripts
        rows = [line.split("\t") for line in (BELLE / "test.tsv").read_text(encoding="utf-8").splitlines()[1:4]]
        clips += [(f"belle-{i}", str(BELLE / "wav" / f"{i}.wav"), text, "zh") for i, text in rows]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(dict(zip(("id", "audio", "text", "lang"), c)), ensure_ascii=False) + "\n"
                                for c in clips), encoding="utf-8")
    stats = tokenize_manifest(manifest, tmp_path / "units.jsonl", extractor, progress=False)
    assert stats["read"] == stats["written"] == len(clips) and stats["skipped_total"] == 0
    out = read_jsonl(tmp_path / "units.jsonl")
    assert [r["id"] for r in out] == [c[0] for c in clips]
    for rec, (_, path, text, _) in zip(out, clips):
        seconds = sf.info(path).duration
        assert abs(len(rec["units"]) - 50 * seconds) <= 1, (path, len(rec["units"]), seconds)
        assert rec["num_frames"] == len(rec["units"]) and all(0 <= u < 4096 for u in rec["units"])
        assert rec["text"] == text and rec["sample_rate"] == 16000 and "durations" not in rec
        assert rec["tokenizer"] == "speech_tokenizer_v1+random-init"
        assert abs(rec["duration_s"] - seconds) < 1e-3
        assert len(set(rec["units"])) > 5  # the random codebook still separates frames
    assert json.loads((tmp_path / "units.jsonl.stats.json").read_text())["written"] == len(clips)


@pytest.mark.timeout(120)
def test_rejects_counts_and_resume(assets, extractor, tmp_path):
    good = assets[0].read_bytes()
    (tmp_path / "good.wav").write_bytes(good)
    (tmp_path / "truncated.wav").write_bytes(good[: len(good) // 2])
    sf.write(tmp_path / "silent.wav", np.zeros(16000, dtype=np.float32), 16000)
    (tmp_path / "text.wav").write_text("this is not audio\n")
    sf.write(tmp_path / "short.wav", np.full(400, 0.1, dtype=np.float32), 16000)
    # Stereo FLAC at 44.1 kHz: downmixed and resampled.
    audio, rate = sf.read(assets[1], dtype="float32")
    stereo = np.stack([audio, 0.5 * audio], axis=1)
    import torchaudio.functional as AF

    stereo44 = AF.resample(torch.from_numpy(stereo.T.copy()), rate, 44100).T.numpy()
    sf.write(tmp_path / "stereo.flac", stereo44, 44100)
    names = ["good", "truncated", "silent", "text", "short", "missing", "stereo"]
    ext = {"stereo": "flac"}
    manifest = tmp_path / "m.tsv"
    manifest.write_text("id\taudio\ttext\tlang\n" + "".join(f"{n}\t{n}.{ext.get(n, 'wav')}\tt {n}\ten\n"
                                                             for n in names))
    out = tmp_path / "out" / "units.jsonl"
    stats = tokenize_manifest(manifest, out, extractor, workers=2, progress=False, chunk_items=3)
    assert (stats["read"], stats["written"]) == (7, 2)
    assert stats["skipped"] == {"truncated": 1, "silent": 1, "wrong_format": 1, "too_short": 1, "unreadable": 1}
    rejects = [line.split("\t") for line in (out.parent / "units.jsonl.rejects.tsv").read_text().splitlines()]
    assert rejects[0] == ["id", "audio", "reason", "detail"]
    assert {(r[0], r[2]) for r in rejects[1:]} == {("truncated", "truncated"), ("silent", "silent"),
                                                    ("text", "wrong_format"), ("short", "too_short"),
                                                    ("missing", "unreadable")}
    assert all(r[1] == f"{r[0]}.wav" for r in rejects[1:])  # as the manifest names it
    assert [r[0] for r in rejects[1:]] == ["truncated", "silent", "text", "short", "missing"]  # input order
    recs = {r["id"]: r for r in read_jsonl(out)}
    assert set(recs) == {"good", "stereo"}
    assert abs(len(recs["stereo"]["units"]) - 50 * sf.info(assets[1]).duration) <= 1

    # Resume: fix one reject, add an item, and leave a half-written line as a killed run would.
    sf.write(tmp_path / "silent.wav", 0.1 * audio, rate)
    with open(manifest, "a") as f:
        f.write("new\tgood.wav\n")
    with open(out, "a") as f:
        f.write('{"id": "new", "units": [1, 2')
    stats = tokenize_manifest(manifest, out, extractor, workers=0, progress=False)
    assert stats["already_done"] == 2 and (stats["read"], stats["written"]) == (6, 2)
    assert sum(stats["skipped"].values()) == 4
    recs = read_jsonl(out)
    assert [r["id"] for r in recs] == ["good", "silent", "stereo", "new"]  # merged in input order
    assert recs[3]["units"] == recs[0]["units"] and recs[3]["text"] == "" and recs[3]["lang"] == ""
    assert not (out.parent / "units.jsonl.parts").exists()
    assert set(stats["skipped"]) <= set(REJECT_REASONS)

    # Resuming with another tokenizer would silently mix two unit vocabularies.
    out.write_text(out.read_text().replace("+random-init", "", 1))
    with pytest.raises(DataError, match=r"units.jsonl:1: field 'tokenizer'.*would mix"):
        tokenize_manifest(manifest, out, extractor, progress=False)


@pytest.mark.timeout(60)
def test_read_audio_reasons(assets, tmp_path):
    audio, rate = read_audio(assets[0])
    assert rate == 16000 and audio.dtype == np.float32 and audio.ndim == 1
    sf.write(tmp_path / "long.wav", np.full(16000 * 3, 0.1, dtype=np.float32), 16000)
    with pytest.raises(AudioRejected, match="too_long"):
        read_audio(tmp_path / "long.wav", AudioLimits(max_seconds=2.0))
    assert to_16k(np.zeros(22050, dtype=np.float32), 22050).shape == (16000,)


@pytest.mark.timeout(120)
def test_dedup_25hz_and_long_audio_windows(assets, extractor):
    waves = [to_16k(*read_audio(p)) for p in assets]
    units = extractor(waves)
    assert units == [extractor([w])[0] for w in waves]  # batching/padding does not change units
    deduped, durations = unit_runs(units[0])
    assert sum(durations) == len(units[0]) and np.repeat(deduped, durations).tolist() == units[0]
    assert all(a != b for a, b in zip(deduped, deduped[1:]))

    # Long audio: 2 s windows with 0.4 s overlap stand in for 30 s / 4 s so the test stays fast.
    long = torch.cat(waves)
    windowed = UnitExtractor("speech_tokenizer_v1", random_init=True, window_frames=200, overlap_frames=40)
    windows = windowed._windows(long.numel() // 160)
    assert len(windows) > 3 and windows[-1][1] == long.numel() // 160
    assert all(w[3] == nxt[2] for w, nxt in zip(windows, windows[1:])) and all(e - s <= 200 for s, e, _, _ in windows)
    assert len(windowed([long])[0]) == windowed.num_units(long.numel()) == math.ceil((long.numel() // 160) / 2)

    slow = UnitExtractor("speech_tokenizer_v1_25hz", random_init=True)
    (units_25hz,) = slow(waves[:1])
    assert abs(len(units_25hz) - 25 * waves[0].numel() / 16000) <= 1


@pytest.mark.timeout(120)
def test_weights_files_load(extractor, assets, tmp_path):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in extractor.net.state_dict().items()}
    torch.save(state, tmp_path / "s3.pt")
    save_file(state, tmp_path / "s3.safetensors")
    for name in ("s3.pt", "s3.safetensors"):
        loaded = load_s3_state_dict(tmp_path / name)
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], v) for k, v in state.items())
    wave = to_16k(*read_audio(assets[0]))
    from_file = UnitExtractor("speech_tokenizer_v1", weights=tmp_path / "s3.safetensors")
    assert from_file.label == "speech_tokenizer_v1" and from_file([wave]) == extractor([wave])
    with pytest.raises(ValueError, match="exactly one"):
        UnitExtractor()


@pytest.mark.timeout(60)
def test_manifest_errors_are_located(tmp_path):
    bad = tmp_path / "m.tsv"
    bad.write_text("a\tx.wav\nb\n")
    with pytest.raises(DataError, match=r"m.tsv:2: expected 2-4 tab-separated columns"):
        read_speech_manifest(bad)
    dup = tmp_path / "m.jsonl"
    dup.write_text('{"id": "a", "audio": "x.wav"}\n{"id": "a", "audio": "y.wav"}\n{"audio": 1}\n')
    with pytest.raises(DataError, match=r"m.jsonl:2: field 'id' duplicate id 'a' \(first on line 1\)"):
        read_speech_manifest(dup)
    dup.write_text('{"id": 3, "audio": 5}\n')
    with pytest.raises(DataError, match=r"m.jsonl:1: field 'audio' expected str, got int"):
        read_speech_manifest(dup)


@pytest.mark.timeout(120)
def test_cli(assets, tmp_path, capsys, caplog):
    manifest = tmp_path / "m.tsv"
    manifest.write_text(f"a\t{assets[0]}\thello\ten\n")
    load_tool("tokenize_speech").main(["--manifest", str(manifest), "--output", str(tmp_path / "u.jsonl"),
                                       "--random-init", "--device", "cpu", "--dedup", "--workers", "0"])
    out = capsys.readouterr()
    assert "RANDOMLY INITIALISED" in caplog.text and json.loads(out.out)["written"] == 1
    rec = read_jsonl(tmp_path / "u.jsonl")[0]
    assert rec["id"] == "a" and sum(rec["durations"]) == rec["num_frames"] == 105  # the default: 25 units/s
    assert rec["speech_tokenizer"] == {"name": "speech_tokenizer_v1_25hz", "units_per_second": 25, "num_codes": 4096,
                                       "weights": "random-init:seed=0"}  # what every later join compares


def test_benchmark_list_without_audio_column_is_refused_by_name(tmp_path):
    benchmark_list = tmp_path / "test.tsv"  # the BELLE-eval-S2S layout: questions, audio in wav/<id>.wav
    benchmark_list.write_text("id\ttext\n0\t中国有多少个省？\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"test.tsv:1: field 'audio' header \['id', 'text'\] has no 'audio'"):
        read_speech_manifest(benchmark_list)


@pytest.mark.timeout(120)
def test_onnx_backend_units_equal_torch_item_by_item(extractor, assets, tmp_path):
    """The onnxruntime backend (an export of the same net, padding mask swapped for a traceable one) gives the torch
    path's units for every item, run one by one or in padded groups on two threads; exports are cached by digest.
    A 2-layer, 256-wide S3 net keeps the export to a second; the 123M one is compared in bench/tokenize_speech.py."""
    from s3tokenizer.model import ModelConfig, S3Tokenizer
    from safetensors.torch import save_file

    from megatron_cslm.errors import CslmError
    from megatron_cslm.speech.onnx_backend import OnnxUnitExtractor, onnx_model_for, resolve_backend

    torch.manual_seed(1)
    small = copy.copy(extractor)
    small.net = S3Tokenizer("speech_tokenizer_v1", ModelConfig(n_audio_state=256, n_audio_head=4, n_audio_layer=2,
                                                               use_sdpa=True)).eval()
    embed = small.net.quantizer._codebook.embed
    embed.copy_(torch.nn.functional.normalize(torch.randn_like(embed), dim=-1))
    speech = torch.cat([to_16k(*read_audio(p)) for p in assets])
    waves = [speech[s: s + n] for s, n in ((0, 16000), (3000, 17000), (9000, 16500), (20000, 41000), (500, 7000))]
    expected = [small([w])[0] for w in waves]
    assert len(set(map(tuple, expected))) == len(waves) and len({u for e in expected for u in e}) > 20

    weights = tmp_path / "w" / "s3.safetensors"
    weights.parent.mkdir()
    save_file({k: v.contiguous() for k, v in small.net.state_dict().items()}, weights)
    path = onnx_model_for(small, weights)
    assert path.parent == weights.parent and path.name.startswith("s3.safetensors.") and path.suffix == ".onnx"
    stamp = path.stat().st_mtime_ns
    assert onnx_model_for(small, weights) == path and path.stat().st_mtime_ns == stamp  # cached, not re-exported
    random_init = onnx_model_for(small, None, cache_dir=tmp_path / "cache")
    assert random_init.parent == tmp_path / "cache" and ".random-init." in random_init.name  # keyed by its tensors

    for concurrency, max_batch in ((1, 1), (2, 3)):  # batch 1, and groups padded to their longest row
        onnx = OnnxUnitExtractor.from_torch(small, onnx_path=path, concurrency=concurrency, max_batch=max_batch)
        assert onnx(waves) == expected and onnx.label == small.label
    assert resolve_backend("auto", "cpu") == "onnx" and resolve_backend("auto", "cpu", random_init=True) == "torch"
    assert resolve_backend("auto", "cpu", model="speech_tokenizer_v2_25hz", weights="s3.pt") == "torch"
    with pytest.raises(CslmError, match="onnx runs on CPU"):
        resolve_backend("onnx", "cuda:0")
