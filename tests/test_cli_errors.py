"""Every tool fails like a tool (issue 14): per tool a bad record, a bad file and a bad flag.

Each case asserts the exit code of the error's kind, the one-line `error: <file>:<line>: field '<name>' ...`
message, no traceback, and that an earlier output at the same path is byte-identical after the failure; the
same input under `--skip-bad-records` gives read = written + skipped with the reasons counted.
Tools run in-process through `run_tool` (the policy the scripts and `cslm` use); two subprocess checks cover
the installed entry points end to end.
"""
from __future__ import annotations

import gzip
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_cslm.cli import run_tool
from megatron_cslm.errors import EXIT_CODES, CslmError
from megatron_cslm.fileio import SkipCounter, iter_jsonl
from tests.helpers.cli import assert_fails, earlier, run, unchanged

ROOT = Path(__file__).resolve().parents[1]


def write_lines(path: Path, lines: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else json.dumps(line, ensure_ascii=False).encode())
            f.write(b"\n")
    return path


# ------------------------------------------------------------------------------------------ the error type


def test_error_type_renders_pickles_and_maps_kinds_to_codes():
    e = CslmError("a.jsonl", 3, "turns[1].text", "empty answer text", reason="empty_answer")
    assert str(e) == "a.jsonl:3: field 'turns[1].text' empty answer text" and e.exit_code == 1
    back = pickle.loads(pickle.dumps(e))  # errors cross worker processes
    assert (back.path, back.line, back.field, back.message, back.kind, back.reason) == \
        ("a.jsonl", 3, "turns[1].text", "empty answer text", "data", "empty_answer")
    assert str(CslmError.in_field("units", "unit 5 out of range").located("f.txt", 2)) == \
        "f.txt:2: field 'units' unit 5 out of range"
    assert {k: CslmError(message="x", kind=k).exit_code for k in EXIT_CODES} == EXIT_CODES
    assert EXIT_CODES["usage"] == 2 and EXIT_CODES["data"] == 1
    with pytest.raises(ValueError, match="unknown error kind"):
        CslmError(message="x", kind="oops")


def test_jsonl_errors_are_on_the_line_that_holds_them(tmp_path):
    path = write_lines(tmp_path / "a.jsonl", [{"a": 1}] * 5 + [b'{"t": "\xff\xfe"}', b"{bad", {"b": 2}])
    with pytest.raises(CslmError, match=r"a\.jsonl:6: not valid UTF-8 \(invalid start byte at byte 7 of the line\)"):
        list(iter_jsonl(path))
    skipped = SkipCounter()
    assert [n for n, _ in iter_jsonl(path, skipped)] == [1, 2, 3, 4, 5, 8]
    assert (skipped.read, dict(skipped.skipped)) == (2, {"not_utf8": 1, "malformed_json": 1})


def test_debug_shows_the_traceback_and_bugs_keep_theirs(capsys):
    def bad_data(argv):
        raise CslmError("x.jsonl", 1, "f", "bad")

    def bug(argv):
        raise KeyError("a bug")

    assert_fails(run(bad_data, [], capsys), 1, "error: x.jsonl:1: field 'f' bad")
    rc, _, err = run(bad_data, ["--debug"], capsys)
    assert rc == 1 and "Traceback" in err and err.rstrip().endswith("error: x.jsonl:1: field 'f' bad")
    with pytest.raises(KeyError):
        run_tool(bug, [])


# ---------------------------------------------------------------------------------------- preprocess_data


def test_preprocess_data(tmp_path, capsys, llama3_tokenizer_path):
    from megatron_cslm.cli.preprocess_data import main

    good = {"segments": [{"text": "hello"}, {"units": [1, 2]}]}
    data = write_lines(tmp_path / "in.jsonl", [good, {"segments": [{"units": [1, 5000]}]}, good, b"{bad json", good])
    prefix = tmp_path / "out" / "cpt"
    before = earlier(Path(f"{prefix}.bin"), Path(f"{prefix}.idx"))
    base = ["--input", data, "--tokenizer-model", llama3_tokenizer_path, "--output-prefix", prefix]
    assert_fails(run(main, base, capsys), 1, f"{data}:2: field 'segments[0].units'", "5000")
    bad_file = write_lines(tmp_path / "latin1.jsonl", [good, b'{"text": "caf\xe9"}'])
    assert_fails(run(main, base[:1] + [bad_file] + base[2:], capsys), 1, f"{bad_file}:2: not valid UTF-8")
    assert_fails(run(main, base + ["--workers", "0"], capsys), 2, "--workers", "expected an integer > 0")
    nothing = tmp_path / "nothing-*.jsonl"  # a glob that matches no file
    assert_fails(run(main, ["--input", nothing] + base[2:], capsys), 1, f"{nothing}: field '--input' matches no file")
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder\n")
    assert_fails(run(main, base[:-1] + [a_file / "out" / "cpt"], capsys), EXIT_CODES["io"],
                 f"{a_file} is a file, not a folder")
    truncated = tmp_path / "truncated.jsonl.gz"
    truncated.write_bytes(gzip.compress(b'{"text": "hello"}\n' * 200)[:-30])
    assert_fails(run(main, ["--input", truncated] + base[2:], capsys), 1, f"{truncated}:", "compressed")
    unchanged(before)
    rc, out, err = run(main, base + ["--skip-bad-records"], capsys)
    assert rc == 0, err
    stats = json.loads(Path(f"{prefix}.stats.json").read_text())
    counts = json.dumps(stats)
    assert '"unit_out_of_range"' in counts or '"bad_units"' in counts, counts
    assert '"malformed_json": 1' in counts, counts
    assert "3" in out  # the three good records are reported written


# ------------------------------------------------------------------------------------ build_pretrain_data


def test_build_pretrain_data(tmp_path, capsys):
    from megatron_cslm.cli.build_pretrain_data import main

    rec = {"id": "a", "text": "hello world again", "units": [1, 2, 3, 4], "lang": "en"}
    asr = write_lines(tmp_path / "asr.jsonl", [rec, {**rec, "id": "b", "units": [1, 9999]}, b"{not json",
                                                {**rec, "id": "c"}])
    out = tmp_path / "docs"
    before = earlier(out / "asr.jsonl", out / "stats.json")
    base = ["--asr", asr, "--out-dir", out, "--recipes", "asr"]
    assert_fails(run(main, base, capsys), 1, f"{asr}:2: field 'units'", "9999")
    only_bad_json = write_lines(tmp_path / "j.jsonl", [rec, b"[1, 2"])
    assert_fails(run(main, ["--asr", only_bad_json, "--out-dir", out, "--recipes", "asr"], capsys), 1,
                 f"{only_bad_json}:2: malformed JSON")
    assert_fails(run(main, base + ["--num-units", "0"], capsys), 2, "--num-units", "expected an integer > 0")
    unchanged(before)
    rc, _, err = run(main, base + ["--skip-bad-records"], capsys)
    assert rc == 0, err
    stats = json.loads((out / "stats.json").read_text())["recipes"]["asr"]
    assert stats["read"] == 4 == stats["written"] + stats["skipped_total"]
    assert stats["skipped"] == {"bad_record": 1, "malformed_json": 1}


# ----------------------------------------------------------------------------------------- build_sft_data


def test_build_sft_data(tmp_path, capsys, llama3_tokenizer_path):
    from megatron_cslm.cli.build_sft_data import main

    def record(answer: str) -> dict:
        return {"lang": "en", "turns": [{"role": "user", "units": [1, 2, 3], "text": "what is it"},
                                        {"role": "assistant", "text": answer, "units": [4, 5, 6]}]}

    data = write_lines(tmp_path / "sft.jsonl", [record("it is a cat."), record("  "), b"{oops", record("a dog.")])
    prefix = tmp_path / "out" / "sft"
    before = earlier(Path(f"{prefix}.bin"), Path(f"{prefix}.idx"))
    base = ["--input", data, "--tokenizer-model", llama3_tokenizer_path, "--output-prefix", prefix,
            "--seq-length", "256"]
    assert_fails(run(main, base, capsys), 1, f"{data}:2: field 'turns[1].text' empty answer text")
    bad_json = write_lines(tmp_path / "j.jsonl", [record("fine."), b"{oops"])
    assert_fails(run(main, ["--input", bad_json] + base[2:], capsys), 1, f"{bad_json}:2: malformed JSON")
    assert_fails(run(main, base + ["--seq-length", "0"], capsys), 2, "--seq-length", "expected an integer > 0")
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder\n")
    assert_fails(run(main, base[:5] + [a_file / "sft"] + base[6:] + ["--skip-bad-records"], capsys),
                 EXIT_CODES["io"], f"{a_file} is a file, not a folder")
    unchanged(before)
    rc, _, err = run(main, base + ["--skip-bad-records"], capsys)
    assert rc == 0, err
    r = json.loads(Path(f"{prefix}.stats.json").read_text())["records"]
    assert r["read"] == 4 == r["written"] + r["skipped_total"]
    assert r["skipped"] == {"empty_answer": 1, "malformed_json": 1}


# ----------------------------------------------------------------------------------------- tokenize_speech


def test_tokenize_speech(tmp_path, capsys):
    """Audio that cannot be tokenized is a per-item reject (counted by reason, the tool's --skip-bad-records);
    a malformed manifest or flag stops the tool with one line, leaving the earlier output as it was."""
    import numpy as np
    import soundfile as sf

    from tests.helpers.files import load_tool

    main = load_tool("tokenize_speech").main
    sf.write(tmp_path / "a.wav", (0.1 * np.sin(np.arange(16000) / 3)).astype("float32"), 16000)
    manifest = write_manifest(tmp_path / "m.tsv", [f"a\t{tmp_path / 'a.wav'}\thello\ten",
                                                   f"b\t{tmp_path / 'missing.wav'}\tworld\ten"])
    out = tmp_path / "units.jsonl"
    base = ["--output", out, "--random-init", "--device", "cpu", "--workers", "0", "--no-progress"]
    rc, printed, err = run(main, ["--manifest", manifest] + base, capsys)
    assert rc == 0, err
    stats = json.loads(printed[printed.index("{"):])
    assert stats["read"] == 2 == stats["written"] + sum(stats["skipped"].values()) and stats["written"] == 1
    assert list(stats["skipped"]) == ["unreadable"] or list(stats["skipped"]) == ["missing_audio"], stats
    before = {out: out.read_bytes()}
    bad_record = tmp_path / "m.jsonl"
    bad_record.write_text('{"id": "a", "audio": "a.wav"}\n{"id": "b", "audio": 5}\n', encoding="utf-8")
    assert_fails(run(main, ["--manifest", bad_record] + base, capsys), 1, f"{bad_record}:2: field 'audio'")
    bad_file = write_manifest(tmp_path / "bad.tsv", [f"a\t{tmp_path / 'a.wav'}", "b"])
    assert_fails(run(main, ["--manifest", bad_file] + base, capsys), 1, f"{bad_file}:2:")
    assert_fails(run(main, ["--manifest", manifest, "--batch-seconds", "0"] + base, capsys), 2, "--batch-seconds")
    unchanged(before)


# ------------------------------------------------------------------------------ tiny checkpoints (shared)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, sp_model_path):
    """A 300-id SentencePiece tokenizer, an HF Llama on it, its Megatron conversion, and an HF model whose
    tokenizer has 512 speech units (for the speech-tokenizer compatibility check)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_cslm.convert import convert_hf_to_megatron
    from megatron_cslm.text.tokenizer import SpeechTextTokenizer

    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    config = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    hf = root / "hf"
    LlamaForCausalLM(LlamaConfig(vocab_size=300, **config)).save_pretrained(hf, max_shard_size="100KB")
    (hf / "tokenizer.model").write_bytes(sp_model_path.read_bytes())
    megatron = root / "megatron"
    convert_hf_to_megatron(hf, megatron, progress=False)
    speech = root / "speech_lm"
    tok = SpeechTextTokenizer(sp_model_path, num_units=512)
    tok.save_pretrained(speech)
    LlamaForCausalLM(LlamaConfig(vocab_size=tok.vocab_size, **config)).save_pretrained(speech)
    return {"hf": hf, "megatron": megatron, "speech_lm": speech, "num_units": 512}


def copy_tree(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------------------- hf_to_megatron


def test_hf_to_megatron(tiny, tmp_path, capsys):
    from megatron_cslm.cli.hf_to_megatron import main

    hf = copy_tree(tiny["hf"], tmp_path / "hf")
    index = json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.mlp.down_proj.weight"
    out = tmp_path / "out"
    before = earlier(out / "latest_checkpointed_iteration.txt")
    # bad record: one tensor of the wrong shape, named with its shard
    from safetensors.torch import load_file, save_file

    shard = hf / index[name]
    tensors = load_file(shard)
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, shard, metadata={"format": "pt"})
    assert_fails(run(main, ["--hf-dir", hf, "--out", out], capsys), 1, f"{shard}: field '{name}' shape")
    # bad file: a truncated shard names the shard and the tensor being read
    hf2 = copy_tree(tiny["hf"], tmp_path / "hf2")
    shard2 = hf2 / index[name]
    shard2.write_bytes(shard2.read_bytes()[:-100])
    assert_fails(run(main, ["--hf-dir", hf2, "--out", out], capsys), EXIT_CODES["checkpoint"], str(shard2),
                 "truncated or corrupt")
    # bad flags: argparse refuses 0; a TP that does not divide the heads stops before any tensor is read
    assert_fails(run(main, ["--hf-dir", hf2, "--out", out, "--tp", "0"], capsys), 2, "--tp")
    assert_fails(run(main, ["--hf-dir", hf2, "--out", out, "--tp", "3"], capsys), 2,
                 "tensor-model-parallel-size 3 does not divide")
    unchanged(before)
    assert not (out / "iter_0000000").exists()


# ----------------------------------------------------------------------------------------- megatron_to_hf


def test_megatron_to_hf(tiny, tmp_path, capsys):
    from megatron_cslm.cli.megatron_to_hf import main

    out = tmp_path / "out"
    before = earlier(out / "notes.txt")
    run_dir = copy_tree(tiny["megatron"], tmp_path / "run")
    manifest = json.loads((run_dir / "cslm_model.json").read_text())
    (run_dir / "cslm_model.json").write_text(json.dumps({**manifest, "padded_vocab_size": 1}))
    assert_fails(run(main, ["--megatron-dir", run_dir, "--out", out], capsys), 1,
                 f"{run_dir / 'cslm_model.json'}: field 'padded_vocab_size'")
    run2 = copy_tree(tiny["megatron"], tmp_path / "run2")
    (run2 / "latest_checkpointed_iteration.txt").write_text("7\n")
    assert_fails(run(main, ["--megatron-dir", run2, "--out", out], capsys), EXIT_CODES["checkpoint"],
                 "latest_checkpointed_iteration.txt:1:", "names iteration 7")
    assert_fails(run(main, ["--megatron-dir", tiny["megatron"], "--out", out, "--max-shard-gb", "0"], capsys), 2,
                 "--max-shard-gb", "expected a number > 0")
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder\n")
    assert_fails(run(main, ["--megatron-dir", tiny["megatron"], "--out", a_file / "hf"], capsys), EXIT_CODES["io"],
                 f"{a_file} is a file, not a folder")
    unchanged(before)
    assert not (out / "config.json").exists()


# ------------------------------------------------------------------------------------ decode and eval_s2s


def write_wav_manifest(directory: Path) -> Path:
    """A benchmark manifest whose one audio file is not audio at all: a run that got as far as reading audio
    would stop on it, so a compatibility error proves that the check came before any audio work."""
    (directory / "wav").mkdir(parents=True)
    (directory / "wav" / "q1.wav").write_bytes(b"RIFF but not really a wav file")
    return write_manifest(directory / "test.tsv", ["id\ttext", "q1\thello"])


def write_manifest(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_decode(tiny, tmp_path, capsys):
    from megatron_cslm.cli.decode import main

    out = tmp_path / "out"
    before = earlier(out / "responses.json")
    model = ["--model-name-or-path", tiny["speech_lm"], "--lang", "en", "--output-dir", out,
             "--max-new-tokens", "4"]
    units = write_manifest(tmp_path / "units.txt", ["<1><2><3>", "<4><600><5>"])
    assert_fails(run(main, ["--unit", units] + model, capsys), 1, f"{units}:2: field 'units'", "600")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"<1><2>\n<3>\xe9\n")
    assert_fails(run(main, ["--unit", latin1] + model, capsys), 1, f"{latin1}:2: not valid UTF-8")
    assert_fails(run(main, ["--unit", units, "--batch-size", "0"] + model, capsys), 2, "--batch-size")
    for not_a_model, what in ((tmp_path, "not an exported model"), (tiny["megatron"], "a Megatron run directory")):
        assert_fails(run(main, ["--unit", units, "--model-name-or-path", not_a_model] + model[2:], capsys),
                     EXIT_CODES["checkpoint"], f"{not_a_model}: field '--model-name-or-path' {what}")
    # a 4,096-code speech tokenizer and a 512-unit model: refused before the model is loaded or any audio is
    # read (the manifest's audio is unreadable), naming both counts
    manifest = write_wav_manifest(tmp_path / "bench")
    v1 = ["--speech-tokenizer", "speech_tokenizer_v1"]  # the model records none (foreign): the flag is required
    assert_fails(run(main, ["--manifest", manifest, "--random-init"] + model, capsys), EXIT_CODES["usage"],
                 "records no speech tokenizer", "--speech-tokenizer")
    assert_fails(run(main, ["--manifest", manifest, "--random-init"] + v1 + model, capsys), EXIT_CODES["compat"],
                 "4096 codes", "512 units", "field '--model-name-or-path'")
    unchanged(before)


def test_eval_s2s(tiny, tmp_path, capsys):
    from megatron_cslm.cli.eval_s2s import main

    manifest = write_wav_manifest(tmp_path / "bench")
    out = tmp_path / "eval"
    before = earlier(out / "report.json")
    base = ["--model", tiny["speech_lm"], "--lang", "en", "--output-dir", out, "--random-init",
            "--speech-tokenizer", "speech_tokenizer_v1"]
    dup = write_manifest(tmp_path / "bench" / "dup.tsv", ["id\ttext", "q1\thello", "q1\tagain"])
    assert_fails(run(main, ["--manifest", dup] + base, capsys), 1, f"{dup}:3: field 'id' duplicate id 'q1'")
    no_id = write_manifest(tmp_path / "bench" / "noid.tsv", ["name\ttext", "q1\thello"])
    assert_fails(run(main, ["--manifest", no_id] + base, capsys), 1, f"{no_id}:1: field 'id'")
    assert_fails(run(main, ["--manifest", manifest, "--limit", "0"] + base, capsys), 2, "--limit")
    assert_fails(run(main, ["--manifest", manifest] + base, capsys), EXIT_CODES["compat"], "4096 codes",
                 "512 units", "field '--model'")  # before any audio is read: q1.wav is not audio
    unchanged(before)


def test_export_of_a_25hz_model_says_so_and_decode_refuses_v1_before_any_audio(tiny, tmp_path, capsys,
                                                                                  monkeypatch):
    """A model converted for speech_tokenizer_v1_25hz units: cslm_model.json, the export's config.json /
    generation_config.json and model card say 25 units/s; decode with --speech-tokenizer speech_tokenizer_v1
    stops naming both, before the S3 net is built or any audio read (the manifest's wav is not audio)."""
    from megatron_cslm.checkpoint.manifest import ModelManifest
    from megatron_cslm.cli.decode import main
    from megatron_cslm.cli.hf_to_megatron import main as convert_main
    from megatron_cslm.convert import convert_megatron_to_hf
    from megatron_cslm.speech import extract
    from megatron_cslm.speech.identity import IDENTITY_KEY, s3_identity

    identity = s3_identity("speech_tokenizer_v1_25hz")  # random-init:seed=0, as --random-init below
    run_dir, export = tmp_path / "run", tmp_path / "export"
    assert run(convert_main, ["--hf-dir", tiny["hf"], "--out", run_dir, "--expand-vocab", "--speech-tokenizer",
                              "speech_tokenizer_v1_25hz", "--speech-tokenizer-weights", identity.weights],
               capsys)[0] == 0
    manifest = ModelManifest.load(run_dir)
    assert manifest.speech_tokenizer == identity and manifest.arch.vocab_size == 300 + 4096 + 4
    convert_megatron_to_hf(run_dir, export, dtype="fp32", progress=False)
    for name in ("config.json", "generation_config.json"):
        assert json.loads((export / name).read_text())[IDENTITY_KEY] == identity.to_dict(), name
    card = (export / "README.md").read_text(encoding="utf-8")
    assert "`speech_tokenizer_v1_25hz`, 25 units/s" in card and "50 units/s" not in card

    built = []
    monkeypatch.setattr(extract, "_build_net", lambda model: built.append(model))  # records a build, if any
    manifest, out = write_wav_manifest(tmp_path / "bench"), tmp_path / "out"
    argv = ["--manifest", manifest, "--random-init", "--model-name-or-path", export, "--lang", "en",
            "--output-dir", out]
    for other in ("speech_tokenizer_v1", "speech_tokenizer_v2_25hz"):
        assert_fails(run(main, argv + ["--speech-tokenizer", other], capsys), EXIT_CODES["compat"],
                     "speech_tokenizer_v1_25hz (25 units/s", f"--speech-tokenizer is {other}")
    assert not built and not out.exists()


@pytest.mark.parametrize("tool,flag", [("decode", "--model-name-or-path"), ("eval-s2s", "--model")])
def test_speech_tokenizer_mismatch_fails_before_the_heavy_work(tiny, tmp_path, tool, flag):
    """The code-count check comes before megatron-core is imported (seconds of torch.compile set-up), before
    the S3 net is built and before any audio is read: a fresh `cslm` process fails with only torch, the
    tokenizer files and s3tokenizer's config behind it (about 4 s on 2 cores instead of 12)."""
    manifest = write_wav_manifest(tmp_path / "bench")
    probe = ("import sys\nfrom megatron_cslm.cli.main import main\nrc = main(sys.argv[1:])\n"
             "heavy = sorted(m for m in ('megatron.core', 'transformers', 'torch._inductor') if m in sys.modules)\n"
             "print('HEAVY', heavy, file=sys.stderr)\nraise SystemExit(rc)")
    argv = [tool, "--manifest", str(manifest), "--random-init", flag, str(tiny["speech_lm"]), "--lang", "en",
            "--output-dir", str(tmp_path / "out"), "--speech-tokenizer", "speech_tokenizer_v1"]
    p = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=300)
    assert p.returncode == EXIT_CODES["compat"], p.stderr
    assert "4096 codes" in p.stderr and "512 units" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert "HEAVY []" in p.stderr, p.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------- installed entry points


def test_scripts_and_cslm_apply_the_policy_end_to_end(tmp_path):
    """The thin script in tools/ and the `cslm` command give the same one line and exit code."""
    bad = write_lines(tmp_path / "asr.jsonl", [b"{not json"])
    argv = ["--asr", str(bad), "--out-dir", str(tmp_path / "docs"), "--recipes", "asr"]
    for cmd in ([sys.executable, str(ROOT / "tools" / "build_pretrain_data.py")],
                [sys.executable, "-m", "megatron_cslm.cli.main", "build-pretrain-data"]):
        result = subprocess.run(cmd + argv, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert result.returncode == 1, result.stderr
        assert f"error: {bad}:1: malformed JSON" in result.stderr and "Traceback" not in result.stderr
    result = subprocess.run([sys.executable, "-m", "megatron_cslm.cli.main", "nope"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "unknown command 'nope'" in result.stderr
