"""Answering a list of spoken questions: audio -> units, prompts, batched or streamed decoding.

Item i is decoded with seed `seed + i`, so an item's answer is reproducible whatever the batch size or
whether it was streamed. This is the library behind `tools/decode.py` and `tools/eval_s2s.py`.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from tqdm import tqdm

from megatron_cslm.data.sft import SFTEncoder
from megatron_cslm.fileio import DataError
from megatron_cslm.inference.generate import Response, SpeechLM
from megatron_cslm.inference.inputs import Question
from megatron_cslm.inference.outputs import append_outputs, make_record
from megatron_cslm.inference.parse import ResponseChunk
from megatron_cslm.inference.sampling import SamplingConfig


@dataclass(frozen=True)
class DecodeOptions:
    answer_lang: str
    sampling: SamplingConfig = SamplingConfig()
    seed: int = 0
    batch_size: int = 1
    stream: bool = False  # decode one item at a time, reporting chunks as they complete
    max_prompt_tokens: int | None = None


def tokenize_audio(questions: Sequence[Question], extractor, batch_items: int = 16, progress: bool = True) -> None:
    """Fill `units` of questions given as audio, with a `speech.extract.UnitExtractor`."""
    from megatron_cslm.speech.audio import AudioRejected, read_audio, to_16k

    todo = [q for q in questions if q.units is None]
    for start in tqdm(range(0, len(todo), batch_items), desc="audio -> units", unit="batch", disable=not progress):
        batch = todo[start:start + batch_items]
        waves = []
        for q in batch:
            try:
                audio, rate = read_audio(q.audio)
            except AudioRejected as e:
                raise DataError(q.audio, None, "audio", f"{e.reason}: {e.detail}") from None
            waves.append(to_16k(audio, rate, extractor.device))
        for q, units in zip(batch, extractor(waves)):
            q.units = units


def print_chunk(question: Question, chunk: ResponseChunk) -> None:
    """Default `on_chunk` for streaming: one line per completed chunk on stderr."""
    what = f"{len(chunk.units)} units" if chunk.kind == "sa" else repr(chunk.text.strip())
    print(f"[{question.id}] {chunk.kind.upper()}{chunk.index + 1} at {chunk.time_s:.3f}s "
          f"(token {chunk.end_token}): {what}", file=sys.stderr)


def answer_questions(lm: SpeechLM, encoder: SFTEncoder, questions: Sequence[Question], options: DecodeOptions,
                     on_chunk: Callable[[Question, ResponseChunk], None] | None = None,
                     progress: bool = True) -> Iterator[Response]:
    """Responses to `questions` (which must have units), yielded in order as their batch completes."""
    missing = [q.id for q in questions if q.units is None]
    if missing:
        raise ValueError(f"questions {missing[:5]} have no units: tokenize their audio first")
    prompts = [encoder.encode_prompt(q.units, options.answer_lang) for q in questions]
    for q, p in zip(questions, prompts):
        if options.max_prompt_tokens is not None and len(p) > options.max_prompt_tokens:
            raise ValueError(f"question {q.id}: prompt has {len(p)} tokens, more than the limit of "
                             f"{options.max_prompt_tokens} (--max-len-input)")
    seeds = [options.seed + i for i in range(len(questions))]
    step = 1 if options.stream else options.batch_size
    with tqdm(total=len(questions), desc="decode", unit="item", disable=not progress) as bar:
        for start in range(0, len(questions), step):
            if options.stream:
                stream = lm.stream(prompts[start], options.sampling, seeds[start])
                for chunk in stream:
                    if on_chunk is not None:
                        on_chunk(questions[start], chunk)
                batch = [stream.response]
            else:
                batch = lm.generate(prompts[start:start + step], options.sampling, seeds[start:start + step])
            bar.update(len(batch))
            yield from batch


def decode_to_dir(lm: SpeechLM, encoder: SFTEncoder, questions: Sequence[Question], options: DecodeOptions,
                  output_dir: str | os.PathLike, meta: dict, durations: int | Sequence[float] | None = None,
                  on_chunk: Callable[[Question, ResponseChunk], None] | None = None, save_every: int = 16,
                  progress: bool = True) -> list[Response]:
    """Answer `questions`, appending their records to `output_dir` (see `outputs`) every `save_every` items."""
    responses: list[Response] = []
    pending: list[dict] = []
    for q, response in zip(questions, answer_questions(lm, encoder, questions, options, on_chunk, progress)):
        responses.append(response)
        pending.append(make_record(q, response, lm.tok, meta, durations))
        if len(pending) >= save_every or len(responses) == len(questions):
            append_outputs(output_dir, pending)
            pending = []
    return responses
