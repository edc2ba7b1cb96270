"""`cslm train-duration`: train the duration predictor that re-expands deduplicated speech units before synthesis.

Input: units JSONL as `cslm tokenize-speech --dedup` writes it (`units` + `durations` in tokenizer frames,
`speaker`, `speech_tokenizer`), or raw frame-rate `units` (runs are merged here; e.g. the toy corpus manifest).
Output: a small directory (duration_config.json + duration_model.safetensors + duration_train_state.pt) that
`cslm synthesize --duration-model` and `cslm decode --duration-model` read. CPU or GPU; `--save` is resumed from
when it holds a run (same result as an uninterrupted run). Held-out errors are printed and stored in the config.

Example:
    cslm train-duration --input asr_units.jsonl --save ckpt/duration --train-iters 2000
"""
from __future__ import annotations

import argparse
import json
import logging

import torch

from megatron_cslm.argtypes import nonnegative_int, positive_float, positive_int
from megatron_cslm.errors import CslmError
from megatron_cslm.speech.duration_training import (
    TrainSettings,
    build_config,
    read_examples,
    split_heldout,
    train_duration,
)

log = logging.getLogger(__name__)


def fraction(value: str) -> float:
    x = float(value)
    if not 0 <= x < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {value!r}")
    return x


def get_args(argv=None) -> argparse.Namespace:
    from megatron_cslm.tool import tool_parser

    p = tool_parser(__doc__)
    io = p.add_argument_group("data")
    io.add_argument("--input", nargs="+", required=True, help="units JSONL file(s) (.jsonl or .jsonl.gz)")
    io.add_argument("--valid-input", nargs="+", default=None,
                    help="held-out units JSONL; without it, --valid-fraction of --input (by a hash of each id)")
    io.add_argument("--valid-fraction", type=fraction, default=0.05, help="share of records held out")
    io.add_argument("--num-units", type=positive_int, default=None,
                    help="speech-unit codebook size when the records name no speech tokenizer (else read from it)")
    io.add_argument("--skip-bad-records", action="store_true", help="skip and count malformed records")
    io.add_argument("--save", required=True, help="output directory; resumed from when it holds a run")
    m = p.add_argument_group("model")
    m.add_argument("--max-duration", type=positive_int, default=32, help="longest run in frames (longer = this)")
    m.add_argument("--hidden-size", type=positive_int, default=64, help="embedding and convolution channels")
    m.add_argument("--num-layers", type=positive_int, default=3, help="1-D convolution layers")
    m.add_argument("--kernel-size", type=positive_int, default=3, help="convolution width in units (odd)")
    t = p.add_argument_group("training")
    t.add_argument("--train-iters", type=positive_int, default=2000, help="optimizer steps")
    t.add_argument("--micro-batch-size", type=positive_int, default=32, help="utterances per step")
    t.add_argument("--lr", type=positive_float, default=3e-3, help="AdamW learning rate (constant)")
    t.add_argument("--seed", type=int, default=0, help="initialisation and batch order")
    t.add_argument("--speaker-dropout", type=fraction, default=0.1,
                   help="share of utterances trained without their speaker (the unknown-speaker embedding)")
    t.add_argument("--save-interval", type=nonnegative_int, default=500, help="steps between saves; 0 = end only")
    t.add_argument("--log-interval", type=positive_int, default=100, help="steps between loss lines")
    t.add_argument("--device", default=None, help="torch device; None: cuda if available, else cpu")
    args = p.parse_args(argv)
    if args.kernel_size % 2 == 0:
        p.error(f"--kernel-size must be odd, got {args.kernel_size}")
    return args


def main(argv=None) -> int:
    args = get_args(argv)
    examples, identity, counts = read_examples(args.input, args.skip_bad_records)
    if args.valid_input:
        train = examples
        heldout, held_identity, _ = read_examples(args.valid_input, args.skip_bad_records)
        if held_identity != identity and None not in (held_identity, identity):
            raise CslmError.compat(f"--valid-input has {held_identity.describe()}, --input {identity.describe()}",
                                   field="--valid-input")
    else:
        train, heldout = split_heldout(examples, args.valid_fraction)
    config = build_config(train, identity, args.num_units,
                          max_duration=args.max_duration, dim=args.hidden_size, kernel_size=args.kernel_size,
                          num_layers=args.num_layers)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    settings = TrainSettings(train_iters=args.train_iters, batch_size=args.micro_batch_size, lr=args.lr,
                             seed=args.seed, speaker_dropout=args.speaker_dropout, save_interval=args.save_interval,
                             log_interval=args.log_interval, device=device)
    print(f"records: {counts.summary()}; train {len(train)}, held out {len(heldout)}; "
          f"{len(config.speakers)} speakers; units {config.num_units}"
          + (f" ({identity.describe()})" if identity else " (no speech tokenizer recorded)"))
    _, metrics = train_duration(train, config, settings, save=args.save, heldout=heldout)
    if metrics:
        print(f"held-out: MAE {metrics['mae_frames']:.3f} frames/unit (median), total length error "
              f"{100 * metrics['total_length_error']:.2f}% (expansion) over {metrics['utterances']} utterances")
    print(json.dumps({"save": args.save, "heldout": metrics, "records": counts.as_dict()}))
    return 0


if __name__ == "__main__":
    from megatron_cslm.tool import run_tool

    raise SystemExit(run_tool(main))
