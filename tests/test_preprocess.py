"""JSONL -> megatron-core .bin/.idx: exact read-back, loss masks, GPTDataset, worker-count invariance, bad records."""
from __future__ import annotations

import gzip
import importlib.util
import json
import random
from pathlib import Path

import numpy as np
import pytest

from megatron_cslm.data import indexed as indexed_data
from megatron_cslm.data.indexed import encode_document, iter_shard_lines, parse_line, plan_input_shards, preprocess
from megatron_cslm.fileio import DataError
from megatron_cslm.text.tokenizer import SpeechTextTokenizer


def load_tool(name: str):
    """tools/ holds scripts, not a package: load one as a module to call its main(argv) in-process."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

TEXT = {"en": ["Please repeat after me.", "The weather is nice today.", "What is machine learning?"],
        "zh": ["请跟我读。", "今天天气很好。", "什么是机器学习？"]}


def make_records(n: int, seed: int, num_units: int = 4096) -> list[dict]:
    """ASR/TTS/dialogue-like documents; every 5th masks its first (prompt) segment, every 7th is plain text."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        lang = rng.choice(["en", "zh"])
        if i % 7 == 3:
            records.append({"text": rng.choice(TEXT[lang]), "lang": lang})
            continue
        units = {"units": [rng.randrange(num_units) for _ in range(rng.randint(1, 60))]}
        text = {"text": rng.choice(TEXT[lang])}
        segments = [units, text] if i % 2 else [text, units, {"text": "[answer]" + rng.choice(TEXT[lang])}]
        if i % 5 == 0:
            segments[0] = {**segments[0], "loss": False}
        records.append({"segments": segments, "source": "asr" if i % 2 else "tts", "lang": lang})
    return records


def expected_ids(tok: SpeechTextTokenizer, rec: dict, eod: bool) -> tuple[list[int], list[int]]:
    """Ids and loss mask built independently of the tool, from the tokenizer's public API."""
    ids, mask = [], []
    for seg in rec.get("segments", [{"text": rec.get("text")}]):
        seg_ids = tok.encode_units(seg["units"]) if "units" in seg else tok.encode_text(seg["text"])
        ids += seg_ids
        mask += [int(seg.get("loss", True))] * len(seg_ids)
    if eod:
        ids.append(tok.eod_id)
        mask.append(1)
    return ids, mask


def write_jsonl(path: Path, records: list[dict]) -> Path:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[list[Path], list[dict]]:
    d = tmp_path_factory.mktemp("corpus")
    a, b, c = make_records(150, 1), make_records(40, 2), make_records(120, 3)
    return [write_jsonl(d / "a.jsonl", a), write_jsonl(d / "b.jsonl.gz", b), write_jsonl(d / "c.jsonl", c)], a + b + c


@pytest.mark.timeout(120)
def test_read_back_equals_every_record(speech_tokenizer, corpus, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tok = speech_tokenizer
    paths, records = corpus
    stats = preprocess([str(p) for p in paths], tmp_path / "ds", tok, append_eod=True, progress=False)
    ds, masks = IndexedDataset(str(tmp_path / "ds")), IndexedDataset(str(tmp_path / "ds_lossmask"))
    assert ds.index.dtype == np.int32 and masks.index.dtype == np.uint8  # 132,356 ids need more than uint16
    assert len(ds) == len(masks) == len(records) and list(ds.document_indices) == list(range(len(records) + 1))
    expected = [expected_ids(tok, r, eod=True) for r in records]
    for i, (ids, mask) in enumerate(expected):
        assert ds[i].tolist() == ids and masks[i].tolist() == mask
    flat = np.concatenate([ids for ids, _ in expected])
    units = int(sum(tok.is_unit(i) for i in flat))
    specials = int(np.count_nonzero(flat >= tok.sosp_id))
    assert stats["documents"] == stats["read"] == stats["written"] == len(records) and stats["skipped_total"] == 0
    assert (stats["tokens"], stats["unit_tokens"], stats["special_tokens"], stats["text_tokens"]) == \
        (flat.size, units, specials, flat.size - units - specials)
    assert stats["masked_tokens"] == sum(m.count(0) for _, m in expected) > 0 and stats["loss_mask"]
    sources = [r.get("source", "") for r in records]
    assert stats["by_source"]["asr"]["documents"] == sources.count("asr")
    assert sum(v["tokens"] for v in stats["by_source"].values()) == flat.size
    assert stats["by_lang"] == {lang: [r["lang"] for r in records].count(lang) for lang in ("en", "zh")}
    assert json.loads((tmp_path / "ds.stats.json").read_text(encoding="utf-8")) == stats
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds.bin", "ds.idx", "ds.meta.json", "ds.stats.json",
                                                          "ds_lossmask.bin", "ds_lossmask.idx"]  # no temporaries left

    # Same prefix again, without loss masks and EOD: the stale mask must not survive next to the new data.
    unmasked = [r for r in records if all(s.get("loss", True) for s in r.get("segments", []))]
    stats = preprocess([str(write_jsonl(tmp_path / "unmasked.jsonl", unmasked))], tmp_path / "ds", tok,
                       append_eod=False, progress=False)
    assert not stats["loss_mask"] and not (tmp_path / "ds_lossmask.idx").exists()
    ds = IndexedDataset(str(tmp_path / "ds"))
    assert len(ds) == len(unmasked) and ds[5].tolist() == expected_ids(tok, unmasked[5], eod=False)[0]


@pytest.mark.timeout(120)
def test_two_workers_byte_identical_to_one(speech_tokenizer, corpus, tmp_path):
    paths, _ = corpus
    pattern = str(paths[0].parent / "*.jsonl*")  # glob: a.jsonl, b.jsonl.gz, c.jsonl (sorted)
    one = preprocess([pattern], tmp_path / "one", speech_tokenizer, workers=1, append_eod=True, progress=False)
    # 2 KiB shards: plain files split into many byte ranges, the .gz file stays whole.
    two = preprocess([pattern], tmp_path / "two", speech_tokenizer, workers=2, append_eod=True, shard_bytes=2048,
                     progress=False)
    assert len(plan_input_shards([str(p) for p in paths], 2048)) > 20
    for suffix in (".bin", ".idx", "_lossmask.bin", "_lossmask.idx"):
        assert (tmp_path / f"one{suffix}").read_bytes() == (tmp_path / f"two{suffix}").read_bytes(), suffix
    assert {k: v for k, v in one.items() if k != "output_prefix"} == {k: v for k, v in two.items()
                                                                       if k != "output_prefix"}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("scan_block", [333, 1 << 24])  # small: cuts and line counts straddle read blocks
def test_shards_start_on_the_lines_they_number(corpus, scan_block, monkeypatch):
    monkeypatch.setattr(indexed_data, "_SCAN_BLOCK", scan_block)
    path = str(corpus[0][0])
    lines = Path(path).read_bytes().splitlines(keepends=True)
    offsets = np.cumsum([0] + [len(x) for x in lines])
    for shard_bytes in (1, 1000, 10**9):
        shards = plan_input_shards([path], shard_bytes)
        assert shards[0].start == 0 and shards[-1].end is None
        for shard, nxt in zip(shards, shards[1:] + [None]):
            assert offsets[shard.first_line - 1] == shard.start
            assert shard.end == (nxt.start if nxt else None)
        assert [raw for s in shards for _, raw in iter_shard_lines(s)] == lines


@pytest.mark.timeout(120)
def test_gpt_dataset_builds_samples(speech_tokenizer, corpus, tmp_path):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.tokenizers import MegatronTokenizer

    paths, records = corpus
    preprocess([str(p) for p in paths], tmp_path / "ds", speech_tokenizer, append_eod=True, progress=False)
    speech_tokenizer.save_pretrained(tmp_path / "tok")
    # megatron-core's own HF tokenizer wrapper loads the saved directory unchanged.
    mtok = MegatronTokenizer.from_pretrained(tokenizer_path=str(tmp_path / "tok"),
                                             metadata_path={"library": "huggingface"})
    assert (mtok.vocab_size, mtok.eod) == (speech_tokenizer.vocab_size, speech_tokenizer.eod_id)
    config = GPTDatasetConfig(random_seed=1234, sequence_length=32, blend=([str(tmp_path / "ds")], None),
                              split="1,0,0", tokenizer=mtok, reset_position_ids=False, reset_attention_mask=False,
                              eod_mask_loss=False, path_to_cache=str(tmp_path / "cache"))
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [50, None, None], lambda: True, config).build()
    assert len(train) >= 50
    # Every sample is a window of the documents concatenated in the dataset's shuffled document order.
    docs = [expected_ids(speech_tokenizer, r, eod=True)[0] for r in records]
    stream = np.concatenate([docs[d] for d in train.document_index])
    starts = np.cumsum([0] + [len(docs[d]) for d in train.document_index])
    for i in range(50):
        sample = train[i]
        pos, offset = train.sample_index[train.shuffle_index[i]]
        window = stream[starts[pos] + offset: starts[pos] + offset + 33]
        assert sample["tokens"].tolist() == window[:-1].tolist() and sample["labels"].tolist() == window[1:].tolist()


@pytest.mark.timeout(60)
def test_parse_line_unit_fast_path_equals_json():
    lines = [b'{"segments": [{"text": "a"}, {"units": [1, 22, 333]}, {"units": [4]}], "lang": "en"}',
             b'{"segments":[{"units":[5,6,7]},{"text":"b"}]}',  # compact separators
             b'{"segments": [{"units" : [1, 2]}]}',  # unusual spacing: plain json.loads
             b'{"segments": [{"units": [1,  2]}, {"units": [3 ,4]}, {"units": [ 5]}]}',
             b'{"segments": [{"text": "a"}], "units": [9, 9]}',  # "units" outside segments
             b'{"segments": [{"text": "x", "meta": {"units": [1]}}, {"units": [2]}]}',
             json.dumps({"segments": [{"text": 'say "units": [1, 2]'}, {"units": [3]}]}).encode(),
             json.dumps({"segments": [{"units": "\x000"}, {"units": [3]}]}).encode(),  # NUL: no fast path
             b'{"text": "plain"}']
    for raw in lines:
        record = parse_line(raw, "f.jsonl", 1)
        for seg in record.get("segments", []):
            if isinstance(seg.get("units"), np.ndarray):
                assert seg["units"].dtype == np.int64
                seg["units"] = seg["units"].tolist()
        assert record == json.loads(raw), raw
    for raw in (b'{"segments": [{"units": [1, 2]}, {"text": "a"}', b'{"segments": [{"units": [1,,2]}]}'):
        with pytest.raises(DataError, match="f.jsonl:7: malformed JSON"):
            parse_line(raw, "f.jsonl", 7)


BAD_LINES = [  # (line, skip reason, field, message)
    (b'{"segments": [{"text": "ok"}, \n', "malformed_json", None, "malformed JSON"),
    (b'{"text": "caf\xe9"}\n', "not_utf8", None, "not valid UTF-8"),
    (b'[1, 2]\n', "malformed_json", None, "expected a JSON object"),
    (b'{"segments": [{"text": "a"}, {"units": [5, 4096]}]}\n', "bad_units", "segments[1].units", "out of range"),
    (b'{"segments": [{"units": [5, "6"]}]}\n', "bad_units", "segments[0].units", "integers"),
    (b'{"text": ""}\n', "empty", "text", "non-empty"),
    (b'{"segments": []}\n', "empty", "segments", "empty list"),
    (b'{"source": "asr"}\n', "missing_field", "segments", "missing"),
    (b'{"segments": [{"txt": "a"}]}\n', "missing_field", "segments[0]", "'text' or a 'units'"),
    (b'{"segments": [{"text": "a", "loss": 0}]}\n', "wrong_type", "segments[0].loss", "expected bool"),
    (b'{"text": "a", "source": 3}\n', "wrong_type", "source", "expected str"),
]


@pytest.mark.timeout(120)
def test_bad_records_are_located_or_counted(speech_tokenizer, tmp_path):
    good = [json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in make_records(60, 4)]
    for k, (line, reason, field, message) in enumerate(BAD_LINES):
        path = tmp_path / f"bad{k}.jsonl"
        path.write_bytes(b"".join(good[:50]) + line + b"".join(good[50:]))
        # 2 workers and 512-byte shards: the line number must still be global to the file.
        with pytest.raises(DataError) as e:
            preprocess([str(path)], tmp_path / "out" / "ds", speech_tokenizer, workers=2, shard_bytes=512,
                       progress=False)
        assert (e.value.path, e.value.line, e.value.field) == (str(path), 51, field), str(e.value)
        assert message in str(e.value) and e.value.reason == reason
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing half-written

    mixed = tmp_path / "mixed.jsonl"
    mixed.write_bytes(b"".join(good[:30]) + b"".join(line for line, *_ in BAD_LINES) + b"\n" + b"".join(good[30:]))
    stats = preprocess([str(mixed)], tmp_path / "skip", speech_tokenizer, workers=2, shard_bytes=512,
                       skip_bad_records=True, progress=False)
    reasons = [reason for _, reason, *_ in BAD_LINES]
    assert stats["skipped"] == {r: reasons.count(r) for r in set(reasons)}
    assert (stats["read"], stats["written"]) == (60 + len(BAD_LINES), 60) and stats["documents"] == 60
    assert f"mixed.jsonl:{31 + reasons.index('bad_units')}: field 'segments[1].units'" in \
        stats["first_example_per_reason"]["bad_units"]


@pytest.mark.timeout(60)
def test_sentencepiece_vocab_gives_uint16(sp_model_path, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tok = SpeechTextTokenizer(sp_model_path, num_units=1024)
    records = [{"segments": [{"text": "hello"}, {"units": [1, 1023]}]}, {"text": "今天天气很好"}]
    preprocess([str(write_jsonl(tmp_path / "a.jsonl", records))], tmp_path / "ds", tok, append_eod=False,
               progress=False)
    ds = IndexedDataset(str(tmp_path / "ds"))
    assert ds.index.dtype == np.uint16 and [ds[i].tolist() for i in range(2)] == \
        [encode_document(r, tok, False, np.int64)[0].tolist() for r in records]


@pytest.mark.timeout(120)
def test_cli_with_saved_tokenizer(speech_tokenizer, corpus, tmp_path, capsys):
    speech_tokenizer.save_pretrained(tmp_path / "tok")
    paths, records = corpus
    tool = load_tool("preprocess_data")
    tool.main(["--input", str(paths[0]), str(paths[1]), "--output-prefix", str(tmp_path / "out" / "cpt"),
               "--tokenizer-model", str(tmp_path / "tok"), "--append-eod", "--workers", "2"])
    stats = json.loads(capsys.readouterr().out)
    assert stats["documents"] == 190 and stats["vocab_size"] == speech_tokenizer.vocab_size
    assert (tmp_path / "out" / "cpt.idx").exists() and (tmp_path / "out" / "cpt_lossmask.idx").exists()
    with pytest.raises(ValueError, match="holds 4096 units, but num_units is 1024"):
        tool.main(["--input", str(paths[0]), "--output-prefix", str(tmp_path / "x"), "--tokenizer-model",
                   str(tmp_path / "tok"), "--num-units", "1024"])
