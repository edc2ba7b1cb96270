r"""Convert a Hugging Face Llama checkpoint into a megatron-core dist_checkpointing run directory.

The output loads at any tensor/pipeline-parallel layout. With --expand-vocab the speech units and the four
specials of SpeechTextTokenizer are appended to the vocabulary (new rows start at the mean of the existing
rows plus small seeded noise; see megatron_cslm/convert/vocab.py). Streams one layer at a time: an 8B model
converts in under 4 GiB of RAM.

Example:
    cslm hf-to-megatron --hf-dir Meta-Llama-3.1-8B-Instruct --out runs/cslm-8b-init \
        --tp 2 --pp 2 --expand-vocab --speech-tokenizer speech_tokenizer_v1_25hz \
        --speech-tokenizer-weights speech_tokenizer_v1_25hz.onnx --verify

Output: OUT/iter_0000000/ (checkpoint), OUT/cslm_model.json (architecture, padded vocabulary),
OUT/tokenizer/ (HF tokenizer files), OUT/latest_checkpointed_iteration.txt (written last).
"""
from __future__ import annotations

import argparse
import logging

from megatron_cslm.cli import nonnegative_float, positive_int, tool_parser
from megatron_cslm.cli.verify_args import add_verify_args, verify_exit_code
from megatron_cslm.convert.hf_to_megatron import convert_hf_to_megatron
from megatron_cslm.convert.vocab import NOISE_SCALE, expansion_units
from megatron_cslm.errors import CslmError
from megatron_cslm.speech.identity import DEFAULT_S3_TOKENIZER, S3_TOKENIZERS, s3_identity

log = logging.getLogger(__name__)


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = tool_parser(__doc__)
    g = p.add_argument_group("input/output")
    g.add_argument("--hf-dir", required=True,
                   help="HF Llama directory: config.json, model.safetensors or shards + model.safetensors.index.json, "
                        "tokenizer files.")
    g.add_argument("--out", required=True, help="New run directory (refused if it already holds a checkpoint).")
    g.add_argument("--tokenizer", default=None,
                   help="Directory with the checkpoint's tokenizer.json / tokenizer.model, when they are not in "
                        "--hf-dir.")
    g = p.add_argument_group("parallelism (checked here; the checkpoint itself loads at any layout)")
    g.add_argument("--tp", type=positive_int, default=1,
                   help="Tensor-parallel size to train with: must divide the attention and KV heads; the vocabulary "
                        "is padded to a multiple of 128 x TP.")
    g.add_argument("--pp", type=positive_int, default=1,
                   help="Pipeline-parallel size to train with: must divide the layers.")
    g = p.add_argument_group("vocabulary expansion")
    g.add_argument("--expand-vocab", action="store_true",
                   help="Append speech units and <sosp> <eosp> [question] [answer] to the vocabulary.")
    g.add_argument("--speech-tokenizer", default=None, choices=sorted(S3_TOKENIZERS),
                   help="The speech tokenizer whose units the model will learn: the expansion holds its codes "
                        "(v1, v1_25hz: 4,096; v2_25hz: 6,561). Default: unit count of "
                        f"{DEFAULT_S3_TOKENIZER}, nothing recorded.")
    g.add_argument("--speech-tokenizer-weights", default=None,
                   help="Its weight file (hashed) or recorded tag (sha256:..., random-init:seed=N): with "
                        "--speech-tokenizer, cslm_model.json records the identity, and training, decode and eval "
                        "refuse units of any other tokenizer.")
    g.add_argument("--num-units", type=positive_int, default=None,
                   help="Number of discrete speech units (default: the speech tokenizer's codes; must equal them "
                        "when both are given).")
    g.add_argument("--seed", type=int, default=1234, help="Seed of the noise added to the new rows.")
    g.add_argument("--new-row-noise", type=nonnegative_float, default=NOISE_SCALE,
                   help="Variance of the new rows around the existing rows' mean, in units of the existing rows' "
                        "variance: 1e-5 as transformers' mean resizing; 1 spreads them like the text rows (a short "
                        "run on a small model tells the units apart sooner; the quickstart uses it).")
    add_verify_args(p, hf_role="original")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = get_args(argv)
    if args.speech_tokenizer_weights and not args.speech_tokenizer:
        raise CslmError.usage("--speech-tokenizer-weights needs --speech-tokenizer (which tokenizer they are)",
                              "--speech-tokenizer")
    num_units = expansion_units(args.num_units, args.speech_tokenizer)  # before any tensor is read
    identity = None
    if args.speech_tokenizer and args.speech_tokenizer_weights:
        identity = s3_identity(args.speech_tokenizer, args.speech_tokenizer_weights)
    elif args.speech_tokenizer:
        log.warning("--speech-tokenizer %s without --speech-tokenizer-weights: the unit count follows it, but no "
                    "identity is recorded (training records its data's)", args.speech_tokenizer)
    manifest = convert_hf_to_megatron(args.hf_dir, args.out, tensor_parallel_size=args.tp,
                                      pipeline_parallel_size=args.pp, expand_vocab=args.expand_vocab,
                                      num_units=num_units, tokenizer=args.tokenizer, seed=args.seed,
                                      noise_scale=args.new_row_noise,
                                      speech_tokenizer=identity)
    print(f"wrote {args.out}: vocab {manifest.arch.vocab_size} (padded {manifest.padded_vocab_size}), "
          f"{manifest.arch.num_layers} layers")
    if args.verify:
        return verify_exit_code(args.hf_dir, args.out, args.verify_atol)
    return 0

