"""The speech tokenizer travels with its units and every join refuses two of them (issue 22, parts 1-2).

Units files are hand-written JSONL with `speech_tokenizer` fields (what `tokenize_speech` writes), so the joins
run in-process on real files, the real preprocessing / SFT packing and the real dataset metadata: units of
CosyVoice's 25 Hz tokenizer and of its 50 Hz one cannot reach the same documents, `.bin`, SFT set, blend or
checkpoint, and each refusal is one `compat` line (exit code 3) naming both tokenizers.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from megatron_cslm.cli import run_tool
from megatron_cslm.errors import EXIT_CODES, CslmError
from megatron_cslm.speech.identity import IDENTITY_KEY, SpeechTokenizerId, s3_identity

V1_25HZ = s3_identity("speech_tokenizer_v1_25hz")  # random-init:seed=0
V1 = SpeechTokenizerId.s3("speech_tokenizer_v1", "sha256:0123456789abcdef")


def units_file(path: Path, identity: SpeechTokenizerId | None, n: int = 3) -> Path:
    """A units JSONL as tokenize_speech writes it (text, units, lang; the identity unless None: legacy)."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            rec = {"id": f"{path.stem}-{i}", "text": "the cat sat on the mat today", "lang": "en",
                   "units": [(7 * i + k) % 4096 for k in range(40)]}
            if identity is not None:
                rec[IDENTITY_KEY] = identity.to_dict()
            f.write(json.dumps(rec) + "\n")
    return path


def sft_file(path: Path, identity: SpeechTokenizerId | None) -> Path:
    rec = {"id": path.stem, "lang": "en", "turns": [
        {"role": "user", "text": "What sat on the mat?", "units": list(range(30))},
        {"role": "assistant", "text": "The cat sat on the mat.", "units": list(range(100, 160))}]}
    if identity is not None:
        rec[IDENTITY_KEY] = identity.to_dict()
    path.write_text(json.dumps(rec) + "\n", encoding="utf-8")
    return path


def assert_names_both(err: CslmError) -> None:
    text = str(err)
    assert err.kind == "compat" and EXIT_CODES[err.kind] == 3, (err.kind, text)
    assert "speech_tokenizer_v1_25hz (25 units/s" in text and "speech_tokenizer_v1 (50 units/s" in text, text
    assert "\n" not in text


def test_units_of_two_tokenizers_never_share_documents_bin_or_sft_set(tmp_path, speech_tokenizer, capsys):
    from megatron_cslm.cli.build_pretrain_data import main as build_main
    from megatron_cslm.data.documents.build import RecipeConfig, build_pretrain_data
    from megatron_cslm.data.indexed import preprocess
    from megatron_cslm.data.sft import SFTConfig, build_sft_data

    a, b = units_file(tmp_path / "a.jsonl", V1_25HZ), units_file(tmp_path / "b.jsonl", V1)
    # documents: the CLI stops with one line naming both, before any output is written
    capsys.readouterr()
    rc = run_tool(build_main, ["--asr", str(a), str(b), "--out-dir", str(tmp_path / "mixed"), "--recipes", "asr"])
    err = capsys.readouterr().err
    assert rc == 3 and "Traceback" not in err, err
    assert f"{b}:1" in err and "speech_tokenizer_v1_25hz" in err and "speech_tokenizer_v1 (50" in err, err
    assert not (tmp_path / "mixed" / "asr.jsonl").exists()

    # each alone: its documents and stats carry its identity
    cfg = RecipeConfig(recipes=("asr", "tts"))
    for name, src in (("da", a), ("db", b)):
        build_pretrain_data(tmp_path / name, speech=[src], config=cfg)
    doc = json.loads((tmp_path / "da" / "asr.jsonl").read_text().splitlines()[0])
    assert doc[IDENTITY_KEY] == V1_25HZ.to_dict()
    assert json.loads((tmp_path / "db" / "stats.json").read_text())[IDENTITY_KEY] == V1.to_dict()

    # .bin: one tokenizer's documents are recorded in .meta.json; documents that mix are refused
    preprocess([tmp_path / "da" / "asr.jsonl"], tmp_path / "bin" / "a", speech_tokenizer, progress=False)
    assert json.loads((tmp_path / "bin" / "a.meta.json").read_text())[IDENTITY_KEY] == V1_25HZ.to_dict()
    with pytest.raises(CslmError) as e:
        preprocess([tmp_path / "da" / "tts.jsonl", tmp_path / "db" / "asr.jsonl"], tmp_path / "bin" / "ab",
                   speech_tokenizer, progress=False)
    assert_names_both(e.value)
    assert not (tmp_path / "bin" / "ab.bin").exists()

    # SFT set: records of two tokenizers are refused; one tokenizer's set records it
    sa, sb = sft_file(tmp_path / "sa.jsonl", V1_25HZ), sft_file(tmp_path / "sb.jsonl", V1)
    with pytest.raises(CslmError) as e:
        build_sft_data([sa, sb], speech_tokenizer, SFTConfig(), tmp_path / "sft" / "ab", 1024, progress=False)
    assert_names_both(e.value)
    v2 = sft_file(tmp_path / "v2.jsonl", s3_identity("speech_tokenizer_v2_25hz"))  # 6,561 codes, 4,096 units
    with pytest.raises(CslmError, match=r"v2.jsonl:1: field 'speech_tokenizer' .*6561 codes.* has 4096 units"):
        build_sft_data([v2], speech_tokenizer, SFTConfig(), tmp_path / "sft" / "v2", 1024, progress=False)
    stats = build_sft_data([sa], speech_tokenizer, SFTConfig(), tmp_path / "sft" / "a", 1024, progress=False)
    assert stats[IDENTITY_KEY] == V1_25HZ.to_dict()
    assert json.loads((tmp_path / "sft" / "a.meta.json").read_text())[IDENTITY_KEY] == V1_25HZ.to_dict()


def _dataset(prefix: Path, identity: SpeechTokenizerId | None, speech_tokenizer, text_only: bool = False) -> str:
    """A real one-document .bin/.idx + .meta.json (preprocess of one record)."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    src = prefix.with_suffix(".jsonl")
    rec = {"segments": [{"text": "hello"}] if text_only else [{"text": "hi"}, {"units": [1, 2, 3]}]}
    if identity is not None:
        rec[IDENTITY_KEY] = identity.to_dict()
    src.write_text(json.dumps(rec) + "\n", encoding="utf-8")
    from megatron_cslm.data.indexed import preprocess

    preprocess([src], prefix, speech_tokenizer, progress=False)
    return str(prefix)


def test_a_blend_or_checkpoint_of_another_tokenizer_is_refused(tmp_path, speech_tokenizer, caplog):
    """training/data.data_speech_tokenizer, which the trainer calls before building anything: blends of two
    codebooks and data of another codebook than the start checkpoint's stop; text-only data blends with any;
    data without a record (older metadata) is accepted with a warning."""
    from megatron_cslm.checkpoint.manifest import ModelManifest
    from megatron_cslm.data.metadata import metadata_path
    from megatron_cslm.models.llama import ARCHS
    from megatron_cslm.training.data import data_speech_tokenizer

    a = _dataset(tmp_path / "a", V1_25HZ, speech_tokenizer)
    b = _dataset(tmp_path / "b", V1, speech_tokenizer)
    text = _dataset(tmp_path / "text", None, speech_tokenizer, text_only=True)
    assert json.loads(metadata_path(text).read_text())[IDENTITY_KEY] is None
    assert data_speech_tokenizer(["0.5", a, "0.5", text]) == V1_25HZ
    with pytest.raises(CslmError) as e:
        data_speech_tokenizer(["0.5", a, "0.5", b])
    assert_names_both(e.value)
    with pytest.raises(CslmError) as e:  # SFT's validation set counts too
        data_speech_tokenizer([a], [b])
    assert_names_both(e.value)

    arch = next(iter(ARCHS.values()))
    ModelManifest(arch, arch.vocab_size, speech_tokenizer=V1).save(tmp_path)
    start = ModelManifest.load(tmp_path)
    assert start.speech_tokenizer == V1
    with pytest.raises(CslmError) as e:
        data_speech_tokenizer([a, text], None, start, str(tmp_path))
    assert_names_both(e.value)
    assert "the start checkpoint" in str(e.value)
    assert data_speech_tokenizer([text], None, start) == V1  # text-only data keeps the model's

    legacy = _dataset(tmp_path / "legacy", V1, speech_tokenizer)
    meta = json.loads(metadata_path(legacy).read_text())
    del meta[IDENTITY_KEY]
    metadata_path(legacy).write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING):
        assert data_speech_tokenizer([a, legacy]) == V1_25HZ
    assert "records no speech tokenizer" in caplog.text and "legacy.meta.json" in caplog.text


def test_vocabulary_expansion_follows_the_speech_tokenizer(tmp_path, capsys):
    from megatron_cslm.cli.hf_to_megatron import main
    from megatron_cslm.convert.vocab import expansion_units

    assert expansion_units(None, None) == 4096  # the paper's speech_tokenizer_v1_25hz
    assert expansion_units(None, "speech_tokenizer_v2_25hz") == 6561
    assert expansion_units(1000, None) == 1000
    capsys.readouterr()
    rc = run_tool(main, ["--hf-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"), "--expand-vocab",
                         "--speech-tokenizer", "speech_tokenizer_v2_25hz", "--num-units", "4096"])
    err = capsys.readouterr().err
    assert rc == 3 and "4096" in err and "6561" in err and "speech_tokenizer_v2_25hz" in err, err
    assert not (tmp_path / "out").exists()


def test_v2_extractor_has_6561_codes_and_an_identity():
    """CosyVoice 2's tokenizer builds (random init) and its units stay in its 6,561 codes; the identity names
    the net, rate, codes and seed."""
    import torch

    from megatron_cslm.speech.extract import UnitExtractor

    extractor = UnitExtractor("speech_tokenizer_v2_25hz", random_init=True, seed=3)
    assert extractor.identity == SpeechTokenizerId("speech_tokenizer_v2_25hz", 25, 6561, "random-init:seed=3")
    assert extractor.net.quantizer.codebook_size == 6561
    units = extractor([torch.randn(16000)])[0]
    assert len(units) == 25 and all(0 <= u < 6561 for u in units) and len(set(units)) > 1


def test_toy_corpus_records_its_own_identity(tmp_path):
    from megatron_cslm.toy.corpus import make_toy_corpus, toy_identity

    info = make_toy_corpus(tmp_path, num_units=512, seed=4, speakers=2)
    ident = toy_identity(512, 4)
    assert info[IDENTITY_KEY] == ident.to_dict() and ident.name == "toy-g2u" and ident.num_codes == 512
    for name in ("manifest.jsonl", "dialogue_sft.jsonl", "heldout.jsonl"):
        first = json.loads((tmp_path / name).read_text(encoding="utf-8").splitlines()[0])
        assert first[IDENTITY_KEY] == ident.to_dict(), name
