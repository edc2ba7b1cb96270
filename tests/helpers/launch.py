"""Multi-process launches: torchrun with CPU workers (gloo), their environment, signals to the trainers.

Tests that call `torchrun`/`torchrun_command`/`signal_workers`, or a session fixture that trains, launch
processes: tests/conftest.py marks them `distributed` automatically, so `-m "not distributed"` skips them.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from megatron_cslm.distributed.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
# What each CPU process used to print around its own output (torch 2.9, megatron-core 0.16); hidden unless
# --verbose / CSLM_VERBOSE=1 (megatron_cslm/distributed/quiet.py).
NOISE = ("[Gloo] Rank 0 is connected to 0 peer ranks", "No CUDA runtime is found",
         "Transformer Engine and Apex are not installed")
LAUNCHERS = ("torchrun", "torchrun_command", "signal_workers", "worker_env")  # conftest marks their users

__all__ = ["LAUNCHERS", "NOISE", "ROOT", "descendants", "free_port", "signal_workers", "torchrun",
           "torchrun_command", "worker_env"]


def torchrun_command(script: str | Path, nproc: int, *args: str) -> list[str]:
    """`script` is a file path, or `-m package.module`."""
    target = ["-m", str(script)[3:]] if str(script).startswith("-m ") else [str(script)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            *target, *map(str, args)]


def worker_env(env: dict | None = None) -> dict:
    """The environment of a launched worker: one thread per process and the repository importable; the
    package's own defaults keep CPU runs quiet (CSLM_VERBOSE=1 in `env` shows everything)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}


def torchrun(script: str | Path, nproc: int, *args: str, timeout: int = 600, check: bool = True,
             env: dict | None = None) -> subprocess.CompletedProcess:
    """Launch `script` under torchrun with `nproc` CPU processes (gloo); fail with its output on error."""
    proc = subprocess.run(torchrun_command(script, nproc, *args), capture_output=True, text=True, timeout=timeout,
                          env=worker_env(env), cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun {script} failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n"
                             f"{proc.stderr[-8000:]}")
    return proc


def descendants(pid: int) -> list[int]:
    """All descendant pids (torchrun starts its workers in their own sessions, so killpg misses them)."""
    out = []
    for child in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split():
        out += [int(child), *descendants(int(child))]
    return out


def signal_workers(proc: subprocess.Popen, sig: int) -> None:
    """Send `sig` to the training processes under a torchrun launcher (as SLURM or the OOM killer would)."""
    for pid in descendants(proc.pid):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
