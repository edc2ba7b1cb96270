"""`cslm make-toy-corpus`: write the embedded toy bilingual speech-text corpus (SYNTHETIC speech units) for
laptop-scale runs.

Example:
    cslm make-toy-corpus --out data/toy
"""
import argparse

from megatron_cslm.cli import nonnegative_int, positive_int, tool_parser
from megatron_cslm.toy.corpus import TOY_UNIT_RANGE, make_toy_corpus


def get_args(argv=None) -> argparse.Namespace:
    parser = tool_parser(
        "Write the toy corpus shipped with megatron_cslm: 160 English/Chinese sentence pairs and 40 Q/A pairs "
        "written for the project, with SYNTHETIC speech (each letter/character is a fixed short unit sequence, "
        "stretched per speaker). Files: manifest.jsonl (ASR/TTS manifest with word timestamps), parallel.jsonl, "
        "instruct.jsonl, dialogue_sft.jsonl, heldout.jsonl (spoken questions kept out of training), reading.jsonl "
        "and repeat_dialogue.jsonl (read speech and repeat-after-me dialogues, --reading), info.json. "
        "Nothing is downloaded; the output depends only on the "
        "arguments.", show_defaults=False)
    parser.add_argument("--out", required=True, help="output directory (created if missing)")
    parser.add_argument("--num-units", type=positive_int, default=4096,
                        help="speech-unit vocabulary size the units must fit (default 4096, CosyVoice S3); the "
                             f"toy uses units [0, min(num_units, {TOY_UNIT_RANGE})), unit 0 being silence")
    parser.add_argument("--seed", type=int, default=0,
                        help="picks speaker rates/pauses and duration jitter (default 0); the letter -> unit "
                             "map is fixed")
    parser.add_argument("--speakers", type=positive_int, default=4,
                        help="number of toy voices; every sentence is said by each (default 4); speaker 0 is "
                             "the assistant's voice in dialogue_sft.jsonl")
    parser.add_argument("--reading", type=nonnegative_int, default=0,
                        help="read-speech utterances (random word sequences of the corpus's lexicon) in "
                             "reading.jsonl, for ASR pretraining (default 0; the quickstart writes 8000)")
    parser.add_argument("--reading-dialogues", type=nonnegative_int, default=0,
                        help="repeat-after-me SFT dialogues over the first read-speech utterances, in "
                             "repeat_dialogue.jsonl (default 0, at most --reading)")
    args = parser.parse_args(argv)
    if not 0 <= args.reading_dialogues <= args.reading:
        parser.error(f"--reading-dialogues must be in [0, --reading={args.reading}], got {args.reading_dialogues}")
    return args


def main(argv=None) -> int:
    args = get_args(argv)
    info = make_toy_corpus(args.out, num_units=args.num_units, seed=args.seed, speakers=args.speakers,
                           reading=args.reading, reading_dialogues=args.reading_dialogues)
    print(f"SYNTHETIC toy corpus (not real speech) -> {args.out}: units in [0, {info['unit_range']}), "
          f"{len(info['speakers'])} speakers")
    for name, count in info["files"].items():
        print(f"  {name}: {count} records")
    return 0

