"""`cslm make-toy-base-model`: train the quickstart's stand-in for Llama-3.1-8B-Instruct, a tiny text LM saved as
a Hugging Face Llama directory (see `megatron_cslm.toy.base_model` for why and what it learns).

    cslm make-toy-base-model --tokenizer RUN/text_tokenizer --corpus RUN/corpus --out RUN/base_hf
    cslm hf-to-megatron --hf-dir RUN/base_hf --out RUN/base --expand-vocab --num-units 512

One process, plain PyTorch (about a minute on 2 cores at the defaults).
"""
import json
from pathlib import Path

from megatron_cslm.cli import positive_float, positive_int, tool_parser
from megatron_cslm.errors import CslmError
from megatron_cslm.models.llama import ARCHS
from megatron_cslm.toy.base_model import train_toy_base_model
from megatron_cslm.toy.tokenizer import toy_texts


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
    corpus = Path(args.corpus)
    for name in ("parallel.jsonl", "instruct.jsonl"):
        if not (corpus / name).exists():
            raise CslmError(corpus / name, None, None, "missing: write the toy corpus first (cslm make-toy-corpus)",
                            kind="io", reason="missing_input")
    if (Path(args.tokenizer) / "cslm_tokenizer.json").exists():
        raise CslmError(args.tokenizer, None, "--tokenizer", "already holds speech units: give the text tokenizer "
                        "(cslm make-toy-tokenizer --text-only)", kind="compat")
    texts = toy_texts(corpus)
    reading = corpus / "reading.jsonl"
    if reading.exists():
        texts += [json.loads(line)["text"] for line in reading.read_text(encoding="utf-8").splitlines() if line]
    qa = [(r["prompt"], r["response"]) for r in map(json.loads, (corpus / "instruct.jsonl").read_text(
        encoding="utf-8").splitlines())]
    stats = train_toy_base_model(args.tokenizer, texts, qa, args.out, arch=args.arch, steps=args.steps,
                                 batch_size=args.batch_size,
                                 seq_length=args.seq_length, lr=args.lr, seed=args.seed)
    print(f"toy base LM -> {args.out}: {stats['documents']} documents, loss {stats['loss_first']:.3f} -> "
          f"{stats['loss_last']:.3f} over {args.steps} steps")
    return 0
