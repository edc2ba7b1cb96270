"""The interleaved pipeline schedule (--virtual-pipeline-model-parallel-size): PP=2 x VPP=2 on the 4-layer tiny
model logs PP=1's losses, its checkpoint resumes at PP=2 without VPP, and it converts to HF with identical
logits (2 gloo processes; megatron-core's interleaved 1F1B schedule with paired P2P on gloo)."""
from __future__ import annotations

import pytest

from tests.helpers.files import load_tool
from tests.helpers.launch import torchrun
from tests.helpers.training import scalars

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
ITERS = 8


def _args(toy, out, *extra) -> list[str]:
    return ["--device", "cpu", "--model-arch", "tiny", "--tokenizer-model", str(toy["tokenizer"]),
            "--data-path", "0.5", toy["prefixes"]["asr"], "0.5", toy["prefixes"]["tts"], "--seq-length", "64",
            "--micro-batch-size", "1", "--global-batch-size", "4", "--lr", "3e-3", "--eval-interval", "0",
            "--log-interval", "1", "--data-cache-path", str(out / "cache"), "--tensorboard-dir", str(out / "tb"),
            "--train-iters", str(ITERS), *map(str, extra)]


@pytest.mark.timeout(900)
def test_pp2_vpp2_matches_pp1_resumes_without_vpp_and_converts(toy_pretrain, tmp_path):
    init = tmp_path / "init"
    torchrun("-m megatron_cslm.pretrain", 1, *_args(toy_pretrain, init, "--train-iters", "0", "--save", init / "ckpt"))
    pp1 = tmp_path / "pp1"
    torchrun("-m megatron_cslm.pretrain", 1, *_args(toy_pretrain, pp1, "--load-init", init / "ckpt"))
    vpp = tmp_path / "vpp"  # 4 micro-batches per step: two groups of PP per chunk
    torchrun("-m megatron_cslm.pretrain", 2, *_args(toy_pretrain, vpp, "--load-init", init / "ckpt",
                                                     "--pipeline-model-parallel-size", "2",
                                                     "--virtual-pipeline-model-parallel-size", "2",
                                                     "--save", vpp / "ckpt", "--save-interval", ITERS // 2))
    reference = scalars(pp1 / "tb")["train/loss/lm loss"]
    interleaved = scalars(vpp / "tb")["train/loss/lm loss"]
    assert sorted(interleaved) == list(range(1, ITERS + 1))
    for step in interleaved:
        assert abs(interleaved[step] - reference[step]) <= 1e-5 * reference[step], (step, interleaved, reference)

    # The save at ITERS/2 resumes at PP=2 without VPP (weights and schedule; the optimizer's dp_reshardable
    # shards belong to one layout, as README says): the first resumed step sees the same weights and data.
    resumed_dir = tmp_path / "pp2"
    (resumed_dir / "ckpt").mkdir(parents=True)
    half = vpp / "ckpt" / f"iter_{ITERS // 2:07d}"
    (resumed_dir / "ckpt" / half.name).symlink_to(half, target_is_directory=True)
    (resumed_dir / "ckpt" / "cslm_model.json").symlink_to(vpp / "ckpt" / "cslm_model.json")
    (resumed_dir / "ckpt" / "latest_checkpointed_iteration.txt").write_text(f"{ITERS // 2}\n")
    torchrun("-m megatron_cslm.pretrain", 2, *_args(toy_pretrain, resumed_dir, "--pipeline-model-parallel-size", "2",
                                                     "--save", resumed_dir / "ckpt", "--save-interval", "1000",
                                                     "--no-load-optim"))
    resumed = scalars(resumed_dir / "tb")["train/loss/lm loss"]
    first = ITERS // 2 + 1
    assert min(resumed) == first
    assert abs(resumed[first] - interleaved[first]) <= 1e-6 * interleaved[first]

    # Converted like one model: the exported HF logits match the Megatron model's (the converter's --verify).
    load_tool("megatron_to_hf", "checkpoints_convert").main(
        ["--megatron-dir", str(vpp / "ckpt"), "--out", str(tmp_path / "hf"), "--dtype", "fp32", "--verify",
         "--verify-atol", "1e-5"])
    assert (tmp_path / "hf" / "config.json").exists()
