"""`cslm align-words`: CTC forced alignment gives the SFT chunker word timestamps in the record's unit indices.

Shown here: exact recovery of known word boundaries from emissions whose best path is given (raw and
deduplicated units, English letters with the word delimiter and Chinese characters); and a run on real speech (the
two 16 kHz wavs s3tokenizer ships) with a randomly initialised tiny Wav2Vec2ForCTC written to disk with its
processor: sharded over two SLURM-style shards, merged, resumed, an unspellable word left to the proportional
cut and counted, and the result consumed by `build_sft_data`.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import soundfile as sf
import torch

from megatron_cslm.data.chunking import chunk_answer, raw_to_dedup, unit_runs
from megatron_cslm.speech.align import CtcVocab, frames_to_units, tile_words, transcript_words, word_start_frames
from megatron_cslm.speech.identity import IDENTITY_KEY, SpeechTokenizerId, random_init_tag

CHARS = list("abcdefghijklmnopqrstuvwxyz'") + list("甚至出现交易几乎停滞的情况一二线城市虽然也处于调整中")
ZH_TEXT = {"BAC009S0764W0121": "甚至出现交易几乎停滞的情况。", "BAC009S0764W0122": "一二线城市虽然也处于调整中。"}
IDENTITY = SpeechTokenizerId.s3("speech_tokenizer_v1_25hz", random_init_tag(0))


def ctc_labels() -> dict[str, int]:
    return {"<pad>": 0, "<unk>": 1, "|": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}


def emissions_for(text: str, vocab: CtcVocab, word_units: list[int], n_units: int, frames_per_unit: int = 2,
                  seed: int = 0) -> torch.Tensor:
    """Log-probabilities whose best path emits word k's labels from frame `frames_per_unit * word_units[k]` on,
    each label for 1-2 frames with blanks after, delimiters in the pause before a word; noise elsewhere."""
    rng = random.Random(seed)
    words = transcript_words(text)
    n_frames = n_units * frames_per_unit
    path = [vocab.blank] * n_frames
    for k, word in enumerate(words):
        t = word_units[k] * frames_per_unit
        end = (word_units[k + 1] if k + 1 < len(words) else n_units) * frames_per_unit
        if k and vocab.delimiter is not None and not ("\u4e00" <= word <= "\u9fff"):
            path[t - 1] = vocab.delimiter  # the previous word's pause holds the delimiter
        labels = vocab.spell(word)
        for j, label in enumerate(labels):
            repeat = rng.choice((1, 2)) if t + 2 * (len(labels) - j) < end else 1
            path[t:t + repeat] = [label] * repeat
            t += repeat + 1  # a blank between labels (needed between repeated letters)
        assert t <= end + 1, "the test utterance leaves each word enough frames"
    logits = torch.randn(n_frames, max(vocab.labels.values()) + 1, generator=torch.Generator().manual_seed(seed))
    logits[torch.arange(n_frames), torch.tensor(path)] += 8.0
    return torch.log_softmax(logits, dim=-1)


@pytest.mark.parametrize("text, lang", [("Hello, the small world; all ballots tally!", "en"),
                                        ("一二线城市，虽然也处于调整中。", "zh")])
def test_known_path_gives_exact_word_boundaries_raw_and_dedup(text, lang):
    vocab = CtcVocab.from_labels(ctc_labels(), blank=0)
    assert vocab.case == "lower" and vocab.delimiter == 2
    words = transcript_words(text)
    rng = random.Random(1)
    lengths = [rng.randint(2 * len(w) + 3, 2 * len(w) + 9) for w in words]  # units per word, pauses included
    starts = [sum(lengths[:k]) for k in range(len(words))]
    n_units = sum(lengths)
    truth = [{"word": w, "start": s, "end": s + n} for w, s, n in zip(words, starts, lengths)]
    log_probs = emissions_for(text, vocab, starts, n_units)

    frames = word_start_frames(log_probs, vocab, words)
    got = tile_words(words, frames_to_units(frames, 0.02, 25, n_units), n_units)  # 50 CTC frames/s, 25 units/s
    assert got == truth

    # Deduplicated units: the same boundaries through the run lengths, and the chunker cuts identically from
    # raw timestamps + dedup and from deduplicated timestamps.
    units = [rng.randrange(3) for _ in range(n_units)]
    merged, durations = unit_runs(units)
    dedup_words = tile_words(words, frames_to_units(frames, 0.02, 25, n_units, durations), len(merged))
    assert [w["start"] for w in dedup_words] == raw_to_dedup(durations, [w["start"] for w in truth])
    assert dedup_words[-1]["end"] == len(merged)
    via_raw = chunk_answer(text, units, words=truth, target=3, dedup=True)
    via_dedup = chunk_answer(text, merged, words=dedup_words, target=3)
    assert via_raw == via_dedup and len(via_raw) > 1
    assert [c.units for c in via_raw] != [c.units for c in chunk_answer(text, units, target=3, dedup=True)]


def test_unspellable_words_are_named():
    vocab = CtcVocab.from_labels(ctc_labels(), blank=0)
    assert vocab.spell("Don't!") == [ctc_labels()[c] for c in "don't"]  # case-folded, unknown punctuation dropped
    with pytest.raises(ValueError, match=r"no label for '5'") as e:
        vocab.spell("5G")
    assert e.value.reason == "unspellable"


# ------------------------------------------------------------------------------------------ real speech


@pytest.fixture(scope="module")
def ctc_model(tmp_path_factory) -> Path:
    """A randomly initialised 1-layer Wav2Vec2ForCTC (hidden 32) with its character vocabulary and processor."""
    from transformers import (
        Wav2Vec2Config,
        Wav2Vec2CTCTokenizer,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2ForCTC,
        Wav2Vec2Processor,
    )

    out = tmp_path_factory.mktemp("ctc")
    (out / "vocab.json").write_text(json.dumps(ctc_labels(), ensure_ascii=False), encoding="utf-8")
    tokenizer = Wav2Vec2CTCTokenizer(str(out / "vocab.json"), unk_token="<unk>", pad_token="<pad>",
                                     word_delimiter_token="|")
    features = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True)
    Wav2Vec2Processor(feature_extractor=features, tokenizer=tokenizer).save_pretrained(out)
    torch.manual_seed(0)
    config = Wav2Vec2Config(vocab_size=len(ctc_labels()), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64, conv_dim=(16,) * 7, num_conv_pos_embeddings=16,
                            num_conv_pos_embedding_groups=2, pad_token_id=0)
    Wav2Vec2ForCTC(config).save_pretrained(out)
    return out


def units_record(id_: str, audio: Path, text: str, seconds: float, dedup: bool) -> dict:
    """A record as `cslm tokenize-speech` writes it (25 units/s; the unit values do not matter to alignment)."""
    units = [(7 * (i // 3)) % 4096 for i in range(round(seconds * 25))]
    rec = {"id": id_, "audio": audio.name, "text": text, "lang": "zh", "speaker": ""}
    if dedup:
        merged, durations = unit_runs(units)
        rec.update(units=merged, durations=durations)
    else:
        rec["units"] = units
    return {**rec, "num_frames": len(units), "sample_rate": 16000, "tokenizer": IDENTITY.name,
            "duration_s": round(seconds, 4), IDENTITY_KEY: IDENTITY.to_dict()}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_real_speech_sharded_resumed_and_consumed_by_sft(ctc_model, tmp_path, speech_tokenizer, capsys):
    import s3tokenizer

    from megatron_cslm.cli import run_tool
    from megatron_cslm.cli.align_words import main
    from megatron_cslm.data.sft import SFTConfig, build_sft_data

    records = []
    for wav in sorted((Path(s3tokenizer.__file__).parent / "assets").glob("*.wav")):
        (tmp_path / wav.name).write_bytes(wav.read_bytes())
        seconds = sf.info(wav).duration
        records += [units_record(wav.stem, tmp_path / wav.name, ZH_TEXT[wav.stem], seconds, dedup=False),
                    units_record(wav.stem + "-dedup", tmp_path / wav.name, ZH_TEXT[wav.stem], seconds, dedup=True)]
    records.append(units_record("spelled-5", tmp_path / wav.name, "一二线城市5G", seconds, dedup=False))
    source, output = tmp_path / "units.jsonl", tmp_path / "words.jsonl"
    source.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    argv = ["--input", str(source), "--output", str(output), "--ctc-model", str(ctc_model), "--no-progress",
            "--device", "cpu"]

    first = main(argv + ["--shard-index", "0", "--num-shards", "2"])
    assert first["merged"] is False and not output.exists()  # shard 1 has not run
    merged = main(argv + ["--shard-index", "1", "--num-shards", "2"])  # the last shard merges
    assert merged["read"] == 5 == merged["aligned"] + merged["unaligned_total"] == merged["written"]
    assert merged["unaligned"] == {"unspellable": 1}
    out = read_jsonl(output)
    assert [r["id"] for r in out] == [r["id"] for r in records]
    assert {k: v for k, v in out[0].items() if k != "words"} == records[0]  # the record itself is unchanged
    for rec in out[:4]:
        words = rec["words"]
        assert [w["word"] for w in words] == list(ZH_TEXT[rec["id"].split("-")[0]].rstrip("。"))
        assert words[0]["start"] == 0 and words[-1]["end"] == len(rec["units"])
        assert all(a["end"] == b["start"] and a["start"] <= a["end"] for a, b in zip(words, words[1:]))
    raw, dedup = out[0], out[1]  # the same audio: deduplicated timestamps are the raw ones through the runs
    assert [w["start"] for w in dedup["words"]] == raw_to_dedup(dedup["durations"], [w["start"] for w in raw["words"]])
    assert "words" not in out[4]
    unaligned = (tmp_path / "words.jsonl.unaligned.tsv").read_text(encoding="utf-8").splitlines()
    assert unaligned[1].split("\t")[:3] == ["spelled-5", records[4]["audio"], "unspellable"] and "'5'" in unaligned[1]

    again = main(argv)  # resume: nothing left to align, the same output
    assert again["already_done"] == 5 and again["read"] == 0 and read_jsonl(output) == out

    # The SFT builder cuts the aligned answer at its word starts and the unaligned one proportionally.
    dialogue = [{"id": f"d{k}", "lang": "zh", "turns": [
        {"role": "user", "text": out[2]["text"], "units": out[2]["units"]},
        {"role": "assistant", **{f: answer[f] for f in ("text", "units", "words") if f in answer}}]}
        for k, answer in enumerate((out[0], out[4]))]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in dialogue),
                                        encoding="utf-8")
    stats = build_sft_data([tmp_path / "sft.jsonl"], speech_tokenizer, SFTConfig(chunk_words=4),
                           tmp_path / "sft", seq_length=1024, progress=False)
    assert stats["answer_cuts"] == {"aligned": 1, "proportional": 1}
    chunks = chunk_answer(raw["text"], raw["units"], words=raw["words"], target=4)
    starts = {w["start"] for w in raw["words"]}
    bounds = [sum(len(c.units) for c in chunks[:k]) for k in range(1, len(chunks))]
    assert len(chunks) > 1 and all(b in starts for b in bounds)

    # Bad input stops with one line naming file, line and field.
    bad = dict(records[1], durations=records[1]["durations"][:-1])
    source.write_text(json.dumps(records[0]) + "\n" + json.dumps(bad) + "\n", encoding="utf-8")
    output.unlink()
    capsys.readouterr()
    assert run_tool(main, argv) == 1
    assert f"error: {source}:2: field 'durations' must be" in capsys.readouterr().err
