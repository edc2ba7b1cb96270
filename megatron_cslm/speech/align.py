"""Word timestamps by CTC forced alignment: where each word of a transcript is spoken, in speech-unit indices.

Why: the interleaved chain of modality pairs each text chunk TA_k with the speech SA_k that says it. Without word
timestamps the SFT chunker (`data/chunking.py`) cuts speech proportionally to characters and boundaries land
mid-word. A CTC acoustic model (transformers `Wav2Vec2ForCTC` and its processor: letters for English, characters
for Chinese) gives per-frame label log-probabilities; torchaudio's `forced_align` finds the best path that spells
the transcript, and the frame where each word's first label is emitted is where that word starts.

Invariants:
- Words are the chunker's spoken pieces (`chunking.split_pieces`) without surrounding punctuation
  (`toy.corpus.bare_word`): one per space-separated word, one per CJK character; each is a substring of the
  text, so `chunking` finds it again.
- `words` tile the record's units as `toy/corpus.py` defines: word 0 starts at 0, word i+1 starts where word i
  ends, the last ends at len(units), `end` exclusive; a pause belongs to the word before it. Only the starts of
  words 1.. come from the acoustics.
- Indices are into the record's `units`: raw frames at the record's rate (its speech tokenizer identity), or,
  when the record is deduplicated (it has `durations`), deduplicated indices through those run lengths (a run
  cut by a boundary stays on the left, as `chunking.split_units` does), so raw timestamps + `--dedup-units` and
  deduplicated timestamps give the SFT builder the same chunks.
- A word the model's vocabulary cannot spell (after case folding and dropping punctuation it has no label for)
  is reported; the record is then written without `words` (the proportional cut) and counted under its reason.
  Unusable audio, a transcript longer than the audio can hold, or no spoken word are likewise reasons.
"""
from __future__ import annotations

import logging
import math
import os
import re
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from megatron_cslm.data.chunking import is_spoken, raw_to_dedup, split_pieces
from megatron_cslm.errors import CslmError
from megatron_cslm.speech.audio import SAMPLE_RATE, AudioLimits, file_sample_rate, read_audio, to_16k
from megatron_cslm.speech.identity import IDENTITY_KEY, S3_TOKENIZERS, parse_identity
from megatron_cslm.text.language import CJK
from megatron_cslm.toy.corpus import bare_word

log = logging.getLogger(__name__)
_CJK_WORD = re.compile(f"[{CJK}]")  # a CJK character is a word of its own

# Why a record keeps the proportional cut (besides the audio reasons of speech.audio.REJECT_REASONS).
UNALIGNED_REASONS = ("unspellable", "no_words", "transcript_too_long", "length_mismatch")


def _unaligned(reason: str, message: str, field: str | None = None) -> CslmError:
    assert reason in UNALIGNED_REASONS, reason
    return CslmError(None, None, field, message, reason=reason)


def transcript_words(text: str) -> list[str]:
    """The words of a transcript as the chunker and the toy corpus count them (see the module docstring)."""
    return [w for w in (bare_word(p) for p in split_pieces(text) if is_spoken(p)) if w]


def _is_cjk(word: str) -> bool:
    return bool(_CJK_WORD.fullmatch(word))


@dataclass(frozen=True)
class CtcVocab:
    """The CTC model's output labels: single characters -> ids, the blank, and the optional word delimiter.

    `case` is "upper" or "lower" when the letters of the vocabulary are of one case (transcripts are folded
    to it), else None.
    """

    labels: Mapping[str, int]
    blank: int
    delimiter: int | None = None
    case: str | None = None

    @classmethod
    def from_labels(cls, labels: Mapping[str, int], blank: int, delimiter: str | None = "|") -> "CtcVocab":
        chars = {k: v for k, v in labels.items() if len(k) == 1 and v != blank}
        letters = [c for c in chars if c.isalpha() and c.lower() != c.upper()]
        upper = sum(c.isupper() for c in letters)
        case = None if not letters or 0 < upper < len(letters) else ("upper" if upper else "lower")
        delim = chars.get(delimiter) if delimiter else None
        return cls({k: v for k, v in chars.items() if v != delim}, blank, delim, case)

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "CtcVocab":
        """From a transformers `Wav2Vec2CTCTokenizer`: its pad token is CTC's blank, `|` separates words."""
        blank = tokenizer.pad_token_id
        if blank is None:
            raise CslmError.compat("the CTC tokenizer has no pad token, which Wav2Vec2ForCTC uses as the blank")
        return cls.from_labels(tokenizer.get_vocab(), blank, getattr(tokenizer, "word_delimiter_token", None))

    def spell(self, word: str) -> list[int]:
        """Label ids of `word`: NFKC, case-folded to the vocabulary, punctuation without a label dropped.

        Raises CslmError (reason ``unspellable``) naming the first letter, digit or character with no label."""
        out = []
        for c in unicodedata.normalize("NFKC", word):
            c = c.upper() if self.case == "upper" else c.lower() if self.case == "lower" else c
            if c in self.labels:
                out.append(self.labels[c])
            elif c.isalnum():
                raise _unaligned("unspellable", f"word {word!r}: the CTC model has no label for {c!r}", "text")
        if not out:
            raise _unaligned("unspellable", f"word {word!r} has no label the CTC model knows", "text")
        return out


def targets(vocab: CtcVocab, words: Sequence[str]) -> tuple[list[int], list[int]]:
    """The label sequence to force-align and the index of every word's first label in it.

    The word delimiter (when the vocabulary has one) goes between two words that are not CJK characters,
    as wav2vec2 models for space-separated scripts are trained to emit it."""
    seq: list[int] = []
    first: list[int] = []
    for k, word in enumerate(words):
        if k and vocab.delimiter is not None and not (_is_cjk(word) or _is_cjk(words[k - 1])):
            seq.append(vocab.delimiter)
        first.append(len(seq))
        seq += vocab.spell(word)
    return seq, first


def forced_align(log_probs: torch.Tensor, labels: Sequence[int], blank: int) -> list[int]:
    """Start frame of every label of `labels` on the best CTC path through `log_probs` (frames x classes)."""
    import torchaudio.functional as AF

    repeats = sum(a == b for a, b in zip(labels, labels[1:]))
    if log_probs.shape[0] < len(labels) + repeats:
        raise _unaligned("transcript_too_long", f"{len(labels)} labels need at least {len(labels) + repeats} CTC "
                                                f"frames, the audio gives {log_probs.shape[0]}")
    with warnings.catch_warnings():  # torchaudio 2.9 marks it deprecated; 2.10+ keeps it (without the warning)
        warnings.simplefilter("ignore")
        path, scores = AF.forced_align(log_probs[None].float().cpu(), torch.tensor([list(labels)], dtype=torch.int32),
                                       blank=blank)
    spans = AF.merge_tokens(path[0], scores[0], blank=blank)
    assert len(spans) == len(labels), "a forced path emits every target label once"
    return [s.start for s in spans]


def word_start_frames(log_probs: torch.Tensor, vocab: CtcVocab, words: Sequence[str]) -> list[int]:
    """CTC frame where each word's first label is emitted."""
    labels, first = targets(vocab, words)
    starts = forced_align(log_probs, labels, vocab.blank)
    return [starts[i] for i in first]


def tile_words(words: Sequence[str], starts: Sequence[int], n_units: int) -> list[dict]:
    """`words: [{word, start, end}]` tiling [0, n_units): word 0 starts at 0, each ends where the next starts."""
    bounds, prev = [0], 0
    for s in starts[1:]:
        prev = min(max(prev, int(s)), n_units)
        bounds.append(prev)
    bounds.append(n_units)
    return [{"word": w, "start": a, "end": b} for w, a, b in zip(words, bounds, bounds[1:])]


def frames_to_units(frames: Sequence[int], frame_seconds: float, units_per_second: float, n_raw: int,
                    durations: Sequence[int] | None = None) -> list[int]:
    """CTC frame indices -> indices into the record's units: raw frames at `units_per_second`, then through
    `durations` (run lengths of deduplicated units) when given."""
    raw = [min(max(0, math.floor(f * frame_seconds * units_per_second + 0.5)), n_raw) for f in frames]  # half up
    return raw_to_dedup(durations, raw) if durations is not None else raw


def record_rate(rec: dict, path: str | os.PathLike | None = None, line: int | None = None) -> float:
    """Units per second of a units record: its speech tokenizer identity, else its `tokenizer` name
    (records written before identities), else `num_frames / duration_s`."""
    ident = parse_identity(rec.get(IDENTITY_KEY), path)
    if ident is not None:
        return float(ident.units_per_second)
    name = str(rec.get("tokenizer", "")).split("+")[0]
    if name in S3_TOKENIZERS:
        return float(S3_TOKENIZERS[name][0])
    if rec.get("num_frames") and rec.get("duration_s"):
        return float(rec["num_frames"]) / float(rec["duration_s"])
    raise CslmError(path, line, IDENTITY_KEY, "no speech tokenizer identity, known 'tokenizer' or num_frames/"
                                              "duration_s: the units' rate is unknown, so frames cannot be mapped "
                                              "to unit indices")


def record_layout(rec: dict, path: str | os.PathLike | None = None, line: int | None = None
                  ) -> tuple[int, list[int] | None]:
    """(raw unit frames, run lengths or None) of a units record; checks `durations` against `units`."""
    units = rec.get("units")
    if not isinstance(units, list) or not units:
        raise CslmError(path, line, "units", "missing or empty")
    durations = rec.get("durations")
    if durations is None:
        return len(units), None
    if (not isinstance(durations, list) or len(durations) != len(units)
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in durations)):
        raise CslmError(path, line, "durations", f"must be {len(units)} positive ints, one per unit (the run "
                                                 "lengths --dedup writes)")
    return sum(durations), durations


class CtcAligner:
    """A local `Wav2Vec2ForCTC` directory (model + processor) that aligns transcripts to 16 kHz audio.

    Args:
        model_dir: `save_pretrained` folder holding config.json, the weights, vocab.json and the processor files.
        device: torch device of the acoustic model.
        max_frame_ratio: refuse (reason ``length_mismatch``) a record whose raw unit count is off from
            duration x rate by more than this fraction (and 2 units): its units are not of this audio.
    """

    def __init__(self, model_dir: str | os.PathLike, device: str | torch.device = "cpu",
                 max_frame_ratio: float = 0.1):
        from transformers import AutoProcessor, Wav2Vec2ForCTC

        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise CslmError(model_dir, None, "--ctc-model", "not a transformers model directory (no config.json)",
                            kind="usage", reason="usage")
        self.model = Wav2Vec2ForCTC.from_pretrained(model_dir).to(device).eval()
        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.vocab = CtcVocab.from_tokenizer(self.processor.tokenizer)
        top = max([self.vocab.blank, *self.vocab.labels.values()])
        if top >= self.model.config.vocab_size:
            raise CslmError.compat(f"the processor's vocabulary has label id {top}, the model's CTC head "
                                   f"{self.model.config.vocab_size} outputs", model_dir)
        rate = getattr(self.processor, "feature_extractor", self.processor).sampling_rate
        if rate != SAMPLE_RATE:
            raise CslmError.compat(f"the CTC model expects {rate} Hz audio; alignment feeds {SAMPLE_RATE} Hz",
                                   model_dir)
        self.frame_seconds = math.prod(self.model.config.conv_stride) / SAMPLE_RATE
        self.device, self.max_frame_ratio = device, max_frame_ratio
        self.name = model_dir.name

    @torch.inference_mode()
    def log_probs(self, wave: np.ndarray) -> torch.Tensor:
        """Per-frame log-probabilities (frames x labels) of 16 kHz mono audio."""
        inputs = self.processor(wave, sampling_rate=SAMPLE_RATE, return_tensors="pt")
        logits = self.model(inputs.input_values.to(self.device)).logits[0]
        return torch.log_softmax(logits.float(), dim=-1).cpu()

    def align(self, text: str, wave: np.ndarray, units_per_second: float, n_raw: int,
              durations: Sequence[int] | None = None) -> list[dict]:
        """`words` of `text` spoken in `wave`, in indices of the record's units (see the module docstring)."""
        words = transcript_words(text)
        if not words:
            raise _unaligned("no_words", "the transcript has no spoken word", "text")
        expected = wave.size / SAMPLE_RATE * units_per_second
        if abs(n_raw - expected) > max(2.0, self.max_frame_ratio * expected):
            raise _unaligned("length_mismatch", f"{n_raw} unit frames, but {wave.size / SAMPLE_RATE:.3f} s of audio "
                                                f"at {units_per_second:g} units/s is {expected:.1f}", "units")
        starts = word_start_frames(self.log_probs(wave), self.vocab, words)
        n_units = len(durations) if durations is not None else n_raw
        return tile_words(words, frames_to_units(starts, self.frame_seconds, units_per_second, n_raw, durations),
                          n_units)


def load_record_audio(rec: dict, audio_root: Path, limits: AudioLimits) -> np.ndarray:
    """The 16 kHz samples a units record was made from: its `audio` file (relative to `audio_root`), or the
    span `start_s` + `duration_s` of it for Lhotse cuts. AudioRejected (with its reason) when unusable."""
    path = Path(str(rec.get("audio", "")))
    path = path if path.is_absolute() else audio_root / path
    start, frames = 0, None
    if "start_s" in rec and "duration_s" in rec:
        rate = file_sample_rate(str(path))
        start, frames = round(float(rec["start_s"]) * rate), round(float(rec["duration_s"]) * rate)
    audio, rate = read_audio(path, limits, start, frames)
    return to_16k(audio, rate).numpy()
