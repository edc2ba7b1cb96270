"""`cslm make-toy-tokenizer`: train the quickstart's small text tokenizer on a toy corpus and save it as a
SpeechTextTokenizer.

    cslm make-toy-tokenizer --corpus runs/quickstart/corpus --out runs/quickstart/tokenizer

The text part is a real Hugging Face byte-level BPE tokenizer.json with Llama-3's special tokens (so the chat
template, export and AutoTokenizer work as with Meta's), just 1,024 ids instead of 128,256 so a CPU model
can afford the softmax; `--characters` makes it one id per character. Real runs use Meta's tokenizer directory
instead.
"""
import tempfile

from megatron_cslm.cli import positive_int, tool_parser
from megatron_cslm.text.tokenizer import SpeechTextTokenizer
from megatron_cslm.toy.tokenizer import toy_texts, train_toy_text_tokenizer


def main(argv: list[str] | None = None) -> int:
    p = tool_parser(__doc__)
    p.add_argument("--corpus", required=True, help="directory written by `cslm make-toy-corpus`")
    p.add_argument("--out", required=True, help="output SpeechTextTokenizer directory")
    p.add_argument("--vocab-size", type=positive_int, default=1024,
                   help="text BPE vocabulary size (ids; with --characters, a cap)")
    p.add_argument("--characters", action="store_true",
                   help="one id per character (BPE merges only a character's bytes), as the quickstart uses")
    p.add_argument("--num-units", type=positive_int, default=512, help="speech units added after the text vocabulary")
    p.add_argument("--text-only", action="store_true",
                   help="write the text tokenizer alone, a base LM's (cslm make-toy-base-model); hf-to-megatron "
                        "--expand-vocab adds the units, as for Meta's tokenizer")
    args = p.parse_args(argv)
    if args.text_only:
        train_toy_text_tokenizer(toy_texts(args.corpus), args.out, args.vocab_size, args.characters)
        print(f"saved {args.out}: text tokenizer only")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        train_toy_text_tokenizer(toy_texts(args.corpus), tmp, args.vocab_size, args.characters)
        tokenizer = SpeechTextTokenizer(tmp, num_units=args.num_units)
        tokenizer.save_pretrained(args.out)
    print(f"saved {args.out}: {tokenizer.base_vocab_size} text ids + {args.num_units} units + 4 specials "
          f"= {tokenizer.vocab_size}")
    return 0
