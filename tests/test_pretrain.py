"""Issue 4: the continual-pretraining loop on CPU (gloo, 2 processes) on the toy blended speech-text data."""
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_cslm.errors import CslmError
from tests.distributed import ROOT, signal_workers, torchrun, torchrun_command, worker_env

SOURCES = ("asr", "tts", "interleave", "replay")


def _args(data, out: Path, *extra) -> list[str]:
    blend = []
    for name in SOURCES:
        blend += ["0.25", data["prefixes"][name]]
    return ["--device", "cpu", "--model-arch", "tiny", "--tokenizer-model", data["tokenizer"], "--data-path", *blend,
            "--seq-length", "128", "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "3e-3",
            "--lr-warmup-fraction", "0.05", "--log-interval", "1", "--eval-interval", "0",
            "--data-cache-path", out / "cache", "--tensorboard-dir", out / "tb", *map(str, extra)]


def _scalars(tb_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def init_ckpt(toy_pretrain, tmp_path_factory):
    """Initial weights written once (--train-iters 0), so runs at different layouts start alike."""
    out = tmp_path_factory.mktemp("init")
    torchrun("-m megatron_cslm.pretrain", 1, *_args(toy_pretrain, out, "--train-iters", "0", "--save", out / "ckpt"))
    return out / "ckpt"


@pytest.fixture(scope="module")
def uninterrupted(toy_pretrain, init_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("run_a")
    torchrun("-m megatron_cslm.pretrain", 2, *_args(toy_pretrain, out, "--load-init", init_ckpt,
                                                      "--tensor-model-parallel-size", "2",
                                                      "--train-iters", "40", "--save", out / "ckpt",
                                                      "--save-interval", "20"))
    return _scalars(out / "tb")


@pytest.mark.timeout(600)
def test_loss_drops_on_every_source_and_is_logged_per_source(uninterrupted):
    for name in SOURCES:
        curve = uninterrupted[f"train/loss/{name}"]
        first, last = np.mean([curve[s] for s in (1, 2, 3)]), np.mean([curve[s] for s in (38, 39, 40)])
        assert last < first - 0.5, (name, first, last)  # nats; replay (masked prompts) learns slowest
    for tag in ("train/throughput/tokens_per_s", "train/throughput/mfu", "train/lr", "train/grad_norm"):
        assert tag in uninterrupted


@pytest.mark.timeout(600)
def test_sigkill_then_resume_reproduces_the_uninterrupted_losses(toy_pretrain, init_ckpt, uninterrupted, tmp_path):
    ckpt = tmp_path / "ckpt"
    args = _args(toy_pretrain, tmp_path / "b1", "--load-init", init_ckpt, "--tensor-model-parallel-size", "2",
                 "--train-iters", "40",
                 "--save", ckpt, "--save-interval", "20")
    proc = subprocess.Popen(torchrun_command("-m megatron_cslm.pretrain", 2, *args), cwd=ROOT, env=worker_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tracker = ckpt / "latest_checkpointed_iteration.txt"
    deadline = time.time() + 400
    while not (tracker.exists() and tracker.read_text().strip() == "20"):
        assert proc.poll() is None and time.time() < deadline, "run ended before its step-20 checkpoint"
        time.sleep(0.05)
    signal_workers(proc, signal.SIGKILL)
    proc.kill()
    proc.wait()
    assert tracker.read_text().strip() == "20"

    args = _args(toy_pretrain, tmp_path / "b2", "--load-init", init_ckpt, "--tensor-model-parallel-size", "2",
                 "--train-iters", "40",
                 "--save", ckpt, "--save-interval", "20")
    torchrun("-m megatron_cslm.pretrain", 2, *args)
    resumed = _scalars(tmp_path / "b2" / "tb")["train/loss/lm loss"]
    assert sorted(resumed) == list(range(21, 41))
    reference = uninterrupted["train/loss/lm loss"]
    assert [resumed[s] for s in range(21, 41)] == [reference[s] for s in range(21, 41)]  # bitwise on CPU


@pytest.mark.timeout(600)
def test_tp2_matches_tp1_dp2(toy_pretrain, init_ckpt, uninterrupted, tmp_path):
    torchrun("-m megatron_cslm.pretrain", 2, *_args(toy_pretrain, tmp_path, "--load-init", init_ckpt,
                                                      "--train-iters", "40"))
    dp2 = _scalars(tmp_path / "tb")["train/loss/lm loss"]
    tp2 = uninterrupted["train/loss/lm loss"]
    for step in (1, 10, 20, 40):
        assert abs(dp2[step] - tp2[step]) / tp2[step] < 1e-4, (step, dp2[step], tp2[step])


@pytest.mark.timeout(600)
def test_sigterm_saves_a_checkpoint_before_exit(toy_pretrain, tmp_path):
    ckpt = tmp_path / "ckpt"
    args = _args(toy_pretrain, tmp_path, "--train-iters", "100000", "--save", ckpt, "--save-interval", "100000")
    proc = subprocess.Popen(torchrun_command("-m megatron_cslm.pretrain", 2, *args), cwd=ROOT, env=worker_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300

    def events():
        return list((tmp_path / "tb").glob("events*"))

    while not events() or os.path.getsize(events()[0]) < 2000:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.2)
    signal_workers(proc, signal.SIGTERM)  # what SLURM does before the time limit
    out, _ = proc.communicate(timeout=300)
    assert "exiting on signal" in out, out[-3000:]
    saved = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    assert saved > 0 and (ckpt / f"iter_{saved:07d}" / "metadata.json").exists()


def test_resume_never_picks_a_save_that_was_cut_short(tmp_path):
    from megatron_cslm.checkpoint.save_load import latest_iteration

    (tmp_path / "iter_0000020").mkdir()
    (tmp_path / "iter_0000020" / "metadata.json").write_text("{}")
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("20\n")
    (tmp_path / "iter_0000030.tmp").mkdir()  # killed mid-save: never renamed, tracker never updated
    assert latest_iteration(tmp_path) == 20
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("30\n")  # a tracker pointing at nothing is loud
    with pytest.raises(CslmError, match="iteration 30"):
        latest_iteration(tmp_path)


@pytest.mark.timeout(300)
def test_bad_start_up_configs_fail_with_clear_errors(toy_pretrain, tmp_path):
    def run(*extra, nproc=2):
        p = torchrun("-m megatron_cslm.pretrain", nproc, "--device", "cpu", "--model-arch", "tiny",
                     "--tokenizer-model", toy_pretrain["tokenizer"], "--seq-length", "64", "--train-iters", "2",
                     "--global-batch-size", "4", *map(str, extra), check=False, timeout=200)
        assert p.returncode != 0
        return p.stdout + p.stderr

    assert "does not exist" in run("--data-path", tmp_path / "missing")
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    builder = IndexedDatasetBuilder(str(tmp_path / "big.bin"), dtype=np.int32)
    builder.add_document(torch.tensor([1, 2, toy_pretrain["vocab_size"] + 5]), [3])
    builder.finalize(str(tmp_path / "big.idx"))
    assert f"token id {toy_pretrain['vocab_size'] + 5} >= the model's vocabulary size" in \
        run("--data-path", tmp_path / "big")
    assert "not divisible by TP x PP x CP" in run("--data-path", toy_pretrain["prefixes"]["asr"],
                                                 "--tensor-model-parallel-size", "2",
                                                 "--pipeline-model-parallel-size", "2", nproc=2)
    assert "is not a multiple of micro batch" in run("--data-path", toy_pretrain["prefixes"]["asr"],
                                                     "--micro-batch-size", "3", nproc=2)


@pytest.mark.timeout(300)
def test_non_finite_loss_stops_without_saving(toy_pretrain, tmp_path):
    ckpt = tmp_path / "ckpt"
    p = torchrun("-m megatron_cslm.pretrain", 1, *_args(toy_pretrain, tmp_path, "--train-iters", "40", "--lr", "1e12",
                                                          "--lr-warmup-fraction", "0.5", "--clip-grad", "0",
                                                          "--save", ckpt, "--save-interval", "2"), check=False)
    assert p.returncode != 0
    out = p.stdout + p.stderr
    assert "stopping without saving. Last good checkpoint:" in out, out[-3000:]
    last = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    assert (ckpt / f"iter_{last:07d}" / "metadata.json").exists()
    assert f"iteration {last}" in out.split("loss is")[1]
