"""Audio manifest -> JSONL of CosyVoice S3 speech units (one line per utterance), resumable.

Example:
    python tools/tokenize_speech.py --manifest train.tsv --output units/train.jsonl \
        --tokenizer-weights speech_tokenizer_v1.onnx --device cuda --workers 8 --dedup
"""
from __future__ import annotations

import argparse
import json

from megatron_cslm.speech.units import UNITS_PER_SECOND, AudioLimits, UnitExtractor, tokenize_manifest
from megatron_cslm.cli import tool_parser


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = tool_parser(__doc__)
    g = p.add_argument_group("input/output")
    g.add_argument("--manifest", required=True,
                   help="TSV (id, audio[, text[, lang]], optional 'id<TAB>audio...' header) or JSONL(.gz) with "
                        "id, audio, text, lang. Relative audio paths are relative to the manifest's directory.")
    g.add_argument("--output", required=True, help="Output JSONL; items already in it are skipped (resume).")
    g.add_argument("--rejects", default=None, help="TSV of rejected items (default: <output>.rejects.tsv).")
    g = p.add_argument_group("speech tokenizer")
    g.add_argument("--tokenizer", default="speech_tokenizer_v1", choices=sorted(UNITS_PER_SECOND),
                   help="S3 tokenizer variant: v1 gives 50 units/s, v1_25hz 25 units/s; both have 4,096 codes.")
    w = g.add_mutually_exclusive_group(required=True)
    w.add_argument("--tokenizer-weights", default=None,
                   help="Local weights: the released speech_tokenizer_v1.onnx, or a converted .pt/.safetensors "
                        "state dict.")
    w.add_argument("--random-init", action="store_true",
                   help="RANDOM weights: meaningless units, for tests and pipeline debugging only.")
    g.add_argument("--device", default="cuda" if _cuda() else "cpu", help="Device for the S3 model.")
    g.add_argument("--batch-seconds", type=float, default=300.0,
                   help="Padded audio seconds per forward pass (lower it if the device runs out of memory).")
    g.add_argument("--dedup", action="store_true",
                   help="Merge runs of a repeated unit; run lengths (in unit frames) go to 'durations'.")
    g = p.add_argument_group("filtering and throughput")
    g.add_argument("--min-seconds", type=float, default=0.1, help="Reject shorter audio (seconds).")
    g.add_argument("--max-seconds", type=float, default=600.0,
                   help="Reject longer audio (seconds); audio over 30 s is tokenized in overlapping windows.")
    g.add_argument("--min-peak", type=float, default=1e-3,
                   help="Reject as silent if max |sample| is below this (full scale = 1.0; 1e-3 = -60 dBFS).")
    g.add_argument("--workers", type=int, default=4, help="Processes decoding audio files (0: in-process).")
    g.add_argument("--chunk-items", type=int, default=256,
                   help="Items decoded, batched by length and appended to the output together.")
    return p.parse_args(argv)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> None:
    args = get_args(argv)
    extractor = UnitExtractor(args.tokenizer, args.tokenizer_weights, random_init=args.random_init,
                              device=args.device, batch_seconds=args.batch_seconds)
    stats = tokenize_manifest(args.manifest, args.output, extractor, workers=args.workers, dedup=args.dedup,
                              limits=AudioLimits(args.min_seconds, args.max_seconds, args.min_peak),
                              rejects=args.rejects, chunk_items=args.chunk_items)
    print(json.dumps(stats, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
