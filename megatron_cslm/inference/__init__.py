"""Inference for CSLM checkpoints: prompts as trained, interleaved decoding, streaming chunks, evaluation.

    lm = SpeechLM.from_pretrained("ckpt")                       # exported HF checkpoint + its tokenizer
    encoder = SFTEncoder(lm.tok, SFTConfig())                    # the SFT prompt layout
    prompt = encoder.encode_prompt(units, lang="en")
    stream = lm.stream(prompt, SamplingConfig(), seed=0)
    for chunk in stream:                                         # TQ, then TA1, SA1, TA2, SA2, ... as completed
        ...
    stream.response.latency.first_speech_tokens
"""
from megatron_cslm.inference.generate import Response, SpeechLM, Stream
from megatron_cslm.inference.latency import Latency
from megatron_cslm.inference.parse import ParsedResponse, ResponseChunk, ResponseParser, parse_response
from megatron_cslm.inference.sampling import SamplingConfig

__all__ = ["Latency", "ParsedResponse", "Response", "ResponseChunk", "ResponseParser", "SamplingConfig", "SpeechLM",
           "Stream", "parse_response"]
