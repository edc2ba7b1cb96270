"""`cslm eval-s2s`: evaluate CSLM checkpoints end to end on a speech-to-speech benchmark (BELLE-eval-S2S format).

    cslm eval-s2s --manifest BELLE-eval-S2S/test.tsv --lang zh --tokenizer-weights s3.onnx \\
        --model ckpt_interleaved --baseline-model ckpt_sequential --output-dir eval_out

The manifest is `id<TAB>text` with a header (text = the spoken question's transcript) and audio in
`wav/<id>.wav` beside it. Questions go through the S3 speech tokenizer once and are answered by each model
with the same seeds. Writes `<output-dir>/report.json` and `report.md`: per item and mean tokens and seconds
to the first complete speech chunk, TA/SA lengths, off-target answer-language ratio, TQ WER/CER against the
transcript and, with --asr-command, WER/CER of the spoken answer against the text answer; one column per
model. Each model's answers are also written to `<output-dir>/<label>/` as by `cslm decode`.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from megatron_cslm.cli import add_debug_flag, positive_int
from megatron_cslm.cli.decode import checked_unit_extractor
from megatron_cslm.cli.decoding import add_decoding_args, durations, load_model, sampling_config
from megatron_cslm.errors import CslmError
from megatron_cslm.fileio import atomic_open, write_json
from megatron_cslm.inference.benchmarks import resolve_languages
from megatron_cslm.inference.evaluate import AsrCommand, render_markdown, run_benchmark
from megatron_cslm.inference.inputs import read_benchmark_list
from megatron_cslm.inference.outputs import RESPONSES
from megatron_cslm.inference.runner import DecodeOptions, tokenize_audio
from megatron_cslm.inference.scores import add_score_args, build_scorers, score_and_render


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("benchmark")
    g.add_argument("--manifest", required=True, help="benchmark TSV with header (id, text[, audio])")
    g.add_argument("--audio-dir", default=None, help="audio directory (default: <manifest dir>/wav)")
    g.add_argument("--limit", type=positive_int, default=None, help="evaluate only the first N items (default: all)")
    g.add_argument("--model", required=True, help="exported HF checkpoint to evaluate")
    g.add_argument("--model-label", default="interleaved", help="its name in the report (default: interleaved)")
    g.add_argument("--baseline-model", default=None,
                   help="second checkpoint answering the same questions, e.g. the sequential-layout baseline")
    g.add_argument("--baseline-label", default="sequential", help="its name in the report (default: sequential)")
    g.add_argument("--asr-command", default=None,
                   help="ASR for the spoken answer, e.g. 'my_asr --units {units_file}': {units_file} is replaced "
                        "by a file of space-separated unit ids; the command prints the transcript")
    g.add_argument("--output-dir", required=True, help="report.json, report.md and per-model answers go here")
    add_score_args(parser)
    add_decoding_args(parser)
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if args.baseline_model and args.baseline_label == args.model_label:
        parser.error("--model-label and --baseline-label must differ")
    return args


def main(argv: list[str] | None = None) -> int:
    args = get_args(argv)
    models = {args.model_label: args.model}
    if args.baseline_model:
        models[args.baseline_label] = args.baseline_model
    out = Path(args.output_dir)
    for label in models:
        if (out / label / RESPONSES).exists():
            raise CslmError(out / label / RESPONSES, None, None, "exists: evaluate into a fresh --output-dir",
                            kind="io", reason="output_exists")
    questions = read_benchmark_list(args.manifest, args.audio_dir)[:args.limit]
    flags = {"--model": args.model, "--baseline-model": args.baseline_model}
    extractor = checked_unit_extractor(args, {flag: path for flag, path in flags.items() if path})
    num_units = extractor.net.quantizer.codebook_size  # == every model's unit count (checked)
    tokenize_audio(questions, extractor)
    answer_lang = resolve_languages(args.benchmark, args.lang, args.answer_lang)[1]
    options = DecodeOptions(answer_lang, sampling_config(args), args.seed, args.batch_size,
                            max_prompt_tokens=args.max_len_input)
    asr = AsrCommand(args.asr_command) if args.asr_command else None
    scorers = build_scorers(args, out)  # before decoding: a missing model or a bad flag stops at once
    reports = run_benchmark(models, lambda path: load_model(path, args), questions, options, out, asr,
                            durations(args, num_units))
    config = {"manifest": args.manifest, "items": len(questions), "models": models, "lang": args.lang,
              "answer_lang": answer_lang, "sampling": dataclasses.asdict(options.sampling), "seed": args.seed,
              "speech_tokenizer": extractor.identity.to_dict(), "speech_tokenizer_label": extractor.label,
              "asr_command": args.asr_command}
    extra_md, extra_json = score_and_render(args, questions, reports, scorers)
    write_json(out / "report.json", {"config": {**config, **extra_json.pop("config")}, "models": reports,
                                     **extra_json})
    with atomic_open(out / "report.md") as f:
        f.write(f"# S2S evaluation: {Path(args.manifest).name} ({len(questions)} items, question {args.lang}, "
                f"answer {answer_lang})\n\n")
        f.write(render_markdown(reports))
        f.write(extra_md)
    print((out / "report.md").read_text(encoding="utf-8"), file=sys.stderr)
    return 0
