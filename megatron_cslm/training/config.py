"""Typed run configuration, one dataclass per concern, built once from the parsed flags.

Invariants:
- Defaults live here, in the dataclass fields; `training/arguments.py` reads them (`default=OptimConfig.lr`)
  so `--help` shows them and no second copy exists. Stage presets (SFT's lr, seq length, split) are the only
  overrides, set on the SFT parser.
- A field's name is its flag's `dest` (`--lr-warmup-iters` -> `lr_warmup_iters`): `RunConfig.from_args`
  picks fields by name, so adding a flag means adding one field here and one `add_argument` there; nothing is
  copied field by field. `tests/test_pretrain.py` checks every training flag lands in exactly one config
  (task-specific flags such as SFT's `--modality-loss-weights` are listed in `TASK_FLAGS`).
- Translation into megatron-core's own configs happens once: `ModelConfig.precision/recompute` +
  `models.llama.transformer_config` (TransformerConfig), `training/setup.py` (DDP, OptimizerConfig, scheduler).
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from megatron_cslm.distributed.parallel import ParallelConfig
from megatron_cslm.models.llama import PrecisionConfig, RecomputeConfig

TASK_FLAGS = {"config", "modality_loss_weights"}  # read by the task (pretrain.py / sft.py), not the trainer


@dataclass(frozen=True)
class ModelConfig:
    """Where the weights and architecture come from, the layer implementation, precision and recompute."""

    model_arch: str | None = None
    load_init: str | None = None
    tokenizer_model: str | None = None
    num_units: int = 4096
    make_vocab_size_divisible_by: int = 128
    transformer_impl: str | None = None  # te | local (None: te when TE and CUDA are present)
    sequence_parallel: bool = False
    bf16: bool = False
    fp32: bool = False
    fp8_format: str | None = PrecisionConfig.fp8
    fp8_recipe: str = PrecisionConfig.fp8_recipe
    fp8_amax_history_len: int = PrecisionConfig.fp8_amax_history_len
    fp8_amax_compute_algo: str = PrecisionConfig.fp8_amax_compute_algo
    first_last_layers_bf16: bool = PrecisionConfig.fp8_first_last_layers_bf16
    num_layers_at_start_in_bf16: int = PrecisionConfig.fp8_num_layers_at_start_in_bf16
    num_layers_at_end_in_bf16: int = PrecisionConfig.fp8_num_layers_at_end_in_bf16
    recompute_granularity: str | None = RecomputeConfig.granularity
    recompute_method: str | None = RecomputeConfig.method
    recompute_num_layers: int | None = RecomputeConfig.num_layers

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
class RuntimeConfig:
    """Device, process group and seeding."""

    device: str = "cuda"  # cuda | cpu
    seed: int = 1234
    distributed_timeout_minutes: int = 10  # Megatron-LM's default
    step_timeout_minutes: float | None = None  # hang watchdog (distributed/watchdog.py); None: tuned from steps


@dataclass(frozen=True)
class DataConfig:
    data_path: tuple | None = None
    split: str = "98,2,0"
    valid_data_path: tuple | None = None
    seq_length: int = 1024
    micro_batch_size: int = 1
    global_batch_size: int = 8
    data_cache_path: str | None = None


@dataclass(frozen=True)
class OptimConfig:
    """Adam(W) with warmup + decay (megatron-core OptimizerParamScheduler). Iterations are optimizer steps."""

    train_iters: int | None = None
    lr: float = 6e-5
    min_lr: float = 0.0
    lr_decay_style: str = "cosine"  # constant | linear | cosine
    lr_warmup_fraction: float | None = None  # of the decay iterations; default 0.03 unless --lr-warmup-iters
    lr_warmup_iters: int = 0
    lr_decay_iters: int | None = None  # None: --train-iters
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = True

    DEFAULT_WARMUP_FRACTION = 0.03  # used when neither --lr-warmup-fraction nor --lr-warmup-iters is given

    def decay_iters(self) -> int:
        return self.lr_decay_iters if self.lr_decay_iters is not None else self.train_iters

    def warmup_iters(self) -> int:
        if self.lr_warmup_fraction is not None and self.lr_warmup_iters:
            raise ValueError("give --lr-warmup-fraction or --lr-warmup-iters, not both")
        if self.lr_warmup_iters:
            return self.lr_warmup_iters
        fraction = self.DEFAULT_WARMUP_FRACTION if self.lr_warmup_fraction is None else self.lr_warmup_fraction
        return int(round(fraction * self.decay_iters()))


@dataclass(frozen=True)
class CheckpointConfig:
    """Saving, resuming (from --save, or Megatron-LM's --load) and what a resume restores."""

    save: str | None = None
    save_interval: int = 1000
    no_save_optim: bool = False
    load: str | None = None
    finetune: bool = False
    no_load_optim: bool = False
    no_load_rng: bool = False
    ckpt_format: str = "torch_dist"
    override_opt_param_scheduler: bool = False
    use_checkpoint_opt_param_scheduler: bool = False
    exit_signal_handler: bool = True
    async_save: bool = False  # megatron-core asynchronous dist_checkpointing (checkpoint/save_load.py)
    dist_ckpt_workers: int = 1  # writer processes per rank (Megatron-LM's default)
    ckpt_assume_constant_structure: bool = False  # reuse the save plan after the first save (Megatron-LM's)
    keep_last_n: int | None = None  # retention (checkpoint/retention.py): newest complete saves kept; None: all
    keep_every: int | None = None  # archive the first save at or after every multiple of this, forever


@dataclass(frozen=True)
class LoggingConfig:
    """Console/TensorBoard/W&B logging and validation cadence."""

    log_interval: int = 10
    eval_interval: int = 1000
    eval_iters: int = 10
    tensorboard_dir: str | None = None
    wandb_project: str | None = None
    peak_tflops: float | None = None  # None: a known GPU's dense bf16 peak, or the measured CPU matmul peak


@dataclass(frozen=True)
class CommConfig:
    """megatron-core DDP communication: overlap the grad reduce-scatter with backward and the param
    all-gather with the next forward (distributed optimizer); bucket size in parameters (None: megatron-core's
    default, max(40M, 1M x DP) with overlap)."""

    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    ddp_bucket_size: int | None = None


@dataclass(frozen=True)
class ProfilingConfig:
    """torch.profiler traces of chosen iterations and ranks; Python GC control (training/profiling.py)."""

    profile: bool = False
    profile_step_start: int = 10
    profile_step_end: int = 12
    profile_ranks: tuple = (0,)
    profile_dir: str | None = None  # None: <tensorboard-dir>/profile, else ./profile
    manual_gc: bool = False
    manual_gc_interval: int = 0  # 0: collect only at start-up


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
