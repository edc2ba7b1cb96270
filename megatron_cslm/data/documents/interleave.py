"""Speech-text interleaving for pretraining: an utterance cut at word boundaries, alternating modality.

Interleaved documents (``text speech text ...`` of one utterance) teach the model that a span of speech and
its words are interchangeable mid-sentence, which is what lets it switch modality inside an answer later.
Words and unit cuts follow `megatron_cslm.data.chunking` (the SFT answer chunker), so pretraining and SFT agree
on what a word is (a space-separated word, or one CJK character) and where its speech starts: with word
timestamps, a chunk's units run from its first word's start to the next chunk's first word's start (pauses
stay with the word before them); without, units are split in proportion to characters. Unlike SFT, chunk
lengths here are drawn at random, ``chunk_words`` (min, max) words each, and the text chunks keep their
leading space, so the text of all chunks concatenates to the transcript.
"""
from __future__ import annotations

import random
from typing import Sequence

from megatron_cslm.data.chunking import AnswerChunk, align_chunks, is_spoken, split_pieces


def chunk_sizes(n_words: int, chunk_words: tuple[int, int], rng: random.Random) -> list[int]:
    """Random chunk lengths in words summing to `n_words`, at least two chunks (so both modalities appear)."""
    lo, hi = chunk_words
    sizes: list[int] = []
    while sum(sizes) < n_words:
        sizes.append(min(rng.randint(lo, hi), n_words - sum(sizes)))
    if len(sizes) == 1:
        first = rng.randint(1, n_words - 1)
        sizes = [first, n_words - first]
    return sizes


def interleave_chunks(text: str, units: Sequence[int], words: Sequence[dict] | None,
                      chunk_words: tuple[int, int], rng: random.Random) -> list[AnswerChunk] | None:
    """Cut an utterance into random-length word chunks with their units; None if it has fewer than 2 words.

    Raises ValueError if `words` timestamps do not appear in order in `text`.
    """
    pieces = split_pieces(text)
    spoken = [i for i, p in enumerate(pieces) if is_spoken(p)]
    if len(spoken) < 2:
        return None
    starts, acc = [], 0
    for size in chunk_sizes(len(spoken), chunk_words, rng)[:-1]:
        acc += size
        starts.append(spoken[acc])  # a chunk begins at a spoken piece; punctuation stays with the chunk before
    bounds = [0, *starts, len(pieces)]
    texts = ["".join(pieces[a:b]) for a, b in zip(bounds, bounds[1:])]
    return align_chunks(text, texts, units, words)


def interleave_segments(chunks: Sequence[AnswerChunk], rng: random.Random) -> list[dict] | None:
    """Alternate text and speech over `chunks`, starting with either at random; None if a speech chunk would be
    empty (an utterance with fewer units than words)."""
    speech_first = rng.random() < 0.5
    segments = []
    for i, chunk in enumerate(chunks):
        if (i % 2 == 0) == speech_first:
            if not chunk.units:
                return None
            segments.append({"units": chunk.units})
        else:
            segments.append({"text": chunk.text})
    return segments
