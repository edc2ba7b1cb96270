"""Issue 15: Megatron-LM's flag names and meanings, typed configs, and the private megatron-core API wrapper.

Runs on both CI legs. On the leg whose megatron-core wheel ships Megatron-LM's `megatron.training` (0.19),
the same command line is also parsed by Megatron-LM's own `parse_args`, and every shared flag must agree.
"""
import shlex
import sys

import numpy as np
import pytest

from megatron_cslm.training.arguments import parse_args
from megatron_cslm.training.config import CONCERNS, TASK_FLAGS, RunConfig
from megatron_cslm.training.pretrain import parser as pretrain_parser
from megatron_cslm.training.sft import parser as sft_parser

# A Megatron-LM `pretrain_gpt.py` command line for Llama-3-8B, restricted to the flags both stacks share
# (architecture flags such as --num-layers are ours only through --model-arch / the checkpoint's manifest).
LLAMA3_8B_MEGATRON_LM = """
    --tensor-model-parallel-size 2 --pipeline-model-parallel-size 1 --context-parallel-size 1
    --use-distributed-optimizer --transformer-impl transformer_engine --sequence-parallel
    --seq-length 8192 --micro-batch-size 1 --global-batch-size 128
    --train-iters 25000 --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 2000
    --lr-decay-iters 25000 --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-8 --clip-grad 1.0
    --bf16 --make-vocab-size-divisible-by 128 --seed 1234
    --recompute-granularity full --recompute-method uniform --recompute-num-layers 1
    --data-path 0.5 /data/a_text_document 0.5 /data/b_text_document --split 99,1,0 --data-cache-path /data/cache
    --tokenizer-model /models/llama3-8b
    --save /ckpt/llama3-8b --load /ckpt/llama3-8b --save-interval 500 --ckpt-format torch_dist
    --no-load-optim --no-load-rng --finetune --exit-signal-handler --distributed-timeout-minutes 60
    --log-interval 1 --eval-interval 1000 --eval-iters 10 --tensorboard-dir /tb
"""

SHARED = {  # dest -> value the command line above sets (Megatron-LM's dest names, which are ours too)
    "tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 1, "context_parallel_size": 1,
    "use_distributed_optimizer": True, "sequence_parallel": True, "seq_length": 8192, "micro_batch_size": 1,
    "global_batch_size": 128, "train_iters": 25000, "lr": 3e-4, "min_lr": 3e-5, "lr_decay_style": "cosine",
    "lr_warmup_iters": 2000, "lr_decay_iters": 25000, "weight_decay": 0.1, "adam_beta1": 0.9, "adam_beta2": 0.95,
    "adam_eps": 1e-8, "clip_grad": 1.0, "bf16": True, "make_vocab_size_divisible_by": 128, "seed": 1234,
    "recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1,
    "split": "99,1,0", "data_cache_path": "/data/cache", "tokenizer_model": "/models/llama3-8b",
    "save": "/ckpt/llama3-8b", "load": "/ckpt/llama3-8b", "save_interval": 500, "ckpt_format": "torch_dist",
    "no_load_optim": True, "no_load_rng": True, "finetune": True, "exit_signal_handler": True,
    "distributed_timeout_minutes": 60, "log_interval": 1, "eval_interval": 1000, "eval_iters": 10,
    "tensorboard_dir": "/tb",
}


def test_megatron_lm_llama3_8b_command_line_parses_unchanged():
    args = parse_args(pretrain_parser(), shlex.split(LLAMA3_8B_MEGATRON_LM))
    for dest, value in SHARED.items():
        assert getattr(args, dest) == value, dest
    assert RunConfig.from_args(args).data.data_path == ("0.5", "/data/a_text_document", "0.5", "/data/b_text_document")
    cfg = RunConfig.from_args(args)
    assert cfg.model.transformer_impl == "te"  # Megatron-LM's name, our internal alias
    assert cfg.optim.warmup_iters() == 2000 and cfg.optim.decay_iters() == 25000
    assert cfg.checkpoint.finetune and cfg.checkpoint.load == "/ckpt/llama3-8b"
    assert cfg.model.precision("cuda").dtype == "bf16" and cfg.model.recompute().granularity == "full"


def test_megatron_lm_parse_args_agrees_on_the_shared_flags(monkeypatch):
    """Megatron-LM's own parser (shipped in the megatron-core 0.19 wheel) reads the same values."""
    arguments = pytest.importorskip("megatron.training.arguments",
                                    reason="megatron.training ships with megatron-core >= 0.19 (CI's 3.12 leg)")
    monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py", *shlex.split(LLAMA3_8B_MEGATRON_LM)])
    theirs = arguments.parse_args()
    for dest, value in SHARED.items():
        if dest == "tokenizer_model":
            continue  # theirs: a HF tokenizer path; ours: the SpeechTextTokenizer dir (same flag, same meaning)
        assert getattr(theirs, dest) == value, dest
    assert theirs.transformer_impl == "transformer_engine"


def test_every_flag_belongs_to_exactly_one_config():
    owners: dict[str, list[str]] = {}
    for name, concern in CONCERNS.items():
        for field in concern.__dataclass_fields__:
            owners.setdefault(field, []).append(name)
    assert all(len(v) == 1 for v in owners.values()), {k: v for k, v in owners.items() if len(v) > 1}
    for parser in (pretrain_parser(), sft_parser()):
        dests = {a.dest for a in parser._actions} - {"help"}
        assert dests - TASK_FLAGS <= owners.keys(), sorted(dests - TASK_FLAGS - owners.keys())


def test_defaults_come_from_the_configs_and_stage_presets():
    pre = RunConfig.from_args(parse_args(pretrain_parser(), ["--data-path", "x", "--train-iters", "1",
                                                             "--model-arch", "tiny"]))
    sft = RunConfig.from_args(parse_args(sft_parser(), ["--data-path", "x", "--train-iters", "1",
                                                        "--model-arch", "tiny"]))
    for name, concern in CONCERNS.items():  # every default is the dataclass's, except the SFT presets
        assert getattr(pre, name) == concern(**{k: v for k, v in vars(getattr(pre, name)).items()
                                                if k in ("data_path", "train_iters", "model_arch")}), name
    assert (sft.optim.lr, sft.data.seq_length, sft.data.split) == (1e-5, 8192, "100,0,0")
    assert pre.optim.use_distributed_optimizer and pre.checkpoint.exit_signal_handler
    assert pre.optim.warmup_iters() == 0  # 3% of one iteration
    off = parse_args(pretrain_parser(), ["--data-path", "x", "--train-iters", "100", "--model-arch", "tiny",
                                         "--no-distributed-optimizer", "--no-exit-signal-handler",
                                         "--transformer-impl", "local"])
    cfg = RunConfig.from_args(off)
    assert not cfg.optim.use_distributed_optimizer and not cfg.checkpoint.exit_signal_handler
    assert cfg.model.transformer_impl == "local" and cfg.optim.warmup_iters() == 3


def test_conflicting_warmup_flags_are_refused():
    args = parse_args(pretrain_parser(), ["--data-path", "x", "--train-iters", "10", "--model-arch", "tiny",
                                          "--lr-warmup-iters", "2", "--lr-warmup-fraction", "0.1"])
    with pytest.raises(ValueError, match="not both"):
        RunConfig.from_args(args).optim.warmup_iters()


def test_schedule_mismatch_on_resume_names_both_values():
    from megatron_cslm.training.setup import schedule_of
    from megatron_cslm.training.trainer import check_schedule

    def cfg(*extra):
        return RunConfig.from_args(parse_args(pretrain_parser(), ["--data-path", "x", "--model-arch", "tiny",
                                                                  "--train-iters", "6", *extra]))

    saved = schedule_of(cfg().optim, 8)
    check_schedule(cfg(), saved, "ckpt iteration 3")  # same schedule: fine
    with pytest.raises(ValueError, match=r"differs from the one ckpt iteration 3 was trained with: --train-iters 10 "
                                         r"\(checkpoint: 6\), --lr-decay-iters 10 \(checkpoint: 6\); pass"):
        check_schedule(cfg("--train-iters", "10"), saved, "ckpt iteration 3")
    with pytest.raises(ValueError, match=r"--global-batch-size 16 \(checkpoint: 8\); pass"):
        check_schedule(cfg("--global-batch-size", "16"), saved, "ckpt")
    check_schedule(cfg("--train-iters", "10", "--override-opt_param-scheduler"), saved, "ckpt")
    check_schedule(cfg("--train-iters", "10", "--use-checkpoint-opt_param-scheduler"), saved, "ckpt")


def test_compat_reads_sample_ids_for_the_loss_mask(tmp_path, monkeypatch):
    """The private megatron-core call behind masked-prompt pretraining, on a real GPTDataset (both legs)."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_cslm.compat import check_megatron_core_version
    from megatron_cslm.distributed import parallel
    from megatron_cslm.training.data import build_pretrain_datasets, parse_data_path

    check_megatron_core_version()
    rng = np.random.default_rng(0)
    prefix = str(tmp_path / "docs")
    tokens, masks = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32), \
        IndexedDatasetBuilder(prefix + "_lossmask.bin", dtype=np.int32)
    for _ in range(40):
        doc = rng.integers(1, 100, size=int(rng.integers(5, 30)))
        tokens.add_item(torch.from_numpy(doc))
        masks.add_item(torch.from_numpy((doc % 2 == 0).astype(np.int32)))  # "train on even ids only"
        tokens.end_document()
        masks.end_document()
    tokens.finalize(prefix + ".idx")
    masks.finalize(prefix + "_lossmask.idx")
    from megatron_cslm.distributed.ports import free_port

    monkeypatch.setenv("MASTER_PORT", str(free_port()))  # other test processes may hold the default 29500
    parallel.initialize(parallel.ParallelConfig(), device="cpu")
    try:
        train, _, _ = build_pretrain_datasets(parse_data_path([prefix]), split="100,0,0", seq_length=16, seed=1,
                                              num_samples=[20, 0, 0], vocab_size=128, eod_id=0,
                                              cache_dir=str(tmp_path / "cache"))
        for i in range(20):
            sample = train[i]
            labels = np.asarray(sample["labels"])
            np.testing.assert_array_equal(np.asarray(sample["loss_mask"]), (labels % 2 == 0) & (labels != 0))
    finally:
        parallel.destroy()


# ------------------------------------------------------------------------ --load / --finetune / schedule, end to end

_PRETRAIN_FLAGS = ["--device", "cpu", "--model-arch", "tiny", "--seq-length", "64", "--micro-batch-size", "2",
                   "--global-batch-size", "4", "--lr", "1e-3", "--log-interval", "1", "--eval-interval", "0"]


def _pretrain(toy, out, *extra, check=True):
    from tests.helpers.launch import torchrun

    return torchrun("-m megatron_cslm.pretrain", 1, *_PRETRAIN_FLAGS, "--tokenizer-model", toy["tokenizer"],
                    "--data-path", toy["prefixes"]["asr"], "--data-cache-path", out / "cache",
                    *map(str, extra), check=check, timeout=400)


def _weights(run, iteration):
    """Every model tensor of a checkpoint, global (optimizer state excluded)."""
    from megatron_cslm.convert.dist_ckpt import DistCheckpointReader

    reader = DistCheckpointReader(run / f"iter_{iteration:07d}")
    keys = [k for k, meta in reader.metadata.state_dict_metadata.items()
            if hasattr(meta, "size") and k.split(".")[0] in ("embedding", "decoder", "output_layer")]
    return {k: reader.read({k: ([0] * len(reader.tensor_meta(k).size), list(reader.tensor_meta(k).size))})[k]
            for k in keys}


@pytest.mark.timeout(900)
def test_load_finetune_starts_at_iteration_0_from_the_weights_and_a_changed_schedule_stops(toy_pretrain, tmp_path,
                                                                                           monkeypatch, capsys):
    import json

    import torch

    from megatron_cslm.checkpoint.manifest import ModelManifest, read_common_state

    first = tmp_path / "first"
    _pretrain(toy_pretrain, tmp_path, "--train-iters", "2", "--save", first)
    (first / "LICENSE").write_text("test licence\n")

    # Megatron-LM's rule on resume: train-iters 2 -> 4 and a doubled global batch stop at start-up, naming both
    # values (a start-up refusal: checked in this process, one rank)
    from megatron_cslm.distributed.ports import free_port
    from megatron_cslm.tool import run_tool
    from megatron_cslm.training.pretrain import cli_main

    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    code = run_tool(cli_main, [*_PRETRAIN_FLAGS, "--tokenizer-model", str(toy_pretrain["tokenizer"]), "--data-path",
                               toy_pretrain["prefixes"]["asr"], "--data-cache-path", str(tmp_path / "cache"),
                               "--train-iters", "4", "--global-batch-size", "8", "--load", str(first)])
    err = capsys.readouterr().err
    assert code == 2 and not torch.distributed.is_initialized()
    assert ("--train-iters 4 (checkpoint: 2), --global-batch-size 8 (checkpoint: 4)" in err
            and "--override-opt_param-scheduler" in err), err[-2000:]

    # --load X --finetune: X's weights, iteration 0, no optimizer; an init-only run saves exactly those weights
    second = tmp_path / "second"
    p = _pretrain(toy_pretrain, tmp_path, "--train-iters", "0", "--load", first, "--finetune", "--save", second,
                  "--lr", "5e-4")
    out = p.stdout + p.stderr
    assert f"initialised weights from {first} (iteration 2)" in out and "resumed" not in out
    common = read_common_state(second, 0)
    assert common["iteration"] == 0 and common["consumed_samples"] == 0 and not common["optimizer_saved"]
    assert read_common_state(first, 2)["optimizer_saved"]
    mine, theirs = _weights(second, 0), _weights(first, 2)
    assert mine.keys() == theirs.keys() and mine
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    # the licence travelled; the lineage names both stages with their data and hyper-parameters
    assert (second / "LICENSE").read_text() == "test licence\n"
    lineage = ModelManifest.load(second).lineage
    assert [r["stage"] for r in lineage] == ["pretrain", "pretrain"]
    assert lineage[0]["data"][0]["tokens"] == json.loads(
        open(toy_pretrain["prefixes"]["asr"] + ".stats.json").read())["tokens"]
    assert lineage[1]["hyper_parameters"]["lr"] == 5e-4 and "--finetune" in lineage[1]["command"]
