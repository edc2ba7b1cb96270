"""Megatron-LM style flags for `megatron_cslm.pretrain` and `megatron_cslm.sft`, with YAML configs.

A YAML file given by `--config` sets defaults (keys are flag names, dashes or underscores); flags on the
command line override it, so a launcher can keep the recipe in YAML and vary one knob per job.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from megatron_cslm.cli import nonnegative_float, nonnegative_int, positive_float, positive_int
from megatron_cslm.distributed.parallel import ParallelConfig
from megatron_cslm.training.config import (
    CheckpointConfig,
    CommConfig,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ProfilingConfig,
    RuntimeConfig,
)


def build_parser(description: str, sft: bool = False) -> argparse.ArgumentParser:
    """Flags; defaults come from the typed configs (training/config.py), the one place they are written."""
    M, R, D, Opt, C, L, P = ModelConfig, RuntimeConfig, DataConfig, OptimConfig, CheckpointConfig, LoggingConfig, \
        ParallelConfig
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="YAML file of flag defaults (flag names as keys); command-line flags win")

    g = p.add_argument_group("model")
    g.add_argument("--model-arch", default=M.model_arch,
                   help="named architecture (llama3.1-8b, llama3.1-70b, tiny, small) for runs from scratch")
    g.add_argument("--load-init", default=M.load_init,
                   help="checkpoint directory to initialise weights from (e.g. checkpoints_convert/hf_to_megatron.py "
                        "output, or a pretraining run's --save); its cslm_model.json gives the architecture. Same as "
                        "Megatron-LM's --load DIR --finetune")
    g.add_argument("--tokenizer-model", default=M.tokenizer_model,
                   help="SpeechTextTokenizer directory (saved by save_pretrained / the converter); defaults to "
                        "<load-init>/tokenizer")
    g.add_argument("--num-units", type=positive_int, default=M.num_units,
                   help="speech units in the vocabulary (from-scratch runs)")
    g.add_argument("--make-vocab-size-divisible-by", type=positive_int, default=M.make_vocab_size_divisible_by,
                   help="pad the vocabulary to a multiple of this x TP (padding rows are never sampled)")

    g = p.add_argument_group("parallelism and device")
    g.add_argument("--device", default=R.device, choices=["cuda", "cpu"],
                   help="cpu runs megatron-core on gloo (laptop debugging, CI); it must be asked for explicitly and "
                        "is refused when CUDA is present")
    g.add_argument("--tensor-model-parallel-size", type=positive_int, default=P.tensor_model_parallel_size)
    g.add_argument("--pipeline-model-parallel-size", type=positive_int, default=P.pipeline_model_parallel_size)
    g.add_argument("--virtual-pipeline-model-parallel-size", type=positive_int,
                   default=P.virtual_pipeline_model_parallel_size)
    g.add_argument("--context-parallel-size", type=positive_int, default=P.context_parallel_size)
    g.add_argument("--sequence-parallel", action="store_true", help="needs Transformer Engine (GPU)")
    g.add_argument("--transformer-impl", default=M.transformer_impl, type=_transformer_impl,
                   choices=["te", "local"], metavar="{transformer_engine,te,local}",
                   help="layer spec (te is an alias of transformer_engine); default: transformer_engine when "
                        "Transformer Engine and CUDA are present, else local")
    g.add_argument("--distributed-timeout-minutes", type=positive_int, default=R.distributed_timeout_minutes,
                   help="timeout of torch.distributed collectives, minutes (a timed-out collective exits 76, "
                        "like a stall)")
    g.add_argument("--step-timeout-minutes", type=positive_float, default=R.step_timeout_minutes,
                   help="hang watchdog: when no step completes within this many minutes every rank dumps its "
                        "Python stacks, the ranks that did not arrive are named, and the job exits 76 (default: "
                        "30 min until the first 3 steps complete, then max(5 min, 10x the slowest of them))")

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=D.data_path,
                   help="[WEIGHT] PREFIX pairs of .bin/.idx datasets" + (" (packed SFT prefixes from "
                                                                       "tools/build_sft_data.py)" if sft else ""))
    g.add_argument("--split", default=D.split, help="train,valid,test split of each dataset (weights)")
    g.add_argument("--valid-data-path", nargs="+", default=D.valid_data_path, help="separate validation data (SFT)")
    g.add_argument("--seq-length", type=positive_int, default=D.seq_length, help="tokens per sample")
    g.add_argument("--micro-batch-size", type=positive_int, default=D.micro_batch_size,
                   help="samples per micro-batch per GPU")
    g.add_argument("--global-batch-size", type=positive_int, default=D.global_batch_size,
                   help="samples per optimizer step = micro batch x gradient accumulation x DP")
    g.add_argument("--data-cache-path", default=D.data_cache_path, help="where megatron-core writes its index caches")

    g = p.add_argument_group("optimization")
    g.add_argument("--train-iters", type=nonnegative_int, default=Opt.train_iters,
                   help="optimizer steps (0 with --save writes the initial weights and exits)")
    g.add_argument("--lr", type=nonnegative_float, default=Opt.lr, help="peak learning rate")
    g.add_argument("--min-lr", type=nonnegative_float, default=Opt.min_lr)
    g.add_argument("--lr-decay-style", default=Opt.lr_decay_style, choices=["constant", "linear", "cosine"])
    g.add_argument("--lr-decay-iters", type=positive_int, default=Opt.lr_decay_iters,
                   help="iterations over which the LR decays (default: --train-iters)")
    g.add_argument("--lr-warmup-iters", type=nonnegative_int, default=Opt.lr_warmup_iters,
                   help="linear warmup, iterations")
    g.add_argument("--lr-warmup-fraction", type=float, default=Opt.lr_warmup_fraction,
                   help=f"warmup as a fraction of the decay iterations (default {Opt.DEFAULT_WARMUP_FRACTION} unless "
                        "--lr-warmup-iters is given)")
    g.add_argument("--weight-decay", type=nonnegative_float, default=Opt.weight_decay)
    g.add_argument("--adam-beta1", type=float, default=Opt.adam_beta1)
    g.add_argument("--adam-beta2", type=float, default=Opt.adam_beta2)
    g.add_argument("--adam-eps", type=positive_float, default=Opt.adam_eps)
    g.add_argument("--clip-grad", type=nonnegative_float, default=Opt.clip_grad,
                   help="global grad-norm clip (0 disables)")
    g.add_argument("--use-distributed-optimizer", dest="use_distributed_optimizer", action="store_true",
                   default=Opt.use_distributed_optimizer,
                   help="shard optimizer state over data-parallel ranks (ZeRO-1; on by default here)")
    g.add_argument("--no-distributed-optimizer", dest="use_distributed_optimizer", action="store_false",
                   help="replicate optimizer state on every data-parallel rank")
    g.add_argument("--seed", type=int, default=R.seed)
    if sft:
        g.add_argument("--modality-loss-weights", type=float, nargs=3, default=[1.0, 1.0, 1.0],
                       metavar=("TQ", "TA", "SA"), help="loss weights of question transcript, text answer, speech")

    g = p.add_argument_group("precision and memory")
    g.add_argument("--bf16", action="store_true", help="BF16 params/compute (default on GPU)")
    g.add_argument("--fp32", action="store_true", help="FP32 (default on CPU)")
    g.add_argument("--fp8-format", default=M.fp8_format, choices=["e4m3", "hybrid"], help="FP8 via Transformer Engine")
    g.add_argument("--fp8-recipe", default=M.fp8_recipe, choices=["delayed", "tensorwise", "mxfp8", "blockwise"])
    g.add_argument("--fp8-amax-history-len", type=positive_int, default=M.fp8_amax_history_len)
    g.add_argument("--fp8-amax-compute-algo", default=M.fp8_amax_compute_algo, choices=["max", "most_recent"])
    g.add_argument("--first-last-layers-bf16", action="store_true", help="keep first/last layers in BF16 with FP8")
    g.add_argument("--num-layers-at-start-in-bf16", type=nonnegative_int, default=M.num_layers_at_start_in_bf16)
    g.add_argument("--num-layers-at-end-in-bf16", type=nonnegative_int, default=M.num_layers_at_end_in_bf16)
    g.add_argument("--recompute-granularity", default=M.recompute_granularity, choices=["full", "selective"])
    g.add_argument("--recompute-method", default=M.recompute_method, choices=["uniform", "block"])
    g.add_argument("--recompute-num-layers", type=positive_int, default=M.recompute_num_layers)

    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=C.save, help="checkpoint directory (a restarted run resumes from its latest save)")
    g.add_argument("--save-interval", type=positive_int, default=C.save_interval, help="optimizer steps between saves")
    g.add_argument("--no-save-optim", action="store_true", help="save weights only")
    g.add_argument("--load", default=C.load,
                   help="Megatron-LM's --load: resume from this checkpoint directory (when --save holds no "
                        "checkpoint yet); with --finetune, its weights only, from iteration 0")
    g.add_argument("--finetune", action="store_true",
                   help="with --load: load weights only (no optimizer, scheduler, RNG, iteration)")
    g.add_argument("--no-load-optim", action="store_true",
                   help="resume without the checkpoint's optimizer state (the LR schedule continues from the "
                        "consumed samples)")
    g.add_argument("--no-load-rng", action="store_true", help="resume without the checkpoint's RNG states")
    g.add_argument("--ckpt-format", default=C.ckpt_format, choices=["torch_dist"],
                   help="checkpoint format (megatron-core dist_checkpointing)")
    g.add_argument("--override-opt_param-scheduler", "--override-opt-param-scheduler",
                   dest="override_opt_param_scheduler", action="store_true",
                   help="on resume, use the command line's LR schedule instead of the checkpoint's")
    g.add_argument("--use-checkpoint-opt_param-scheduler", "--use-checkpoint-opt-param-scheduler",
                   dest="use_checkpoint_opt_param_scheduler", action="store_true",
                   help="on resume, keep the checkpoint's LR schedule whatever the command line says")
    g.add_argument("--exit-signal-handler", dest="exit_signal_handler", action="store_true",
                   default=C.exit_signal_handler,
                   help="on SIGTERM/SIGUSR1 (SLURM's pre-timeout signals) save a checkpoint and exit (on by default "
                        "here)")
    g.add_argument("--no-exit-signal-handler", dest="exit_signal_handler", action="store_false",
                   help="leave SIGTERM/SIGUSR1 to their default action (the process dies without saving)")
    g.add_argument("--async-save", action="store_true", default=C.async_save,
                   help="write checkpoints in background processes while training continues; the tracker file "
                        "names a save only once every rank finished it; a signal save and the end of training "
                        "wait for pending saves")
    g.add_argument("--dist-ckpt-workers", type=positive_int, default=C.dist_ckpt_workers,
                   help="writer processes per rank for a checkpoint save (default: %(default)s; more split the "
                        "files further, but an asynchronous save's writers then compete with training for cores)")
    g.add_argument("--ckpt-assume-constant-structure", action="store_true",
                   default=C.ckpt_assume_constant_structure,
                   help="the checkpointed state keeps its structure for the whole run: reuse megatron-core's save "
                        "plan and check sharding integrity on the first save only (faster saves; default: off)")
    g.add_argument("--keep-last-n", type=positive_int, default=C.keep_last_n,
                   help="delete older checkpoints once a newer one is complete on every rank, keeping the newest N "
                        "(and the --keep-every archive); default: keep all")
    g.add_argument("--keep-every", type=positive_int, default=C.keep_every,
                   help="with --keep-last-n: also keep, forever, the first checkpoint at or after every multiple "
                        "of this many iterations")

    g = p.add_argument_group("communication (megatron-core DDP)")
    g.add_argument("--overlap-grad-reduce", action="store_true", default=CommConfig.overlap_grad_reduce,
                   help="overlap the gradient reduce(-scatter) with the backward pass, bucket by bucket")
    g.add_argument("--overlap-param-gather", action="store_true", default=CommConfig.overlap_param_gather,
                   help="overlap the distributed optimizer's parameter all-gather with the next forward pass "
                        "(needs the distributed optimizer and --overlap-grad-reduce)")
    g.add_argument("--ddp-bucket-size", type=int, default=CommConfig.ddp_bucket_size,
                   help="parameters per communication bucket (default: megatron-core's, max(40M, 1M x DP))")

    g = p.add_argument_group("profiling and timing")
    g.add_argument("--profile", action="store_true", default=ProfilingConfig.profile,
                   help="trace iterations --profile-step-start..--profile-step-end with torch.profiler "
                        "(Chrome-trace JSON: TensorBoard's profiler plugin or ui.perfetto.dev)")
    g.add_argument("--profile-step-start", type=int, default=ProfilingConfig.profile_step_start,
                   help="first traced iteration (1-based optimizer step)")
    g.add_argument("--profile-step-end", type=int, default=ProfilingConfig.profile_step_end,
                   help="last traced iteration (included)")
    g.add_argument("--profile-ranks", type=int, nargs="+", default=list(ProfilingConfig.profile_ranks),
                   help="global ranks that write a trace")
    g.add_argument("--profile-dir", default=ProfilingConfig.profile_dir,
                   help="where traces go (default <tensorboard-dir>/profile, else ./profile)")
    g.add_argument("--manual-gc", action="store_true", default=ProfilingConfig.manual_gc,
                   help="disable Python's automatic garbage collection; collect on all ranks at the same step")
    g.add_argument("--manual-gc-interval", type=int, default=ProfilingConfig.manual_gc_interval,
                   help="steps between manual collections (0: only at start-up)")

    g = p.add_argument_group("evaluation and logging")
    g.add_argument("--eval-interval", type=nonnegative_int, default=L.eval_interval,
                   help="steps between validation passes (0: never)")
    g.add_argument("--eval-iters", type=nonnegative_int, default=L.eval_iters,
                   help="global batches per validation pass")
    g.add_argument("--log-interval", type=positive_int, default=L.log_interval, help="steps between log lines")
    g.add_argument("--tensorboard-dir", default=L.tensorboard_dir)
    g.add_argument("--wandb-project", default=L.wandb_project,
                   help="log to Weights & Biases too (needs wandb installed)")
    g.add_argument("--peak-tflops", type=positive_float, default=L.peak_tflops,
                   help="dense peak TFLOP/s per device for MFU (default: H100/H200 bf16 989, A100 312, B200 2250 "
                        "by device name; on CPU the measured fp32 matmul peak of the process; an unknown GPU "
                        "logs no MFU)")
    return p


def _transformer_impl(value: str) -> str:
    """Megatron-LM's names (transformer_engine | local) and our short alias te."""
    return "te" if value == "transformer_engine" else value


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse flags with YAML defaults from --config; unknown YAML keys are an error, not silently ignored."""
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        values = yaml.safe_load(Path(pre.config).read_text(encoding="utf-8")) or {}
        if not isinstance(values, dict):
            raise SystemExit(f"{pre.config}: expected a mapping of flag names to values")
        known = {a.dest for a in parser._actions}
        defaults = {}
        for key, value in values.items():
            dest = key.replace("-", "_")
            if dest not in known:
                raise SystemExit(f"{pre.config}: unknown key '{key}' (not a flag of this command)")
            defaults[dest] = value
        parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    for required in ("data_path", "train_iters"):
        if getattr(args, required) in (None, []):
            parser.error(f"--{required.replace('_', '-')} is required (flag or YAML key)")
    if args.load_init is None and args.model_arch is None and args.load is None:
        parser.error("give --load-init (a converted checkpoint), --load (a checkpoint to resume or, with "
                     "--finetune, start from) or --model-arch (train from scratch)")
    return args
