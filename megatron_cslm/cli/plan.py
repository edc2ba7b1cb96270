"""`cslm plan`: per-GPU memory by part, whether it fits, and the layouts that fit ranked by step time, before launch.

    cslm plan --model llama3.1-8b --config examples/configs/pretrain_llama3.1_8b.yaml --gpu h100-80 --num-gpus 32 \\
        --train-tokens 10e9
    cslm plan --model ckpt/llama-cslm --seq-length 8192 --micro-batch-size 1 --global-batch-size 64 \\
        --recompute-granularity full --num-gpus 32 --json

--model is a preset (models/llama.py), a run directory or its cslm_model.json (vocabulary and padding as
saved), or an HF config.json (the CSLM expansion, --num-units + 4 specials, is added to presets and HF configs).
--config reads a training YAML (examples/configs/*.yaml) for the flags plan shares with the trainer; flags on
the command line win. Training flags keep the trainer's names and defaults. Memory is per GPU in GiB (2^30
bytes) for the pipeline stage that needs the most; weights, gradients and optimizer state are the bytes
megatron-core allocates (padded buffers, distributed-optimizer shards), activations a formula
(megatron_cslm/plan/memory.py states it and its source). Step time = model FLOPs / (GPUs x dense peak x
--mfu) x (1 + pipeline bubble) + TP/PP communication + exposed DP communication (plan/layouts.py).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import yaml

from megatron_cslm.argtypes import nonnegative_float, nonnegative_int, positive_float, positive_int
from megatron_cslm.distributed.parallel import ParallelConfig
from megatron_cslm.errors import CslmError
from megatron_cslm.plan.gpus import GPUS
from megatron_cslm.plan.layouts import Run, candidate_layouts, check_layout, estimate, rank
from megatron_cslm.plan.memory import Layout
from megatron_cslm.plan.report import as_json, markdown
from megatron_cslm.plan.source import resolve_model
from megatron_cslm.speech.identity import DEFAULT_S3_TOKENIZER, S3_TOKENIZERS
from megatron_cslm.tool import tool_parser
from megatron_cslm.training.arguments import add_field_flag
from megatron_cslm.training.config import CommConfig, DataConfig, ModelConfig, OptimConfig

# training flags plan shares with the trainer (same names, types, defaults and help: one source)
SHARED = ((DataConfig, ("seq_length", "micro_batch_size", "global_batch_size")),
          (ParallelConfig, ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                            "virtual_pipeline_model_parallel_size")),
          (ModelConfig, ("model_arch", "load_init", "make_vocab_size_divisible_by", "transformer_impl", "fp8_format",
                         "recompute_granularity")),
          (OptimConfig, ("use_distributed_optimizer",)),
          (CommConfig, ("overlap_grad_reduce", "ddp_bucket_size")))


def build_parser():
    p = tool_parser(__doc__)
    p.add_argument("--model", help="preset name, run directory / cslm_model.json, or HF config.json (default: the "
                   "--config's load-init when it exists, else its model-arch)")
    p.add_argument("--config", help="training YAML whose shared flags (seq length, batches, TP/PP, recompute, "
                   "FP8, optimizer, DDP) become defaults; other keys are ignored")
    p.add_argument("--gpu", default="h100-80", choices=sorted(GPUS), help="accelerator (memory, peaks: plan/gpus.py)")
    p.add_argument("--num-gpus", type=positive_int, default=8, help="GPUs in the job (TP x PP x DP)")
    p.add_argument("--gpus-per-node", type=positive_int, default=8,
                   help="GPUs per node: TP stays inside a node; groups beyond it use the network's bandwidth")
    p.add_argument("--precision", default=None, choices=("bf16", "fp8"),
                   help="GEMM precision for the peak FLOP/s (default: fp8 when --fp8-format is given, else bf16)")
    p.add_argument("--mfu", type=positive_float, default=0.4, help="fraction of the dense peak the GEMMs reach")
    p.add_argument("--reserve-gib", type=nonnegative_float, default=4.0,
                   help="GiB per GPU kept for the CUDA context, NCCL buffers and allocator fragmentation")
    p.add_argument("--train-tokens", type=positive_float, default=None, help="token budget to time (e.g. 10e9)")
    p.add_argument("--num-units", type=nonnegative_int, default=S3_TOKENIZERS[DEFAULT_S3_TOKENIZER][1],
                   help="speech units added (with 4 specials) to a preset's or HF config's vocabulary; 0: none")
    p.add_argument("--no-sequence-parallel", action="store_true",
                   help="plan without sequence parallelism (default: on when TP > 1, as the launchers do)")
    p.add_argument("--vpp-candidates", type=positive_int, nargs="*", default=[],
                   help="virtual pipeline sizes to rank besides none (interleaved 1F1B)")
    p.add_argument("--top", type=positive_int, default=10, help="layouts shown in the ranking")
    p.add_argument("--json", action="store_true", help="print JSON (bytes, seconds) instead of markdown")
    g = p.add_argument_group("training flags (as the trainer names them)")
    for cls, names in SHARED:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for name in names:
            add_field_flag(g, fields[name])
    # the layout to detail: by default the fastest that fits
    p.set_defaults(tensor_model_parallel_size=None, pipeline_model_parallel_size=None)
    return p


def _yaml_defaults(parser, path: str) -> None:
    try:
        values = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except OSError as e:
        raise CslmError(path, None, "config", f"cannot be read: {e.strerror}", kind="io") from None
    if not isinstance(values, dict):
        raise CslmError(path, None, "config", "expected a mapping of flag names to values")
    known = {a.dest for a in parser._actions}
    parser.set_defaults(**{k.replace("-", "_"): v for k, v in values.items() if k.replace("-", "_") in known
                           and k not in ("model", "config", "json")})


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        _yaml_defaults(parser, pre.config)
    args = parser.parse_args(argv)
    if args.mfu > 1:
        parser.error(f"--mfu is a fraction of the peak (0, 1], got {args.mfu}")
    source = args.model
    if source is None:
        if args.load_init and Path(args.load_init).exists():
            source = args.load_init
        elif args.model_arch:
            source = args.model_arch
        else:
            raise CslmError.usage("give --model (a preset, a run directory / cslm_model.json or an HF config.json)"
                                  + (f"; --config's load-init {args.load_init} does not exist here"
                                     if args.load_init else ""), field="model")
    model = resolve_model(source, args.num_units, args.make_vocab_size_divisible_by)
    gpu = dataclasses.replace(GPUS[args.gpu], gpus_per_node=args.gpus_per_node)
    run = Run(args.seq_length, args.micro_batch_size, args.global_batch_size, gpu, args.num_gpus,
              precision=args.precision or ("fp8" if args.fp8_format else "bf16"),
              recompute=args.recompute_granularity or "none", mfu=args.mfu, reserve_gib=args.reserve_gib,
              train_tokens=args.train_tokens, spec="local" if args.transformer_impl == "local" else "te")
    try:
        run.gpu.peak_tflops(run.precision)
    except ValueError as e:
        raise CslmError.usage(str(e), field="precision") from None
    common = dict(distributed_optimizer=args.use_distributed_optimizer,
                  overlap_grad_reduce=args.overlap_grad_reduce, bucket_size=args.ddp_bucket_size)
    sp = False if args.no_sequence_parallel else None
    layouts = [dataclasses.replace(lay, sequence_parallel=sp)
               for lay in candidate_layouts(model, run, vpp=tuple(args.vpp_candidates), **common)]
    if not layouts:
        raise CslmError.usage(f"no TP x PP x DP layout of {run.num_gpus} GPUs suits this model and batch "
                              f"(global batch {run.global_batch_size}, micro batch {run.micro_batch_size})")
    estimates = rank(model, run, layouts)
    chosen = estimates[0]
    if args.tensor_model_parallel_size or args.pipeline_model_parallel_size:
        tp, pp = args.tensor_model_parallel_size or 1, args.pipeline_model_parallel_size or 1
        if run.num_gpus % (tp * pp):
            raise CslmError.usage(f"TP {tp} x PP {pp} does not divide {run.num_gpus} GPUs",
                                  field="tensor-model-parallel-size")
        layout = Layout(tp, pp, run.num_gpus // (tp * pp), args.virtual_pipeline_model_parallel_size,
                        sequence_parallel=sp, **common)
        why = check_layout(model, run, layout)
        if why:
            raise CslmError.usage(f"{layout.name()}: {why}", field="tensor-model-parallel-size")
        chosen = estimate(model, run, layout)
    if args.json:
        print(json.dumps(as_json(model, run, chosen, estimates), indent=1))
    else:
        print(markdown(model, run, chosen, estimates, args.top), end="")
    return 0
