"""The CosyVoice S3 speech tokenizers (v1 50/s and v1_25hz 25/s: 4,096 codes; v2_25hz: 6,561), batched by length.

Every extractor has an `identity` (speech/identity.py: name, rate, codes, weights digest or random-init seed) that
the units it writes carry, so later joins can refuse units of another codebook.

Waveforms are 16 kHz mono. A batch holds as many length-sorted waveforms as fit a padded-frame budget
(`batch_seconds`), which is where the speed comes from: batch 1 leaves the matrix units idle on short clips.
Audio longer than the model's 30 s context is tokenized in overlapping windows cut at the overlap midpoints, so
the unit count always equals that of the unwindowed rate (50 or 25 units/s). Units do not depend on how items are
grouped into batches (padding is masked), so sharded runs reproduce a single-process run exactly.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Iterator, Sequence

import torch

from megatron_cslm.speech.identity import (
    DEFAULT_S3_TOKENIZER,
    S3_TOKENIZERS,
    SpeechTokenizerId,
    random_init_tag,
    weights_digest,
)

log = logging.getLogger(__name__)

HOP = 160  # mel hop in samples: 100 mel frames per second
MAX_WINDOW_FRAMES = 3000  # 30 s: the S3 encoder's positional context
UNITS_PER_SECOND = {name: rate for name, (rate, _) in S3_TOKENIZERS.items()}
MAX_PAD_RATIO = 1.1  # longest / shortest item in a batch: at most ~10% of a batch's frames are padding
AUTOCAST_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def load_s3_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """S3 weights from the released ONNX file, a converted torch state dict or safetensors."""
    path = str(path)
    if path.endswith(".onnx"):
        from s3tokenizer.utils import onnx2torch

        return onnx2torch(path, None, False)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def s3_codebook_size(model: str) -> int:
    """Codes of the S3 tokenizer `model`, from the architecture config its net is built from: known before the
    ~120M-parameter net is built or its weights read, so a model with another unit count is refused at once."""
    if model not in UNITS_PER_SECOND:
        raise ValueError(f"unknown S3 tokenizer {model!r}; choose from {sorted(UNITS_PER_SECOND)}")
    return _config(model).n_codebook_size


def _config(model: str):
    """s3tokenizer's architecture config of `model` (v2 nets have their own module and 3**8 FSQ codes)."""
    if "v2" in model:
        from s3tokenizer.model_v2 import ModelConfig

        return ModelConfig(use_sdpa=True, n_codebook_size=3 ** 8)
    from s3tokenizer.model import ModelConfig

    return ModelConfig(use_sdpa=True)


def _build_net(model: str) -> torch.nn.Module:
    if "v2" in model:
        from s3tokenizer.model_v2 import S3TokenizerV2

        return S3TokenizerV2(model, _config(model))
    from s3tokenizer.model import S3Tokenizer

    return S3Tokenizer(model, _config(model))


class UnitExtractor:
    """Batched S3 tokenizer on CPU or GPU.

    Args:
        model: "speech_tokenizer_v1" (50 units/s), "speech_tokenizer_v1_25hz" (25 units/s, the default, as the
            paper) or "speech_tokenizer_v2_25hz" (CosyVoice 2: 25 units/s, 6,561 codes).
        weights: ONNX / .pt / .safetensors weights; None requires `random_init` (tests and debugging only).
        batch_seconds: padded audio seconds per forward pass (bounds memory).
        window_frames, overlap_frames: long-audio windows in 10 ms mel frames (30 s / 4 s).
        precision: "fp32", or "fp16"/"bf16" autocast of the encoder (GPU only; units may then differ from fp32's
            in a few frames, so the label records it and resume refuses to mix).
    """

    def __init__(self, model: str = DEFAULT_S3_TOKENIZER, weights: str | os.PathLike | None = None,
                 random_init: bool = False, device: str | torch.device = "cpu", batch_seconds: float = 300.0,
                 window_frames: int = MAX_WINDOW_FRAMES, overlap_frames: int = 400, seed: int = 0,
                 precision: str = "fp32"):
        if model not in UNITS_PER_SECOND:
            raise ValueError(f"unknown S3 tokenizer {model!r}; choose from {sorted(UNITS_PER_SECOND)}")
        if (weights is None) == (not random_init):
            raise ValueError("pass exactly one of weights=<file> or random_init=True")
        self.frames_per_unit = 100 // UNITS_PER_SECOND[model]
        if not (0 <= overlap_frames < window_frames <= MAX_WINDOW_FRAMES) or window_frames % self.frames_per_unit \
                or overlap_frames % self.frames_per_unit:
            raise ValueError(f"need 0 <= overlap < window <= {MAX_WINDOW_FRAMES} frames, window a multiple of "
                             f"{self.frames_per_unit}, overlap too")
        self.name = model
        self.units_per_second = UNITS_PER_SECOND[model]
        self.device = torch.device(device)
        self.batch_frames = int(batch_seconds * 100)
        self.window, self.overlap = window_frames, overlap_frames
        torch.manual_seed(seed)
        net = _build_net(model)
        if random_init:
            log.warning("%s is RANDOMLY INITIALISED: its units are meaningless (tests/debugging only)", model)
            embed = getattr(net.quantizer._codebook, "embed", None)
            if embed is not None:  # v1's vector quantizer (v2's FSQ has no codebook to fill)
                # Unit-norm codes: the quantizer compares normalised features by Euclidean distance, so random
                # codes of unequal norm would all lose to the shortest one and every frame would get one unit.
                embed.copy_(torch.nn.functional.normalize(torch.randn_like(embed), dim=-1))
            self.label = f"{model}+random-init"
            weights_id = random_init_tag(seed)
        else:
            net.load_state_dict(load_s3_state_dict(weights), strict=True)
            self.label = model
            weights_id = weights_digest(weights)
        self.identity = SpeechTokenizerId.s3(model, weights_id)
        if precision not in AUTOCAST_DTYPES:
            raise ValueError(f"precision {precision!r}: choose from {sorted(AUTOCAST_DTYPES)}")
        if precision != "fp32":
            if self.device.type != "cuda":
                raise ValueError(f"--precision {precision} is an autocast for GPUs; on {self.device} use fp32")
            self.label += f"+{precision}"
        self.autocast_dtype = AUTOCAST_DTYPES[precision]
        self.net = net.to(self.device).eval()

    def num_units(self, num_samples: int) -> int:
        """Units for `num_samples` of 16 kHz audio (the encoder's conv arithmetic)."""
        return math.ceil((num_samples // HOP) / self.frames_per_unit)

    def _windows(self, frames: int) -> list[tuple[int, int, int, int]]:
        """(start, end) mel frames of each window and the [keep_from, keep_to) unit range it contributes."""
        if frames <= self.window:
            return [(0, frames, 0, math.ceil(frames / self.frames_per_unit))]
        fpu, hop = self.frames_per_unit, self.window - self.overlap
        n = math.ceil((frames - self.window) / hop) + 1
        starts = [i * hop for i in range(n - 1)] + [math.ceil((frames - self.window) / fpu) * fpu]
        ends = [min(s + self.window, frames) for s in starts]
        # Cut each overlap at its midpoint (a unit boundary), so every unit comes from the window where it
        # has the most context on both sides.
        cuts = [0] + [(starts[i + 1] + ends[i]) // (2 * fpu) for i in range(n - 1)] + [math.ceil(frames / fpu)]
        return [(s, e, cuts[i], cuts[i + 1]) for i, (s, e) in enumerate(zip(starts, ends))]

    @torch.inference_mode()
    def __call__(self, waves: Sequence[torch.Tensor]) -> list[list[int]]:
        """Units of each 16 kHz mono waveform."""
        from s3tokenizer.utils import log_mel_spectrogram

        pieces = []  # (item, mel window, keep range in window-local units)
        for item, wave in enumerate(waves):
            mel = log_mel_spectrogram(wave.to(self.device, torch.float32), n_mels=128)
            for start, end, keep_from, keep_to in self._windows(mel.shape[1]):
                offset = start // self.frames_per_unit
                pieces.append((item, mel[:, start:end], keep_from - offset, keep_to - offset))
        codes: list[torch.Tensor | None] = [None] * len(pieces)
        order = sorted(range(len(pieces)), key=lambda i: pieces[i][1].shape[1])
        for batch in self._batches([pieces[i][1].shape[1] for i in order]):
            idx = [order[b] for b in batch]
            mels = [pieces[i][1] for i in idx]
            lengths = torch.tensor([m.shape[1] for m in mels], device=self.device)
            padded = torch.nn.utils.rnn.pad_sequence([m.t() for m in mels], batch_first=True).transpose(1, 2)
            with self._autocast():
                batch_codes, batch_lens = self.net.quantize(padded, lengths)
            for row, i in enumerate(idx):
                codes[i] = batch_codes[row, :batch_lens[row]].cpu()
        out: list[list[int]] = [[] for _ in waves]
        for (item, _, keep_from, keep_to), piece_codes in zip(pieces, codes):  # an item's pieces are in time order
            out[item] += piece_codes[keep_from:keep_to].tolist()
        return out

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _batches(self, sorted_lengths: list[int]) -> Iterator[list[int]]:
        """Positions into `sorted_lengths` grouped so that padded frames per batch stay within budget.

        A batch also ends where the next item is over MAX_PAD_RATIO times its shortest: padding costs as much
        as audio (attention quadratically), so a few mixed lengths would make a batch slower than batch 1.
        """
        batch: list[int] = []
        for pos, length in enumerate(sorted_lengths):
            if batch and (length * (len(batch) + 1) > self.batch_frames
                          or length > MAX_PAD_RATIO * sorted_lengths[batch[0]]):
                yield batch
                batch = []
            batch.append(pos)
        if batch:
            yield batch
