"""Evaluation: latency accounting of interleaved vs sequential layouts, metrics, ASR hook, the eval tool."""
from __future__ import annotations

import json
import sys

import pytest
from test_inference import ANSWERS, QUESTIONS, answer_units, belle_manifest, chunk_units, tiny_models

from megatron_cslm.data.sft import SFTConfig, SFTEncoder, parse_record
from megatron_cslm.inference.evaluate import AsrCommand, evaluate, render_markdown
from megatron_cslm.inference.generate import Response
from megatron_cslm.inference.inputs import Question
from megatron_cslm.inference.latency import measure
from megatron_cslm.inference.metrics import error_rates, script_language
from megatron_cslm.inference.parse import parse_response
from tests.distributed import load_tool

# The spoken answer of each toy text answer, for the toy ASR below (a real command reading the units file).
TOY_ASR = """
import json, sys
lexicon = json.load(open(sys.argv[1], encoding="utf-8"))
print(lexicon.get(open(sys.argv[2]).read().strip(), "<unknown>"))
"""


def _assistant_ids(tok, layout: str, chunks: list[str]) -> list[int]:
    """The trained assistant side (after the header) of one answer in `layout`."""
    record = {"lang": "en", "turns": [{"role": "user", "units": [1, 2, 3], "text": "Why does the sun shine?"},
                                      {"role": "assistant",
                                       "chunks": [{"text": c, "units": chunk_units(c)} for c in chunks]}]}
    ids = SFTEncoder(tok, SFTConfig(layout=layout)).encode(parse_record(record, tok.num_units)).tokens.tolist()
    return ids[ids.index(tok.question_id):]


@pytest.mark.timeout(60)
def test_latency_interleaved_vs_sequential_on_the_same_answer(speech_tokenizer):
    tok = speech_tokenizer
    chunks = ANSWERS["4"]["en"]
    text_tokens = [len(tok.encode_text(c)) for c in chunks]
    inter = measure(parse_response(tok, _assistant_ids(tok, "interleaved", chunks)), prompt_tokens=10)
    seq = measure(parse_response(tok, _assistant_ids(tok, "sequential", chunks)), prompt_tokens=10)
    tq = 2 + len(tok.encode_text("Why does the sun shine?"))  # [question] TQ [answer]
    # Interleaved: speech after one text chunk; sequential: only after the whole text answer.
    assert inter.text_chunks_before_speech == 1 and inter.text_tokens_before_speech == text_tokens[0]
    assert inter.first_speech_tokens == tq + text_tokens[0] + 1 + 8 + 1  # <sosp> 8 units <eosp>
    assert seq.text_chunks_before_speech == 1 and seq.text_tokens_before_speech == seq.answer_text_tokens
    assert seq.first_speech_tokens == tq + seq.answer_text_tokens + 1 + 24 + 1
    assert inter.first_speech_tokens < seq.first_speech_tokens
    assert inter.speech_units == seq.speech_units == 24
    assert inter.generated_tokens == seq.generated_tokens + 4  # two more <sosp>/<eosp> pairs


@pytest.mark.timeout(60)
def test_language_id_and_error_rates():
    assert script_language("天空是蓝色的。") == "zh"
    assert script_language("The sky is blue.") == "en"
    assert script_language("机器学习 (machine learning) 是一种方法") == "zh"
    assert script_language("12 + 3 = 15") is None
    assert error_rates(["The sky, is BLUE!"], ["the sky is blue"]) == {"wer": 0.0, "cer": 0.0, "pairs": 1}
    rates = error_rates(["天空是蓝色的"], ["天空是红色的"])
    assert rates["cer"] == pytest.approx(1 / 6) and rates["wer"] == pytest.approx(1 / 6)  # CJK char = word
    assert error_rates(["..."], ["x"]) is None


@pytest.mark.timeout(60)
def test_asr_command(tmp_path):
    script = tmp_path / "asr.py"
    script.write_text(TOY_ASR, encoding="utf-8")
    lexicon = tmp_path / "lex.json"
    lexicon.write_text(json.dumps({"1 2 3": "hello"}), encoding="utf-8")
    asr = AsrCommand(f"{sys.executable} {script} {lexicon} {{units_file}}")
    assert asr([1, 2, 3]) == "hello" and asr([4]) == "<unknown>"
    with pytest.raises(ValueError, match="must contain"):
        AsrCommand("asr --units x")
    with pytest.raises(RuntimeError, match="failed with exit code 3"):
        AsrCommand(f"{sys.executable} -c 'import sys; sys.exit(3)' {{units_file}}")([1])


@pytest.mark.timeout(60)
def test_report_counts_off_target_and_renders(speech_tokenizer):
    tok = speech_tokenizer
    questions = [Question("a", "a", reference="What is it?"), Question("b", "b", reference="它是什么？")]
    texts = ["[question]What is it?[answer]It is a cat.<sosp><1><2><eosp><|eot_id|>",
             "[question]它是什么？[answer]它是猫。<sosp><3><eosp><|eot_id|>"]
    responses = []
    for text in texts:
        parsed = parse_response(tok, tok.encode_text(text))
        responses.append(Response(tok.encode_text(text), parsed, measure(parsed, 5, 0.5)))
    report = evaluate(questions, responses, answer_lang="en")
    s = report["summary"]
    assert s["off_target_ratio"] == 0.5 and [r["off_target"] for r in report["items"]] == [False, True]
    assert s["tq_error"]["wer"] == 0.0 and s["asr_error"] is None and s["warnings"] == {}
    assert s["mean_speech_units"] == 1.5 and s["mean_sa_chunks"] == 1
    md = render_markdown({"interleaved": report, "other": report})
    assert "| metric | interleaved | other |" in md and "| off-target answer language | 0.500 | 0.500 |" in md
    assert "| a | " in md


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_eval_tool_compares_layouts(tmp_path_factory, speech_tokenizer, tmp_path):
    models = tiny_models(tmp_path_factory, speech_tokenizer)
    script = tmp_path / "asr.py"
    script.write_text(TOY_ASR, encoding="utf-8")
    lexicon = tmp_path / "lex.json"
    lexicon.write_text(json.dumps({" ".join(map(str, answer_units(k, lang))): "".join(ANSWERS[k][lang])
                                   for k in QUESTIONS for lang in ("zh", "en")}, ensure_ascii=False))
    out = tmp_path / "eval"
    load_tool("eval_s2s").main([
        "--manifest", str(belle_manifest(tmp_path)), "--audio-dir", str(models["audio_dir"]), "--random-init",
        "--model", str(models["interleaved"]), "--baseline-model", str(models["sequential"]),
        "--lang", "zh", "--answer-lang", "en", "--max-new-tokens", "80", "--batch-size", "3",
        "--asr-command", f"{sys.executable} {script} {lexicon} {{units_file}}", "--output-dir", str(out)])
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    inter, seq = report["models"]["interleaved"], report["models"]["sequential"]
    for a, b in zip(inter["items"], seq["items"]):
        assert a["ta"] == b["ta"] == "".join(ANSWERS[a["id"]]["en"])  # the same answer in both layouts
        assert a["text_chunks_before_speech"] == 1 and a["text_tokens_before_speech"] < a["answer_text_tokens"]
        assert b["text_tokens_before_speech"] == b["answer_text_tokens"]
        assert a["first_speech_tokens"] < b["first_speech_tokens"]
    for m in (inter, seq):
        s = m["summary"]
        assert s["items"] == s["items_with_speech"] == 3 and s["warnings"] == {}
        assert s["off_target_ratio"] == 0.0  # cross-lingual: Chinese questions, English answers
        assert s["tq_error"] == {"wer": 0.0, "cer": 0.0, "pairs": 3}
        assert s["asr_error"] == {"wer": 0.0, "cer": 0.0, "pairs": 3}
    assert inter["summary"]["mean_first_speech_tokens"] < seq["summary"]["mean_first_speech_tokens"]
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "| metric | interleaved | sequential |" in md and "tokens to first speech chunk" in md
    for label in ("interleaved", "sequential"):
        assert len(json.loads((out / label / "responses.json").read_text(encoding="utf-8"))) == 3
