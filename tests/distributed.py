"""Launch a worker script under torchrun with N CPU processes (gloo) and fail with its output on error."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def torchrun_command(script: str | Path, nproc: int, *args: str) -> list[str]:
    """`script` is a file path, or `-m package.module`."""
    target = ["-m", str(script)[3:]] if str(script).startswith("-m ") else [str(script)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            *target, *map(str, args)]


def worker_env(env: dict | None = None) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TORCH_CPP_LOG_LEVEL": "ERROR",
            "PYTHONWARNINGS": "ignore", **(env or {})}


def torchrun(script: str | Path, nproc: int, *args: str, timeout: int = 600, check: bool = True,
             env: dict | None = None) -> subprocess.CompletedProcess:
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

# Part of the authors' BELLE-eval-S2S benchmark, checked out beside the repository (shared/ next to it in CI).
BELLE_DIR = Path(os.environ.get("BELLE_EVAL_S2S", ROOT.parent / "shared" / "data" / "belle-eval-s2s"))
