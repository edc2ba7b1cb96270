"""Megatron-LM style flags for `megatron_cslm.pretrain` and `megatron_cslm.sft`, with YAML configs.

A YAML file given by `--config` sets defaults (keys are flag names, dashes or underscores); flags on the
command line override it, so a launcher can keep the recipe in YAML and vary one knob per job.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import yaml


def build_parser(description: str, sft: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="YAML file of flag defaults (flag names as keys); command-line flags win")

    g = p.add_argument_group("model")
    g.add_argument("--model-arch", default=None,
                   help="named architecture (llama3.1-8b, llama3.1-70b, tiny, small) for runs from scratch")
    g.add_argument("--load-init", default=None,
                   help="checkpoint directory to initialise weights from (e.g. checkpoints_convert/hf_to_megatron.py "
                        "output, or a pretraining run's --save); its cslm_model.json gives the architecture")
    g.add_argument("--tokenizer-model", default=None,
                   help="SpeechTextTokenizer directory (saved by save_pretrained / the converter); defaults to "
                        "<load-init>/tokenizer")
    g.add_argument("--num-units", type=int, default=4096, help="speech units in the vocabulary (from-scratch runs)")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="pad the vocabulary to a multiple of this x TP (padding rows are never sampled)")

    g = p.add_argument_group("parallelism and device")
    g.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu runs megatron-core on gloo (laptop debugging, CI); it must be asked for explicitly and "
                        "is refused when CUDA is present")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--virtual-pipeline-model-parallel-size", type=int, default=None)
    g.add_argument("--context-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true", help="needs Transformer Engine (GPU)")
    g.add_argument("--transformer-impl", default=None, choices=["te", "local"],
                   help="layer spec; default: te when Transformer Engine and CUDA are present, else local")

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", required=False,
                   help="[WEIGHT] PREFIX pairs of .bin/.idx datasets" + (" (packed SFT prefixes from "
                                                                       "tools/build_sft_data.py)" if sft else ""))
    g.add_argument("--split", default="98,2,0", help="train,valid,test split of each dataset (weights)")
    g.add_argument("--valid-data-path", nargs="+", default=None, help="separate validation data (SFT)")
    g.add_argument("--seq-length", type=int, default=1024, help="tokens per sample")
    g.add_argument("--micro-batch-size", type=int, default=1, help="samples per micro-batch per GPU")
    g.add_argument("--global-batch-size", type=int, default=8,
                   help="samples per optimizer step = micro batch x gradient accumulation x DP")
    g.add_argument("--data-cache-path", default=None, help="where megatron-core writes its index caches")

    g = p.add_argument_group("optimization")
    g.add_argument("--train-iters", type=int, required=False,
                   help="optimizer steps (0 with --save writes the initial weights and exits)")
    g.add_argument("--lr", type=float, default=6e-5 if not sft else 1e-5)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", default="cosine", choices=["constant", "linear", "cosine"])
    g.add_argument("--lr-warmup-fraction", type=float, default=0.03, help="fraction of --train-iters")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0, help="global grad-norm clip (0 disables)")
    g.add_argument("--no-distributed-optimizer", action="store_true", help="replicate optimizer state on DP ranks")
    g.add_argument("--seed", type=int, default=1234)
    if sft:
        g.add_argument("--modality-loss-weights", type=float, nargs=3, default=[1.0, 1.0, 1.0],
                       metavar=("TQ", "TA", "SA"), help="loss weights of question transcript, text answer, speech")

    g = p.add_argument_group("precision and memory")
    g.add_argument("--bf16", action="store_true", help="BF16 params/compute (default on GPU)")
    g.add_argument("--fp32", action="store_true", help="FP32 (default on CPU)")
    g.add_argument("--fp8-format", default=None, choices=["e4m3", "hybrid"], help="FP8 via Transformer Engine")
    g.add_argument("--fp8-recipe", default="delayed", choices=["delayed", "tensorwise", "mxfp8", "blockwise"])
    g.add_argument("--fp8-amax-history-len", type=int, default=1024)
    g.add_argument("--fp8-amax-compute-algo", default="max", choices=["max", "most_recent"])
    g.add_argument("--first-last-layers-bf16", action="store_true", help="keep first/last layers in BF16 with FP8")
    g.add_argument("--num-layers-at-start-in-bf16", type=int, default=1)
    g.add_argument("--num-layers-at-end-in-bf16", type=int, default=1)
    g.add_argument("--recompute-granularity", default=None, choices=["full", "selective"])
    g.add_argument("--recompute-method", default=None, choices=["uniform", "block"])
    g.add_argument("--recompute-num-layers", type=int, default=None)

    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None, help="checkpoint directory (resumes from its latest save)")
    g.add_argument("--save-interval", type=int, default=1000, help="optimizer steps between saves")
    g.add_argument("--no-save-optim", action="store_true", help="save weights only")
    g.add_argument("--exit-signal-handler", action="store_true", default=True,
                   help="on SIGTERM/SIGUSR1 (SLURM's pre-timeout signals) save a checkpoint and exit")

    g = p.add_argument_group("evaluation and logging")
    g.add_argument("--eval-interval", type=int, default=1000, help="steps between validation passes (0: never)")
    g.add_argument("--eval-iters", type=int, default=10, help="global batches per validation pass")
    g.add_argument("--log-interval", type=int, default=10, help="steps between log lines")
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--wandb-project", default=None, help="log to Weights & Biases too (needs wandb installed)")
    g.add_argument("--peak-tflops", type=float, default=989.0,
                   help="dense peak TFLOP/s per GPU for MFU (H100 BF16: 989)")
    return p


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
    if args.load_init is None and args.model_arch is None:
        parser.error("give --load-init (a converted checkpoint) or --model-arch (train from scratch)")
    return args
