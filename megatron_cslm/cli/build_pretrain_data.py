"""`cslm build-pretrain-data`: build continual-pretraining documents (ASR, TTS, interleaved, translation,
cross-lingual speech, chat replay) from source corpora; the output feeds `cslm preprocess-data`.

Example:
    cslm build-pretrain-data --asr data/toy/manifest.jsonl --parallel data/toy/parallel.jsonl \
        --instruct data/toy/instruct.jsonl --out-dir data/pretrain --mask-prompt
"""
import argparse

from megatron_cslm.cli import positive_int, tool_parser
from megatron_cslm.data.documents import RECIPES, RecipeConfig, Templates, build_pretrain_data


def _chunk_words(value: str) -> tuple[int, int]:
    try:
        lo, _, hi = value.partition("-")
        lo, hi = int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN-MAX words, got {value!r}") from None
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"need 1 <= MIN <= MAX, got {value!r}")
    return lo, hi


def _prob(value: str) -> float:
    p = float(value)
    if not 0.0 <= p <= 1.0:
        raise argparse.ArgumentTypeError(f"a probability must be in [0, 1], got {value}")
    return p


def get_args(argv=None) -> argparse.Namespace:
    parser = tool_parser(
        "Turn ASR/TTS manifests, parallel text and instruction data into pretraining documents "
        "({'segments': [{'text'}|{'units'}], 'source', 'lang'}), one <recipe>.jsonl per recipe in --out-dir plus "
        "stats.json (read/written/skipped by reason). Outputs are written atomically: after an error no partial "
        "file is left.", show_defaults=False)
    group = parser.add_argument_group("inputs (JSONL or JSONL.gz)")
    group.add_argument("--asr", nargs="+", default=[], metavar="MANIFEST",
                       help="speech manifests {text, units, [lang, id, words]} as tools/tokenize_speech.py writes; "
                            "used by the asr, tts and interleave recipes")
    group.add_argument("--parallel", nargs="+", default=[], metavar="FILE",
                       help="parallel text {zh, en, [zh_units], [en_units]} or {translation: {zh, en}}; used by "
                            "translate and cross_speech")
    group.add_argument("--instruct", nargs="+", default=[], metavar="FILE",
                       help="instruction data {prompt, response}, {messages: [...]} or {conversations: [...]}; "
                            "used by replay")
    parser.add_argument("--out-dir", required=True, help="output directory")
    parser.add_argument("--recipes", default=None,
                        help=f"comma-separated subset of {','.join(RECIPES)} (default: every recipe whose input "
                             "is given)")
    group = parser.add_argument_group("sampling: each recipe keeps each record with its probability (default 1.0)")
    for recipe in RECIPES:
        group.add_argument(f"--p-{recipe.replace('_', '-')}", type=_prob, default=1.0, metavar="P",
                           help=f"keep probability of the {recipe} recipe")
    parser.add_argument("--interleave-chunk-words", type=_chunk_words, default=(3, 8), metavar="MIN-MAX",
                        help="words per interleaved chunk, drawn uniformly; a CJK character counts as a word "
                             "(default 3-8)")
    parser.add_argument("--langs", default="zh,en",
                        help="the two language keys of the parallel files (default zh,en)")
    parser.add_argument("--templates", default=None, metavar="FILE",
                        help="YAML/JSON file overriding prompt templates (see "
                             "megatron_cslm/data/documents/templates.py)")
    parser.add_argument("--mask-prompt", action="store_true",
                        help="replay: mark everything except assistant replies 'loss': false")
    parser.add_argument("--mask-inputs", action="store_true",
                        help="asr, tts, cross_speech: train on the target (the last segment: transcript, speech, "
                             "translation) only; the prompt and the input are context")
    parser.add_argument("--num-units", type=positive_int, default=4096,
                        help="speech-unit vocabulary size; units must lie in [0, num_units) (default 4096)")
    parser.add_argument("--dedup-units", action="store_true",
                        help="collapse repeated units (1 1 2 -> 1 2; word timestamps follow) of frame-rate inputs, "
                             "as tokenize_speech.py --dedup does; inputs already collapsed are unchanged")
    parser.add_argument("--seed", type=int, default=0, help="seed of all sampling (default 0)")
    parser.add_argument("--skip-bad-records", action="store_true",
                        help="count bad records (malformed JSON included) as skipped, by reason, instead of "
                             "stopping at the first one")
    args = parser.parse_args(argv)
    given = {"speech": args.asr, "parallel": args.parallel, "instruct": args.instruct}
    if args.recipes is None:
        args.recipes = [r for r, kind in RECIPES.items() if given[kind]]
        if not args.recipes:
            parser.error("give at least one of --asr, --parallel, --instruct")
    else:
        args.recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
        unknown = [r for r in args.recipes if r not in RECIPES]
        if unknown:
            parser.error(f"unknown recipe(s) {unknown}; choose from {','.join(RECIPES)}")
        missing = [r for r in args.recipes if not given[RECIPES[r]]]
        if missing:
            parser.error(f"recipe(s) {missing} need their input (--asr for asr/tts/interleave, --parallel for "
                         "translate/cross_speech, --instruct for replay)")
    langs = tuple(x.strip() for x in args.langs.split(","))
    if len(langs) != 2 or langs[0] == langs[1]:
        parser.error(f"--langs needs two different keys, got {args.langs!r}")
    args.langs = langs
    return args


def main(argv=None) -> int:
    args = get_args(argv)
    config = RecipeConfig(
        recipes=tuple(args.recipes), p={r: getattr(args, f"p_{r}") for r in args.recipes},
        chunk_words=args.interleave_chunk_words, langs=args.langs, mask_prompt=args.mask_prompt,
        mask_inputs=args.mask_inputs,
        num_units=args.num_units, dedup_units=args.dedup_units, seed=args.seed,
        skip_bad_records=args.skip_bad_records,
        templates=Templates.from_file(args.templates) if args.templates else Templates.default())
    counters = build_pretrain_data(args.out_dir, args.asr, args.parallel, args.instruct, config, progress=True)
    for recipe, counter in counters.items():
        print(f"{recipe:>12}: {counter.summary()}")
    print(f"wrote {', '.join(f'{r}.jsonl' for r in counters)} and stats.json to {args.out_dir}")
    return 0

