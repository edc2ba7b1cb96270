r"""Export a megatron-core checkpoint of ours (saved at any TP x PP) to a Hugging Face Llama directory.

The result loads with transformers' AutoModelForCausalLM and AutoTokenizer without custom code: sharded
safetensors with model.safetensors.index.json, config.json with the unpadded vocabulary and RoPE scaling in
the classic rope_theta + rope_scaling form (read by vLLM and transformers 4/5), generation_config.json, and
the run's tokenizer (speech units as added tokens, Llama-3.1 chat template). Streams one layer at a time.

Example:
    cslm megatron-to-hf --megatron-dir runs/cslm-8b-sft --out exports/cslm-8b \
        --dtype bf16 --verify
"""
from __future__ import annotations

import argparse

from megatron_cslm.cli import positive_float, tool_parser
from megatron_cslm.cli.verify_args import add_verify_args, verify_exit_code
from megatron_cslm.convert.megatron_to_hf import DTYPES, convert_megatron_to_hf


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = tool_parser(__doc__)
    g = p.add_argument_group("input/output")
    g.add_argument("--megatron-dir", required=True,
                   help="Run directory (its latest_checkpointed_iteration.txt is followed) or one iter_XXXXXXX "
                        "directory; the run directory must hold cslm_model.json and the tokenizer it names.")
    g.add_argument("--out", required=True, help="New HF directory (refused if it already holds a checkpoint).")
    g.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="Weight dtype of the exported files.")
    g.add_argument("--max-shard-gb", type=positive_float, default=5.0,
                   help="Largest safetensors shard in GB (10^9 bytes); Meta ships ~5 GB shards.")
    add_verify_args(p, hf_role="exported")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = get_args(argv)
    manifest = convert_megatron_to_hf(args.megatron_dir, args.out, dtype=args.dtype,
                                      max_shard_bytes=int(args.max_shard_gb * 10**9))
    print(f"wrote {args.out}: vocab {manifest.arch.vocab_size}, {manifest.arch.num_layers} layers, {args.dtype}")
    if args.verify:
        return verify_exit_code(args.out, args.megatron_dir, args.verify_atol)
    return 0

