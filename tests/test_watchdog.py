"""Runs that look after themselves, through the real trainer on 2 gloo processes: checkpoint retention with
asynchronous saves keeps exactly the expected set and the latest stays resumable; a rank that stalls ends the
job within the step timeout, with every rank's stacks in the log, the stalled rank named, and exit status 76
(the status examples/slurm_cslm.sbatch requeues on)."""
from __future__ import annotations

import pytest

from tests.helpers.launch import torchrun

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _args(toy, tmp_path, train_iters: int) -> list[str]:
    return ["--device", "cpu", "--model-arch", "tiny", "--tokenizer-model", str(toy["tokenizer"]),
            "--data-path", "0.5", toy["prefixes"]["asr"], "0.5", toy["prefixes"]["tts"],
            "--seq-length", "64", "--micro-batch-size", "1", "--global-batch-size", "2",
            "--train-iters", str(train_iters), "--eval-interval", "0", "--log-interval", "5",
            "--data-cache-path", str(tmp_path / "cache"), "--save", str(tmp_path / "ckpt")]


def test_retention_with_async_saves_then_a_stalled_rank_ends_the_job(toy_pretrain, tmp_path):
    ckpt = tmp_path / "ckpt"
    run = torchrun("-m megatron_cslm.pretrain", 2, *_args(toy_pretrain, tmp_path, 25), "--save-interval", "3",
                   "--keep-last-n", "2", "--keep-every", "10", "--async-save")
    kept = sorted(int(p.name[5:]) for p in ckpt.glob("iter_*"))
    # saves at 3, 6, ..., 24 and 25; the archive keeps the first at or after 10 and 20, the last two stay
    assert kept == [12, 21, 24, 25], kept
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "25"
    assert "deleted checkpoint" in run.stdout + run.stderr

    # Resume from the retained latest and stall rank 1 inside iteration 27: both watchdogs fire after ~6 s.
    stalled = torchrun("-m megatron_cslm.pretrain", 2, *_args(toy_pretrain, tmp_path, 30), "--save-interval", "100",
                       "--step-timeout-minutes", "0.1", "--use-checkpoint-opt_param-scheduler", check=False,
                       timeout=300,
                       env={"CSLM_TEST_STALL": "1:27:600"})
    log = stalled.stdout + stalled.stderr
    assert stalled.returncode != 0
    assert "resumed from" in log and "at iteration 25" in log
    for rank in (0, 1):
        assert f"[rank {rank}] step watchdog: no step completed" in log, log[-4000:]
    assert log.count("Thread 0x") + log.count("Current thread 0x") >= 2  # faulthandler's stacks, both ranks
    assert "did not arrive: rank 1 at" in log and "stall_for_tests" in log
    assert "exitcode  : 76" in log  # torchrun's report of the workers' status
