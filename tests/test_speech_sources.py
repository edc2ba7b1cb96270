"""Speech corpora as users hold them give the units of the plain TSV route, item by item.

LibriSpeech prepared by Lhotse's own recipe, segments of a long recording (a Lhotse CutSet with offsets, and the
same cuts as Lhotse Shar), Hugging Face parquet / save_to_disk datasets with an Audio column; and bad items in
those formats are rejected with the item id and a reason while read = written + rejected. Random-init S3 model
(real architecture), clips of about a second.
"""
from __future__ import annotations

import pytest
import soundfile as sf

from megatron_cslm.fileio import DataError
from megatron_cslm.speech.extract import UnitExtractor
from megatron_cslm.speech.sharded import tokenize_speech
from megatron_cslm.speech.sources import HFAudioSource, LhotseSource, SpeechManifestSource
from tests.speech_fixtures import clips, read_jsonl, speech, write_tsv


@pytest.fixture(scope="module")
def extractor() -> UnitExtractor:
    return UnitExtractor("speech_tokenizer_v1", random_init=True)


def run(source, out, extractor) -> tuple[dict, list[dict]]:
    stats = tokenize_speech(source, out, extractor, progress=False, chunk_items=4)
    assert stats["read"] == stats["written"] + stats["skipped_total"]
    return stats, read_jsonl(out)


def units_by_id(records: list[dict]) -> dict[str, list[int]]:
    return {r["id"]: r["units"] for r in records}


@pytest.mark.timeout(180)
def test_librispeech_recipe_equals_tsv_route(extractor, tmp_path):
    from lhotse.recipes import prepare_librispeech

    corpus = tmp_path / "LibriSpeech"
    rows = []
    audio = clips(5)
    for k, wave in enumerate(audio):
        speaker, chapter, utt = (19, 198)[k % 2], 1000 + k % 2, k
        folder = corpus / "dev-clean" / str(speaker) / str(chapter)
        folder.mkdir(parents=True, exist_ok=True)
        uid = f"{speaker}-{chapter}-{utt:04d}"
        sf.write(folder / f"{uid}.flac", wave, 16000, subtype="PCM_16")
        with open(folder / f"{speaker}-{chapter}.trans.txt", "a") as f:
            f.write(f"{uid} WORDS OF UTTERANCE {utt}\n")
        rows.append((uid, str(folder / f"{uid}.flac"), f"WORDS OF UTTERANCE {utt}", "en"))
    manifests = prepare_librispeech(corpus, dataset_parts="auto", output_dir=tmp_path / "manifests")
    assert list(manifests) == ["dev-clean"]
    lhotse_source = LhotseSource(recordings=tmp_path / "manifests/librispeech_recordings_dev-clean.jsonl.gz",
                                 supervisions=tmp_path / "manifests/librispeech_supervisions_dev-clean.jsonl.gz")
    _, from_lhotse = run(lhotse_source, tmp_path / "lhotse.jsonl", extractor)
    _, from_tsv = run(SpeechManifestSource(write_tsv(tmp_path / "m.tsv", rows)), tmp_path / "tsv.jsonl", extractor)
    assert len(from_lhotse) == len(from_tsv) == 5
    assert units_by_id(from_lhotse) == units_by_id(from_tsv)
    by_id = {r["id"]: r for r in from_lhotse}
    for uid, path, text, _ in rows:
        rec = by_id[uid]
        assert rec["text"] == text and rec["lang"] == "English" and rec["speaker"] == uid.split("-")[0]
        assert rec["audio"] == path and rec["recording_id"] == uid and rec["start_s"] == 0


@pytest.mark.timeout(180)
def test_long_recording_segments_equal_their_own_wavs(extractor, tmp_path):
    from lhotse import CutSet, Recording, RecordingSet, SupervisionSegment, SupervisionSet

    long = speech(6.0)
    sf.write(tmp_path / "long.wav", long, 16000, subtype="PCM_16")
    spans = [(0.5, 1.5), (2.25, 1.75), (4.0, 1.5)]  # seconds: start, duration (whole samples at 16 kHz)
    sups = SupervisionSet.from_segments([
        SupervisionSegment(f"seg{i}", "long", start=s, duration=d, text=f"text {i}", language="zh", speaker="spk1")
        for i, (s, d) in enumerate(spans)])
    recordings = RecordingSet.from_recordings([Recording.from_file(tmp_path / "long.wav", recording_id="long")])
    cuts = CutSet.from_manifests(recordings=recordings, supervisions=sups).trim_to_supervisions()
    cuts.to_file(tmp_path / "cuts.jsonl.gz")
    rows = []
    for i, (s, d) in enumerate(spans):
        sf.write(tmp_path / f"seg{i}.wav", long[int(s * 16000): int((s + d) * 16000)], 16000, subtype="PCM_16")
        rows.append((f"seg{i}", f"seg{i}.wav"))
    _, reference = run(SpeechManifestSource(write_tsv(tmp_path / "m.tsv", rows)), tmp_path / "ref.jsonl", extractor)
    _, segments = run(LhotseSource(cuts=tmp_path / "cuts.jsonl.gz"), tmp_path / "cuts_units.jsonl", extractor)
    assert [r["id"] for r in segments] == ["seg0", "seg1", "seg2"]
    assert units_by_id(segments) == units_by_id(reference)
    assert [len(r["units"]) for r in segments] == [75, 88, 75]  # the span only, never the whole 6 s
    assert [(r["start_s"], r["recording_id"], r["text"], r["lang"], r["speaker"]) for r in segments] == [
        (s, "long", f"text {i}", "zh", "spk1") for i, (s, _) in enumerate(spans)]

    # The same cuts exported to Lhotse Shar (audio in tar shards) give the same units.
    (tmp_path / "shar").mkdir()
    cuts.to_shar(tmp_path / "shar", fields={"recording": "flac"}, shard_size=2)
    _, shar = run(LhotseSource(shar_dir=tmp_path / "shar"), tmp_path / "shar_units.jsonl", extractor)
    assert units_by_id(shar) == units_by_id(reference) and [r["text"] for r in shar] == ["text 0", "text 1", "text 2"]


def hf_dataset(tmp_path, audio: list, ids: list[str]):
    import datasets

    cells = [None if a is None else {"bytes": (tmp_path / a).read_bytes(), "path": a} for a in audio]
    ds = datasets.Dataset.from_dict({"key": ids, "audio": cells, "sentence": [f"say {i}" for i in ids],
                                     "locale": ["en"] * len(ids)})
    return ds.cast_column("audio", datasets.Audio(decode=False))


@pytest.mark.timeout(180)
def test_hf_parquet_and_save_to_disk_equal_tsv_route(extractor, tmp_path):
    rows = []
    for k, wave in enumerate(clips(4)):
        rate = 22050 if k == 1 else 16000  # one clip resampled on the way, as the TSV route does
        if rate != 16000:
            import torch
            import torchaudio.functional as AF

            wave = AF.resample(torch.from_numpy(wave), 16000, rate).numpy()
        sf.write(tmp_path / f"c{k}.flac", wave, rate)
        rows.append((f"c{k}", f"c{k}.flac"))
    _, reference = run(SpeechManifestSource(write_tsv(tmp_path / "m.tsv", rows)), tmp_path / "ref.jsonl", extractor)
    ds = hf_dataset(tmp_path, [a for _, a in rows], [i for i, _ in rows])
    (tmp_path / "parquet").mkdir()
    ds.to_parquet(tmp_path / "parquet" / "train-00000.parquet")
    ds.save_to_disk(tmp_path / "saved")
    columns = dict(id_column="key", text_column="sentence", lang_column="locale", cache_dir=str(tmp_path / "cache"))
    _, from_parquet = run(HFAudioSource(tmp_path / "parquet", **columns), tmp_path / "pq.jsonl", extractor)
    _, from_disk = run(HFAudioSource(tmp_path / "saved", **columns), tmp_path / "disk.jsonl", extractor)
    assert units_by_id(from_parquet) == units_by_id(from_disk) == units_by_id(reference)
    assert [(r["id"], r["text"], r["lang"], r["speaker"]) for r in from_parquet] == [
        (f"c{k}", f"say c{k}", "en", "") for k in range(4)]


@pytest.mark.timeout(180)
def test_bad_items_rejected_with_id_and_reason(extractor, tmp_path):
    from lhotse import CutSet, MonoCut, Recording

    good = clips(1)[0]
    sf.write(tmp_path / "good.wav", good, 16000, subtype="PCM_16")
    (tmp_path / "text.wav").write_text("not audio\n")
    ok = Recording.from_file(tmp_path / "good.wav", recording_id="good")
    unreadable = Recording.from_dict({**ok.to_dict(), "id": "unreadable", "sources": [
        {"type": "file", "channels": [0], "source": str(tmp_path / "missing.wav")}]})
    wrong_rate = Recording.from_dict({**ok.to_dict(), "id": "rate8k", "sampling_rate": 8000,
                                      "num_samples": good.size // 2, "duration": good.size / 16000})
    cuts = CutSet.from_cuts([
        MonoCut("cut-good", start=0.1, duration=0.5, channel=0, recording=ok),
        MonoCut("cut-unreadable", start=0, duration=0.5, channel=0, recording=unreadable),
        MonoCut("cut-past-end", start=0.5, duration=ok.duration, channel=0, recording=ok),
        MonoCut("cut-rate", start=0, duration=0.5, channel=0, recording=wrong_rate),
    ])
    cuts.to_file(tmp_path / "bad_cuts.jsonl")
    stats, recs = run(LhotseSource(cuts=tmp_path / "bad_cuts.jsonl"), tmp_path / "out.jsonl", extractor)
    assert [r["id"] for r in recs] == ["cut-good"] and len(recs[0]["units"]) == 25
    assert (stats["read"], stats["written"], stats["skipped"]) == (
        4, 1, {"unreadable": 1, "past_end": 1, "rate_mismatch": 1})
    rejects = [line.split("\t") for line in (tmp_path / "out.jsonl.rejects.tsv").read_text().splitlines()]
    assert [(r[0], r[2]) for r in rejects[1:]] == [("cut-unreadable", "unreadable"), ("cut-past-end", "past_end"),
                                                    ("cut-rate", "rate_mismatch")]
    assert "8000 Hz" in rejects[3][3] and "16000 Hz" in rejects[3][3] and "missing.wav" in rejects[1][3]

    # HF: a row without audio is rejected by id; a dataset without the audio column stops before any work.
    ds = hf_dataset(tmp_path, ["good.wav", None, "text.wav"], ["a", "b", "c"])
    ds.save_to_disk(tmp_path / "saved")
    source = HFAudioSource(tmp_path / "saved", id_column="key")
    stats, recs = run(source, tmp_path / "hf.jsonl", extractor)
    assert [r["id"] for r in recs] == ["a"] and stats["skipped"] == {"missing_audio": 1, "wrong_format": 1}
    rejects = (tmp_path / "hf.jsonl.rejects.tsv").read_text().splitlines()
    assert [line.split("\t")[:3] for line in rejects[1:]] == [["b", f"{tmp_path / 'saved'}#1", "missing_audio"],
                                                             ["c", f"{tmp_path / 'saved'}#2", "wrong_format"]]
    with pytest.raises(DataError, match=r"saved: field 'speech' no audio column 'speech'; the dataset has "
                                        r"\['key', 'audio', 'sentence', 'locale'\]"):
        HFAudioSource(tmp_path / "saved", audio_column="speech", id_column="key")
