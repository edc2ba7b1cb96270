"""`cslm decode`: answer spoken questions with an exported CSLM checkpoint (Hugging Face format).

Compatible with the CSLM authors' decode_general.py / decode_general_cross.py:

    cslm decode --lang zh --unit questions.txt --model-name-or-path ckpt --output-dir out

`--unit` holds one question per line (`<sosp><12><7>...<eosp>`, `<12> <7>` or `12 7`). Audio questions come
from a tab-separated `--manifest` (header with `id`, optional `audio`, `text`; default audio `wav/<id>.wav`,
the BELLE-eval-S2S layout) and go through the S3 speech tokenizer. Results are appended to
`<output-dir>/responses.json` (the authors' list of {"question", "response"} plus our fields), `decode.jsonl`
(chunks, warnings, latency) and `speech_units.txt` (one line of unit ids per item, for CosyVoice token2wav).
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch

from megatron_cslm.cli import add_debug_flag
from megatron_cslm.errors import CslmError
from megatron_cslm.inference.cli import add_decoding_args, durations, load_model, sampling_config, unit_extractor
from megatron_cslm.inference.inputs import read_benchmark_list, read_unit_file
from megatron_cslm.inference.runner import DecodeOptions, decode_to_dir, print_chunk, tokenize_audio
from megatron_cslm.text.tokenizer import SpeechTextTokenizer


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = parser.add_argument_group("input / output")
    src = io.add_mutually_exclusive_group(required=True)
    src.add_argument("--unit", help="file of unit sequences, one spoken question per line")
    src.add_argument("--manifest", help="tab-separated audio manifest (see above)")
    io.add_argument("--audio-dir", default=None, help="audio of manifest ids without an 'audio' column "
                                                      "(default: <manifest dir>/wav)")
    io.add_argument("--model-name-or-path", required=True, help="exported HF checkpoint directory")
    io.add_argument("--output-dir", required=True, help="results are appended to the files in this directory")
    io.add_argument("--stream", action="store_true",
                    help="decode item by item, printing each TQ/TA/SA chunk to stderr when it completes")
    add_decoding_args(parser)
    add_debug_flag(parser)
    return parser.parse_args(argv)


def checked_unit_extractor(args: argparse.Namespace, models: dict[str, str]):
    """The S3 speech tokenizer for audio questions, refused before it is built and before any audio is read
    unless its code count equals the unit count of every model's tokenizer (a mismatch would fail, or silently
    misread units, only after all the audio is tokenized)."""
    from megatron_cslm.speech.extract import s3_codebook_size

    codes = s3_codebook_size(args.speech_tokenizer)  # the config the net is built from
    for flag, model in models.items():
        tokenizer_dir = args.tokenizer or model
        num_units = SpeechTextTokenizer.from_pretrained(tokenizer_dir).num_units
        if num_units != codes:
            raise CslmError.compat(f"the speech tokenizer {args.speech_tokenizer} has {codes} codes but the model's "
                                   f"tokenizer has {num_units} units: they must be equal", Path(tokenizer_dir),
                                   field=flag)
    return unit_extractor(args, args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def main(argv: list[str] | None = None) -> int:
    args = get_args(argv)
    extractor = None
    if args.manifest:  # checked before the model is loaded and before any audio is read
        extractor = checked_unit_extractor(args, {"--model-name-or-path": args.model_name_or_path})
    lm, encoder = load_model(args.model_name_or_path, args)
    if args.unit:
        questions = read_unit_file(args.unit, lm.tok.num_units)
    else:
        questions = read_benchmark_list(args.manifest, args.audio_dir)
        tokenize_audio(questions, extractor)
    answer_lang = args.answer_lang or args.lang
    options = DecodeOptions(answer_lang, sampling_config(args), args.seed, args.batch_size, args.stream,
                            args.max_len_input)
    meta = {"model": args.model_name_or_path, "lang": args.lang, "answer_lang": answer_lang, "seed_base": args.seed}
    responses = decode_to_dir(lm, encoder, questions, options, args.output_dir, meta,
                              durations(args, lm.tok.num_units), on_chunk=print_chunk if args.stream else None)
    warnings = Counter()
    for r in responses:
        warnings.update(r.parsed.warnings)
    print(f"answered {len(responses)} questions -> {args.output_dir}; parse warnings: "
          f"{dict(sorted(warnings.items())) or 'none'}", file=sys.stderr)
    return 0
