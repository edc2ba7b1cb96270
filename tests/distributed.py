"""Helpers shared by the test modules: multi-process launches, the tools as modules, JSONL files, BELLE opt-in.

Everything a test needs is written by the test itself (or is a small file of ours under tests/data/), so a
fresh clone anywhere passes the suite. The authors' BELLE-eval-S2S audio is used only when the environment
variable BELLE_EVAL_S2S names its folder (`test.tsv` + `wav/`); see `belle_dir()`.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BELLE_ENV = "BELLE_EVAL_S2S"
# What each CPU process used to print around its own output (torch 2.9, megatron-core 0.16); hidden unless
# --verbose / CSLM_VERBOSE=1 (megatron_cslm/distributed/quiet.py).
NOISE = ("[Gloo] Rank 0 is connected to 0 peer ranks", "No CUDA runtime is found",
         "Transformer Engine and Apex are not installed")


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


def load_tool(name: str, folder: str = "tools"):
    """A script of tools/ (or checkpoints_convert/, bench/) loaded as a module, to call its main(argv)
    in-process."""
    spec = importlib.util.spec_from_file_location(name, ROOT / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: str | Path, records: list[dict]) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def belle_dir() -> Path | None:
    """The authors' BELLE-eval-S2S folder when BELLE_EVAL_S2S names one (opt-in), else None.

    A name that does not hold `test.tsv` and `wav/` is an error, not a reason to skip: whoever set the
    variable wants those tests to run.
    """
    value = os.environ.get(BELLE_ENV, "").strip()
    if not value:
        return None
    path = Path(value)
    if not (path / "test.tsv").is_file() or not (path / "wav").is_dir():
        raise FileNotFoundError(f"{BELLE_ENV}={value}: expected the BELLE-eval-S2S layout there (test.tsv and "
                                f"wav/<id>.wav); unset {BELLE_ENV} to run the tests on audio they write themselves")
    return path


# Part of the authors' BELLE-eval-S2S benchmark (opt-in through BELLE_EVAL_S2S), or None.
BELLE_DIR = belle_dir()
