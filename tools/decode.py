#!/usr/bin/env python
"""Answer spoken questions with an exported CSLM checkpoint (Hugging Face format).

Compatible with the CSLM authors' decode_general.py / decode_general_cross.py:

    python tools/decode.py --lang zh --unit questions.txt --model-name-or-path ckpt --output-dir out

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

from megatron_cslm.inference.cli import (add_decoding_args, durations, load_model, sampling_config,
                                         unit_extractor)
from megatron_cslm.inference.inputs import read_manifest, read_unit_file
from megatron_cslm.inference.runner import DecodeOptions, decode_to_dir, print_chunk, tokenize_audio


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
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = get_args(argv)
    lm, encoder = load_model(args.model_name_or_path, args)
    if args.unit:
        questions = read_unit_file(args.unit, lm.tok.num_units)
    else:
        questions = read_manifest(args.manifest, args.audio_dir)
        tokenize_audio(questions, unit_extractor(args, lm.device))
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


if __name__ == "__main__":
    main()
