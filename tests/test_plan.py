"""Issue 26 part 3: `cslm plan` counts what megatron-core allocates, and its activation formula holds.

- weights / gradient / optimizer bytes equal, to the byte, the storages megatron-core allocates for the same model
  and layout (4 gloo processes, 14 layouts: TP2xPP2, TP2xDP2, PP2xDP2, DP4, TP4, each with and without the
  distributed optimizer, PP ones also with tied embeddings; tests/workers/plan_bytes.py);
- the activation formula (plan/memory.py) is within 10% of the bytes autograd saves for backward in a real forward
  pass of the same layer stack, per recompute setting (in-process, tiny dims);
- the command reads the trainer's YAML, ranks layouts, refuses impossible ones in one line, and its JSON adds up.
"""
import json
import subprocess
import sys

import pytest
import torch

from megatron_cslm.cli.plan import main as plan_main
from megatron_cslm.distributed import parallel
from megatron_cslm.models.llama import (
    LlamaArch,
    PrecisionConfig,
    RecomputeConfig,
    build_gpt_model,
    padded_vocab_size,
    transformer_config,
)
from megatron_cslm.plan.memory import Layout, activation_bytes
from megatron_cslm.tool import run_tool
from tests.helpers.launch import ROOT, torchrun, worker_env


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_state_bytes_equal_megatron_core_allocations(tmp_path):
    torchrun("tests/workers/plan_bytes.py", 4, tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results) == 14
    for layout, ranks in results.items():
        for rank, r in enumerate(ranks):
            assert r["plan"] == r["measured"], (layout, rank, r)  # [weights, gradients, optimizer] bytes
    # the padding and sharding rules matter: DP ranks differ, and the distributed optimizer shards the state
    dp4 = results["TP1 PP1 DP4 distopt=True tied=False"]
    assert len({tuple(r["measured"]) for r in dp4}) > 1
    assert dp4[0]["measured"][2] * 3 < results["TP1 PP1 DP4 distopt=False tied=False"][0]["measured"][2]


# head_dim 24: q (192) != h (128), so terms of each width are told apart
ARCH = LlamaArch(num_layers=2, hidden_size=128, ffn_hidden_size=320, num_attention_heads=8, num_query_groups=4,
                 vocab_size=1000, max_position_embeddings=512, rope_scaling=None, kv_channels=24)
RECOMPUTE = {"none": RecomputeConfig(), "selective": RecomputeConfig("selective"),
             "full": RecomputeConfig("full", "uniform", 1)}


def saved_bytes(model, tokens) -> int:
    """Bytes of the distinct storages autograd saves for backward in one forward + loss, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    s = tokens.shape[1]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens, torch.arange(s).expand_as(tokens), None, labels=tokens)
    return sum(seen.values())


@pytest.mark.parametrize("recompute", sorted(RECOMPUTE))
def test_activation_formula_matches_autograd_saved_tensors(recompute):
    parallel.initialize(parallel.ParallelConfig(), device="cpu", seed=3)
    seq, mbs = 128, 2
    padded = padded_vocab_size(ARCH.vocab_size, 1)
    cfg = transformer_config(ARCH, precision=PrecisionConfig(dtype="fp32"), recompute=RECOMPUTE[recompute],
                             spec="local")
    model = build_gpt_model(ARCH, cfg, padded_vocab=padded, spec="local").train()
    measured = saved_bytes(model, torch.randint(0, ARCH.vocab_size, (mbs, seq)))
    plan = activation_bytes(ARCH, seq, mbs, Layout(), padded, recompute=recompute, layers=ARCH.num_layers,
                            act_bytes=4, spec="local").saved
    assert abs(plan - measured) <= 0.10 * measured, (recompute, plan, measured)


def test_plan_command_reads_the_training_yaml_ranks_and_refuses(capsys):
    config = str(ROOT / "examples/configs/sft_llama3.1_8b.yaml")  # TP 4, seq 8192, full recompute
    base = ["--model", "llama3.1-8b", "--config", config, "--num-gpus", "32", "--train-tokens", "1e9"]
    assert run_tool(plan_main, base + ["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    chosen = report["chosen"]
    assert (chosen["layout"]["tp"], chosen["layout"]["dp"], report["run"]["recompute"]) == (4, 8, "full")
    assert report["model"]["vocab_size"] == 128256 + 4096 + 4 and chosen["padded_vocab_size"] % (128 * 4) == 0
    b = chosen["bytes"]
    assert b["total"] == (b["weights"] + b["gradients"] + b["optimizer"] + b["reserve"]
                          + int(b["activations_per_microbatch"] * b["activations_in_flight"])
                          + b["activations_transient"])
    assert b["gradients"] == 2 * b["weights"]  # FP32 grads of BF16 weights, same padded buffer
    steps = [lay["seconds"]["step"] for lay in report["layouts"] if lay["fits"]]
    assert steps == sorted(steps) and len(steps) > 3
    # 8B without the distributed optimizer at TP1 on 40 GB: 16 bytes per parameter alone do not fit
    assert run_tool(plan_main, ["--model", "llama3.1-8b", "--gpu", "a100-40", "--num-gpus", "8",
                                "--tensor-model-parallel-size", "1", "--no-distributed-optimizer"]) == 0
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert run_tool(plan_main, base + ["--tensor-model-parallel-size", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "TP 3" in err and len(err.splitlines()) == 1


def test_launcher_prints_the_plan_of_its_layout_before_the_command():
    env = {**worker_env(), "PLAN": "1", "DRY_RUN": "1", "PYTHON": sys.executable, "NNODES": "4", "TP": "1",
           "RECOMPUTE": "selective", "PLAN_GPU": "a100-40"}
    p = subprocess.run(["bash", "examples/train_llama3.1_8b.sh", "pretrain", "data/asr"], cwd=ROOT,
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "**TP1 PP1 DP32** on 32 x a100-40" in out and "recompute selective" in out
    assert "DOES NOT FIT" in out  # 8B at TP1 on 40 GB: the launch would have failed
    assert out.index("# cslm plan") < out.index("torchrun --nnodes 4")  # the plan first, then the command
