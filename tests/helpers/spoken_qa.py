"""Three of BELLE-eval-S2S's spoken questions, their toy answers, and tiny Llama models trained on them (once per
session): shared by tests/test_inference.py and tests/test_eval.py."""
from __future__ import annotations

import json
import math
import random
import zlib
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F

from megatron_cslm.data.sft import SFTConfig, SFTEncoder, parse_record
from tests.helpers.belle import BELLE_DIR

QUESTIONS = {"0": "中国有多少个省？", "3": "人类存在的意义是什么？", "4": "为什么太阳会发光？"}
ANSWERS = {  # answer chunks by question id and answer language
    "0": {"zh": ["中国有三十四个", "省级行政区。"], "en": ["China has thirty-four", " provincial regions."]},
    "3": {"zh": ["人类存在的意义", "在于创造和爱。"], "en": ["The meaning of life", " is to create and love."]},
    "4": {"zh": ["太阳发光是因为", "核聚变释放能量。"],
          "en": ["The sun shines", " because nuclear fusion", " releases energy."]},
}
LAYOUTS = ("interleaved", "sequential")

QUESTION_RATE = 22050  # BELLE-eval-S2S's sample rate; the tools resample to the tokenizer's 16 kHz


def chunk_units(text: str, n: int = 8) -> list[int]:
    """The toy 'speech' of a text chunk: n units derived from the text (a toy ASR can invert it)."""
    rng = random.Random(zlib.crc32(text.encode("utf-8")))
    return [rng.randrange(4096) for _ in range(n)]


def answer_units(qid: str, lang: str) -> list[int]:
    return [u for c in ANSWERS[qid][lang] for u in chunk_units(c)]


def write_question_wavs(wav_dir: Path) -> Path:
    """Spoken-question stand-ins, `wav_dir/<id>.wav` (mono 16-bit PCM at 22.05 kHz): one voiced syllable per
    character, pitch and length drawn from a seed of the question's text, so each question has its own units."""
    wav_dir.mkdir(parents=True, exist_ok=True)
    for qid, text in QUESTIONS.items():
        rng = np.random.default_rng(zlib.crc32(text.encode("utf-8")))
        syllables = []
        for _ in text:
            n = int(QUESTION_RATE * rng.uniform(0.15, 0.3))
            t = np.arange(n) / QUESTION_RATE
            f0 = rng.uniform(110, 260) * (1 + rng.uniform(-0.2, 0.2) * t / t[-1])  # a rising or falling tone
            phase = 2 * np.pi * np.cumsum(f0) / QUESTION_RATE
            voiced = sum(np.sin(h * phase) / h for h in range(1, 9)) * np.hanning(n)
            syllables += [voiced, np.zeros(int(QUESTION_RATE * rng.uniform(0.02, 0.08)))]
        audio = np.concatenate(syllables) + rng.normal(0, 0.003, sum(map(len, syllables)))
        sf.write(wav_dir / f"{qid}.wav", (0.3 * audio / np.abs(audio).max()).astype(np.float32), QUESTION_RATE,
                 subtype="PCM_16")
    return wav_dir


def question_audio_dir(tmp_path_factory) -> Path:
    """The questions' wav folder: BELLE-eval-S2S's own (opt-in), else written once per session."""
    if BELLE_DIR is not None:
        return BELLE_DIR / "wav"
    wav_dir = tmp_path_factory.getbasetemp() / "questions" / "wav"
    return wav_dir if wav_dir.is_dir() else write_question_wavs(wav_dir)


def belle_manifest(directory: Path) -> Path:
    """The three questions in the BELLE-eval-S2S list format, `id<TAB>text` (audio: `<audio dir>/<id>.wav`)."""
    path = directory / "test.tsv"
    path.write_text("id\ttext\n" + "".join(f"{k}\t{v}\n" for k, v in QUESTIONS.items()), encoding="utf-8")
    return path


def question_units(wav_dir: Path) -> dict[str, list[int]]:
    """S3 units of the three wavs, through the same library calls the tools use (random-init weights)."""
    from megatron_cslm.inference.inputs import Question
    from megatron_cslm.inference.runner import tokenize_audio
    from megatron_cslm.speech.extract import UnitExtractor

    questions = [Question(k, k, audio=wav_dir / f"{k}.wav") for k in QUESTIONS]
    tokenize_audio(questions, UnitExtractor(random_init=True), progress=False)
    return {q.id: q.units for q in questions}


def toy_records(units: dict[str, list[int]]) -> list[dict]:
    return [{"id": f"{k}-{lang}", "lang": lang,
             "turns": [{"role": "user", "units": units[k], "text": QUESTIONS[k]},
                       {"role": "assistant", "chunks": [{"text": c, "units": chunk_units(c)} for c in chunks]}]}
            for k, by_lang in ANSWERS.items() for lang, chunks in by_lang.items()]


def train_tiny(tok, records: list[dict], layout: str, out: Path, steps: int = 300) -> None:
    """Train a tiny LlamaForCausalLM (full expanded vocab) on `records` and save it with the tokenizer.

    Only the embedding and output rows of tokens in the data are trained; the other output rows are zero, so
    their logits are exactly 0 and the full-vocabulary softmax is the softmax over the data's tokens plus one
    constant column log(#other tokens). That keeps a step at a few milliseconds despite 132k ids.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_cslm.models.llama import ARCHS

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**ARCHS["tiny"].with_vocab(tok.vocab_size).to_hf_config()))
    encoder = SFTEncoder(tok, SFTConfig(layout=layout))
    samples = [encoder.encode(parse_record(r, tok.num_units)) for r in records]
    width = max(len(s.tokens) for s in samples)
    ids = torch.full((len(samples), width), tok.eod_id)
    labels = torch.full((len(samples), width), -100)
    for i, s in enumerate(samples):
        t = torch.as_tensor(s.tokens, dtype=torch.long)
        ids[i, :len(t)] = t
        labels[i, :len(t)] = torch.where(torch.as_tensor(s.modality > 0), t, -100)
    active = torch.unique(ids)
    local = torch.full((tok.vocab_size,), -1)
    local[active] = torch.arange(len(active))
    emb = torch.nn.Parameter(model.model.embed_tokens.weight.detach()[active].clone())
    head = torch.nn.Parameter(model.lm_head.weight.detach()[active].clone())
    body = [p for n, p in model.named_parameters() if n not in ("model.embed_tokens.weight", "lm_head.weight")]
    inputs, targets = local[ids[:, :-1]], labels[:, 1:]
    trained = targets != -100
    target_local = local[targets[trained]]
    rest = math.log(tok.vocab_size - len(active))
    opt = torch.optim.Adam(body + [emb, head], lr=1e-2)
    for _ in range(steps):
        hidden = model.model(inputs_embeds=emb[inputs]).last_hidden_state[trained]
        logits = torch.cat([hidden @ head.T, hidden.new_full((len(hidden), 1), rest)], dim=1)
        loss = F.cross_entropy(logits, target_local)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 2e-3:
            break
    assert loss.item() < 0.05, f"tiny {layout} model did not learn the toy data (loss {loss.item():.3f})"
    with torch.no_grad():
        model.model.embed_tokens.weight[active] = emb
        model.lm_head.weight.zero_()
        model.lm_head.weight[active] = head
    model.save_pretrained(out)
    tok.save_pretrained(out)


def tiny_models(tmp_path_factory, tok) -> dict:
    """{"units": question units, "audio_dir": their wavs, "interleaved": dir, "sequential": dir}, trained once
    per session."""
    root = tmp_path_factory.getbasetemp() / "tiny_cslm"
    meta = root / "units.json"
    audio_dir = question_audio_dir(tmp_path_factory)
    if not meta.exists():
        units = question_units(audio_dir)
        for layout in LAYOUTS:
            train_tiny(tok, toy_records(units), layout, root / layout)
        meta.write_text(json.dumps(units), encoding="utf-8")
    return {"units": json.loads(meta.read_text(encoding="utf-8")), "audio_dir": audio_dir,
            **{k: root / k for k in LAYOUTS}}
