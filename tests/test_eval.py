"""Evaluation: latency accounting of interleaved vs sequential layouts, metrics, ASR hook, the eval tool."""
from __future__ import annotations

import json
import sys

import pytest

from megatron_cslm.data.sft import SFTConfig, SFTEncoder, parse_record
from megatron_cslm.errors import CslmError
from megatron_cslm.inference.evaluate import AsrCommand, evaluate, render_markdown
from megatron_cslm.inference.generate import Response
from megatron_cslm.inference.inputs import Question
from megatron_cslm.inference.latency import measure
from megatron_cslm.inference.metrics import error_rates, script_language
from megatron_cslm.inference.parse import parse_response
from tests.helpers.files import load_tool
from tests.helpers.spoken_qa import ANSWERS, QUESTIONS, answer_units, belle_manifest, chunk_units, tiny_models

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
def test_eval_tool_compares_layouts(tmp_path_factory, speech_tokenizer, tmp_path, chat_server):
    import numpy as np
    import soundfile as sf

    models = tiny_models(tmp_path_factory, speech_tokenizer)
    (tmp_path / "answers").mkdir()
    for k in QUESTIONS:  # the spoken answers, as `cslm synthesize` would write them (one folder for both models)
        sf.write(tmp_path / "answers" / f"{k}.wav", np.random.default_rng(0).uniform(-0.3, 0.3, 8000), 16000)
    script = tmp_path / "asr.py"
    script.write_text(TOY_ASR, encoding="utf-8")
    lexicon = tmp_path / "lex.json"
    lexicon.write_text(json.dumps({" ".join(map(str, answer_units(k, lang))): "".join(ANSWERS[k][lang])
                                   for k in QUESTIONS for lang in ("zh", "en")}, ensure_ascii=False))
    out = tmp_path / "eval"
    load_tool("eval_s2s").main([
        "--manifest", str(belle_manifest(tmp_path)), "--audio-dir", str(models["audio_dir"]), "--random-init",
        "--speech-tokenizer", "speech_tokenizer_v1_25hz",  # the tiny models record none; trained on these units
        "--model", str(models["interleaved"]), "--baseline-model", str(models["sequential"]),
        "--lang", "zh", "--answer-lang", "en", "--max-new-tokens", "80", "--batch-size", "3",
        "--asr-command", f"{sys.executable} {script} {lexicon} {{units_file}}", "--output-dir", str(out),
        "--benchmark", "belle-eval-s2s-x", "--answer-audio-dir", str(tmp_path / "answers"),
        "--asr-model", str(_tiny_whisper(tmp_path / "whisper")), "--utmos-model", str(_utmos_models(tmp_path)[0]),
        "--judge-url", chat_server.url, "--judge-model", "toy-judge"])
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
        assert s["asr_error"]["pairs"] == 3  # Whisper on the answer wavs replaced the units ASR
        assert s["mean_judge_score"] == 4 and s["judge_errors"] == 0 and s["items_with_audio"] == 3
    assert all(v is not None for row in report["paper_table"] for v in row.values()), report["paper_table"]
    assert report["config"]["benchmark"] == "belle-eval-s2s-x" and report["config"]["judge_requests"] == 3
    assert len(chat_server.requests) == 3  # the same answer text in both layouts: the second model hits the cache
    assert inter["summary"]["mean_first_speech_tokens"] < seq["summary"]["mean_first_speech_tokens"]
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "| metric | interleaved | sequential |" in md and "tokens to first speech chunk" in md
    assert "## The paper's table" in md and "## interleaved" in md and "## sequential" in md
    for label in ("interleaved", "sequential"):
        assert len(json.loads((out / label / "responses.json").read_text(encoding="utf-8"))) == 3


# ------------------------------------------------------------------ the paper's scores (issue 25, part 3)

class _ChatServer:
    """A local OpenAI-compatible chat-completions server (real HTTP in a thread). What it answers depends on
    the answer in the prompt: "FAIL" -> HTTP 500, "GARBAGE" -> a reply without a score, "FLAKY" -> one 500,
    then a score; anything else -> "Score: 4"."""

    def __init__(self):
        import http.server
        import threading

        self.requests, self.seen = [], set()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][-1]["content"]
                server.requests.append((self.path, self.headers.get("Authorization"), body))
                answer = prompt.split("Answer:")[1]
                if "FAIL" in answer or ("FLAKY" in answer and prompt not in server.seen):
                    server.seen.add(prompt)
                    self.send_response(500)
                    self.end_headers()
                    return
                content = "I would rather not say." if "GARBAGE" in answer else "Score: 4"
                data = json.dumps({"id": "c1", "object": "chat.completion", "model": body["model"], "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def chat_server():
    server = _ChatServer()
    yield server
    server.close()


def _tiny_whisper(path):
    """A randomly initialised tiny Whisper saved with a WhisperProcessor whose byte-level tokenizer is built here
    (256 byte symbols + Whisper's specials, no merges): what `pipeline("automatic-speech-recognition")` loads."""
    import torch
    from transformers import (
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    specials = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|zh|>", "<|translate|>", "<|transcribe|>",
                "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>"]
    vocab.update({s: len(vocab) + i for i, s in enumerate(specials)})
    tokenizer = WhisperTokenizer(vocab=vocab, merges=[], pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})
    eos = vocab["<|endoftext|>"]
    config = WhisperConfig(vocab_size=len(vocab), d_model=32, encoder_layers=1, decoder_layers=1,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                           decoder_ffn_dim=64, num_mel_bins=80, max_target_positions=64,
                           decoder_start_token_id=vocab["<|startoftranscript|>"], eos_token_id=eos,
                           pad_token_id=eos, bos_token_id=eos)
    torch.manual_seed(0)
    WhisperForConditionalGeneration(config).save_pretrained(path)
    processor = WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tokenizer)
    processor.save_pretrained(path)
    return path


def _utmos_models(directory):
    """The two UTMOS loading contracts with the same toy MOS (1 + 4 * mean |x|, clipped): TorchScript and ONNX."""
    import onnx
    import torch
    from onnx import TensorProto, helper

    class ToyMos(torch.nn.Module):
        def forward(self, wave: torch.Tensor) -> torch.Tensor:
            return 1.0 + 4.0 * wave.abs().mean(dim=1).clamp(0.0, 1.0)

    torch.jit.save(torch.jit.script(ToyMos()), str(directory / "utmos.pt"))
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    nodes = [helper.make_node("Abs", ["wave"], ["a"]), helper.make_node("ReduceMean", ["a", "axes"], ["m"], keepdims=0),
             helper.make_node("Clip", ["m", "lo", "hi"], ["c"]), helper.make_node("Mul", ["c", "four"], ["s"]),
             helper.make_node("Add", ["s", "one"], ["mos"])]
    consts = [axes] + [helper.make_tensor(n, TensorProto.FLOAT, [], [v])
                       for n, v in (("lo", 0.0), ("hi", 1.0), ("four", 4.0), ("one", 1.0))]
    graph = helper.make_graph(nodes, "toy_mos", [helper.make_tensor_value_info("wave", TensorProto.FLOAT, [1, None])],
                              [helper.make_tensor_value_info("mos", TensorProto.FLOAT, [1])], initializer=consts)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(directory / "utmos.onnx"))
    return directory / "utmos.pt", directory / "utmos.onnx"


def _toy_report(tok, answers: dict[str, str]):
    questions = [Question(k, k, reference=f"Question {k}?") for k in answers]
    responses = []
    for text in answers.values():
        ids = tok.encode_text(f"[question]Question?[answer]{text}<sosp><1><2><eosp><|eot_id|>")
        parsed = parse_response(tok, ids)
        responses.append(Response(ids, parsed, measure(parsed, 5, 0.5)))
    return questions, evaluate(questions, responses, answer_lang="en")


@pytest.mark.timeout(60)
def test_judge_retries_then_reports_per_item_errors_and_caches(chat_server, speech_tokenizer, tmp_path,
                                                               monkeypatch):
    from megatron_cslm.inference.evaluate import add_speech_scores, render_model_markdown
    from megatron_cslm.inference.judge import Judge, JudgeConfig, parse_score

    assert [parse_score(r) for r in ("4", "Score: 5.", "4/5", "rated 3.5", "10", "")] == [4, 5, 4, None, None, None]
    monkeypatch.setenv("TOY_JUDGE_KEY", "sk-toy")
    config = JudgeConfig(chat_server.url, "toy-judge", "TOY_JUDGE_KEY", tmp_path / "cache.jsonl", retries=2,
                         backoff_s=0.01)
    questions, report = _toy_report(speech_tokenizer, {"good": "It is blue.", "flaky": "FLAKY blue.",
                                                       "fail": "FAIL blue.", "garbage": "GARBAGE blue."})
    judge = Judge(config)
    add_speech_scores(report, questions, judge=judge)
    by_id = {row["id"]: row["judge"] for row in report["items"]}
    assert by_id["good"] == {"score": 4, "error": None, "cached": False} and by_id["flaky"]["score"] == 4
    assert by_id["fail"]["score"] is None and "HTTP 500" in by_id["fail"]["error"]
    assert "3 attempts" in by_id["fail"]["error"]
    assert by_id["garbage"]["score"] is None and "no score 1-5" in by_id["garbage"]["error"]
    assert judge.requests == len(chat_server.requests) == 1 + 2 + 3 + 3  # retries: flaky once, the others twice
    path, auth, body = chat_server.requests[0]
    assert path == "/v1/chat/completions" and auth == "Bearer sk-toy" and body["model"] == "toy-judge"
    assert "Question good?" in body["messages"][0]["content"] and "suitab" in body["messages"][0]["content"]
    s = report["summary"]
    assert (s["mean_judge_score"], s["judge_scored"], s["judge_errors"]) == (4, 2, 2)
    assert "error: HTTP 500" in render_model_markdown("m", report)

    # A rerun (a new process would read the same file) sends nothing for the items already scored.
    before = len(chat_server.requests)
    again = Judge(config)
    assert again.score("Question good?", "It is blue.") == {"score": 4, "error": None, "cached": True}
    assert again.score("Question flaky?", "FLAKY blue.")["cached"] and again.requests == 0
    assert len(chat_server.requests) == before


@pytest.mark.timeout(120)
def test_asr_utmos_and_paper_table_from_answer_wavs(speech_tokenizer, tmp_path):
    import numpy as np
    import soundfile as sf

    from megatron_cslm.inference.asr import PipelineAsr, Utmos, answer_wavs, load_waves
    from megatron_cslm.inference.evaluate import (
        PAPER_COLUMNS,
        add_speech_scores,
        paper_table,
        render_model_markdown,
        render_paper_markdown,
    )

    questions, report = _toy_report(speech_tokenizer, {"a": "The sky is blue.", "b": "Cats eat fish.",
                                                       "c": "No audio here."})
    rng = np.random.default_rng(0)
    (tmp_path / "wav").mkdir()
    sf.write(tmp_path / "wav" / "a.wav", 0.25 * rng.uniform(-1, 1, 8000), 16000)  # mean |x| = 0.125
    sf.write(tmp_path / "wav" / "b.wav", 0.5 * rng.uniform(-1, 1, 11025), 22050)  # resampled to 16 kHz
    sources = answer_wavs(tmp_path / "wav", [q.id for q in questions])
    assert sorted(sources) == ["a", "b"]  # "c" has no wav: no audio scores, not an error
    waves = load_waves({**sources, "b": (0.5 * rng.uniform(-1, 1, 8000).astype(np.float32), 16000)})
    asr = PipelineAsr(_tiny_whisper(tmp_path / "whisper"), batch_size=2, max_new_tokens=8)
    pt, onnx_file = _utmos_models(tmp_path)
    assert Utmos(onnx_file)([waves["a"]]) == pytest.approx(Utmos(pt)([waves["a"]]), abs=1e-5)
    add_speech_scores(report, questions, waves, asr=asr, utmos=Utmos(onnx_file))
    rows = {row["id"]: row for row in report["items"]}
    for key in ("a", "b"):
        assert isinstance(rows[key]["asr_transcript"], str) and rows[key]["asr_error"]["wer"] >= 0
    assert rows["a"]["utmos"] == pytest.approx(1 + 4 * np.abs(waves["a"][0]).mean(), rel=1e-4)
    assert "utmos" not in rows["c"] and "asr_transcript" not in rows["c"]
    s = report["summary"]
    assert s["items_with_audio"] == 2 and s["asr_error"]["pairs"] == 2
    assert s["mean_utmos"] == pytest.approx(np.mean([rows["a"]["utmos"], rows["b"]["utmos"]]))

    # Several models side by side (the paper's table); one table per model with every item.
    _, other = _toy_report(speech_tokenizer, {"a": "天空是蓝色的。", "b": "x", "c": "y"})
    table = paper_table({"cslm": report, "other": other})
    assert [r["model"] for r in table] == ["cslm", "other"] and table[1]["off-target"] == pytest.approx(1 / 3)
    assert all(table[0][name] is not None for name, _ in PAPER_COLUMNS if name != "judge (1-5)")
    md = render_paper_markdown({"cslm": report, "other": other})
    assert md.splitlines()[0].startswith("| model | judge (1-5) | UTMOS | ASR-WER |") and "| other | - | - |" in md
    assert "| c | " in render_model_markdown("cslm", report)

    with pytest.raises(CslmError, match="--asr-model"):
        PipelineAsr(tmp_path / "missing")
