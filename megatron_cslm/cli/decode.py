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
from megatron_cslm.cli.decoding import add_decoding_args, durations, load_model, sampling_config, unit_extractor
from megatron_cslm.errors import CslmError
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
    io.add_argument("--synthesize", action="store_true",
                    help="also speak each answer: <output-dir>/wav/<id>.wav through CosyVoice (speech out flags; "
                         "with --stream each SA chunk is synthesized as soon as it completes)")
    from megatron_cslm.cli.synthesize import add_speech_out_args
    add_speech_out_args(parser, required=False, fixed_durations=False)
    add_debug_flag(parser)
    return parser.parse_args(argv)


def checked_unit_extractor(args: argparse.Namespace, models: dict[str, str]):
    """The S3 speech tokenizer for audio questions, refused before it is built and before any audio is read
    unless it is the one the models record (`speech_tokenizer` in their config.json; --speech-tokenizer for a
    model without a record) and its code count equals the unit count of every model's tokenizer (a mismatch
    would fail, or silently misread units, only after all the audio is tokenized)."""
    from megatron_cslm.inference.inputs import resolve_speech_tokenizer
    from megatron_cslm.speech.extract import s3_codebook_size

    if not args.tokenizer_weights and not args.random_init:  # (unit_extractor says so too; the weights name it)
        unit_extractor(args, "cpu")
    # the models' recorded tokenizer, or --speech-tokenizer for a model without one; a mismatch stops here
    args.speech_tokenizer, _ = resolve_speech_tokenizer(args.speech_tokenizer, args.tokenizer_weights, models)
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
    meta = {"model": args.model_name_or_path, "lang": args.lang, "answer_lang": answer_lang, "seed_base": args.seed,
            "speech_tokenizer": extractor.identity.to_dict() if extractor is not None else None}
    speech_out = None
    if args.duration_model and not args.synthesize:
        raise CslmError.usage("--duration-model is used with --synthesize: add it", "--duration-model")
    if args.synthesize:  # checked against the model's units before decoding starts
        from megatron_cslm.cli.synthesize import build_speech_out
        from megatron_cslm.inference.inputs import model_speech_tokenizer
        speech_out = build_speech_out(args, lm.tok.num_units, model_speech_tokenizer(args.model_name_or_path),
                                      args.model_name_or_path)  # the model's recorded units (None: unknown)

    def on_chunk(question, chunk):
        print_chunk(question, chunk)
        if speech_out is not None:
            speech_out.on_chunk(question, chunk)
    responses = decode_to_dir(lm, encoder, questions, options, args.output_dir, meta,
                              speech_out.durations if speech_out and args.duration_model
                              else durations(args, lm.tok.num_units), on_chunk=on_chunk if args.stream else None)
    if speech_out is not None:
        speech_out.write_answers(questions, responses, args.output_dir)
    warnings = Counter()
    for r in responses:
        warnings.update(r.parsed.warnings)
    print(f"answered {len(responses)} questions -> {args.output_dir}; parse warnings: "
          f"{dict(sorted(warnings.items())) or 'none'}", file=sys.stderr)
    return 0
