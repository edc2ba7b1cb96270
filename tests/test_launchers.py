"""Issue 8: launchers parse, print the exact command with DRY_RUN=1, and check the parallel arithmetic."""
import os
import subprocess

import pytest

from tests.distributed import ROOT

LAUNCHERS = ["examples/quickstart_cpu.sh", "examples/train_llama3.1_8b.sh", "examples/slurm_cslm.sbatch"]


def _run(*cmd, **env):
    return subprocess.run(["bash", *cmd], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "DRY_RUN": "1", **env})


@pytest.mark.parametrize("script", LAUNCHERS)
def test_launchers_parse(script):
    assert subprocess.run(["bash", "-n", script], cwd=ROOT).returncode == 0


def test_multi_node_torchrun_command_and_arithmetic():
    p = _run("examples/train_llama3.1_8b.sh", "pretrain", "0.5", "data/asr", "0.5", "data/replay",
             NNODES="4", NODE_RANK="2", MASTER_ADDR="10.0.0.1", TRAIN_TOKENS="1e9")
    assert p.returncode == 0, p.stderr
    assert "TP=2 PP=1 DP=16; micro batch 4, accumulation 16; 1048576 tokens/step; 954 steps" in p.stdout
    cmd = p.stdout.strip().splitlines()[-1]
    assert cmd.startswith("torchrun --nnodes 4 --node-rank 2 --nproc-per-node 8 --master-addr 10.0.0.1")
    for piece in ("-m megatron_cslm.pretrain", "--train-iters 954", "--data-path 0.5 data/asr 0.5 data/replay",
                  "--tensor-model-parallel-size 2", "--sequence-parallel"):
        assert piece in cmd


def test_fp8_and_recompute_switches_reach_the_command():
    p = _run("examples/train_llama3.1_8b.sh", "sft", "data/sft", PRECISION="fp8", RECOMPUTE="full", TP="8")
    cmd = p.stdout.strip().splitlines()[-1]
    assert "-m megatron_cslm.sft" in cmd and "--fp8-format hybrid" in cmd and "--recompute-granularity full" in cmd


def test_bad_layouts_are_refused_before_launch():
    p = _run("examples/train_llama3.1_8b.sh", "pretrain", "data/asr", TP="3")
    assert p.returncode != 0 and "not divisible by TP x PP" in p.stderr
    p = _run("examples/train_llama3.1_8b.sh", "pretrain", "data/asr", GBS="100")
    assert p.returncode != 0 and "not a multiple of micro batch" in p.stderr


def test_slurm_launcher_prints_srun_and_node_command():
    p = _run("examples/slurm_cslm.sbatch", "pretrain", "1", "data/asr", SLURM_NNODES="2")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert lines[0].startswith("srun --kill-on-bad-exit=1 --ntasks-per-node=1")
    assert lines[-1].startswith("torchrun --nnodes 2 --node-rank 0")
