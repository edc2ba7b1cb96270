"""The training loop shared by pretraining and SFT: setup, resume, steps, validation, checkpoints, signals.

What differs between the stages is data: a `Task` gives the datasets, how to batch them and the names
(and weights) of the loss groups. Everything else (parallelism, optimizer, checkpoint/resume semantics,
logging) is one code path.
"""
from __future__ import annotations

import argparse
import math
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from megatron_cslm.distributed import parallel
from megatron_cslm.models.flops import train_flops_per_token
from megatron_cslm.checkpoint.manifest import ModelManifest
from megatron_cslm.models.llama import ARCHS, LlamaArch, PrecisionConfig, RecomputeConfig, padded_vocab_size, transformer_config
from megatron_cslm.checkpoint.save_load import latest_iteration, load_checkpoint, save_checkpoint
from megatron_cslm.training.logger import TrainingLogger
from megatron_cslm.training.setup import OptimConfig, build_model, build_optimizer
from megatron_cslm.training.step import evaluate, train_step


@dataclass
class Task:
    """The data side of a run. `stream(dataset, consumed_samples)` yields this DP rank's micro-batches."""

    train: object  # None on ranks that receive batches by broadcast (TP rank > 0)
    valid: object | None
    has_valid: bool  # the same on every rank, unlike `valid`
    stream: Callable
    group_names: list[str]
    group_weights: torch.Tensor | None = None


@dataclass
class ModelSource:
    arch: LlamaArch
    tokenizer_dir: Path
    checkpoint_padded_vocab: int | None = None  # rows of the checkpoint we start from, if any


class TrainingStopped(RuntimeError):
    """Raised on every rank when the loss stops being finite."""


def resolve_model(args: argparse.Namespace, resume_at: int | None) -> ModelSource:
    """Architecture from the checkpoint we resume (`resume_at` in --save) or start from (its cslm_model.json),
    or a named arch resized to the tokenizer's vocabulary."""
    from megatron_cslm.text.tokenizer import SpeechTextTokenizer

    start = args.save if resume_at is not None else args.load_init  # a resumed run keeps its saved architecture
    if start:
        manifest = ModelManifest.load(start)
        tokenizer_dir = Path(args.tokenizer_model) if args.tokenizer_model else manifest.tokenizer_dir(start)
        return ModelSource(manifest.arch, tokenizer_dir, manifest.padded_vocab_size)
    if args.model_arch not in ARCHS:
        raise ValueError(f"--model-arch {args.model_arch!r} is not one of {sorted(ARCHS)}")
    if not args.tokenizer_model:
        raise ValueError("--model-arch runs need --tokenizer-model (a saved SpeechTextTokenizer directory)")
    tokenizer = SpeechTextTokenizer.from_pretrained(args.tokenizer_model)
    return ModelSource(ARCHS[args.model_arch].with_vocab(tokenizer.vocab_size), Path(args.tokenizer_model))


def run_padded_vocab(source: ModelSource, tp: int, multiple: int) -> int:
    """Keep the checkpoint's vocabulary padding when it splits evenly at this TP (weights load as saved);
    otherwise pad for this TP: megatron-core loads embeddings whose padding differs (extra rows are zero)."""
    step = multiple * tp
    if source.checkpoint_padded_vocab and source.checkpoint_padded_vocab % step == 0:
        return source.checkpoint_padded_vocab
    return padded_vocab_size(source.arch.vocab_size, tp, multiple)


def precision_from_args(args: argparse.Namespace, device: str) -> PrecisionConfig:
    dtype = "fp32" if args.fp32 or (device == "cpu" and not args.bf16) else "bf16"
    return PrecisionConfig(dtype=dtype, fp8=args.fp8_format, fp8_recipe=args.fp8_recipe,
                           fp8_amax_history_len=args.fp8_amax_history_len,
                           fp8_amax_compute_algo=args.fp8_amax_compute_algo,
                           fp8_first_last_layers_bf16=args.first_last_layers_bf16,
                           fp8_num_layers_at_start_in_bf16=args.num_layers_at_start_in_bf16,
                           fp8_num_layers_at_end_in_bf16=args.num_layers_at_end_in_bf16)


class _ExitSignal:
    """SIGTERM/SIGUSR1 (what SLURM sends before the time limit) -> checkpoint at the next step boundary."""

    def __init__(self, enabled: bool):
        self.received = False
        if enabled:
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.received = True

    def any_rank(self) -> bool:
        flag = torch.tensor([int(self.received)], dtype=torch.int32,
                            device="cuda" if torch.cuda.is_available() else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def _broadcast_from_last(values: list[float]) -> list[float]:
    """Loss values live on the last pipeline stage; every rank needs them to agree on NaN stops."""
    t = torch.tensor(values, dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
    dist.broadcast(t, src=dist.get_world_size() - 1)
    return t.tolist()


def run(args: argparse.Namespace, make_task: Callable[[argparse.Namespace, ModelSource, int], Task]) -> int:
    """Train; returns the last completed iteration."""
    from megatron.core import parallel_state

    layout = parallel.ParallelConfig(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                                     args.context_parallel_size, args.virtual_pipeline_model_parallel_size)
    device = parallel.initialize(layout, device=args.device, seed=args.seed)
    world = dist.get_world_size()
    dp = layout.data_parallel_size(world)
    if args.global_batch_size % (args.micro_batch_size * dp):
        raise ValueError(f"--global-batch-size {args.global_batch_size} is not a multiple of micro batch "
                         f"{args.micro_batch_size} x data-parallel size {dp}")
    num_microbatches = args.global_batch_size // (args.micro_batch_size * dp)
    resume_at = latest_iteration(args.save) if args.save else None
    source = resolve_model(args, resume_at)
    arch, tp = source.arch, args.tensor_model_parallel_size
    padded = run_padded_vocab(source, tp, args.make_vocab_size_divisible_by)
    recompute = RecomputeConfig(args.recompute_granularity, args.recompute_method, args.recompute_num_layers)
    config = transformer_config(arch, tensor_parallel_size=tp, pipeline_parallel_size=args.pipeline_model_parallel_size,
                                virtual_pipeline_size=args.virtual_pipeline_model_parallel_size,
                                precision=precision_from_args(args, device), recompute=recompute,
                                sequence_parallel=args.sequence_parallel, spec=args.transformer_impl)
    task = make_task(args, source, padded)  # data errors surface before the model is built
    model = build_model(arch, config, padded, spec=args.transformer_impl,
                        use_distributed_optimizer=not args.no_distributed_optimizer)
    optim = OptimConfig(lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay, adam_beta1=args.adam_beta1,
                        adam_beta2=args.adam_beta2, adam_eps=args.adam_eps, clip_grad=args.clip_grad,
                        lr_warmup_fraction=args.lr_warmup_fraction, lr_decay_style=args.lr_decay_style,
                        use_distributed_optimizer=not args.no_distributed_optimizer)
    optimizer, scheduler = build_optimizer(model, optim, config, args.train_iters, args.global_batch_size)

    iteration, consumed = 0, 0
    if resume_at is not None:
        common = load_checkpoint(args.save, resume_at, model, optimizer, scheduler)
        iteration, consumed = common["iteration"], common["consumed_samples"]
        print_rank_0(f"resumed from {args.save} at iteration {iteration} ({consumed} samples consumed)")
    elif args.load_init:
        init_at = latest_iteration(args.load_init) or 0
        load_checkpoint(args.load_init, init_at, model, None, None, restore_rng=False)
        optimizer.reload_model_params()
        print_rank_0(f"initialised weights from {args.load_init} (iteration {init_at})")
    if args.save and dist.get_rank() == 0:
        ModelManifest(arch, padded, str(source.tokenizer_dir.resolve())).save(args.save)

    dp_rank = parallel_state.get_data_parallel_rank()
    train_iter = task.stream(task.train, consumed, dp_rank, dp, num_microbatches)
    is_logger = dist.get_rank() == world - 1
    flops = train_flops_per_token(arch, args.seq_length, padded, full_recompute=args.recompute_granularity == "full")
    logger = TrainingLogger(enabled=is_logger, tensorboard_dir=args.tensorboard_dir, wandb_project=args.wandb_project,
                            flops_per_token=flops, peak_tflops=args.peak_tflops, world_size=world, config=vars(args))
    exit_signal = _ExitSignal(args.exit_signal_handler)
    step_kwargs = dict(num_microbatches=num_microbatches, seq_length=args.seq_length,
                       micro_batch_size=args.micro_batch_size, group_names=task.group_names)

    def save(it: int) -> None:
        if args.save:
            with_optim = it > 0 and not args.no_save_optim  # an optimizer that never stepped has no state
            save_checkpoint(args.save, it, model, optimizer if with_optim else None, scheduler,
                            {"iteration": it, "consumed_samples": consumed, "args": _plain(vars(args))})
            print_rank_0(f"saved checkpoint at iteration {it} to {args.save}")

    tokens_per_step = args.global_batch_size * args.seq_length
    if args.train_iters == 0:  # an init-only run: write the initial weights (e.g. to start several runs alike)
        save(0)
    while iteration < args.train_iters:
        stats = train_step(model, optimizer, scheduler, train_iter, global_batch_size=args.global_batch_size,
                           group_weights=task.group_weights, **step_kwargs)
        iteration += 1
        consumed += args.global_batch_size
        total = stats["losses"].get("lm loss", (0.0, 1.0)) if stats["losses"] else (0.0, 1.0)
        loss_sum, = _broadcast_from_last([total[0]])
        if not math.isfinite(loss_sum):
            last = latest_iteration(args.save) if args.save else None
            raise TrainingStopped(f"loss is {loss_sum} at iteration {iteration}; stopping without saving. Last good "
                                  f"checkpoint: {f'{args.save} iteration {last}' if last is not None else 'none'}")
        logger.accumulate(stats["losses"], tokens_per_step)
        if iteration % args.log_interval == 0 or iteration == args.train_iters:
            logger.flush(iteration, scheduler.get_lr(optimizer.param_groups[0]), stats["grad_norm"], args.train_iters)
        if task.has_valid and args.eval_interval and (iteration % args.eval_interval == 0
                                                               or iteration == args.train_iters):
            valid_iter = task.stream(task.valid, 0, dp_rank, dp, num_microbatches)
            logger.validation(iteration, evaluate(model, valid_iter, num_batches=args.eval_iters, **step_kwargs))
        if exit_signal.any_rank():
            save(iteration)
            print_rank_0(f"exiting on signal after iteration {iteration}")
            break
        if iteration % args.save_interval == 0 or iteration == args.train_iters:
            save(iteration)
    logger.close()
    return iteration


def _plain(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (str, int, float, bool, list, type(None)))}


def print_rank_0(msg: str) -> None:
    if dist.get_rank() == 0:
        print(f"[megatron_cslm] {msg}", flush=True)


def main(make_task, parser_factory, argv: list[str] | None = None) -> None:
    from megatron_cslm.training.arguments import parse_args

    args = parse_args(parser_factory(), argv)
    try:
        run(args, make_task)
    except (ValueError, FileNotFoundError, TrainingStopped) as e:
        print(f"[megatron_cslm] error: {e}", file=sys.stderr, flush=True)
        parallel.destroy()
        sys.exit(2)
    parallel.destroy()
