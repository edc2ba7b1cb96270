"""Issue 5: SFT on packed chain-of-modality bins with real megatron-core on CPU; per-modality losses drop."""
import pytest

from tests.helpers.launch import torchrun
from tests.helpers.toy import build_toy_sft
from tests.helpers.training import scalars

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.mark.timeout(600)
def test_short_sft_run_lowers_loss_on_every_modality(toy_pretrain, tmp_path):
    prefix = build_toy_sft(toy_pretrain, seq_length=512)
    torchrun("-m megatron_cslm.sft", 2, "--device", "cpu", "--model-arch", "tiny",
             "--tokenizer-model", toy_pretrain["tokenizer"], "--data-path", prefix, "--seq-length", "512",
             "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "30", "--lr", "3e-3",
             "--log-interval", "1", "--tensor-model-parallel-size", "2", "--tensorboard-dir", tmp_path / "tb",
             "--modality-loss-weights", "1", "1", "2")
    logged = scalars(tmp_path / "tb")
    for modality in ("tq", "ta", "sa"):
        curve = logged[f"train/loss/{modality}"]
        first, last = sum(curve[s] for s in (1, 2, 3)) / 3, sum(curve[s] for s in (28, 29, 30)) / 3
        assert last < first - 0.5, (modality, first, last)
