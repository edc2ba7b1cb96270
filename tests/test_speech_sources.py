"""Speech corpora as users hold them give the units of the plain TSV route, item by item.

LibriSpeech prepared by Lhotse's own recipe, segments of a long recording (a Lhotse CutSet with offsets, and the
same cuts as Lhotse Shar), Hugging Face parquet / save_to_disk datasets with an Audio column; and bad items in
those formats are rejected with the item id and a reason while read = written + rejected. Corpora as
WenetSpeech/GigaSpeech users hold them (segments a few ms past their recording, supervisions without a
recording, undecodable files) are clipped or rejected alike on every Lhotse route, and whole-input mistakes stop
with one line before anything is written. Random-init S3 model (real architecture), clips of about a second.
"""
from __future__ import annotations

import pytest
import soundfile as sf

from megatron_cslm.fileio import DataError
from megatron_cslm.speech.extract import UnitExtractor
from megatron_cslm.speech.sharded import tokenize_speech
from megatron_cslm.speech.sources import HFAudioSource, LhotseSource, SpeechManifestSource
from tests.helpers.cli import assert_fails, earlier, unchanged
from tests.helpers.cli import run as run_cli
from tests.helpers.files import read_jsonl, write_tsv
from tests.helpers.speech import clips, speech


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


# ------------------------------------------- corpora as WenetSpeech/GigaSpeech users hold them (issue 23, part 6)


def segment_corpus(tmp_path) -> tuple[list, list]:
    """Recordings r1 (1.0 s), r2 (0.5 s) and r3 (a FLAC cut off after its header), and supervisions as large
    corpora have them: one inside r1, one ending 20 ms past r1's end, one 0.3 s past r2's end, one whose
    recording is not in the manifest, one on the cut-off file. Written as Lhotse recordings + supervisions."""
    from lhotse import Recording, RecordingSet, SupervisionSegment, SupervisionSet

    audio = speech(1.5)
    for k, wave in ((1, audio[:16000]), (2, audio[16000:24000]), (3, audio[:16000])):
        sf.write(tmp_path / f"r{k}.flac", wave, 16000)
    recs = [Recording.from_file(tmp_path / f"r{k}.flac", recording_id=f"r{k}") for k in (1, 2, 3)]
    data = (tmp_path / "r3.flac").read_bytes()
    (tmp_path / "r3.flac").write_bytes(data[: len(data) // 3])  # a cut-off download: the header still reads
    sups = [SupervisionSegment("ok", "r1", start=0.0, duration=0.6, text="inside"),
            SupervisionSegment("clip", "r1", start=0.5, duration=0.52, text="20 ms past the end"),
            SupervisionSegment("far", "r2", start=0.2, duration=0.6, text="0.3 s past the end"),
            SupervisionSegment("norec", "r9", start=0.0, duration=0.5, text="no such recording"),
            SupervisionSegment("broken", "r3", start=0.1, duration=0.8, text="cut-off file")]
    RecordingSet.from_recordings(recs).to_file(tmp_path / "recordings.jsonl.gz")
    SupervisionSet.from_segments(sups).to_file(tmp_path / "supervisions.jsonl.gz")
    return recs, sups


@pytest.mark.timeout(180)
def test_corpus_faults_are_rejects_or_clips_and_every_supervision_counts(extractor, tmp_path, caplog):
    """A segment a few ms past its recording is clipped and counted; one far past it, one without a recording and
    one on an undecodable file are rejects with a reason and one short line; read = written + rejected over every
    supervision given; a one-process run logs no second copy of the totals that the tool prints."""
    import logging

    from megatron_cslm.speech.audio import CAUSE_CHARS

    segment_corpus(tmp_path)
    out = tmp_path / "units.jsonl"
    source = LhotseSource(recordings=tmp_path / "recordings.jsonl.gz", supervisions=tmp_path / "supervisions.jsonl.gz")
    with caplog.at_level(logging.INFO, logger="megatron_cslm"):
        stats, _ = run(source, out, extractor)
    assert not [r.getMessage() for r in caplog.records if "read=" in r.getMessage()]
    assert (stats["read"], stats["written"], stats["skipped"], stats["clipped_to_end"]) == (
        5, 2, {"past_end": 1, "missing_recording": 1, "unreadable": 1}, 1)
    records = {r["id"]: r for r in read_jsonl(out)}
    assert list(records) == ["ok", "clip"] and "clipped_to_end_s" not in records["ok"]
    assert (records["clip"]["clipped_to_end_s"], records["clip"]["duration_s"]) == (0.02, 0.5)
    rejects = [line.split("\t") for line in (tmp_path / "units.jsonl.rejects.tsv").read_text().splitlines()[1:]]
    assert [(r[0], r[2]) for r in rejects] == [("far", "past_end"), ("norec", "missing_recording"),
                                               ("broken", "unreadable")]
    assert "'r9' is not in" in rejects[1][3]
    broken = rejects[2][3]  # Lhotse's message is ~1.2 kB over 6 lines (every backend tried, every call)
    assert broken.startswith(f"{tmp_path / 'r3.flac'}: AudioLoadingError: ") and "LibsndfileError" in broken
    assert len(broken) <= len(str(tmp_path / "r3.flac")) + 2 + CAUSE_CHARS, broken


def outcomes(source) -> dict[str, tuple]:
    """id -> (seconds to tokenize, seconds clipped) or (reject reason,), from reading the manifests only."""
    from megatron_cslm.speech.audio import AudioRejected

    return {item.id: (item.ref.reason,) if isinstance(item.ref, AudioRejected) else
            (round(item.ref.duration, 3), item.extra.get("clipped_to_end_s")) for item in source}


def test_past_end_tolerance_is_the_same_on_every_lhotse_route(tmp_path):
    """Recordings + supervisions, a CutSet trimmed to its supervisions, the same as Shar, and one cut per segment
    clip and reject the same segments; the tolerance (--past-end-tolerance) moves the line."""
    from lhotse import CutSet, MonoCut

    recs, sups = segment_corpus(tmp_path)
    whole = CutSet.from_cuts([MonoCut(r.id, 0, r.duration, 0, recording=r,
                                      supervisions=[s for s in sups if s.recording_id == r.id]) for r in recs[:2]])
    whole.to_file(tmp_path / "whole.jsonl.gz")
    (tmp_path / "shar").mkdir()
    whole.to_shar(tmp_path / "shar", fields={"recording": "flac"}, shard_size=1)
    by_id = {r.id: r for r in recs}
    CutSet.from_cuts([MonoCut(s.id, s.start, s.duration, 0, recording=by_id[s.recording_id]) for s in sups[:3]]
                     ).to_file(tmp_path / "segments.jsonl.gz")
    expected = {"ok": (0.6, None), "clip": (0.5, 0.02), "far": ("past_end",)}
    pair = outcomes(LhotseSource(recordings=tmp_path / "recordings.jsonl.gz",
                                 supervisions=tmp_path / "supervisions.jsonl.gz"))
    assert pair == {**expected, "norec": ("missing_recording",), "broken": (0.8, None)}
    assert outcomes(LhotseSource(cuts=tmp_path / "whole.jsonl.gz", trim_to_supervisions=True)) == expected
    assert outcomes(LhotseSource(shar_dir=tmp_path / "shar", trim_to_supervisions=True)) == expected
    assert outcomes(LhotseSource(cuts=tmp_path / "segments.jsonl.gz")) == expected
    assert outcomes(LhotseSource(cuts=tmp_path / "segments.jsonl.gz", past_end_tolerance=0)) == {
        **expected, "clip": ("past_end",)}
    assert outcomes(LhotseSource(cuts=tmp_path / "segments.jsonl.gz", past_end_tolerance=0.5))["far"] == (0.3, 0.3)


def test_whole_input_mistakes_stop_with_one_line_and_write_nothing(tmp_path, capsys):
    """Each mistake in the input as a whole: its exit code (io 5, data 1, usage 2), one line, no traceback, the
    earlier output byte-identical and no part files: nothing was tokenized."""
    import gzip

    from megatron_cslm.cli.tokenize_speech import main

    segment_corpus(tmp_path)
    recordings, supervisions = tmp_path / "recordings.jsonl.gz", tmp_path / "supervisions.jsonl.gz"
    truncated = tmp_path / "truncated.jsonl.gz"
    truncated.write_bytes(gzip.compress(gzip.decompress(supervisions.read_bytes()) * 20)[:-40])
    (tmp_path / "empty_shar").mkdir()
    out = tmp_path / "out" / "units.jsonl"
    before = earlier(out)
    base = ["--output", out, "--random-init", "--device", "cpu", "--workers", "0", "--no-progress"]
    for args, code, fragment in [
        (["--manifest", tmp_path / "missing.tsv"], 5, "missing.tsv: field '--manifest' does not exist"),
        (["--lhotse-cuts", tmp_path / "missing.jsonl.gz"], 5, "field '--lhotse-cuts' does not exist"),
        (["--hf-dataset", tmp_path / "missing_dataset"], 5, "field '--hf-dataset' does not exist"),
        (["--lhotse-cuts", truncated], 1, "truncated.jsonl.gz: field '--lhotse-cuts' is truncated or corrupt"),
        (["--lhotse-recordings", recordings, "--lhotse-supervisions", truncated], 1,
         "field '--lhotse-supervisions' is truncated or corrupt (EOFError: "),
        (["--lhotse-shar", tmp_path / "empty_shar"], 1, "empty_shar: field '--lhotse-shar' is not a Lhotse Shar"),
        (["--lhotse-recordings", supervisions, "--lhotse-supervisions", recordings], 2,
         "swap --lhotse-recordings and --lhotse-supervisions"),
        (["--lhotse-cuts", supervisions], 2, "holds a SupervisionSet, not a CutSet"),
    ]:
        assert_fails(run_cli(main, args + base, capsys), code, fragment)
        unchanged(before)
        assert not (tmp_path / "out" / "units.jsonl.parts").exists(), args
