"""`cslm align-words`: word timestamps for a units JSONL by CTC forced alignment, sharded and resumable.

Between `cslm tokenize-speech` and `cslm build-sft-data` / `build-pretrain-data`: each record of the units JSONL
(id, text, units, audio; `durations` under --dedup; its speech tokenizer's rate) gets `words: [{word, start,
end}]` in indices of its own `units` (deduplicated indices when it has `durations`), so answers are cut into
text/speech chunks where the words are spoken instead of proportionally to characters. The acoustic model is a
local transformers `Wav2Vec2ForCTC` directory with its processor (letters for English, characters for
Chinese); alignment is torchaudio's `forced_align`. A record whose words the model cannot spell, or whose audio
is unusable, is written without `words` and listed in `<output>.unaligned.tsv` with the reason; the counts go
to `<output>.stats.json` (read = aligned + unaligned by reason). Each rank writes `<output>.parts/part-R-of-W
.jsonl`; the output is merged in input order once every record is done; re-running resumes (also with another
number of processes).

Examples:
    cslm align-words --input units/train.jsonl --output units/train.words.jsonl \\
        --ctc-model models/wav2vec2-base-960h --audio-root corpus/
    torchrun --nproc-per-node 8 tools/align_words.py --input units/zh.jsonl --output units/zh.words.jsonl \\
        --ctc-model models/wav2vec2-large-xlsr-53-chinese-zh-cn --device cuda
"""
from __future__ import annotations

import argparse
import json

from megatron_cslm.cli import add_debug_flag, positive_float, positive_int, run_tool, tool_parser
from megatron_cslm.cli.speech_flags import (
    add_audio_limit_flags,
    add_shard_flags,
    audio_limits,
    default_device,
    job_rank,
)


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = tool_parser(__doc__)
    g = p.add_argument_group("input/output")
    g.add_argument("--input", required=True, help="Units JSONL as `cslm tokenize-speech` writes it.")
    g.add_argument("--output", required=True,
                   help="Output JSONL: the same records in the same order, with 'words'. Parts go to "
                        "<output>.parts/ until the merge.")
    g.add_argument("--audio-root", default=None,
                   help="Directory that relative 'audio' paths are relative to (tokenize-speech keeps the "
                        "manifest's relative paths; default: the directory of --input).")
    g = p.add_argument_group("acoustic model")
    g.add_argument("--ctc-model", required=True,
                   help="Local Wav2Vec2ForCTC directory (save_pretrained: config, weights, vocab.json, processor).")
    g.add_argument("--device", default=None,
                   help="Device of the CTC model (default: cuda:<LOCAL_RANK> when CUDA is available, else cpu).")
    g.add_argument("--max-length-mismatch", type=positive_float, default=0.1,
                   help="Leave a record unaligned (reason length_mismatch) when its unit count differs from audio "
                        "seconds x units/s by more than this fraction (and 2 units).")
    add_shard_flags(p)
    g = p.add_argument_group("audio and throughput")
    add_audio_limit_flags(g, "Leave unaligned:")
    g.add_argument("--chunk-items", type=positive_int, default=64,
                   help="Records appended to the part file between syncs.")
    g.add_argument("--no-progress", action="store_true", help="No progress bar.")
    add_debug_flag(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = get_args(argv)
    from megatron_cslm.speech.align import CtcAligner
    from megatron_cslm.speech.align_shards import align_words

    shard = job_rank(args)
    aligner = CtcAligner(args.ctc_model, device=args.device or default_device(),
                         max_frame_ratio=args.max_length_mismatch)
    stats = align_words(args.input, args.output, aligner, shard, audio_root=args.audio_root,
                        limits=audio_limits(args),
                        chunk_items=args.chunk_items, progress=not args.no_progress)
    if shard.rank == 0 or not shard.distributed:
        print(json.dumps(stats, indent=2, ensure_ascii=False))
    return stats


if __name__ == "__main__":
    raise SystemExit(run_tool(main))
