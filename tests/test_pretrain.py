"""Issue 4: the continual-pretraining loop on CPU (gloo, 2 processes) on the toy blended speech-text data."""
import json
import shutil

import numpy as np
import pytest
import torch

from megatron_cslm.errors import CslmError
from tests.helpers.launch import torchrun
from tests.helpers.training import SOURCES, pretrain_args, scalars


@pytest.fixture(scope="module")
def init_ckpt(toy_pretrain, tmp_path_factory):
    """Initial weights written once (--train-iters 0), so runs at different layouts start alike."""
    out = tmp_path_factory.mktemp("init")
    torchrun("-m megatron_cslm.pretrain", 1, *pretrain_args(toy_pretrain, out, "--train-iters", "0",
                                                          "--save", out / "ckpt"))
    return out / "ckpt"


@pytest.fixture(scope="module")
def uninterrupted(toy_pretrain, init_ckpt, tmp_path_factory):
    """40 steps at TP=2 with saves at 20 and 40: the reference losses, and the checkpoints a resume starts from."""
    out = tmp_path_factory.mktemp("run_a")
    torchrun("-m megatron_cslm.pretrain", 2, *pretrain_args(toy_pretrain, out, "--load-init", init_ckpt,
                                                          "--tensor-model-parallel-size", "2",
                                                          "--train-iters", "40", "--save", out / "ckpt",
                                                          "--save-interval", "20"))
    return {**scalars(out / "tb"), "ckpt": out / "ckpt"}


@pytest.mark.timeout(600)
def test_loss_drops_on_every_source_and_is_logged_per_source(uninterrupted):
    for name in SOURCES:
        curve = uninterrupted[f"train/loss/{name}"]
        first, last = np.mean([curve[s] for s in (1, 2, 3)]), np.mean([curve[s] for s in (38, 39, 40)])
        assert last < first - 0.5, (name, first, last)  # nats; replay (masked prompts) learns slowest
    for tag in ("train/throughput/tokens_per_s", "train/throughput/mfu", "train/lr", "train/grad_norm"):
        assert tag in uninterrupted


@pytest.mark.timeout(600)
def test_killed_run_resumes_from_its_last_complete_save_and_reproduces_the_losses(toy_pretrain, init_ckpt,
                                                                                  uninterrupted, tmp_path):
    """What a run SIGKILLed after its step-20 save and in the middle of its step-30 save leaves behind (the
    complete save of the shared reference run, an unrenamed `.tmp` save, a tracker naming 20), resumed: steps
    21-40 log the uninterrupted run's losses, bitwise. (A real SIGKILL of a run, during an asynchronous save,
    is tests/test_scale.py's; re-training steps 1-20 here would only repeat the reference run.)"""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(uninterrupted["ckpt"] / "iter_0000020", ckpt / "iter_0000020")
    (ckpt / "latest_checkpointed_iteration.txt").write_text("20\n")
    shutil.copytree(uninterrupted["ckpt"] / "iter_0000020", ckpt / "iter_0000030.tmp")  # killed mid-save
    for name in (uninterrupted["ckpt"]).iterdir():  # the manifest, tokenizer and licence files beside the saves
        if not name.name.startswith(("iter_", "latest_")):
            (shutil.copytree if name.is_dir() else shutil.copy2)(name, ckpt / name.name)
    args = pretrain_args(toy_pretrain, tmp_path / "b2", "--load-init", init_ckpt, "--tensor-model-parallel-size",
                         "2", "--train-iters", "40", "--save", ckpt, "--save-interval", "20")
    torchrun("-m megatron_cslm.pretrain", 2, *args)
    resumed = scalars(tmp_path / "b2" / "tb")["train/loss/lm loss"]
    assert sorted(resumed) == list(range(21, 41))
    reference = uninterrupted["train/loss/lm loss"]
    assert [resumed[s] for s in range(21, 41)] == [reference[s] for s in range(21, 41)]  # bitwise on CPU


@pytest.mark.timeout(600)
def test_tp2_matches_tp1_dp2(toy_pretrain, init_ckpt, uninterrupted, tmp_path):
    torchrun("-m megatron_cslm.pretrain", 2, *pretrain_args(toy_pretrain, tmp_path, "--load-init", init_ckpt,
                                                      "--train-iters", "40"))
    dp2 = scalars(tmp_path / "tb")["train/loss/lm loss"]
    tp2 = uninterrupted["train/loss/lm loss"]
    for step in (1, 10, 20, 40):
        assert abs(dp2[step] - tp2[step]) / tp2[step] < 1e-4, (step, dp2[step], tp2[step])


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


def test_bad_start_up_configs_fail_with_clear_errors(toy_pretrain, tmp_path, monkeypatch, capsys):
    """In this process (one rank, gloo): each refusal comes from the start-up checks, before any step; a layout
    check needs no second process (world size 1 is not divisible by TP x PP = 4 either)."""
    from megatron_cslm.distributed.ports import free_port
    from megatron_cslm.tool import run_tool
    from megatron_cslm.training.pretrain import cli_main

    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)

    def run(*extra, main=cli_main):
        code = run_tool(main, ["--device", "cpu", "--model-arch", "tiny", "--tokenizer-model",
                                   str(toy_pretrain["tokenizer"]), "--seq-length", "64", "--train-iters", "2",
                                   "--global-batch-size", "4", "--data-cache-path", str(tmp_path / "cache"),
                                   *map(str, extra)])
        assert code != 0 and not torch.distributed.is_initialized()
        return capsys.readouterr().err

    assert "does not exist" in run("--data-path", tmp_path / "missing")
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    builder = IndexedDatasetBuilder(str(tmp_path / "big.bin"), dtype=np.int32)
    builder.add_document(torch.tensor([1, 2, toy_pretrain["vocab_size"] + 5]), [3])
    builder.finalize(str(tmp_path / "big.idx"))
    assert f"token id {toy_pretrain['vocab_size'] + 5} >= the model's vocabulary size" in \
        run("--data-path", tmp_path / "big")
    assert "not divisible by TP x PP x CP" in run("--data-path", toy_pretrain["prefixes"]["asr"],
                                                 "--tensor-model-parallel-size", "2",
                                                 "--pipeline-model-parallel-size", "2")
    assert "is not a multiple of micro batch" in run("--data-path", toy_pretrain["prefixes"]["asr"],
                                                     "--micro-batch-size", "3")
    # a blend whose units come from two speech tokenizers (the toy's and CosyVoice's): refused naming both
    from megatron_cslm.data.indexed import preprocess
    from megatron_cslm.speech.identity import IDENTITY_KEY, s3_identity
    from megatron_cslm.text.tokenizer import SpeechTextTokenizer
    (tmp_path / "s3.jsonl").write_text(json.dumps({"segments": [{"units": [1, 2]}], IDENTITY_KEY: s3_identity(
        "speech_tokenizer_v1_25hz", None).to_dict() | {"num_codes": 512}}) + "\n")
    toy_tokenizer = SpeechTextTokenizer.from_pretrained(toy_pretrain["tokenizer"])
    preprocess([tmp_path / "s3.jsonl"], tmp_path / "s3", toy_tokenizer, progress=False)
    err = run("--data-path", toy_pretrain["prefixes"]["asr"], tmp_path / "s3")
    assert "units from two speech tokenizers" in err and "toy-g2u" in err and "speech_tokenizer_v1_25hz" in err, err
    # SFT pointed at a pretraining prefix: one line before megatron-core's assertion about `_modality` files
    from megatron_cslm.training.sft import cli_main as sft_main
    err = run("--data-path", toy_pretrain["prefixes"]["asr"], "--num-units", "512", main=sft_main)
    assert "is not a packed SFT dataset" in err and "Traceback" not in err and len(err.strip().splitlines()) <= 2, err


@pytest.mark.timeout(300)
def test_non_finite_loss_stops_without_saving(toy_pretrain, tmp_path):
    ckpt = tmp_path / "ckpt"
    p = torchrun("-m megatron_cslm.pretrain", 1, *pretrain_args(toy_pretrain, tmp_path, "--train-iters", "40",
                                                              "--lr", "1e12", "--lr-warmup-fraction", "0.5",
                                                              "--clip-grad", "0", "--save", ckpt,
                                                              "--save-interval", "2"), check=False)
    assert p.returncode != 0
    out = p.stdout + p.stderr
    assert "stopping without saving. Last good checkpoint:" in out, out[-3000:]
    last = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    assert (ckpt / f"iter_{last:07d}" / "metadata.json").exists()
    assert f"iteration {last}" in out.split("loss is")[1]
