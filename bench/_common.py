"""What the benches share: the environment of a launched run, a free port, page-cache eviction, and the
command line of a one-rank CPU pretraining run.

Why one module: every bench that launches `python -m megatron_cslm.pretrain` needs the same quiet,
one-thread, importable environment on its own rendezvous port, and the start-up benches must evict the same
way; copies drifted (three port helpers, two `evict`s). Benches run as scripts (`python bench/x.py`, so
bench/ is on sys.path: `from _common import ...`); tests import it as `bench._common` for the same argument
builder (tests/helpers/training.py).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from megatron_cslm.distributed.ports import free_port

ROOT = Path(__file__).resolve().parent.parent


def run_env(extra: dict | None = None) -> dict:
    """A launched run's environment: the repository importable, one thread per process, warnings hidden,
    a free `MASTER_PORT` (torchrun's default 29500 may be taken by another job)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore",
            "MASTER_PORT": str(free_port()), **(extra or {})}


def evict(path: str | os.PathLike) -> None:
    """Drop `path` from the page cache (written back first), so the next read is real I/O."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def pretrain_argv(tokenizer: str | os.PathLike, data_path: list[str], cache: str | os.PathLike, *,
                  model_arch: str = "tiny", seq_length: int = 128, micro_batch_size: int = 2,
                  global_batch_size: int = 8, extra: tuple = ()) -> list[str]:
    """Flags of a CPU pretraining run on a tiny blend: log every step, no validation, its own index cache."""
    return ["--device", "cpu", "--model-arch", model_arch, "--tokenizer-model", str(tokenizer),
            "--data-path", *map(str, data_path), "--seq-length", str(seq_length),
            "--micro-batch-size", str(micro_batch_size), "--global-batch-size", str(global_batch_size),
            "--log-interval", "1", "--eval-interval", "0", "--data-cache-path", str(cache), *map(str, extra)]


def pretrain_command(*args, **kwargs) -> list[str]:
    """`python -m megatron_cslm.pretrain` with `pretrain_argv(*args, **kwargs)`."""
    return [sys.executable, "-m", "megatron_cslm.pretrain", *pretrain_argv(*args, **kwargs)]
