"""Typed run configuration, one dataclass per concern, built once from the parsed flags.

Invariants:
- One source for each setting: a field declared with `argtypes.setting(default, help, type=, choices=)` *is*
  its flag. `training/arguments.py` generates every training flag from these fields (name, type, default,
  help, choices, aliases), so adding a setting is a one-place change: add the field here (or to
  `distributed.parallel.ParallelConfig`). Stage presets (SFT's lr, seq length, split) are the only overrides,
  set on the SFT parser; YAML presets (`--config`) go through the same types and choices.
- Values are checked by the configs themselves (`__post_init__` -> `argtypes.check_settings`): a config built
  in code, from a preset or from flags refuses the same bad value with the same words.
- A field's name is its flag's `dest` (`--lr-warmup-iters` -> `lr_warmup_iters`): `RunConfig.from_args` picks
  fields by name. Task-specific flags (SFT's `--modality-loss-weights`, `--config`) are listed in `TASK_FLAGS`.
- Translation into megatron-core's own configs happens once: `ModelConfig.precision/recompute` +
  `models.llama.transformer_config` (TransformerConfig), `training/setup.py` (DDP, OptimizerConfig, scheduler).
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from megatron_cslm.argtypes import (
    check_settings,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    setting,
)
from megatron_cslm.distributed.parallel import ParallelConfig
from megatron_cslm.errors import CslmError
from megatron_cslm.models.llama import PrecisionConfig, RecomputeConfig

TASK_FLAGS = {"config", "modality_loss_weights"}  # read by the task (pretrain.py / sft.py), not the trainer
DEFAULT_WARMUP_FRACTION = 0.03  # used when neither --lr-warmup-fraction nor --lr-warmup-iters is given


def transformer_impl(value: str) -> str:
    """Megatron-LM's names (transformer_engine | local) and our short alias te."""
    return "te" if value == "transformer_engine" else value


class _Checked:
    def __post_init__(self):
        check_settings(self)


@dataclass(frozen=True)
class ModelConfig(_Checked):
    """Where the weights and architecture come from, the layer implementation, precision and recompute."""

    model_arch: str | None = setting(
        None, "named architecture (llama3.1-8b, llama3.1-70b, tiny, small) for runs from scratch")
    load_init: str | None = setting(
        None, "checkpoint directory to initialise weights from (e.g. checkpoints_convert/hf_to_megatron.py "
              "output, or a pretraining run's --save); its cslm_model.json gives the architecture. Same as "
              "Megatron-LM's --load DIR --finetune")
    tokenizer_model: str | None = setting(
        None, "SpeechTextTokenizer directory (saved by save_pretrained / the converter); defaults to "
              "<load-init>/tokenizer")
    num_units: int = setting(4096, "speech units in the vocabulary (from-scratch runs)", type=positive_int)
    make_vocab_size_divisible_by: int = setting(
        128, "pad the vocabulary to a multiple of this x TP (padding rows are never sampled)", type=positive_int)
    transformer_impl: str | None = setting(
        None, "layer spec (te is an alias of transformer_engine); default: transformer_engine when Transformer "
              "Engine and CUDA are present, else local",
        type=transformer_impl, choices=("te", "local"), metavar="{transformer_engine,te,local}")
    sequence_parallel: bool = setting(False, "needs Transformer Engine (GPU)")
    bf16: bool = setting(False, "BF16 params/compute (default on GPU)")
    fp32: bool = setting(False, "FP32 (default on CPU)")
    fp8_format: str | None = setting(PrecisionConfig.fp8, "FP8 via Transformer Engine", choices=("e4m3", "hybrid"))
    fp8_recipe: str = setting(PrecisionConfig.fp8_recipe, "FP8 scaling recipe",
                              choices=("delayed", "tensorwise", "mxfp8", "blockwise"))
    fp8_amax_history_len: int = setting(PrecisionConfig.fp8_amax_history_len, "FP8 amax history, steps",
                                        type=positive_int)
    fp8_amax_compute_algo: str = setting(PrecisionConfig.fp8_amax_compute_algo, "FP8 amax from the history",
                                         choices=("max", "most_recent"))
    first_last_layers_bf16: bool = setting(PrecisionConfig.fp8_first_last_layers_bf16,
                                           "keep first/last layers in BF16 with FP8")
    num_layers_at_start_in_bf16: int = setting(PrecisionConfig.fp8_num_layers_at_start_in_bf16,
                                               "with --first-last-layers-bf16: first layers kept in BF16",
                                               type=nonnegative_int)
    num_layers_at_end_in_bf16: int = setting(PrecisionConfig.fp8_num_layers_at_end_in_bf16,
                                             "with --first-last-layers-bf16: last layers kept in BF16",
                                             type=nonnegative_int)
    recompute_granularity: str | None = setting(RecomputeConfig.granularity, "activation recomputation",
                                                choices=("full", "selective"))
    recompute_method: str | None = setting(RecomputeConfig.method, "which layers full recomputation covers",
                                           choices=("uniform", "block"))
    recompute_num_layers: int | None = setting(RecomputeConfig.num_layers, "layers per recomputed group (uniform) "
                                               "or recomputed layers per stage (block)", type=positive_int)

    def precision(self, device: str) -> PrecisionConfig:
        dtype = "fp32" if self.fp32 or (device == "cpu" and not self.bf16) else "bf16"
        return PrecisionConfig(dtype=dtype, fp8=self.fp8_format, fp8_recipe=self.fp8_recipe,
                               fp8_amax_history_len=self.fp8_amax_history_len,
                               fp8_amax_compute_algo=self.fp8_amax_compute_algo,
                               fp8_first_last_layers_bf16=self.first_last_layers_bf16,
                               fp8_num_layers_at_start_in_bf16=self.num_layers_at_start_in_bf16,
                               fp8_num_layers_at_end_in_bf16=self.num_layers_at_end_in_bf16)

    def recompute(self) -> RecomputeConfig:
        return RecomputeConfig(self.recompute_granularity, self.recompute_method, self.recompute_num_layers)


@dataclass(frozen=True)
class RuntimeConfig(_Checked):
    """Device, process group and seeding."""

    device: str = setting("cuda", "cpu runs megatron-core on gloo (laptop debugging, CI); it must be asked for "
                                  "explicitly and is refused when CUDA is present", choices=("cuda", "cpu"))
    seed: int = setting(1234, "seed of python, numpy, torch and megatron-core's model-parallel RNG", type=int)
    distributed_timeout_minutes: int = setting(  # Megatron-LM's default
        10, "timeout of torch.distributed collectives, minutes (a timed-out collective exits 76, like a stall)",
        type=positive_int)
    step_timeout_minutes: float | None = setting(
        None, "hang watchdog: when no step completes within this many minutes every rank dumps its Python "
              "stacks, the ranks that did not arrive are named, and the job exits 76 (default: 30 min until the "
              "first 3 steps complete, then max(5 min, 10x the slowest of them))", type=positive_float)


@dataclass(frozen=True)
class DataConfig(_Checked):
    data_path: tuple | None = setting(
        None, "[WEIGHT] PREFIX pairs of .bin/.idx datasets (pretraining: tools/preprocess_data.py; SFT: packed "
              "prefixes from tools/build_sft_data.py)", nargs="+")
    split: str = setting("98,2,0", "train,valid,test split of each dataset (weights)")
    valid_data_path: tuple | None = setting(None, "separate validation data (SFT)", nargs="+")
    seq_length: int = setting(1024, "tokens per sample", type=positive_int)
    micro_batch_size: int = setting(1, "samples per micro-batch per GPU", type=positive_int)
    global_batch_size: int = setting(8, "samples per optimizer step = micro batch x gradient accumulation x DP",
                                     type=positive_int)
    data_cache_path: str | None = setting(None, "where megatron-core writes its index caches")


@dataclass(frozen=True)
class OptimConfig(_Checked):
    """Adam(W) with warmup + decay (megatron-core OptimizerParamScheduler). Iterations are optimizer steps."""

    train_iters: int | None = setting(None, "optimizer steps (0 with --save writes the initial weights and exits)",
                                      type=nonnegative_int)
    lr: float = setting(6e-5, "peak learning rate", type=nonnegative_float)
    min_lr: float = setting(0.0, "learning rate at the end of the decay", type=nonnegative_float)
    lr_decay_style: str = setting("cosine", "learning-rate decay after warmup",
                                  choices=("constant", "linear", "cosine"))
    lr_warmup_fraction: float | None = setting(
        None, f"warmup as a fraction of the decay iterations (default {DEFAULT_WARMUP_FRACTION} unless "
              "--lr-warmup-iters is given)", type=nonnegative_float)
    lr_warmup_iters: int = setting(0, "linear warmup, iterations", type=nonnegative_int)
    lr_decay_iters: int | None = setting(None, "iterations over which the LR decays (default: --train-iters)",
                                         type=positive_int)
    weight_decay: float = setting(0.0, "AdamW weight decay", type=nonnegative_float)
    adam_beta1: float = setting(0.9, "Adam beta1", type=float)
    adam_beta2: float = setting(0.95, "Adam beta2", type=float)
    adam_eps: float = setting(1e-8, "Adam epsilon", type=positive_float)
    clip_grad: float = setting(1.0, "global grad-norm clip (0 disables)", type=nonnegative_float)
    use_distributed_optimizer: bool = setting(
        True, "shard optimizer state over data-parallel ranks (ZeRO-1; on by default here)",
        negative="--no-distributed-optimizer",
        negative_help="replicate optimizer state on every data-parallel rank")

    DEFAULT_WARMUP_FRACTION = DEFAULT_WARMUP_FRACTION

    def decay_iters(self) -> int:
        return self.lr_decay_iters if self.lr_decay_iters is not None else self.train_iters

    def warmup_iters(self) -> int:
        if self.lr_warmup_fraction is not None and self.lr_warmup_iters:
            raise CslmError.usage("give --lr-warmup-fraction or --lr-warmup-iters, not both")
        if self.lr_warmup_iters:
            return self.lr_warmup_iters
        fraction = self.DEFAULT_WARMUP_FRACTION if self.lr_warmup_fraction is None else self.lr_warmup_fraction
        return int(round(fraction * self.decay_iters()))


@dataclass(frozen=True)
class CheckpointConfig(_Checked):
    """Saving, resuming (from --save, or Megatron-LM's --load) and what a resume restores."""

    save: str | None = setting(None, "checkpoint directory (a restarted run resumes from its latest save)")
    save_interval: int = setting(1000, "optimizer steps between saves", type=positive_int)
    no_save_optim: bool = setting(False, "save weights only")
    load: str | None = setting(None, "Megatron-LM's --load: resume from this checkpoint directory (when --save "
                                     "holds no checkpoint yet); with --finetune, its weights only, from iteration 0")
    finetune: bool = setting(False, "with --load: load weights only (no optimizer, scheduler, RNG, iteration)")
    no_load_optim: bool = setting(False, "resume without the checkpoint's optimizer state (the LR schedule "
                                         "continues from the consumed samples)")
    no_load_rng: bool = setting(False, "resume without the checkpoint's RNG states")
    ckpt_format: str = setting("torch_dist", "checkpoint format (megatron-core dist_checkpointing)",
                               choices=("torch_dist",))
    override_opt_param_scheduler: bool = setting(
        False, "on resume, use the command line's LR schedule instead of the checkpoint's",
        flags=("--override-opt_param-scheduler", "--override-opt-param-scheduler"))
    use_checkpoint_opt_param_scheduler: bool = setting(
        False, "on resume, keep the checkpoint's LR schedule whatever the command line says",
        flags=("--use-checkpoint-opt_param-scheduler", "--use-checkpoint-opt-param-scheduler"))
    exit_signal_handler: bool = setting(
        True, "on SIGTERM/SIGUSR1 (SLURM's pre-timeout signals) save a checkpoint and exit (on by default here)",
        negative="--no-exit-signal-handler",
        negative_help="leave SIGTERM/SIGUSR1 to their default action (the process dies without saving)")
    async_save: bool = setting(  # megatron-core asynchronous dist_checkpointing (checkpoint/save_load.py)
        False, "write checkpoints in background processes while training continues; the tracker file names a "
               "save only once every rank finished it; a signal save and the end of training wait for pending saves")
    dist_ckpt_workers: int = setting(  # Megatron-LM's default
        1, "writer processes per rank for a checkpoint save (more split the files further, but an asynchronous "
           "save's writers then compete with training for cores)", type=positive_int)
    ckpt_assume_constant_structure: bool = setting(
        False, "the checkpointed state keeps its structure for the whole run: reuse megatron-core's save plan and "
               "check sharding integrity on the first save only (faster saves)")
    keep_last_n: int | None = setting(  # retention (checkpoint/retention.py)
        None, "delete older checkpoints once a newer one is complete on every rank, keeping the newest N (and the "
              "--keep-every archive); default: keep all", type=positive_int)
    keep_every: int | None = setting(
        None, "with --keep-last-n: also keep, forever, the first checkpoint at or after every multiple of this many "
              "iterations", type=positive_int)


@dataclass(frozen=True)
class LoggingConfig(_Checked):
    """Console/TensorBoard/W&B logging and validation cadence."""

    log_interval: int = setting(10, "steps between log lines", type=positive_int)
    eval_interval: int = setting(1000, "steps between validation passes (0: never)", type=nonnegative_int)
    eval_iters: int = setting(10, "global batches per validation pass", type=nonnegative_int)
    tensorboard_dir: str | None = setting(None, "TensorBoard event directory")
    wandb_project: str | None = setting(None, "log to Weights & Biases too (needs wandb installed)")
    peak_tflops: float | None = setting(
        None, "dense peak TFLOP/s per device for MFU (default: H100/H200 bf16 989, A100 312, B200 2250 by device "
              "name; on CPU the measured fp32 matmul peak of the process; an unknown GPU logs no MFU)",
        type=positive_float)


@dataclass(frozen=True)
class CommConfig(_Checked):
    """megatron-core DDP communication: overlap the grad reduce-scatter with backward and the param
    all-gather with the next forward (distributed optimizer); bucket size in parameters (None: megatron-core's
    default, max(40M, 1M x DP) with overlap)."""

    overlap_grad_reduce: bool = setting(
        False, "overlap the gradient reduce(-scatter) with the backward pass, bucket by bucket")
    overlap_param_gather: bool = setting(
        False, "overlap the distributed optimizer's parameter all-gather with the next forward pass (needs the "
               "distributed optimizer and --overlap-grad-reduce)")
    ddp_bucket_size: int | None = setting(
        None, "parameters per communication bucket (default: megatron-core's, max(40M, 1M x DP))", type=positive_int)


@dataclass(frozen=True)
class ProfilingConfig(_Checked):
    """torch.profiler traces of chosen iterations and ranks; Python GC control (training/profiling.py)."""

    profile: bool = setting(False, "trace iterations --profile-step-start..--profile-step-end with torch.profiler "
                                   "(Chrome-trace JSON: TensorBoard's profiler plugin or ui.perfetto.dev)")
    profile_step_start: int = setting(10, "first traced iteration (1-based optimizer step)", type=int)
    profile_step_end: int = setting(12, "last traced iteration (included)", type=int)
    profile_ranks: tuple = setting((0,), "global ranks that write a trace", type=nonnegative_int, nargs="+")
    profile_dir: str | None = setting(None, "where traces go (default <tensorboard-dir>/profile, else ./profile)")
    manual_gc: bool = setting(False, "disable Python's automatic garbage collection; collect on all ranks at the "
                                     "same step")
    manual_gc_interval: int = setting(0, "steps between manual collections (0: only at start-up)",
                                      type=nonnegative_int)


CONCERNS = {"model": ModelConfig, "parallel": ParallelConfig, "runtime": RuntimeConfig, "data": DataConfig,
            "optim": OptimConfig, "checkpoint": CheckpointConfig, "logging": LoggingConfig, "comm": CommConfig,
            "profiling": ProfilingConfig}


def _pick(cls, args: argparse.Namespace):
    """`cls` from the flags of the same names; lists (nargs flags) become tuples: configs are immutable."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    parallel: ParallelConfig
    runtime: RuntimeConfig
    data: DataConfig
    optim: OptimConfig
    checkpoint: CheckpointConfig
    logging: LoggingConfig
    comm: CommConfig
    profiling: ProfilingConfig

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "RunConfig":
        return cls(**{name: _pick(concern, args) for name, concern in CONCERNS.items()})

    def flat(self) -> dict:
        """Every field, flag-named (saved in checkpoints' common state and logged as the run's config)."""
        out = {}
        for name in CONCERNS:
            out.update(dataclasses.asdict(getattr(self, name)))
        return out
