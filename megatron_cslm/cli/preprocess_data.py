"""`cslm preprocess-data`: tokenize speech-text JSONL into a megatron-core indexed dataset (<prefix>.bin/.idx),
Megatron-LM style.

Input records: {"segments": [{"text": "..."}, {"units": [12, 345, ...]}, ...], "source": "...", "lang": "..."}
or {"text": "..."}. Unit segments become <sosp> units <eosp>; a segment with "loss": false is excluded from the
loss via <prefix>_lossmask.bin/.idx. Stats go to <prefix>.stats.json.

Example:
    cslm preprocess-data --input 'data/asr_*.jsonl.gz' data/tts.jsonl --output-prefix data/cpt \
        --tokenizer-model Llama-3.1-8B-Instruct/ --workers 16 --append-eod
"""
from __future__ import annotations

import argparse
import json

from megatron_cslm.cli import positive_float, positive_int, tool_parser
from megatron_cslm.data.indexed import preprocess
from megatron_cslm.text.tokenizer import SpeechTextTokenizer


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = tool_parser(__doc__)
    g = p.add_argument_group("input data")
    g.add_argument("--input", nargs="+", required=True,
                   help="JSONL or JSONL.gz files or quoted globs; concatenated in the order given (globs sorted).")
    g.add_argument("--skip-bad-records", action="store_true",
                   help="Count and skip malformed records (reported by reason in the stats) instead of stopping "
                        "at the first one with its file, line and field.")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-model", required=True,
                   help="HF tokenizer directory or tokenizer.json, SentencePiece .model, or a directory saved by "
                        "SpeechTextTokenizer.save_pretrained (which keeps its own units and specials).")
    g.add_argument("--num-units", type=positive_int, default=None,
                   help="Speech units appended to a plain text vocabulary (default 4,096, CosyVoice S3); for a "
                        "saved SpeechTextTokenizer directory it is only checked against the saved count.")
    g.add_argument("--append-eod", action="store_true", help="Append the end-of-document token to every record.")
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True, help="Writes <prefix>.bin/.idx (+ _lossmask, .stats.json).")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=positive_int, default=1,
                   help="Tokenizer processes; output is identical for any count.")
    g.add_argument("--shard-mb", type=positive_float, default=None,
                   help="Work unit in MiB of uncompressed input (.gz files are one unit each). "
                        "Default: 8 per worker, at least 1 MiB.")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = get_args(argv)
    tokenizer = SpeechTextTokenizer.load(args.tokenizer_model, args.num_units)
    shard_bytes = int(args.shard_mb * (1 << 20)) if args.shard_mb else None
    stats = preprocess(args.input, args.output_prefix, tokenizer, workers=args.workers, append_eod=args.append_eod,
                       skip_bad_records=args.skip_bad_records, shard_bytes=shard_bytes)
    print(json.dumps({k: v for k, v in stats.items() if k != "inputs"}, indent=2, ensure_ascii=False))
    return 0
