#!/usr/bin/env python
"""Where the SFT chunker cuts answer speech: proportionally to characters vs at CTC-aligned word starts.

Ground truth: the toy corpus's synthetic speech (megatron_cslm/toy/corpus.py), whose per-speaker durations define
every word's true unit span. Each utterance (the toy QA answers and parallel sentences, 4 to an answer, said by
every toy speaker) is cut by the SFT chunker (`data/chunking.chunk_answer`, ~7-word chunks) three ways: with the
true word timestamps (the reference), without timestamps (the proportional cut every record got before `cslm
align-words`), and with timestamps from the aligner (`speech/align.py`: forced alignment + the unit mapping the
tool uses). The error of a cut is its distance in units from the reference cut, averaged over every chunk
boundary; the proportional cut is the baseline, measured in the same process.

Emissions for the aligner are synthesised from the truth, with noise: a CTC model at 50 frames/s over units at
25/s (2 frames per unit); silence units are blank; a word's spoken frames are shared evenly by its labels
(letters, or one CJK character); every frame gets `--evidence` nats on its true label plus N(0, `--noise`) on
every label, so the best path is often not the true one. No acoustic model is involved: this measures the
chunking and mapping, given emissions of a known quality.

    python bench/align.py            # all 4 toy speakers, every answer
    python bench/align.py --quick    # 1 speaker, every 5th answer
"""
from __future__ import annotations

import argparse
import statistics

import torch

from megatron_cslm.cli import run_tool
from megatron_cslm.data.chunking import chunk_answer
from megatron_cslm.speech.align import CtcVocab, frames_to_units, tile_words, word_start_frames
from megatron_cslm.toy.corpus import SILENCE_UNIT, ToySpeech, parallel_sentences, qa_pairs

FRAMES_PER_UNIT = 2  # a 50 frames/s CTC model (wav2vec2) over 25 units/s (S3 v1_25hz)
UNITS_PER_SECOND = 25


def emissions(units: list[int], words: list[dict], vocab: CtcVocab, evidence: float, noise: float,
              gen: torch.Generator) -> torch.Tensor:
    """Frame log-probabilities from the true word spans (see the module docstring)."""
    truth = [vocab.blank] * (len(units) * FRAMES_PER_UNIT)
    for w in words:
        spoken = [f for u in range(w["start"], w["end"]) if units[u] != SILENCE_UNIT
                  for f in range(u * FRAMES_PER_UNIT, (u + 1) * FRAMES_PER_UNIT)]
        labels = vocab.spell(w["word"])
        for j, frame in enumerate(spoken):
            truth[frame] = labels[j * len(labels) // len(spoken)]
    logits = noise * torch.randn(len(truth), max(vocab.labels.values()) + 1, generator=gen)
    logits[torch.arange(len(truth)), torch.tensor(truth)] += evidence
    return torch.log_softmax(logits, dim=-1)


def boundaries(text: str, units: list[int], words: list[dict] | None, target: int) -> list[int]:
    chunks = chunk_answer(text, units, words=words, target=target)
    return [sum(len(c.units) for c in chunks[:k]) for k in range(1, len(chunks))]


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 speaker, every 5th answer")
    p.add_argument("--sentences", type=int, default=4, help="toy sentences per answer (default: 4)")
    p.add_argument("--chunk-words", type=int, default=7, help="SFT chunk target in words (default: 7)")
    p.add_argument("--evidence", type=float, default=2.0, help="nats on the true label per frame (default: 2.0)")
    p.add_argument("--noise", type=float, default=1.0, help="std of the N(0, s) logit noise (default: 1.0)")
    p.add_argument("--seed", type=int, default=0, help="toy corpus and noise seed (default: 0)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = get_args(argv)
    tts = ToySpeech(seed=args.seed)
    pairs = [(en, zh) for qa in qa_pairs() for en, zh in [(qa["en"][1], qa["zh"][1])]] + parallel_sentences()
    texts = [(lang, sep.join(p[i] for p in pairs[k:k + args.sentences]))  # answers of several sentences
             for k in range(0, len(pairs), args.sentences) for i, lang, sep in ((0, "en", " "), (1, "zh", ""))]
    speakers = range(1 if args.quick else len(tts.voices))
    if args.quick:
        texts = texts[::5]
    chars = sorted({c.lower() for _, t in texts for c in t if c.isalnum()})
    vocab = CtcVocab.from_labels({"<blank>": 0, **{c: i + 1 for i, c in enumerate(chars)}}, blank=0, delimiter=None)
    gen = torch.Generator().manual_seed(args.seed)
    errors: dict[str, dict[str, list[int]]] = {lang: {"proportional": [], "aligned": []} for lang in ("en", "zh")}
    for n, (lang, text) in enumerate(texts):
        for s in speakers:
            units, words = tts.speak(text, s, f"bench-{n}-{s}")
            reference = boundaries(text, units, words, args.chunk_words)
            if not reference:
                continue
            frames = word_start_frames(emissions(units, words, vocab, args.evidence, args.noise, gen), vocab,
                                       [w["word"] for w in words])
            aligned = tile_words([w["word"] for w in words], frames_to_units(
                frames, 1 / (FRAMES_PER_UNIT * UNITS_PER_SECOND), UNITS_PER_SECOND, len(units)), len(units))
            for name, cut_words in (("proportional", None), ("aligned", aligned)):
                cuts = boundaries(text, units, cut_words, args.chunk_words)
                errors[lang][name] += [abs(a - b) for a, b in zip(cuts, reference)]
    means = {}
    for lang, by in errors.items():
        if not by["aligned"]:
            continue
        prop, ali = statistics.fmean(by["proportional"]), statistics.fmean(by["aligned"])
        exact = sum(e == 0 for e in by["aligned"]) / len(by["aligned"])
        print(f"{lang}: {len(by['aligned'])} chunk boundaries, mean error proportional {prop:.2f} vs aligned "
              f"{ali:.2f} units ({prop / max(ali, 1e-9):.1f}x); aligned exact at {exact:.0%} of boundaries")
    for name in ("proportional", "aligned"):
        means[name] = statistics.fmean(e for by in errors.values() for e in by[name])
    print(f"all: proportional / aligned error = {means['proportional'] / max(means['aligned'], 1e-9):.1f}x "
          f"(evidence {args.evidence} nats, noise {args.noise}, {FRAMES_PER_UNIT} CTC frames per unit)")
    print(f"chunk boundary error, proportional vs aligned: {means['proportional']:.2f} vs {means['aligned']:.2f} units")


if __name__ == "__main__":
    raise SystemExit(run_tool(main))
