"""Issues 8 and 16: launchers parse, print the exact command with DRY_RUN=1, check the parallel arithmetic; the SLURM
launcher's pre-timeout SIGUSR1 (and SIGTERM) ends a 2-process CPU run with a complete checkpoint and exit 75
(saved, needs more time; tests/test_slurm.py has a real SLURM requeue it), and the rerun resumes bitwise."""
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.launch import ROOT, descendants, worker_env

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


def test_slurm_launcher_runs_one_process_per_gpu_without_torchrun():
    p = _run("examples/slurm_cslm.sbatch", "pretrain", "1", "data/asr", SLURM_NNODES="2",
             EXTRA_ARGS="--async-save")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert lines[0].startswith("srun --kill-on-bad-exit=1 --ntasks-per-node=8")
    assert "train_llama3.1_8b.sh" in lines[0] and "torchrun" not in lines[0]
    assert "2 node(s) x 8 GPUs = 16; TP=2 PP=1 DP=8" in p.stdout
    cmd = lines[-1]
    assert cmd.startswith("python -m megatron_cslm.pretrain") and cmd.endswith("--async-save")
    sbatch = (ROOT / "examples/slurm_cslm.sbatch").read_text()
    assert "#SBATCH --signal=USR1@600" in sbatch  # to every task of the step, i.e. to the trainers


def test_slurm_ranks_come_from_slurm_variables(monkeypatch):
    from megatron_cslm.distributed.parallel import use_slurm_ranks

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # recorded, so what use_slurm_ranks sets is undone after
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS", raising=False)
    use_slurm_ranks()  # a batch script or salloc shell (no job step): a single process, not rank 5
    assert "RANK" not in os.environ
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "8")
    use_slurm_ranks()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("5", "8", "1")
    monkeypatch.setenv("RANK", "0")  # torchrun inside an srun task: torchrun's variables win
    monkeypatch.setenv("SLURM_PROCID", "3")
    use_slurm_ranks()
    assert os.environ["RANK"] == "0"


# What srun does on one node: start --ntasks-per-node copies of the command with SLURM's per-task variables,
# forward the signals it receives to them, and exit with the worst task status.
FAKE_SRUN = f"""#!{sys.executable}
import os, signal, subprocess, sys
args, n = sys.argv[1:], 1
while args and args[0].startswith("--"):
    flag = args.pop(0)
    if flag.startswith("--ntasks-per-node="):
        n = int(flag.split("=", 1)[1])
tasks = [subprocess.Popen(args, env={{**os.environ, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i),
                                      "SLURM_NODEID": "0", "SLURM_NTASKS": str(n),
                                      "SLURM_STEP_NUM_TASKS": str(n)}}) for i in range(n)]
for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda s, f: [t.send_signal(s) for t in tasks])
codes = [t.wait() for t in tasks]
sys.exit(max((abs(c) for c in codes), default=0))
"""


def _sbatch(toy, tmp_path: Path, run: str, save: Path, train_iters: int) -> subprocess.Popen:
    """examples/slurm_cslm.sbatch as SLURM would run it on one node with 2 tasks, on the toy data on CPU."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    srun = bindir / "srun"
    srun.write_text(FAKE_SRUN)
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    config = tmp_path / f"{run}.yaml"
    config.write_text(f"device: cpu\nmodel-arch: tiny\ntokenizer-model: {toy['tokenizer']}\nlr: 3.0e-3\n"
                      f"lr-warmup-fraction: 0.05\nlog-interval: 1\neval-interval: 0\nseed: 11\n"
                      f"tensorboard-dir: {tmp_path / run / 'tb'}\ndata-cache-path: {tmp_path / 'cache'}\n")
    env = worker_env({"PATH": f"{bindir}:{os.environ['PATH']}", "PYTHON": sys.executable, "CONFIG": str(config),
                      "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "localhost", "GPUS_PER_NODE": "2",
                      "MASTER_PORT": str(29600 + os.getpid() % 300), "TP": "1", "SEQ": "128", "MBS": "2",
                      "GBS": "8", "TRAIN_ITERS": str(train_iters), "SAVE": str(save), "SAVE_INTERVAL": "100000",
                      "SLURM_SUBMIT_DIR": str(ROOT)})
    blend = ["0.5", toy["prefixes"]["asr"], "0.5", toy["prefixes"]["tts"]]
    return subprocess.Popen(["bash", str(ROOT / "examples/slurm_cslm.sbatch"), "pretrain", *blend], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.timeout(900)
def test_slurm_pre_timeout_signal_saves_exits_75_and_resumes_bitwise(toy_pretrain, tmp_path):
    from tests.helpers.training import scalars

    total = 10
    ref = _sbatch(toy_pretrain, tmp_path, "reference", tmp_path / "ref_ckpt", total)
    out, _ = ref.communicate(timeout=600)
    assert ref.returncode == 0, out[-4000:]

    ckpt = tmp_path / "ckpt"
    job = _sbatch(toy_pretrain, tmp_path, "first", ckpt, total)
    seen = []
    # SLURM's --signal=USR1@600: USR1 to every task of the step, i.e. each trainer; SIGTERM (scancel, the time
    # limit itself, a preemption) goes the same way: one rank gets each, and the pair saves the same step
    for line in job.stdout:
        seen.append(line)
        if "iteration        3/" in line:
            srun = descendants(job.pid)[0]  # the batch script waits for srun (it requeues on what srun reports)
            trainers = descendants(srun)
            assert len(trainers) == 2, trainers  # one python per task: no torchrun, no shell in between
            for pid, sig in zip(trainers, (signal.SIGUSR1, signal.SIGTERM)):  # both exit signals, one per rank
                os.kill(pid, sig)
            break
    rest, _ = job.communicate(timeout=300)
    log = "".join(seen) + rest
    # 75: saved before --train-iters; outside SLURM (no job to requeue) the launcher says so and exits with it
    assert job.returncode == 75, log[-4000:]
    assert "exiting on signal" in log
    saved = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    assert 3 <= saved < total and (ckpt / f"iter_{saved:07d}" / "metadata.json").exists()

    again = _sbatch(toy_pretrain, tmp_path, "resumed", ckpt, total)
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out[-4000:]
    reference = scalars(tmp_path / "reference" / "tb")["train/loss/lm loss"]
    resumed = scalars(tmp_path / "resumed" / "tb")["train/loss/lm loss"]
    assert sorted(resumed) == list(range(saved + 1, total + 1))
    assert [resumed[s] for s in resumed] == [reference[s] for s in resumed]  # bitwise on CPU
