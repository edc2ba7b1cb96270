"""Time to the first training step for the toy pretraining blend at 1x, 10x and 100x its size.

Start-up must not grow with the data: the token-id check reads `<prefix>.meta.json` and the `.idx` header
(`training/data.check_indexed_dataset`), never the `.bin`; megatron-core's index caches depend on the
document count (`.idx`), not on the tokens. The big blends repeat the toy datasets into bigger `.bin/.idx`
(the index tiled, the tokens concatenated, metadata copied), and every `.bin` is evicted from the
page cache before each run, so a start-up that read the tokens would pay for real I/O. Each run is a fresh
process (`python -m megatron_cslm.pretrain`, one CPU rank, tiny model, one step, fresh index cache); the
figure is the wall time to its exit, the best of --repeats runs. For contrast the table also shows what the
old start-up check cost: a full scan of every `.bin` for its largest id.

    python bench/startup.py            # 1x, 10x, 100x; 2 runs each
    python bench/startup.py --quick    # 1x and 100x, 1 run each

The last line is `start-up 100x vs 1x data: N.NNx` (time ratio; 1.00x = flat).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import ROOT, evict, pretrain_command, run_env

from megatron_cslm.toy.pipeline import TOY_SOURCES as SOURCES


def build_toy(out: Path) -> tuple[Path, dict[str, str]]:
    """The toy corpus -> tokenizer -> pretraining documents -> .bin/.idx (+ .meta.json), as the tools do."""
    from megatron_cslm.toy.pipeline import build_toy_pretrain

    toy = build_toy_pretrain(out, bin_dir="x1", sources=SOURCES)
    return toy["tokenizer"], toy["prefixes"]


def repeat_dataset(src: str, dst: str, times: int) -> None:
    """`dst` = `src` repeated `times` times (tokens, loss mask and metadata). The index is tiled with numpy
    (megatron-core's `add_index` grows Python lists and takes minutes at 100x)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset, _IndexWriter

    for suffix in ("", "_lossmask"):
        if not os.path.exists(src + suffix + ".idx"):
            continue
        index = IndexedDataset(src + suffix).index
        lengths = np.tile(index.sequence_lengths, times)
        docs = np.asarray(index.document_indices, dtype=np.int64)
        tiled = np.concatenate([[0]] + [docs[1:] + k * len(index.sequence_lengths) for k in range(times)])
        payload = Path(src + suffix + ".bin").read_bytes()
        with open(dst + suffix + ".bin", "wb") as f:
            for _ in range(times):
                f.write(payload)
        with _IndexWriter(dst + suffix + ".idx", index.dtype) as writer:
            writer.write(lengths.tolist(), None, tiled.tolist())
    meta = json.loads(Path(src + ".meta.json").read_text())
    for key in ("documents", "tokens"):
        if key in meta:
            meta[key] *= times
    Path(dst + ".meta.json").write_text(json.dumps(meta))


def time_to_first_step(tokenizer: Path, prefixes: dict[str, str], cache: Path) -> float:
    for p in prefixes.values():
        evict(p + ".bin")
    shutil.rmtree(cache, ignore_errors=True)
    blend = [x for name in SOURCES for x in ("0.25", prefixes[name])]
    cmd = pretrain_command(tokenizer, blend, cache, global_batch_size=4, extra=("--train-iters", "1"))
    env = run_env()
    start = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if p.returncode != 0 or "iteration        1/1" not in p.stdout:
        raise SystemExit(f"training run failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return elapsed


def full_scan_seconds(prefixes: dict[str, str]) -> float:
    """What the old start-up check did: read every token for the largest id (page cache evicted first)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    start = time.perf_counter()
    for p in prefixes.values():
        evict(p + ".bin")
        int(np.memmap(p + ".bin", dtype=IndexedDataset(p).index.dtype, mode="r").max())
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1x and 100x, one run each")
    ap.add_argument("--repeats", type=int, default=2, help="runs per size (the best counts)")
    args = ap.parse_args()
    scales = (1, 100) if args.quick else (1, 10, 100)
    repeats = 1 if args.quick else args.repeats
    with tempfile.TemporaryDirectory(prefix="bench_startup.") as tmp:
        out = Path(tmp)
        tokenizer, base = build_toy(out)
        blends = {1: base}
        for k in scales[1:]:
            blends[k] = {name: str(out / f"x{k}" / name) for name in SOURCES}
            (out / f"x{k}").mkdir()
            for name in SOURCES:
                repeat_dataset(base[name], blends[k][name], k)
        best = {k: float("inf") for k in scales}
        for _ in range(repeats):  # interleaved, so machine load drifts over every size alike
            for k in scales:
                best[k] = min(best[k], time_to_first_step(tokenizer, blends[k], out / f"cache{k}"))
        print(f"{'data':>6} {'.bin MiB':>9} {'tokens':>12} {'to first step':>14} {'vs 1x':>7} {'full scan (old)':>16}")
        for k in scales:
            size = sum(os.path.getsize(p + ".bin") for p in blends[k].values())
            tokens = sum(json.loads(Path(p + ".meta.json").read_text())["tokens"] for p in blends[k].values())
            print(f"{k:>5}x {size / 2**20:>9.1f} {tokens:>12,} {best[k]:>13.2f}s {best[k] / best[1]:>6.2f}x "
                  f"{full_scan_seconds(blends[k]):>15.3f}s")
    print(f"start-up {scales[-1]}x vs 1x data: {best[scales[-1]] / best[1]:.2f}x")


if __name__ == "__main__":
    main()
