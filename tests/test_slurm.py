"""examples/slurm_cslm.sbatch under a real SLURM (slurmctld + slurmd + munge on this host, CPUs only, 2 tasks):
a job submitted once, from another directory, with a time limit shorter than the run, is signalled, saves, is
requeued by itself and finishes --train-iters, ending COMPLETED; its losses equal an uninterrupted run's.

Needs Debian's `slurm-wlm` and `munge` (root: `apt-get install -y slurm-wlm munge`); skipped where they are not
installed. Run it with `pytest -m slurm tests/test_slurm.py` (about 4 minutes: SLURM delivers the pre-timeout
signal with up to 60 s of slack, and the minimum time limit is one minute).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.launch import ROOT, worker_env

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.distributed,
              pytest.mark.skipif(shutil.which("slurmctld") is None or shutil.which("munged") is None,
                                 reason="SLURM is not installed (apt-get install -y slurm-wlm munge)")]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A one-host SLURM cluster for this module; yields the environment that reaches it."""
    state = tmp_path_factory.mktemp("slurm")
    out = subprocess.run(["bash", str(ROOT / "scripts/slurm_localhost.sh"), "start", str(state)],
                         capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        pytest.fail(f"could not start SLURM on this host:\n{out.stdout}\n{out.stderr}")
    # a rendezvous left in this process's environment (by an in-process test) is not the job's: the launcher
    # derives its port from the job id
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                                                            "LOCAL_RANK")}
    env["SLURM_CONF"] = str(state / "slurm.conf")
    yield env
    subprocess.run(["bash", str(ROOT / "scripts/slurm_localhost.sh"), "stop", str(state)], timeout=60)


def _job(env: dict, job_id: str) -> dict[str, str]:
    text = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, env=env).stdout
    return dict(kv.split("=", 1) for kv in text.split() if "=" in kv)


def _submit(slurm_env: dict, toy, run_dir: Path, train_iters: int, sbatch_flags: list[str], extra_env: dict) -> str:
    run_dir.mkdir()
    config = run_dir / "run.yaml"
    config.write_text(f"device: cpu\nmodel-arch: tiny\ntokenizer-model: {toy['tokenizer']}\nlr: 3.0e-3\n"
                      f"lr-warmup-fraction: 0.05\nlog-interval: 1\neval-interval: 0\nseed: 11\n"
                      f"tensorboard-dir: {run_dir / 'tb'}\ndata-cache-path: {run_dir / 'cache'}\n")
    env = worker_env({**slurm_env, "PYTHON": sys.executable, "CONFIG": str(config), "GPUS_PER_NODE": "2", "TP": "1",
                      "SEQ": "128", "MBS": "2", "GBS": "8", "TRAIN_ITERS": str(train_iters),
                      "SAVE": str(run_dir / "ckpt"), "SAVE_INTERVAL": "100000", **extra_env})
    blend = ["0.5", toy["prefixes"]["asr"], "0.5", toy["prefixes"]["tts"]]
    # submitted from the run directory, not the repository root, and with no logs/ folder anywhere
    out = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0",
                          "--cpus-per-task=1", "--exclusive=user", *sbatch_flags,
                          str(ROOT / "examples/slurm_cslm.sbatch"), "pretrain", *blend],
                         cwd=run_dir, env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip().split(";")[0]


def _wait(env: dict, job_id: str, timeout: float = 600) -> dict[str, str]:
    """Wait for the job to end; a requeued job is released at once (SLURM holds it ~2 minutes by default)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = _job(env, job_id)
        if job.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return job
        if job.get("JobState") == "PENDING" and job.get("Reason") == "BeginTime":
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=env, check=False)
        time.sleep(2)
    raise AssertionError(f"job {job_id} did not end within {timeout} s: {_job(env, job_id)}")


@pytest.mark.timeout(900)
def test_a_job_submitted_once_requeues_itself_until_train_iters_and_matches_an_uninterrupted_run(slurm, toy_pretrain,
                                                                                                tmp_path):
    from tests.helpers.training import scalars

    total = 40
    ref = _submit(slurm, toy_pretrain, tmp_path / "reference", total, [], {})
    # 2.5 s per step: 40 steps (~2 min with start-up) outlast the first job's 2-minute limit, whose signal comes
    # 30-90 s in (SLURM sends it up to a minute early); the requeued run finishes well within its own limit
    job = _submit(slurm, toy_pretrain, tmp_path / "interrupted", total, ["--time=2", "--signal=USR1@30"],
                  {"CSLM_TEST_STALL": "*:*:2.5"})
    reference, interrupted = _wait(slurm, ref), _wait(slurm, job)
    log = (tmp_path / "interrupted" / f"cslm-{job}.out").read_text()
    assert reference["JobState"] == "COMPLETED", (tmp_path / "reference" / f"cslm-{ref}.out").read_text()[-3000:]
    assert interrupted["JobState"] == "COMPLETED" and int(interrupted["Restarts"]) >= 1, log[-4000:]
    assert "saved on the pre-timeout signal; requeued job" in log and "training finished" in log
    ckpt = tmp_path / "interrupted" / "ckpt"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == str(total)
    expected = scalars(tmp_path / "reference" / "tb")["train/loss/lm loss"]
    got = scalars(tmp_path / "interrupted" / "tb")["train/loss/lm loss"]
    assert sorted(got) == list(range(1, total + 1))
    assert [got[s] for s in sorted(got)] == [expected[s] for s in sorted(got)]  # bitwise on CPU
