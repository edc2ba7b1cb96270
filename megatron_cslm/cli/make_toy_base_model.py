"""`cslm make-toy-base-model`: train the quickstart's stand-in for Llama-3.1-8B-Instruct, a tiny text LM saved as
a Hugging Face Llama directory (see `megatron_cslm.toy.base_model` for why and what it learns).

    cslm make-toy-base-model --tokenizer RUN/text_tokenizer --corpus RUN/corpus --out RUN/base_hf
    cslm hf-to-megatron --hf-dir RUN/base_hf --out RUN/base --expand-vocab --num-units 512

One process, plain PyTorch (about a minute on 2 cores at the defaults).
"""
from pathlib import Path

from megatron_cslm.cli import positive_float, positive_int, tool_parser
from megatron_cslm.errors import CslmError
from megatron_cslm.models.llama import ARCHS
from megatron_cslm.text.tokenizer import META_FILE
from megatron_cslm.toy.base_model import base_corpus, train_toy_base_model


def main(argv: list[str] | None = None) -> int:
    p = tool_parser(__doc__)
    p.add_argument("--tokenizer", required=True, help="text tokenizer directory (cslm make-toy-tokenizer --text-only)")
    p.add_argument("--corpus", required=True,
                   help="toy corpus directory: its text, reading.jsonl's sentences and instruct.jsonl's Q/A")
    p.add_argument("--out", required=True, help="output HF model directory (replaced atomically)")
    p.add_argument("--arch", default="tiny", choices=sorted(ARCHS),
                   help="model shape (models.llama.ARCHS; its RoPE base is set to 10,000, see toy.base_model)")
    p.add_argument("--steps", type=positive_int, default=1200, help="optimizer steps")
    p.add_argument("--batch-size", type=positive_int, default=8, help="sequences per step")
    p.add_argument("--seq-length", type=positive_int, default=256, help="tokens per sequence (documents packed)")
    p.add_argument("--lr", type=positive_float, default=3e-3, help="peak learning rate (cosine to 10%%)")
    p.add_argument("--seed", type=int, default=1234, help="initialisation and data order")
    args = p.parse_args(argv)
    if (Path(args.tokenizer) / META_FILE).exists():
        raise CslmError(args.tokenizer, None, "--tokenizer", "already holds speech units: give the text tokenizer "
                        "(cslm make-toy-tokenizer --text-only)", kind="compat")
    texts, qa = base_corpus(args.corpus)
    stats = train_toy_base_model(args.tokenizer, texts, qa, args.out, arch=args.arch, steps=args.steps,
                                 batch_size=args.batch_size,
                                 seq_length=args.seq_length, lr=args.lr, seed=args.seed)
    print(f"toy base LM -> {args.out}: {stats['documents']} documents, loss {stats['loss_first']:.3f} -> "
          f"{stats['loss_last']:.3f} over {args.steps} steps")
    return 0
