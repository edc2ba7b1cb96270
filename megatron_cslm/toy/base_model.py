"""A tiny pretrained text LM for the quickstart: what Llama-3.1-8B-Instruct is to the real run.

Why: CSLM continues pretraining a *pretrained* LLM. Measured on the toy corpus, a randomly initialised 64-wide
model given speech-to-text pairs memorises the sentences and reads nothing new (held-out question CER ~0.8),
while the same model that can already repeat text it has seen in its context (the induction heads every
pretrained LM has) learns to read the toy's speech within a few hundred continual-pretraining steps. So the
quickstart first trains this stand-in base, in plain PyTorch in one process (about a minute on 2 cores):

* the `tiny` Llama-3.1 shape (`models.llama.ARCHS`) over the toy *text* tokenizer (no speech units yet);
* documents: ``sentence \\n sentence`` (loss on the repeat: in-context copying) over the toy corpus's text and
  random word sequences of its lexicon (`toy.corpus.random_sentences`), and ``question \\n answer`` over the
  toy Q/A pairs (loss on the answer: the text knowledge the spoken answers should carry over);
* saved as a Hugging Face Llama directory (``config.json``, ``model.safetensors``, the tokenizer), so the
  quickstart converts it exactly as a user converts Meta's checkpoint: ``hf-to-megatron --expand-vocab``.

Deterministic for a given seed and thread count (one process, fixed data order).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import random
import shutil
from pathlib import Path

import torch

from megatron_cslm.errors import CslmError
from megatron_cslm.fileio import iter_jsonl, require, write_json
from megatron_cslm.text.tokenizer import TOKENIZER_FILES
from megatron_cslm.toy.tokenizer import toy_texts

log = logging.getLogger(__name__)

# RoPE base of the stand-in: with 16-wide heads, Llama-3's 500,000 leaves only ~2 of 8 frequency pairs turning
# within a 256-token window, and in-context copying needs to tell neighbouring positions apart.
BASE_ROPE_THETA = 10_000.0


def base_corpus(corpus_dir: str | Path) -> tuple[list[str], list[tuple[str, str]]]:
    """The stand-in's material in a toy corpus directory: its texts (`toy_texts`, plus the read-speech sentences
    when ``reading.jsonl`` was written) and the Q/A pairs of ``instruct.jsonl``."""
    corpus = Path(corpus_dir)
    for name in ("parallel.jsonl", "instruct.jsonl"):
        if not (corpus / name).exists():
            raise CslmError(corpus / name, None, None, "missing: write the toy corpus first (cslm make-toy-corpus)",
                            kind="io", reason="missing_input")
    texts = toy_texts(corpus)
    reading = corpus / "reading.jsonl"
    if reading.exists():
        texts += [require(r, "text", str, reading, line) for line, r in iter_jsonl(reading)]
    instruct = corpus / "instruct.jsonl"
    qa = [(require(r, "prompt", str, instruct, line), require(r, "response", str, instruct, line))
          for line, r in iter_jsonl(instruct)]
    return texts, qa


def base_documents(tokenizer, texts: list[str], qa: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(ids, loss mask) per document: copies of `texts`, then answers of `qa`; each ends with end-of-text."""
    eos = tokenizer.convert_tokens_to_ids("<|end_of_text|>")
    newline = tokenizer.encode("\n", add_special_tokens=False)
    docs = []
    for first, second in [(t, t) for t in texts] + list(qa):
        a = tokenizer.encode(first, add_special_tokens=False) + newline
        b = tokenizer.encode(second, add_special_tokens=False) + [eos]
        docs.append((a + b, [0] * len(a) + [1] * len(b)))
    return docs


def _batches(docs, batch_size: int, seq_length: int, seed: int):
    """Endless (input, target, mask) batches of documents packed end to end into seq_length + 1 positions."""
    rng = random.Random(seed)
    while True:
        rows, masks = [], []
        for _ in range(batch_size):
            ids, mask = [], []
            while len(ids) < seq_length + 1:
                doc_ids, doc_mask = docs[rng.randrange(len(docs))]
                ids += doc_ids
                mask += doc_mask
            rows.append(ids[:seq_length + 1])
            masks.append(mask[:seq_length + 1])
        x, m = torch.tensor(rows), torch.tensor(masks, dtype=torch.float32)
        yield x[:, :-1], x[:, 1:], m[:, 1:]


def train_toy_base_model(tokenizer_dir: str | Path, texts: list[str], qa: list[tuple[str, str]],
                         out_dir: str | Path, *, arch: str = "tiny", steps: int = 1200, batch_size: int = 8,
                         seq_length: int = 256, lr: float = 3e-3, rope_theta: float = BASE_ROPE_THETA, seed: int = 1234,
                         progress: bool = True) -> dict:
    """Train the stand-in base LM (see module docstring) and save it as an HF Llama directory; returns stats."""
    from tqdm import tqdm
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from megatron_cslm.models.llama import ARCHS

    tokenizer_dir, out_dir = Path(tokenizer_dir), Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    shape = dataclasses.replace(ARCHS[arch], rope_theta=rope_theta).with_vocab(len(tokenizer))
    config = LlamaConfig(**shape.to_hf_config(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    docs = base_documents(tokenizer, texts, qa)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, steps // 50)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 0.1 + 0.45 * (
        1 + math.cos(math.pi * min(1.0, s / steps)))))
    losses = []
    batches = _batches(docs, batch_size, seq_length, seed)
    bar = tqdm(range(steps), desc="toy base LM", unit="step", disable=not progress)
    for step in bar:
        x, y, m = next(batches)
        logits = model(x).logits
        token_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                                       reduction="none")
        loss = (token_loss * m.reshape(-1)).sum() / m.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy2(tokenizer_dir / name, tmp / name)
    stats = {"arch": arch, "rope_theta": rope_theta, "steps": steps, "batch_size": batch_size,
             "seq_length": seq_length, "lr": lr, "seed": seed, "documents": len(docs), "loss_first": losses[0],
             "loss_last": sum(losses[-20:]) / len(losses[-20:])}
    write_json(tmp / "toy_base_model.json", stats)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    log.info("toy base LM: loss %.3f -> %.3f over %d steps -> %s", stats["loss_first"], stats["loss_last"], steps,
             out_dir)
    return stats
