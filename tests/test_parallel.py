"""Issue 2: parallel parity on real megatron-core (4 gloo processes) and clear refusals of bad layouts."""
import json

import pytest

from megatron_cslm.distributed.parallel import ParallelConfig
from megatron_cslm.models.llama import ARCHS, PrecisionConfig, RecomputeConfig, check_parallel_fit, transformer_config
from tests.helpers.launch import torchrun


@pytest.mark.timeout(900)
def test_tp_pp_logits_and_optimizer_steps_match_tp1(tmp_path):
    torchrun("tests/workers/parallel_parity.py", 4, tmp_path)
    r = json.loads((tmp_path / "results.json").read_text())
    for layout in ("tp2_pp1", "tp1_pp2", "tp2_pp2"):
        assert r[f"logits_{layout}"] < 1e-4, (layout, r[f"logits_{layout}"])
    ref, got = r["losses_tp1_pp1"], r["losses_tp2_pp2"]
    assert len(ref) == len(got) == 3
    assert ref[2] < ref[0]  # the three steps actually trained
    for a, b in zip(ref, got):
        assert abs(a - b) / abs(a) < 1e-4, (ref, got)


def test_layout_errors_are_explicit():
    arch = ARCHS["tiny"]  # 4 heads, 2 KV heads, 4 layers
    with pytest.raises(ValueError, match="does not divide the 2 KV heads"):
        check_parallel_fit(arch, 4, 1)
    with pytest.raises(ValueError, match="does not divide num_attention_heads"):
        check_parallel_fit(arch, 3, 1)
    with pytest.raises(ValueError, match="pipeline-model-parallel-size 3 does not divide num_layers 4"):
        check_parallel_fit(arch, 1, 3)
    with pytest.raises(ValueError, match="world size 6 is not divisible by TP x PP x CP = 2 x 2 x 1 = 4"):
        ParallelConfig(2, 2).data_parallel_size(6)
    assert ParallelConfig(2, 2).data_parallel_size(8) == 2


def test_fp8_and_sequence_parallel_need_transformer_engine():
    arch = ARCHS["tiny"]
    with pytest.raises(ValueError, match="FP8 training needs Transformer Engine"):
        transformer_config(arch, precision=PrecisionConfig(fp8="hybrid"), spec="local")
    with pytest.raises(ValueError, match="--sequence-parallel needs Transformer Engine"):
        transformer_config(arch, tensor_parallel_size=2, sequence_parallel=True, spec="local")


def test_fp8_settings_reach_transformer_config():
    """On a TE machine these are what megatron-core's TE layers read; here we check the plumbing."""
    cfg = transformer_config(ARCHS["tiny"], spec="te", recompute=RecomputeConfig("full", "uniform", 1),
                             precision=PrecisionConfig(dtype="bf16", fp8="e4m3", fp8_recipe="tensorwise",
                                                       fp8_amax_history_len=16, fp8_amax_compute_algo="most_recent",
                                                       fp8_first_last_layers_bf16=True))
    assert (cfg.fp8, cfg.fp8_recipe, cfg.fp8_amax_history_len) == ("e4m3", "tensorwise", 16)
    assert cfg.first_last_layers_bf16 and cfg.recompute_granularity == "full" and cfg.bf16


def test_cpu_mode_refused_with_cuda():
    from megatron_cslm.distributed import cpu_mode
    with pytest.raises(RuntimeError, match="CUDA is available"):
        cpu_mode.refuse_if_cuda(True)
    cpu_mode.refuse_if_cuda(False)


def test_cpu_mode_is_never_implicit():
    import torch

    from megatron_cslm.distributed.parallel import resolve_device
    if torch.cuda.is_available():
        pytest.skip("this check is about machines without CUDA")
    with pytest.raises(ValueError, match="pass --device cpu"):
        resolve_device("cuda")
