"""Issue 13: checkpoints whose tokenizer already speaks units, in layouts other than ours, keep their own ids.

Tokenizers are built like released speech LMs: a real byte-level BPE text tokenizer (trained here, Llama-3's
format) plus `<k>` unit tokens and `<sosp> <eosp> [question] [answer]` added in another order than ours, and
a chat template of their own. Every stage is checked against what the Hugging Face tokenizer itself says:
the unit segment [12, 345, 4095] must become exactly the ids of `<sosp><12><345><4095><eosp>`.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_cslm.errors import CslmError
from megatron_cslm.text.tokenizer import META_FILE, Segment, SpeechTextTokenizer

from conftest import EN, ZH

ROOT = Path(__file__).resolve().parent.parent
UNITS = [f"<{k}>" for k in range(4096)]
SPECIALS = ["<sosp>", "<eosp>", "[question]", "[answer]"]
SEGMENT = [12, 345, 4095]
SEGMENT_TEXT = "<sosp><12><345><4095><eosp>"
# Groups of tokens in the order a release added them.
LAYOUTS = {
    "sosp_then_units": [["<sosp>"], UNITS, ["<eosp>", "[question]", "[answer]"]],  # the example
    "specials_first": [SPECIALS, UNITS],
    "units_split": [UNITS[:1000], ["<sosp>", "<eosp>"], UNITS[1000:], ["[question]", "[answer]"]],
}
# A chat template that is not ours (a default system turn, as Meta's Llama-3.1 template has).
RELEASED_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] != 'system' %}{{ '<|start_header_id|>system<|end_header_id|>\\n\\n"
    "Cutting Knowledge Date: December 2023<|eot_id|>' }}{% endif %}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")


def released_tokenizer(text_dir: Path, out: Path, groups: list[list[str]]) -> Path:
    """The text tokenizer plus unit tokens and specials added group by group, saved as a HF directory."""
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_file(str(text_dir / "tokenizer.json"))
    for group in groups:
        if group[0] in SPECIALS:
            tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in group])
        else:  # as transformers' tokenizer.add_tokens(list) adds them
            tok.add_tokens([AddedToken(t, special=False) for t in group])
    out.mkdir(parents=True)
    tok.save(str(out / "tokenizer.json"))
    config = json.loads((text_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    (out / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": RELEASED_TEMPLATE}))
    return out


def hf_ids(directory: Path, text: str) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(directory / "tokenizer.json")).encode(text, add_special_tokens=False).ids


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    from megatron_cslm.toy.tokenizer import train_toy_text_tokenizer

    return train_toy_text_tokenizer((EN + ZH) * 20, tmp_path_factory.mktemp("text") / "tok", vocab_size=400)


@pytest.fixture(scope="module")
def released(tmp_path_factory, text_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("released")
    return {name: released_tokenizer(text_dir, root / name, groups) for name, groups in LAYOUTS.items()}


# ----------------------------------------------------------------------------------------------- reading


@pytest.mark.timeout(120)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_units_and_specials_are_read_from_the_vocabulary(released, layout, tmp_path):
    from tokenizers import Tokenizer

    d = released[layout]
    hf = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok = SpeechTextTokenizer.from_pretrained(d)  # HF files only: no cslm_tokenizer.json
    assert not (d / META_FILE).exists()
    assert tok.vocab_size == tok.base_vocab_size == hf.get_vocab_size(with_added_tokens=True)
    assert tok.layout.ids.tolist() == [hf.token_to_id(u) for u in UNITS]
    assert list(tok.special_ids) == [hf.token_to_id(s) for s in SPECIALS]
    assert (tok.layout.offset is None) == (layout == "units_split")
    expected = hf_ids(d, SEGMENT_TEXT)
    assert len(expected) == 5
    assert tok.encode_units(SEGMENT) == tok.encode_segments([{"units": SEGMENT}]) == expected
    text = "[question]The cat 你好[answer]What's 12 + 30?<sosp><0><999><1000><4095><eosp> sat<|eot_id|><4096>"
    ids = tok.encode_text(text)
    assert ids == hf.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text
    assert tok.split(expected) == [Segment("units", units=SEGMENT)]
    assert tok.count_speech_tokens(np.array(ids)) == (4, 4)
    assert [tok.unit_of(i) for i in expected] == [-1, *SEGMENT, -1]
    if tok.layout.offset is None:
        with pytest.raises(ValueError, match="not contiguous"):
            _ = tok.unit_offset
    assert SpeechTextTokenizer.load(d, 4096).layout == tok.layout
    with pytest.raises(CslmError, match="holds 4096 unit tokens .* but num_units is 1024"):
        SpeechTextTokenizer.load(d, 1024)
    # save_pretrained writes the same ids back, plus a cache that is checked against the vocabulary on load.
    tok.save_pretrained(tmp_path / "saved")
    again = SpeechTextTokenizer.from_pretrained(tmp_path / "saved")
    assert again.layout == tok.layout and again.special_ids == tok.special_ids
    assert again.identity() == tok.identity()
    assert hf_ids(tmp_path / "saved", text) == ids
    meta = json.loads((tmp_path / "saved" / META_FILE).read_text())
    meta["special_ids"]["<eosp>"] += 1
    (tmp_path / "saved" / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CslmError, match=f"says <eosp> is id {tok.eosp_id + 1}, the vocabulary has {tok.eosp_id}"):
        SpeechTextTokenizer.from_pretrained(tmp_path / "saved")


@pytest.mark.timeout(120)
def test_partial_duplicated_and_ambiguous_unit_sets_are_refused(text_dir, tmp_path):
    cases = {
        "partial": ([[u for u in UNITS if u != "<12>"], SPECIALS], r"unit set is partial: '<12>' is missing"),
        "ambiguous": ([UNITS, ["<0012>"], SPECIALS], r"unit token '<0012>' .* second spelling of unit 12"),
    }
    for name, (groups, message) in cases.items():
        d = released_tokenizer(text_dir, tmp_path / name, groups)
        with pytest.raises(CslmError, match=message) as e:
            SpeechTextTokenizer.from_pretrained(d)
        assert "\n" not in str(e.value)
    # `tokenizers` itself keeps one of two entries with the same content: the file is read, not the library.
    d = released_tokenizer(text_dir, tmp_path / "duplicated", [UNITS, SPECIALS])
    spec = json.loads((d / "tokenizer.json").read_text())
    spec["added_tokens"].append({**next(t for t in spec["added_tokens"] if t["content"] == "<345>"),
                                 "id": len(spec["model"]["vocab"]) + 4096 + 4})
    (d / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(CslmError, match=r"token '<345>' is duplicated"):
        SpeechTextTokenizer(d)
    # A tool stops with one line naming the token (no traceback).
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": "hi"}) + "\n")
    proc = subprocess.run([sys.executable, "tools/preprocess_data.py", "--input", str(tmp_path / "in.jsonl"),
                           "--tokenizer-model", str(tmp_path / "partial"), "--output-prefix", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert "'<12>' is missing" in one_line_error(proc)


def test_plain_text_tokenizer_is_still_extended(text_dir):
    tok = SpeechTextTokenizer(text_dir, num_units=4096)
    base = tok.base_vocab_size
    assert not tok.units_in_vocabulary and tok.unit_offset == base
    assert list(tok.special_ids) == list(range(base + 4096, base + 4100)) and tok.vocab_size == base + 4100
    with pytest.raises(CslmError, match="plain text tokenizer"):
        SpeechTextTokenizer.from_pretrained(text_dir)


# ----------------------------------------------------------------------------------------------- pipeline


@pytest.fixture(scope="module", params=["units_split", "specials_first"])
def checkpoint(request, released, tmp_path_factory) -> dict:
    """A released HF checkpoint of this layout, converted to Megatron and exported back to HF."""
    from megatron_cslm.convert import convert_hf_to_megatron, convert_megatron_to_hf
    from tests.helpers.hf import make_hf_llama

    layout = request.param
    d = released[layout]
    tok = SpeechTextTokenizer.from_pretrained(d)
    work = tmp_path_factory.mktemp(f"ckpt_{layout}")
    hf = make_hf_llama(work / "hf", d / "tokenizer.json", vocab_size=tok.vocab_size, num_hidden_layers=2,
                       bos_token_id=tok.bos_id, eos_token_id=tok.eod_id)
    shutil.copyfile(d / "tokenizer_config.json", hf / "tokenizer_config.json")
    convert_hf_to_megatron(hf, work / "megatron", progress=False)
    convert_megatron_to_hf(work / "megatron", work / "hf_out", dtype="fp32", progress=False)
    return {"layout": layout, "tokenizer_dir": d, "tok": tok, "hf": hf, "work": work}


@pytest.mark.timeout(300)
def test_hf_megatron_hf_keeps_every_id(checkpoint):
    from tokenizers import Tokenizer

    from megatron_cslm.convert import convert_hf_to_megatron
    from tests.helpers.hf import load_hf_tensors

    work, hf = checkpoint["work"], checkpoint["hf"]
    vocab = {p: Tokenizer.from_file(str(p / "tokenizer.json")).get_vocab(with_added_tokens=True)
             for p in (hf, work / "megatron" / "tokenizer", work / "hf_out")}
    assert vocab[hf] == vocab[work / "megatron" / "tokenizer"] == vocab[work / "hf_out"]
    original, exported = load_hf_tensors(hf), load_hf_tensors(work / "hf_out")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(original[name], exported[name])  # row i is still token i
    assert SpeechTextTokenizer.from_pretrained(work / "hf_out").layout == checkpoint["tok"].layout
    with pytest.raises(CslmError, match="already holds speech units .* convert it without --expand-vocab"):
        convert_hf_to_megatron(hf, work / "expanded", expand_vocab=True, progress=False)
    if checkpoint["layout"] == "units_split":  # the tool's one-line error, once
        proc = subprocess.run([sys.executable, "checkpoints_convert/hf_to_megatron.py", "--hf-dir", str(hf),
                               "--out", str(work / "expanded2"), "--expand-vocab"],
                              capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert "already holds speech units" in one_line_error(proc)
        assert not (work / "expanded2" / "iter_0000000").exists()


@pytest.mark.timeout(300)
def test_preprocessing_and_sft_data_use_the_checkpoint_ids(checkpoint, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_cslm.data.indexed import preprocess
    from megatron_cslm.data.sft import SFTConfig, SFTEncoder, build_sft_data, parse_record

    d, tok = checkpoint["tokenizer_dir"], checkpoint["tok"]
    segment_ids = hf_ids(d, SEGMENT_TEXT)
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"segments": [{"text": "The cat"}, {"units": SEGMENT}, {"text": " sat."}]}) + "\n")
    preprocess([docs], tmp_path / "pre", SpeechTextTokenizer.load(d), workers=1, append_eod=True, progress=False)
    dataset = IndexedDataset(str(tmp_path / "pre"))  # kept alive: items are views of its memory map
    assert dataset[0].tolist() == hf_ids(d, f"The cat{SEGMENT_TEXT} sat.") + [tok.eod_id]
    stats = json.loads((tmp_path / "pre.stats.json").read_text())
    assert (stats["unit_tokens"], stats["special_tokens"]) == (3, 2)

    records = [{"prompt": SEGMENT_TEXT, "response": "[question] hi [answer] The cat<sosp><7><8><eosp> sat."},
               {"lang": "zh", "turns": [{"role": "user", "text": "你好", "units": SEGMENT},
                                        {"role": "assistant", "text": "The cat sat on the mat.",
                                         "units": list(range(4090, 4096))}]}]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    encoder = SFTEncoder(tok, SFTConfig())
    for record in records:
        tokens = encoder.encode(parse_record(record, tok.num_units)).tokens.tolist()
        assert any(tokens[i:i + 5] == segment_ids for i in range(len(tokens)))
    first = encoder.encode(parse_record(records[0], tok.num_units)).tokens.tolist()
    answer_speech = hf_ids(d, "<sosp><7><8><eosp>")
    assert any(first[i:i + 4] == answer_speech for i in range(len(first)))
    prefix = tmp_path / "sft"
    build_sft_data([tmp_path / "sft.jsonl"], tok, SFTConfig(), prefix, seq_length=256, progress=False)
    bins = IndexedDataset(str(prefix))
    packed = np.concatenate([bins[i] for i in range(len(bins))]).tolist()
    assert sum(packed[i:i + 5] == segment_ids for i in range(len(packed))) == 2
    if checkpoint["layout"] == "units_split":  # one SFT step of the converted checkpoint on its own ids
        from tests.helpers.launch import torchrun

        torchrun("-m megatron_cslm.sft", 1, "--device", "cpu", "--load-init", checkpoint["work"] / "megatron",
                 "--data-path", prefix, "--seq-length", "256", "--micro-batch-size", "1", "--global-batch-size",
                 "1", "--train-iters", "1", "--lr", "1e-4", "--log-interval", "1", timeout=300)


@pytest.mark.timeout(300)
def test_decoding_uses_the_checkpoint_ids_and_the_authors_prompt(checkpoint):
    import argparse

    from transformers import AutoTokenizer

    from megatron_cslm.cli.decoding import add_decoding_args, load_model
    from megatron_cslm.inference.parse import parse_response
    from megatron_cslm.inference.sampling import ModalityConstraint, SamplingConfig

    out, d = checkpoint["work"] / "hf_out", checkpoint["tokenizer_dir"]
    parser = argparse.ArgumentParser()
    add_decoding_args(parser)
    args = parser.parse_args(["--lang", "en", "--prompt-style", "cslm-authors", "--device", "cpu"])
    lm, prompts = load_model(str(out), args)
    tok = lm.tok
    assert tok.layout == checkpoint["tok"].layout
    # The authors' prompt is what transformers' apply_chat_template gives for their user turn, id for id.
    user = f"Please directly answer the questions in the user's speech. This is input: {SEGMENT_TEXT}."
    hf = AutoTokenizer.from_pretrained(out)
    expected = hf.apply_chat_template([{"role": "user", "content": user}], tokenize=True, add_generation_prompt=True,
                                      return_dict=False)
    prompt = prompts.encode_prompt(SEGMENT, "en")
    assert prompt == list(expected)
    assert "Cutting Knowledge Date" in tok.decode(prompt)  # the checkpoint's own chat template
    zh = hf.apply_chat_template([{"role": "user", "content": f"直接回答用户语音中的问题。 这是输入: {SEGMENT_TEXT}。"}],
                                tokenize=True, add_generation_prompt=True, return_dict=False)
    assert prompts.encode_prompt(SEGMENT, "zh") == list(zh)
    # Parsing and the modality constraint classify units by the checkpoint's ids.
    answer = hf_ids(d, f"[question]hi[answer]The cat{SEGMENT_TEXT}<|eot_id|>")
    parsed = parse_response(tok, answer)
    assert parsed.speech_units == SEGMENT and parsed.answer_text == "The cat" and not parsed.warnings
    constraint = ModalityConstraint(lm.vocab, lm.model.get_output_embeddings().weight.shape[0], "cpu")
    assert torch.nonzero(constraint.speech_allowed).flatten().tolist() == sorted(
        [hf.convert_tokens_to_ids(u) for u in UNITS] + [tok.eosp_id])
    state = constraint.advance(torch.tensor([True, True, False]), torch.tensor(answer[-3:]))
    assert state.tolist() == [True, False, False]  # <4095> keeps speech, <eosp> ends it
    responses = lm.generate([prompt], SamplingConfig(max_new_tokens=8, constrained=True), [0])
    assert len(responses[0].ids) <= 8
