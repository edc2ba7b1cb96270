"""`cslm synthesize`: speech units -> WAV through CosyVoice's flow-matching model and HiFT vocoder, chunk by chunk.

Input: `cslm decode`'s decode.jsonl (each answer's SA chunks are synthesized in order, one stream per answer, as
`decode --synthesize` does while decoding), or a units file (one utterance per line: `<12><7>...`, `12 7 ...`).
Deduplicated units are re-expanded to the tokenizer's frame rate first: by a trained duration predictor
(`--duration-model`, from `cslm train-duration`), a table of mean durations or a fixed duration; without any of
them the units are taken as frame-rate units. The voice: a CosyVoice `spk2info.pt` speaker or a saved zero-shot
prompt (`--speaker-prompt`, x-vector + optional prompt units and mel); default a neutral (zero) x-vector.
Needs a local CosyVoice model directory (`--cosyvoice-dir`: cosyvoice.yaml + flow.pt + hift.pt; CosyVoice-300M-25Hz
for the 25 Hz v1 tokenizer, CosyVoice-300M for v1 at 50 Hz) and the `synth` extra (see README "Speech out").
Output: <output-dir>/wav/<id>.wav (16-bit PCM at the model's sample rate) and synthesis.jsonl (samples and
synthesis time per chunk).

Example:
    cslm synthesize --decode-output out/decode.jsonl --cosyvoice-dir CosyVoice-300M-25Hz \\
        --duration-model ckpt/duration --output-dir out
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from megatron_cslm.argtypes import positive_int
from megatron_cslm.errors import CslmError
from megatron_cslm.fileio import iter_jsonl, iter_lines
from megatron_cslm.speech.identity import IDENTITY_KEY, parse_identity


def add_speech_out_args(parser: argparse.ArgumentParser, required: bool = True, fixed_durations: bool = True) -> None:
    """The synthesis flags, shared with `cslm decode --synthesize` (which has its own --unit-duration flags:
    `fixed_durations=False`)."""
    g = parser.add_argument_group("speech out (CosyVoice synthesis)")
    g.add_argument("--cosyvoice-dir", required=required, default=None,
                   help="local CosyVoice model directory: cosyvoice.yaml (or cosyvoice2.yaml) + flow.pt + hift.pt")
    g.add_argument("--cosyvoice-random-init", action="store_true",
                   help="build the flow and vocoder from the YAML without loading flow.pt/hift.pt: noise, for tests")
    g.add_argument("--speaker-prompt", default=None,
                   help="CosyVoice spk2info.pt (or one speaker's dict): x-vector [+ prompt units + mel] "
                        "(default: the model directory's spk2info.pt when --speaker is given, else a neutral voice)")
    g.add_argument("--speaker", default=None, help="speaker id inside --speaker-prompt / spk2info.pt")
    d = g.add_mutually_exclusive_group() if fixed_durations else g
    d.add_argument("--duration-model", default=None,
                   help="duration predictor directory (`cslm train-duration`): the units are deduplicated")
    if fixed_durations:
        d.add_argument("--unit-duration", type=positive_int, default=None,
                       help="the units are deduplicated: repeat each this many frames")
        d.add_argument("--unit-duration-table", default=None,
                       help="the units are deduplicated: JSON list/object of each unit's mean duration in frames")
    g.add_argument("--duration-speaker", default=None,
                   help="speaker name the duration predictor was trained with (default: its unknown speaker)")
    g.add_argument("--duration-rounding", choices=("mean", "median"), default="mean",
                   help="mean: accumulated expected durations (right total length); median: per-unit medians")
    g.add_argument("--synth-device", default=None, help="torch device for synthesis; None: cuda if available, else cpu")


def build_speech_out(args: argparse.Namespace, num_units: int | None = None, identity=None, where: str = "the units"):
    """The SpeechOut of the flags, checked against the units' unit count / identity before any audio is made."""
    from megatron_cslm.inference.durations import check_predictor, load_duration_table
    from megatron_cslm.inference.speech_out import SpeechOut, check_speech_out
    from megatron_cslm.speech.duration_model import load_predictor
    from megatron_cslm.speech.synthesis import MODEL_HINT, CosyVoiceSynthesizer, SpeakerPrompt

    if not args.cosyvoice_dir:
        raise CslmError.usage("synthesis needs --cosyvoice-dir: " + MODEL_HINT, "--cosyvoice-dir")
    if args.duration_model and (args.unit_duration or args.unit_duration_table):
        raise CslmError.usage("give one of --duration-model, --unit-duration, --unit-duration-table",
                              "--duration-model")
    device = args.synth_device or ("cuda" if torch.cuda.is_available() else "cpu")
    synth = CosyVoiceSynthesizer.from_model_dir(args.cosyvoice_dir, device,
                                                load_weights=not args.cosyvoice_random_init)
    durations = args.unit_duration
    if args.duration_model:
        durations = load_predictor(args.duration_model, device)
        if num_units is not None:
            check_predictor(durations, num_units, identity, where, args.duration_model)
    elif args.unit_duration_table:
        durations = load_duration_table(args.unit_duration_table, synth.num_units)
    if num_units is not None and num_units != synth.num_units:
        raise CslmError.compat(f"{where} has {num_units} units but the CosyVoice flow ({synth.source}) has "
                               f"{synth.num_units}", field="--cosyvoice-dir")
    check_speech_out(synth, durations, identity, where)
    speaker = None
    prompt = args.speaker_prompt or (str(Path(args.cosyvoice_dir) / "spk2info.pt") if args.speaker else None)
    if prompt:
        speaker = SpeakerPrompt.from_file(prompt, args.speaker)
    return SpeechOut(synth, durations, speaker, args.duration_speaker, args.duration_rounding)


def get_args(argv=None) -> argparse.Namespace:
    from megatron_cslm.tool import tool_parser

    p = tool_parser(__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--decode-output", help="decode.jsonl of `cslm decode` (SA chunks per answer)")
    src.add_argument("--units", help="one utterance of units per line")
    p.add_argument("--chunk-units", type=positive_int, default=None,
                   help="with --units: synthesize each line in chunks of this many units (default: whole lines)")
    p.add_argument("--output-dir", required=True, help="wav/<id>.wav and synthesis.jsonl go here")
    add_speech_out_args(p)
    return p.parse_args(argv)


def read_items(args: argparse.Namespace) -> tuple[list[tuple[str, list[list[int]]]], object]:
    """(id, chunks of units) per utterance, and the units' speech tokenizer identity when recorded."""
    from megatron_cslm.text.markup import MarkupError
    from megatron_cslm.text.markup import parse_unit_line as parse_unit_markup

    items, identity = [], None
    if args.decode_output:
        for line, rec in iter_jsonl(args.decode_output):
            sa = rec.get("sa")
            if not isinstance(sa, list) or not all(isinstance(c, list) for c in sa):
                raise CslmError(args.decode_output, line, "sa", "expected a list of SA chunks (lists of units)")
            identity = identity or parse_identity(rec.get(IDENTITY_KEY), args.decode_output)
            items.append((str(rec.get("id", line)), [c for c in sa if c]))
        return items, identity
    for line, text in iter_lines(args.units):
        if not text.strip():
            continue
        try:
            units = parse_unit_markup(text)
        except MarkupError as e:
            raise CslmError(args.units, line, "units", str(e)) from None
        n = args.chunk_units or max(1, len(units))
        items.append((str(line), [units[i:i + n] for i in range(0, len(units), n)]))
    return items, None


def main(argv=None) -> int:
    args = get_args(argv)
    items, identity = read_items(args)
    out = build_speech_out(args, None, identity, args.decode_output or args.units)
    for _, chunks in items:  # every unit checked before any audio is made
        for units in chunks:
            out.synth.check_units(units)
    from megatron_cslm.inference.speech_out import append_summaries, wav_name

    summaries = []
    for key, chunks in items:
        for units in chunks:
            out.push(key, units)
        summaries.append(out.finish(key, wav_name(args.output_dir, key)))
        print(f"[{key}] {summaries[-1]['seconds']:.2f} s of audio from {len(chunks)} chunk(s) -> "
              f"{summaries[-1]['wav']}")
    append_summaries(args.output_dir, summaries)
    return 0


if __name__ == "__main__":
    from megatron_cslm.tool import run_tool

    raise SystemExit(run_tool(main))
