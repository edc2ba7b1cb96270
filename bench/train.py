#!/usr/bin/env python
"""megatron_cslm vs the CSLM authors' stack (transformers `Trainer`), same model, data, optimizer and budget.

The authors train with transformers' Trainer (+ DeepSpeed ZeRO-2 on GPUs): SFT samples truncated at 4,096
tokens, pretraining documents at 1,024, each micro-batch padded to its longest sample, no packing. This
script trains the same Llama-3.1-shaped model (`--arch`, default `small`) from the same initial weights (one
seeded `LlamaForCausalLM`, converted with checkpoints_convert/hf_to_megatron.py for megatron_cslm) on:

* SFT: synthetic spoken dialogue in the interleaved chain of modality (`data/sft.py`), question 2-20 s of
  speech, answers of --answer-words words (speech at 2.5 words/s, 50 units/s, deduplicated units x0.6), so
  lengths follow bench/packing.py's distribution while every sample fits 4,096 tokens (neither side cuts
  anything). Budget: one epoch over the same samples, i.e. exactly the same real (loss-bearing) tokens.
  megatron_cslm trains packed bins of --sft-seq-length (per-sample attention on the local spec); the Trainer
  micro-batches of --micro-batch-size samples.
* pretraining: a two-source blend (interleaved text/speech documents, text replay), documents of 400-3,000
  tokens (mostly cut to 1,024 by the authors' collator). megatron_cslm trains the GPTDataset blend at
  sequence 1,024 (no padding); the Trainer the same documents (the same token ids, read from the .bin
  files: its own units-as-text tokenization is not counted against it) until it has trained as many real
  tokens.

Both sides: AdamW (beta 0.9/0.95, eps 1e-8, weight decay 0), cosine schedule with 10% warmup to 0, grad clip
1.0, the same seed, FP32 on CPU (`--device cuda --bf16`: BF16 on one GPU, DeepSpeed ZeRO-2 for the Trainer
when installed). Each side runs in its own subprocess; reported per side: real tokens/s over its training
loop (start-up excluded, shown separately in the process wall time), peak RSS of the process, and the final
loss (mean over the last quarter of steps). The final losses must agree within --loss-tolerance (relative):
the script fails otherwise. Ratios are megatron_cslm / Trainer, measured in the same run.

    python bench/train.py                          # CPU, a few minutes on 2 cores
    python bench/train.py --device cuda --bf16     # one GPU (prints MFU)
    python bench/train.py --smoke                  # tiny budget, seconds (tests)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from megatron_cslm.cli import run_tool
from megatron_cslm.distributed.ports import free_port

ROOT = Path(__file__).resolve().parents[1]

SFT_TRUNCATE, PRETRAIN_TRUNCATE = 4096, 1024  # the authors' collator
NUM_UNITS = 512  # toy unit block (keeps the CPU softmax cheap); the layout is the real one
OPTIM = {"lr": 3e-4, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.0, "clip_grad": 1.0,
         "warmup_fraction": 0.1}
FINAL_QUARTER = 0.25


# ---------------------------------------------------------------------------------------------- data


def _sentences() -> list[str]:
    from megatron_cslm.toy.corpus import parallel_sentences, qa_pairs

    out = [en for en, _ in parallel_sentences()]
    for pair in qa_pairs():
        out += [text for text, _ in pair.values()] if isinstance(pair, dict) else []
    return [s for s in out if s and s.isascii()]


def _words(rng: np.random.Generator, sentences: list[str], n: int) -> str:
    """About n words of running text made of whole toy sentences."""
    words: list[str] = []
    while len(words) < n:
        words += sentences[int(rng.integers(len(sentences)))].split()
    return " ".join(words[:max(1, n)])


def write_sft_records(path: Path, n: int, rng: np.random.Generator, sentences: list[str],
                      answer_words: tuple[int, int], dedup_ratio: float) -> None:
    """Spoken dialogues (speech-aware form): lengths as bench/packing.py draws them, units synthetic."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            q_s, words = rng.uniform(2, 20), int(rng.uniform(*answer_words))
            q_units = rng.integers(0, NUM_UNITS, int(q_s * 50 * dedup_ratio)).tolist()
            a_units = rng.integers(0, NUM_UNITS, int(words / 2.5 * 50 * dedup_ratio)).tolist()
            record = {"id": f"d{i}", "lang": "en", "turns": [
                {"role": "user", "text": _words(rng, sentences, int(q_s * 2.5)), "units": q_units},
                {"role": "assistant", "text": _words(rng, sentences, words), "units": a_units}]}
            f.write(json.dumps(record) + "\n")


def write_pretrain_documents(out: Path, n: int, rng: np.random.Generator, sentences: list[str]) -> dict[str, Path]:
    """Two sources of pretraining documents (format of data/documents): interleaved text/speech, text replay."""
    paths = {"interleave": out / "interleave.jsonl", "replay": out / "replay.jsonl"}
    with open(paths["interleave"], "w", encoding="utf-8") as f:
        for _ in range(n):
            segments = []
            for _ in range(int(rng.integers(4, 16))):
                segments.append({"text": _words(rng, sentences, int(rng.integers(10, 40))) + " "})
                segments.append({"units": rng.integers(0, NUM_UNITS, int(rng.integers(40, 160))).tolist()})
            f.write(json.dumps({"segments": segments, "source": "interleave", "lang": "en"}) + "\n")
    with open(paths["replay"], "w", encoding="utf-8") as f:
        for _ in range(n):
            text = _words(rng, sentences, int(rng.integers(300, 2000)))
            f.write(json.dumps({"segments": [{"text": text}], "source": "replay", "lang": "en"}) + "\n")
    return paths


def prepare(work: Path, args: argparse.Namespace) -> dict:
    """Tokenizer, SFT bins + unpacked samples, pretraining .bin/.idx, the shared initial weights (HF + Megatron)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_cslm.convert.hf_to_megatron import convert_hf_to_megatron
    from megatron_cslm.data.indexed import preprocess
    from megatron_cslm.data.sft import SFTConfig, SFTEncoder, build_sft_data, parse_record
    from megatron_cslm.fileio import iter_jsonl
    from megatron_cslm.models.llama import ARCHS
    from megatron_cslm.text.tokenizer import SpeechTextTokenizer
    from megatron_cslm.toy.tokenizer import train_toy_text_tokenizer

    rng = np.random.default_rng(args.seed)
    sentences = _sentences()
    train_toy_text_tokenizer(sentences, work / "text_tokenizer", vocab_size=1024)
    tokenizer = SpeechTextTokenizer(work / "text_tokenizer", num_units=NUM_UNITS)
    records = work / "dialogue.jsonl"
    write_sft_records(records, args.sft_samples, rng, sentences, tuple(args.answer_words), 0.6)
    config = SFTConfig(layout="interleaved")
    encoder = SFTEncoder(tokenizer, config)
    samples = [encoder.encode(parse_record(r, tokenizer.num_units, tokenizer.specials, "en"))
               for _, r in iter_jsonl(records)]
    longest = max(len(s.tokens) for s in samples)
    if longest > SFT_TRUNCATE:
        raise SystemExit(f"an SFT sample has {longest} tokens > {SFT_TRUNCATE}: lower --answer-words")
    np.savez(work / "sft_samples.npz", tokens=np.concatenate([s.tokens for s in samples]),
             modality=np.concatenate([s.modality for s in samples]),
             offsets=np.cumsum([0] + [len(s.tokens) for s in samples]))
    sft_stats = build_sft_data([records], tokenizer, config, work / "sft" / "interleaved",
                               seq_length=args.sft_seq_length, progress=False)
    docs = write_pretrain_documents(work, args.pretrain_documents, rng, sentences)
    prefixes = {}
    for name, path in docs.items():
        prefixes[name] = str(work / "bin" / name)
        preprocess([path], prefixes[name], tokenizer, workers=1, progress=False)

    arch = ARCHS[args.arch].with_vocab(tokenizer.vocab_size)
    hf_dir = work / "init_hf"
    shutil.rmtree(work / "init_megatron", ignore_errors=True)  # a stale run of a changed configuration
    torch.manual_seed(args.seed)
    hf = LlamaForCausalLM(LlamaConfig(**arch.to_hf_config(bos_token_id=tokenizer.bos_id,
                                                          eos_token_id=tokenizer.eod_id)))
    hf.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    convert_hf_to_megatron(hf_dir, work / "init_megatron", progress=False)  # what hf_to_megatron.py runs
    return {"sft_prefix": str(work / "sft" / "interleaved"), "sft_bins": sft_stats["bins"],
            "sft_samples": len(samples), "sft_longest": longest, "prefixes": prefixes,
            "sft_mean_length": float(np.mean([len(x.tokens) for x in samples])), "vocab_size": tokenizer.vocab_size}


def _run(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Run `cmd` with its output in `log`; return wall seconds and the process's own peak RSS (wait4)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore", **(env or {})}
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}); last lines of {log}:\n"
                         + "\n".join(log.read_text(errors="replace").splitlines()[-30:]))
    return {"wall_s": wall, "peak_rss_gib": usage.ru_maxrss / 2**20}


# ---------------------------------------------------------------------------------------------- the Trainer side


def trainer_side(args: argparse.Namespace) -> None:
    """The authors' configuration, in this process: prints RESULT{json}."""
    import torch
    from torch.utils.data import Dataset
    from transformers import LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    work = Path(args.work_dir)
    if args.side_task == "sft":
        data = np.load(work / "sft_samples.npz")
        off = data["offsets"]
        rows = []
        for a, b in zip(off[:-1], off[1:]):
            ids = data["tokens"][a:b][:SFT_TRUNCATE].astype(np.int64)
            labels = np.where(data["modality"][a:b][:SFT_TRUNCATE] > 0, ids, -100)
            rows.append((ids, labels))
    else:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        docs = [np.asarray(d, dtype=np.int64)[:PRETRAIN_TRUNCATE]
                for p in args.prefixes for d in IndexedDataset(p)]
        order = np.random.default_rng(args.seed).permutation(len(docs))
        rows, real = [], 0
        for i in order.tolist():  # as many documents as it takes to train the megatron side's real tokens
            if real >= args.pretrain_real_tokens and len(rows) % args.micro_batch_size == 0:
                break
            rows.append((docs[i], docs[i]))
            real += len(docs[i]) - 1
    real_tokens = int(sum((np.asarray(lab[1:]) != -100).sum() for _, lab in rows))

    class Rows(Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return {"input_ids": rows[i][0], "labels": rows[i][1]}

    def collate(batch):  # the authors' collator: pad to the longest sample in the batch, no packing
        n = max(len(x["input_ids"]) for x in batch)
        ids = torch.zeros(len(batch), n, dtype=torch.long)
        labels = torch.full((len(batch), n), -100, dtype=torch.long)
        mask = torch.zeros(len(batch), n, dtype=torch.long)
        for k, x in enumerate(batch):
            m = len(x["input_ids"])
            ids[k, :m], labels[k, :m], mask[k, :m] = (torch.as_tensor(x["input_ids"]),
                                                      torch.as_tensor(x["labels"]), 1)
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    class Record(TrainerCallback):
        def __init__(self):
            self.losses, self.start, self.end = [], None, None

        def on_train_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_train_end(self, *a, **k):
            self.end = time.perf_counter()

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = LlamaForCausalLM.from_pretrained(work / "init_hf", dtype=dtype, attn_implementation="sdpa")
    deepspeed = None
    if cuda and _has("deepspeed"):
        deepspeed = {"zero_optimization": {"stage": 2}, "bf16": {"enabled": bool(args.bf16)},
                     "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                     "gradient_clipping": "auto", "optimizer": {"type": "AdamW", "params": {
                         "lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
                     "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": "auto",
                                                                         "warmup_num_steps": "auto"}}}
    targs = TrainingArguments(
        output_dir=str(work / f"trainer_{args.side_task}"), per_device_train_batch_size=args.micro_batch_size,
        num_train_epochs=1, learning_rate=OPTIM["lr"], lr_scheduler_type="cosine",
        warmup_steps=OPTIM["warmup_fraction"], adam_beta1=OPTIM["beta1"], adam_beta2=OPTIM["beta2"],
        adam_epsilon=OPTIM["eps"], weight_decay=OPTIM["weight_decay"], max_grad_norm=OPTIM["clip_grad"],
        optim="adamw_torch", seed=args.seed, data_seed=args.seed, logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=not cuda, bf16=bool(args.bf16), dataloader_num_workers=0,
        remove_unused_columns=False, disable_tqdm=True, deepspeed=deepspeed)
    record = Record()
    Trainer(model=model, args=targs, train_dataset=Rows(), data_collator=collate, callbacks=[record]).train()
    print("RESULT" + json.dumps({"train_s": record.end - record.start, "real_tokens": real_tokens,
                                 "steps": len(record.losses), "losses": record.losses,
                                 "positions": int(sum(len(r[0]) for r in rows))}), flush=True)


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# ---------------------------------------------------------------------------------------------- both sides


ITERATION = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss ([0-9.]+).*?\| ([0-9.]+) ms/step")


def megatron_side(task: str, prep: dict, args: argparse.Namespace, work: Path) -> dict:
    """python -m megatron_cslm.<task> on the shared init; parses its per-iteration log lines."""
    common = ["--device", args.device, "--load-init", str(work / "init_megatron"), "--seed", str(args.seed),
              "--lr", str(OPTIM["lr"]), "--min-lr", "0", "--lr-decay-style", "cosine",
              "--lr-warmup-fraction", str(OPTIM["warmup_fraction"]), "--weight-decay", "0",
              "--adam-beta1", str(OPTIM["beta1"]), "--adam-beta2", str(OPTIM["beta2"]),
              "--adam-eps", str(OPTIM["eps"]), "--clip-grad", str(OPTIM["clip_grad"]), "--log-interval", "1",
              "--bf16" if args.bf16 else "--fp32"]
    if task == "sft":
        # one bin per step, each bin once: the same samples as the Trainer's epoch
        iters, mbs = prep["sft_bins"], 1
        cmd = ["--data-path", prep["sft_prefix"], "--seq-length", str(args.sft_seq_length)]
        real = None  # every loss-bearing token of the samples, counted on the Trainer side
    else:
        iters, mbs = args.pretrain_iters, args.micro_batch_size
        weights = []
        for p in prep["prefixes"].values():
            weights += [str(1 / len(prep["prefixes"])), p]
        cmd = ["--data-path", *weights, "--seq-length", str(PRETRAIN_TRUNCATE), "--split", "100,0,0"]
        real = iters * mbs * PRETRAIN_TRUNCATE
    cmd += ["--micro-batch-size", str(mbs), "--global-batch-size", str(mbs), "--train-iters", str(iters)]
    log = work / f"megatron_{task}.log"
    run = _run([sys.executable, "-m", f"megatron_cslm.{'sft' if task == 'sft' else 'pretrain'}", *common, *cmd],
               log, env={"MASTER_PORT": str(free_port())})
    steps = [(int(i), float(loss), float(ms) / 1e3) for i, loss, ms in ITERATION.findall(log.read_text())]
    if len(steps) != iters:
        raise SystemExit(f"{log}: parsed {len(steps)} iteration lines, expected {iters}")
    return {**run, "train_s": sum(s for _, _, s in steps), "losses": [loss for _, loss, _ in steps],
            "real_tokens": real, "steps": iters}


def trainer_run(task: str, prep: dict, args: argparse.Namespace, work: Path, real: int | None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--side", "trainer", "--side-task", task,
           "--work-dir", str(work), "--device", args.device, "--seed", str(args.seed),
           "--micro-batch-size", str(args.micro_batch_size)] + (["--bf16"] if args.bf16 else [])
    if task == "pretrain":
        cmd += ["--pretrain-real-tokens", str(real), "--prefixes", *prep["prefixes"].values()]
    log = work / f"trainer_{task}.log"
    run = _run(cmd, log)
    result = json.loads(log.read_text().split("RESULT")[-1].splitlines()[0])
    return {**run, **result}


def model_flops_per_token(task: str, prep: dict, args: argparse.Namespace) -> float:
    """Training FLOPs per real token (models/flops.py, Megatron-LM's count) at the task's attention length:
    the mean SFT sample (what per-sample attention attends) or the pretraining sequence. The same figure for
    both sides, so their MFU ratio is their tokens/s ratio."""
    from megatron_cslm.models.flops import train_flops_per_token
    from megatron_cslm.models.llama import ARCHS

    length = prep["sft_mean_length"] if task == "sft" else PRETRAIN_TRUNCATE
    return train_flops_per_token(ARCHS[args.arch].with_vocab(prep["vocab_size"]), int(length))


def final_loss(losses: list[float]) -> float:
    tail = losses[-max(1, math.ceil(len(losses) * FINAL_QUARTER)):]
    return float(np.mean(tail))


def compare(task: str, prep: dict, args: argparse.Namespace, work: Path) -> float:
    mega = megatron_side(task, prep, args, work)
    trainer = trainer_run(task, prep, args, work, mega["real_tokens"])
    if mega["real_tokens"] is None:
        mega["real_tokens"] = trainer["real_tokens"]
    rows = {"Trainer": trainer, "megatron_cslm": mega}
    for r in rows.values():
        r["tps"] = r["real_tokens"] / r["train_s"]
        r["final"] = final_loss(r["losses"])
    print(f"\n[{task}] real (loss-bearing) tokens: Trainer {trainer['real_tokens']:,} in {trainer['steps']} steps "
          f"(padded positions {trainer['positions']:,}), megatron_cslm {mega['real_tokens']:,} in "
          f"{mega['steps']} steps")
    flops = model_flops_per_token(task, prep, args)
    for name, r in rows.items():
        extra = f" | MFU {100 * r['tps'] * flops / (args.peak_tflops * 1e12):.2f}%" if args.device == "cuda" else ""
        print(f"  {name:<14} {r['tps']:>9,.0f} real tok/s | train {r['train_s']:7.1f} s | process {r['wall_s']:7.1f} s "
              f"| peak RSS {r['peak_rss_gib']:.2f} GiB | final loss {r['final']:.4f}{extra}")
    gap = abs(mega["final"] - trainer["final"]) / trainer["final"]
    print(f"  megatron_cslm / Trainer: time to budget {mega['train_s'] / trainer['train_s']:.2f}x, "
          f"peak RSS {mega['peak_rss_gib'] / trainer['peak_rss_gib']:.2f}x, final loss differs by {gap:.1%} "
          f"(tolerance {args.loss_tolerance:.0%})")
    if gap > args.loss_tolerance:
        raise SystemExit(f"{task}: final losses disagree: megatron_cslm {mega['final']:.4f} vs Trainer "
                         f"{trainer['final']:.4f} ({gap:.1%} > --loss-tolerance {args.loss_tolerance:.0%})")
    return mega["tps"] / trainer["tps"]


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="device of both sides (default: cpu)")
    p.add_argument("--bf16", action="store_true", help="BF16 on both sides (GPU); default FP32")
    p.add_argument("--arch", default="small", help="architecture from models/llama.py ARCHS (default: small)")
    p.add_argument("--smoke", action="store_true", help="tiny budget and the tiny arch (tests; seconds)")
    p.add_argument("--sft-samples", type=int, default=120, help="SFT dialogues = the SFT budget (default: 120)")
    p.add_argument("--answer-words", type=int, nargs=2, default=(25, 200),
                   help="answer length range, words, uniform; <= 4096 tokens per sample (default: 25 200)")
    p.add_argument("--sft-seq-length", type=int, default=8192,
                   help="megatron_cslm's packed bin size, positions (default: 8192)")
    p.add_argument("--pretrain-documents", type=int, default=200, help="documents per source (default: 200)")
    p.add_argument("--pretrain-iters", type=int, default=40,
                   help="megatron_cslm steps of micro-batch x 1024 tokens = the pretraining budget (default: 40)")
    p.add_argument("--micro-batch-size", type=int, default=4,
                   help="Trainer samples per step (SFT, pretraining); megatron_cslm rows per pretraining step "
                        "(default: 4)")
    p.add_argument("--loss-tolerance", type=float, default=0.1,
                   help="largest relative difference of the two sides' final losses (default: 0.1)")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="GPU dense peak for MFU, TFLOP/s (default: 989, H100/H200 BF16)")
    p.add_argument("--seed", type=int, default=1234, help="seed of data, init, shuffling (default: 1234)")
    p.add_argument("--work-dir", default=None, help="keep data and logs here (default: a temporary directory)")
    p.add_argument("--side", choices=["trainer"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--side-task", choices=["sft", "pretrain"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--pretrain-real-tokens", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--prefixes", nargs="+", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.arch, args.sft_samples, args.answer_words = "tiny", 8, (10, 30)
        args.sft_seq_length, args.pretrain_documents, args.pretrain_iters = 2048, 12, 3
        args.loss_tolerance = max(args.loss_tolerance, 0.5)
    if args.bf16 and args.device != "cuda":
        p.error("--bf16 needs --device cuda")
    return args


def main(argv: list[str] | None = None) -> None:
    args = get_args(argv)
    if args.side == "trainer":
        trainer_side(args)
        return
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        key = {k: getattr(args, k) for k in ("arch", "sft_samples", "answer_words", "sft_seq_length",
                                             "pretrain_documents", "seed")}
        cache = work / "prepared.json"  # a --work-dir reused with the same data arguments skips preparation
        cached = json.loads(cache.read_text()) if cache.exists() else {}
        prep = cached.get("prep") if cached.get("key") == json.loads(json.dumps(key)) else None
        if prep is None:
            prep = prepare(work, args)
            cache.write_text(json.dumps({"key": key, "prep": prep}))
        print(f"data: {prep['sft_samples']} SFT samples (longest {prep['sft_longest']} tokens <= {SFT_TRUNCATE}: "
              f"nothing cut) in {prep['sft_bins']} bins of {args.sft_seq_length}; pretraining blend "
              f"{', '.join(prep['prefixes'])}; arch {args.arch}; {args.device}"
              f"{' bf16' if args.bf16 else ' fp32'}; prepared in {time.perf_counter() - t0:.0f} s", flush=True)
        ratios = {task: compare(task, prep, args, work) for task in ("sft", "pretrain")}
    print()
    for task, ratio in ratios.items():
        print(f"{task}: real tokens/s vs Trainer {ratio:.2f}x")


if __name__ == "__main__":
    raise SystemExit(run_tool(main))
