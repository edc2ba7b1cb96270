"""Speech corpus -> JSONL of CosyVoice S3 speech units (one line per utterance), sharded and resumable.

Inputs: the project's TSV/JSONL manifest, Lhotse manifests (a CutSet, or recordings + supervisions as Lhotse's
recipes write them; one item per supervision), Lhotse Shar directories, or Hugging Face datasets on disk
(save_to_disk folders or parquet) with an Audio column. Each rank writes `<output>.parts/part-R-of-W.jsonl`; the
output is merged in input order once every item is written or rejected. Re-running resumes (also with another
number of processes); rejected items are retried. Every record carries the tokenizer's identity
(`speech_tokenizer`: name, units/s, codes, weights digest or random-init seed), which every later join checks.

Examples:
    python tools/tokenize_speech.py --manifest train.tsv --output units/train.jsonl \
        --speech-tokenizer speech_tokenizer_v1_25hz --tokenizer-weights speech_tokenizer_v1_25hz.onnx \
        --device cuda --workers 8 --dedup
    torchrun --nnodes 2 --nproc-per-node 8 ... tools/tokenize_speech.py \
        --lhotse-recordings librispeech_recordings_train-clean-100.jsonl.gz \
        --lhotse-supervisions librispeech_supervisions_train-clean-100.jsonl.gz --output units/ls100.jsonl \
        --speech-tokenizer speech_tokenizer_v1 --tokenizer-weights speech_tokenizer_v1.onnx --precision bf16
    python tools/tokenize_speech.py --hf-dataset data/cv_parquet --id-column path --text-column sentence \
        --lang-column locale --output units/cv.jsonl --tokenizer-weights ... --shard-index 3 --num-shards 16
"""
from __future__ import annotations

import argparse
import json

from megatron_cslm.argtypes import nonnegative_float
from megatron_cslm.cli import add_debug_flag, nonnegative_int, positive_float, positive_int, run_tool, tool_parser
from megatron_cslm.cli.speech_flags import (
    add_audio_limit_flags,
    add_shard_flags,
    audio_limits,
    default_device,
    job_rank,
)
from megatron_cslm.speech.extract import AUTOCAST_DTYPES, UNITS_PER_SECOND
from megatron_cslm.speech.identity import DEFAULT_S3_TOKENIZER
from megatron_cslm.speech.onnx_backend import BACKENDS, build_extractor
from megatron_cslm.speech.sharded import tokenize_speech
from megatron_cslm.speech.sources import PAST_END_TOLERANCE_S, open_speech_source


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = tool_parser(__doc__)
    g = p.add_argument_group("input (exactly one)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest",
                     help="TSV (id, audio[, text[, lang]], optional 'id<TAB>audio...' header) or JSONL(.gz) with "
                          "id, audio, text, lang, speaker. Relative audio paths are relative to the manifest.")
    src.add_argument("--lhotse-cuts", help="Lhotse CutSet manifest (.jsonl/.jsonl.gz); cuts with an offset into a "
                                           "recording are tokenized from their span only.")
    src.add_argument("--lhotse-recordings", help="Lhotse RecordingSet manifest; needs --lhotse-supervisions. One "
                                                 "item per supervision segment.")
    src.add_argument("--lhotse-shar", help="Lhotse Shar directory (cuts + recording tar shards).")
    src.add_argument("--hf-dataset", help="Hugging Face dataset on disk: a save_to_disk folder, a parquet file or "
                                          "a folder of parquet files, with an Audio column.")
    g.add_argument("--lhotse-supervisions", help="Lhotse SupervisionSet manifest paired with --lhotse-recordings.")
    g.add_argument("--trim-to-supervisions", action="store_true",
                   help="Split Lhotse cuts (--lhotse-cuts/--lhotse-shar) into one item per supervision.")
    g.add_argument("--past-end-tolerance", type=nonnegative_float, default=PAST_END_TOLERANCE_S,
                   help="Lhotse inputs: a segment ending past its recording's end by at most this many seconds is "
                        "clipped to the end (counted as clipped_to_end); further, it is rejected as past_end.")
    g.add_argument("--audio-column", default="audio", help="HF dataset: the Audio (or file path) column.")
    g.add_argument("--id-column", default="id", help="HF dataset: the column of unique item ids.")
    g.add_argument("--text-column", default="text", help="HF dataset: transcript column (optional).")
    g.add_argument("--lang-column", default="lang", help="HF dataset: language column (optional).")
    g.add_argument("--speaker-column", default="speaker", help="HF dataset: speaker column (optional).")
    g.add_argument("--split", default="train", help="HF dataset: split of a saved DatasetDict.")
    g.add_argument("--hf-cache-dir", default=None,
                   help="HF dataset: cache for parquet -> arrow (default: the datasets library's cache).")
    g = p.add_argument_group("output")
    g.add_argument("--output", required=True,
                   help="Output JSONL (merged, in input order). Parts go to <output>.parts/ until the merge.")
    g.add_argument("--rejects", default=None, help="TSV of rejected items: id, audio, reason, detail "
                                                   "(default: <output>.rejects.tsv).")
    add_shard_flags(p)
    g = p.add_argument_group("speech tokenizer")
    g.add_argument("--speech-tokenizer", "--tokenizer", dest="tokenizer", default=DEFAULT_S3_TOKENIZER,
                   choices=sorted(UNITS_PER_SECOND),
                   help="S3 tokenizer: speech_tokenizer_v1 gives 50 units/s, speech_tokenizer_v1_25hz 25 units/s "
                        "(4,096 codes each; default %(default)s, as the paper), speech_tokenizer_v2_25hz "
                        "(CosyVoice 2) 25 units/s, 6,561 codes. Its identity (name, rate, codes, weights digest) "
                        "is written into every record as \"speech_tokenizer\".")
    w = g.add_mutually_exclusive_group(required=True)
    w.add_argument("--tokenizer-weights", default=None,
                   help="Local weights: the released speech_tokenizer_v1.onnx, or a converted .pt/.safetensors "
                        "state dict.")
    w.add_argument("--random-init", action="store_true",
                   help="RANDOM weights: meaningless units, for tests and pipeline debugging only.")
    g.add_argument("--device", default=None,
                   help="Device for the S3 model (default: cuda:<LOCAL_RANK> when CUDA is available, else cpu).")
    g.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="onnx: onnxruntime on CPU, one single-threaded run per core (OMP_NUM_THREADS cores per "
                        "process), the net exported once beside --tokenizer-weights (a released .onnx is run as it "
                        "is; random-init nets go to $CSLM_CACHE_DIR, default ~/.cache/megatron_cslm); units equal "
                        "torch's. auto (default): onnx on CPU when onnxruntime is installed and weights are given, "
                        "else torch.")
    g.add_argument("--precision", default="fp32", choices=sorted(AUTOCAST_DTYPES),
                   help="fp16/bf16: autocast the S3 encoder (GPU only).")
    g.add_argument("--batch-seconds", type=positive_float, default=300.0,
                   help="Padded audio seconds per forward pass (lower it if the device runs out of memory).")
    g.add_argument("--dedup", action="store_true",
                   help="Merge runs of a repeated unit; run lengths (in unit frames) go to 'durations'.")
    g = p.add_argument_group("filtering and throughput")
    add_audio_limit_flags(g, "Reject")  # audio over 30 s is tokenized in overlapping windows
    g.add_argument("--workers", type=nonnegative_int, default=4,
                   help="Processes per rank decoding audio (0: in-process).")
    g.add_argument("--chunk-items", type=positive_int, default=256,
                   help="Items decoded, batched by length and appended to the part file together.")
    g.add_argument("--no-progress", action="store_true", help="No progress bar.")
    add_debug_flag(p)
    args = p.parse_args(argv)
    if bool(args.lhotse_recordings) != bool(args.lhotse_supervisions):
        p.error("--lhotse-recordings and --lhotse-supervisions go together")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = get_args(argv)
    shard = job_rank(args)
    source = open_speech_source(
        args.manifest, args.lhotse_cuts, args.lhotse_recordings, args.lhotse_supervisions, args.lhotse_shar,
        args.hf_dataset, args.trim_to_supervisions, args.past_end_tolerance, audio_column=args.audio_column,
        id_column=args.id_column, text_column=args.text_column, lang_column=args.lang_column,
        speaker_column=args.speaker_column, split=args.split, cache_dir=args.hf_cache_dir)
    extractor = build_extractor(args.backend, args.tokenizer, args.tokenizer_weights, random_init=args.random_init,
                                device=args.device or default_device(), batch_seconds=args.batch_seconds,
                                precision=args.precision)
    stats = tokenize_speech(source, args.output, extractor, shard, rejects=args.rejects, workers=args.workers,
                            dedup=args.dedup, limits=audio_limits(args),
                            chunk_items=args.chunk_items, progress=not args.no_progress)
    if shard.rank == 0 or not shard.distributed:
        print(json.dumps(stats, indent=2, ensure_ascii=False))
    return stats


if __name__ == "__main__":
    raise SystemExit(run_tool(main))
