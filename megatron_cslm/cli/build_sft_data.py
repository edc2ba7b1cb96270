"""`cslm build-sft-data`: chain-of-modality JSONL -> packed `<prefix>.bin/.idx`, `<prefix>_modality.bin/.idx`,
`<prefix>.stats.json`. See megatron_cslm/data/sft.py (input forms, layouts) and megatron_cslm/data/packing.py
(storage, masks). Training mmaps the result with `megatron_cslm.data.packing.PackedSFTDataset`.

Example:
    cslm build-sft-data --input sft.jsonl --tokenizer-model ckpt/tokenizer --output-prefix data/sft \\
        --seq-length 8192 --layout interleaved --chunk-words 7 --dedup-units
"""
from __future__ import annotations

import argparse
import json
import sys

from megatron_cslm.cli import positive_int, tool_parser
from megatron_cslm.data.chunking import CUT_KINDS
from megatron_cslm.data.packing import OVERLONG
from megatron_cslm.data.sft import INSTRUCTIONS, LAYOUTS, SFTConfig, build_sft_data
from megatron_cslm.text.tokenizer import SpeechTextTokenizer


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = tool_parser(__doc__, show_defaults=False)
    g = p.add_argument_group("input/output")
    g.add_argument("--input", nargs="+", required=True, help="SFT JSONL files (.jsonl or .jsonl.gz)")
    g.add_argument("--tokenizer-model", required=True,
                   help="SpeechTextTokenizer directory (save_pretrained), or a plain HF tokenizer dir/tokenizer.json "
                        "or SentencePiece .model that gets --num-units units")
    g.add_argument("--num-units", type=positive_int, default=4096,
                   help="speech units in the vocabulary (default: 4096, CosyVoice S3)")
    g.add_argument("--output-prefix", required=True, help="output path prefix (no extension)")
    g.add_argument("--skip-bad-records", action="store_true",
                   help="skip invalid records (malformed JSON and empty answers included), counted by reason in "
                        "the stats (default: stop at the first, naming file, line and field)")
    g = p.add_argument_group("layout")
    g.add_argument("--layout", choices=LAYOUTS, default="interleaved",
                   help="interleaved: [question] TQ [answer] TA1 SA1 TA2 SA2 ... (CSLM); sequential: TQ, whole TA, "
                        "whole SA; text: TQ, TA only (default: interleaved)")
    g.add_argument("--no-tq", action="store_true", help="drop '[question] TQ' (the question transcript)")
    size = g.add_mutually_exclusive_group()
    size.add_argument("--chunk-words", type=positive_int, default=7,
                      help="target TA chunk size in words; a CJK character counts as a word (default: 7)")
    size.add_argument("--chunk-tokens", type=positive_int, default=None,
                      help="target TA chunk size in text tokens instead")
    g.add_argument("--dedup-units", action="store_true",
                   help="collapse repeated units (1 1 2 -> 1 2), to match deduplicated pretraining data")
    g.add_argument("--system-prompt", default=None, help="system turn text (default: none; a record's own "
                                                         "system turn wins)")
    g.add_argument("--lang", choices=sorted(INSTRUCTIONS), default="en",
                   help="instruction language for records without a 'lang' field (default: en)")
    g = p.add_argument_group("packing")
    g.add_argument("--seq-length", type=positive_int, default=8192,
                   help="positions per packed bin, = the training --seq-length; size it to hold the longest sample "
                        "(the run reports the size that does), since longer samples are cut (default: 8192)")
    g.add_argument("--overlong", choices=OVERLONG, default="truncate",
                   help="samples longer than --seq-length + 1 tokens: truncate or drop, counted (default: truncate)")
    g.add_argument("--seed", type=int, default=0, help="seed for packing ties and bin order (default: 0)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = get_args(argv)
    tokenizer = SpeechTextTokenizer.load(args.tokenizer_model, args.num_units)
    config = SFTConfig(layout=args.layout, with_tq=not args.no_tq, chunk_words=args.chunk_words,
                       chunk_tokens=args.chunk_tokens, dedup_units=args.dedup_units,
                       system_prompt=args.system_prompt, default_lang=args.lang)
    stats = build_sft_data(args.input, tokenizer, config, args.output_prefix, args.seq_length, args.overlong,
                           args.seed, args.skip_bad_records)
    r = stats["records"]
    print(f"records: read={r['read']} packed={r['written']} skipped={r['skipped_total']} {r['skipped']}")
    if args.layout == "interleaved":  # word timestamps (cslm align-words) vs the proportional cut
        print("answers cut: " + " ".join(f"{k}={stats['answer_cuts'].get(k, 0)}" for k in CUT_KINDS))
    print(f"bins={stats['bins']} fill={stats['fill_ratio']:.4f} (bound {stats['fill_bound']:.4f}) "
          f"truncated={stats['truncated']} loss tokens={json.dumps(stats['loss_tokens'])} "
          f"-> {args.output_prefix}.stats.json")
    if stats["longer_than_seq_length"]:
        cut = "dropped" if args.overlong == "drop" else "truncated"
        print(f"warning: {stats['longer_than_seq_length']} of {stats['samples_in']} samples are longer than "
              f"--seq-length {args.seq_length} ({cut}); the longest has {stats['longest_sample']} positions, "
              f"--seq-length {stats['whole_sample_seq_length']} keeps every sample whole", file=sys.stderr)
    return 0

