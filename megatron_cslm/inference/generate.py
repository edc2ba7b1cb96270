"""Autoregressive decoding of an exported Hugging Face checkpoint with a KV cache, batched or streaming.

One decoding loop serves both entry points: `generate` runs it over a left-padded batch and parses each
row afterwards; `stream` runs it for one prompt and yields every TQ/TA/SA chunk the step it completes, so a
caller can synthesise SA1 while TA2 is still being generated. With the same seed both produce the same ids.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from megatron_cslm.inference.latency import Latency, measure
from megatron_cslm.inference.parse import ParsedResponse, ResponseChunk, ResponseParser
from megatron_cslm.inference.sampling import ModalityConstraint, SamplingConfig, sample
from megatron_cslm.inference.vocab import Vocab
from megatron_cslm.text.tokenizer import SpeechTextTokenizer


@dataclass
class Response:
    """One answered prompt: generated ids (prompt excluded), their parse and latency."""

    ids: list[int]
    parsed: ParsedResponse
    latency: Latency


class Stream:
    """Iterate to receive chunks as they complete; afterwards `response` holds the whole Response."""

    def __init__(self, lm: "SpeechLM", prompt: Sequence[int], config: SamplingConfig, seed: int):
        self._lm, self._prompt, self._config, self._seed = lm, list(prompt), config, seed
        self.response: Response | None = None

    def __iter__(self) -> Iterator[ResponseChunk]:
        parser = ResponseParser(self._lm.tok, self._lm.vocab)
        ids: list[int] = []
        elapsed = 0.0
        for tokens, elapsed in self._lm.decode_steps([self._prompt], self._config, [self._seed]):
            ids.append(tokens[0])
            yield from parser.feed(tokens[0], elapsed)
        yield from parser.finish(elapsed)
        parsed = parser.result()
        self.response = Response(ids, parsed, measure(parsed, len(self._prompt), elapsed))


class SpeechLM:
    """A causal LM over the speech-text vocabulary plus its tokenizer, ready to answer prompts."""

    def __init__(self, model: torch.nn.Module, tok: SpeechTextTokenizer):
        rows = model.get_output_embeddings().weight.shape[0]
        if rows < tok.vocab_size:
            raise ValueError(f"model has {rows} output rows but the tokenizer has {tok.vocab_size} ids: "
                             "wrong tokenizer for this checkpoint")
        self.model = model.eval()
        self.tok = tok
        self.vocab = Vocab.of(tok)
        self.device = next(model.parameters()).device
        self.constraint = ModalityConstraint(self.vocab, rows, self.device)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
                        device: str | None = None, dtype: torch.dtype | None = None) -> "SpeechLM":
        """Load an exported checkpoint (safetensors only, no remote code) and the tokenizer saved with it.

        Defaults: CUDA in bfloat16 when available, else CPU in float32.
        """
        from transformers import AutoModelForCausalLM

        from megatron_cslm.inference.inputs import exported_model_config

        exported_model_config(path)  # one line naming what the directory is, not transformers' traceback
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                     trust_remote_code=False)
        return cls(model.to(device), SpeechTextTokenizer.from_pretrained(tokenizer or path))

    @torch.inference_mode()
    def decode_steps(self, prompts: Sequence[Sequence[int]], config: SamplingConfig,
                     seeds: Sequence[int]) -> Iterator[tuple[list[int | None], float]]:
        """Yield (next token per row, seconds since start) per step; None for rows that already stopped."""
        if len(prompts) != len(seeds) or not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("need one non-empty prompt per seed")
        start = time.perf_counter()
        batch, width = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((batch, width), self.vocab.pad, dtype=torch.long)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding keeps every row's next token in the last column
            ids[i, width - len(p):] = torch.as_tensor(list(p))
            mask[i, width - len(p):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        generators = [torch.Generator(self.device).manual_seed(int(s)) for s in seeds]
        stops = torch.tensor(sorted(self.vocab.stops), device=self.device)
        done = torch.zeros(batch, dtype=torch.bool, device=self.device)
        in_speech = torch.zeros_like(done)
        cache = None
        for _ in range(config.max_new_tokens):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                             use_cache=True, logits_to_keep=1)
            cache = out.past_key_values
            logits = out.logits[:, -1].float()
            logits[:, self.vocab.size:] = float("-inf")  # embedding padding rows
            if config.constrained:
                logits = self.constraint.apply(logits, in_speech)
            tokens = sample(logits, config, generators)
            yield [None if d else t for d, t in zip(done.tolist(), tokens.tolist())], time.perf_counter() - start
            done |= torch.isin(tokens, stops)
            if done.all():
                return
            in_speech = self.constraint.advance(in_speech, tokens)
            ids = tokens.masked_fill(done, self.vocab.pad)[:, None]
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
            positions = positions[:, -1:] + 1

    def generate(self, prompts: Sequence[Sequence[int]], config: SamplingConfig,
                 seeds: Sequence[int]) -> list[Response]:
        """Answer a batch of prompts (token ids, BOS included); seeds[i] seeds item i."""
        parsers = [ResponseParser(self.tok, self.vocab) for _ in prompts]
        ids: list[list[int]] = [[] for _ in prompts]
        ends = [0.0] * len(prompts)
        for tokens, elapsed in self.decode_steps(prompts, config, seeds):
            for i, t in enumerate(tokens):
                if t is not None:
                    ids[i].append(t)
                    parsers[i].feed(t, elapsed)
                    ends[i] = elapsed
        out = []
        for i, parser in enumerate(parsers):
            parser.finish(ends[i])
            parsed = parser.result()
            out.append(Response(ids[i], parsed, measure(parsed, len(prompts[i]), ends[i])))
        return out

    def stream(self, prompt: Sequence[int], config: SamplingConfig, seed: int) -> Stream:
        """Answer one prompt, yielding chunks as they complete (see `Stream`)."""
        return Stream(self, prompt, config, seed)
