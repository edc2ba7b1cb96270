"""Duration predictor: how many tokenizer frames each deduplicated speech unit lasted.

Why: a model trained on deduplicated units (`<12><12><12><7>` -> `<12><7>`) emits one id per run, but CosyVoice's
flow-matching decoder expects one unit per tokenizer frame; a run's length depends on the unit, its neighbours
(coarticulation, pauses) and the speaker's rate. This is a small non-autoregressive model over unit embeddings
(unit embedding + speaker embedding -> a few 1-D convolutions over neighbouring units -> a distribution over
1..max_duration frames), trained by `cslm train-duration` on the `durations` that `tokenize-speech --dedup`
records (speech/runs.py). A class distribution, not a regression, because a run length is a small integer and
two point estimates are needed: its median (least absolute error per unit) and its mean (an unbiased total length,
what expansion accumulates so the utterance has the right length).

Checkpoint format (a directory, small and self-describing):
- ``duration_config.json``: `DurationConfig` (unit count, speakers, layer sizes), the speech tokenizer identity of
  the training units (megatron_cslm/speech/identity.py, or null for legacy/synthetic data), the training step and
  the held-out metrics;
- ``duration_model.safetensors``: the weights;
- ``duration_train_state.pt``: optimizer, step and RNG states, only while/after training (resume).

Invariants: predicted durations are >= 1 frame; unit ids are checked against `num_units` before lookup; speaker
index 0 is "unknown speaker" (trained on a share of utterances with the speaker hidden), so an unseen or missing
speaker still gets a sensible prediction.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from megatron_cslm.errors import CslmError
from megatron_cslm.fileio import atomic_path, write_json
from megatron_cslm.speech.identity import SpeechTokenizerId, parse_identity

log = logging.getLogger(__name__)

CONFIG_NAME = "duration_config.json"
WEIGHTS_NAME = "duration_model.safetensors"
FORMAT = "cslm-duration-predictor/1"
UNKNOWN_SPEAKER = 0


@dataclass
class DurationConfig:
    """Sizes of the predictor and what it was trained on (stored in duration_config.json)."""

    num_units: int
    max_duration: int = 32  # classes 1..max_duration frames; longer runs are counted as max_duration
    dim: int = 64
    kernel_size: int = 3  # each layer sees (kernel_size - 1) / 2 neighbours on each side
    num_layers: int = 3
    speakers: list[str] = field(default_factory=list)  # index i + 1; 0 = unknown speaker
    speech_tokenizer: dict | None = None  # SpeechTokenizerId.to_dict() of the training units, None if unknown

    def identity(self) -> SpeechTokenizerId | None:
        return parse_identity(self.speech_tokenizer, CONFIG_NAME)

    def speaker_index(self, speaker: str | None) -> int:
        try:
            return self.speakers.index(speaker) + 1 if speaker is not None else UNKNOWN_SPEAKER
        except ValueError:
            return UNKNOWN_SPEAKER


class DurationPredictor(nn.Module):
    """units [B, T] (+ speaker [B]) -> logits [B, T, max_duration] over durations 1..max_duration frames."""

    def __init__(self, config: DurationConfig):
        super().__init__()
        self.config = config
        d = config.dim
        self.unit_embedding = nn.Embedding(config.num_units, d)
        self.speaker_embedding = nn.Embedding(len(config.speakers) + 1, d)
        self.convs = nn.ModuleList(nn.Conv1d(d, d, config.kernel_size, padding=config.kernel_size // 2)
                                   for _ in range(config.num_layers))
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(config.num_layers))
        self.head = nn.Linear(d, config.max_duration)

    def forward(self, units: torch.Tensor, speaker: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        keep = torch.ones_like(units, dtype=torch.float32) if mask is None else mask.float()
        h = (self.unit_embedding(units) + self.speaker_embedding(speaker)[:, None, :]) * keep[..., None]
        for conv, norm in zip(self.convs, self.norms):
            # padding positions stay zero, so a sequence's predictions do not depend on its batch's padding
            h = (h + torch.relu(conv(h.transpose(1, 2))).transpose(1, 2)) * keep[..., None]
            h = norm(h) * keep[..., None]
        return self.head(h)

    @torch.no_grad()
    def predict(self, units: Sequence[int], speaker: str | None = None) -> tuple[list[int], list[float]]:
        """(median, mean) duration in frames of each unit of one utterance; both >= 1."""
        if not len(units):
            return [], []
        check_units(units, self.config.num_units)
        device = self.head.weight.device
        x = torch.tensor([list(units)], dtype=torch.long, device=device)
        spk = torch.tensor([self.config.speaker_index(speaker)], device=device)
        probs = torch.softmax(self.forward(x, spk)[0].float(), dim=-1)
        return medians(probs).tolist(), means(probs).tolist()


def medians(probs: torch.Tensor) -> torch.Tensor:
    """The median duration (frames, >= 1) of each row of a [..., max_duration] distribution over 1..max."""
    return (torch.cumsum(probs, dim=-1) < 0.5).sum(dim=-1).clamp(max=probs.shape[-1] - 1) + 1


def means(probs: torch.Tensor) -> torch.Tensor:
    return probs @ torch.arange(1, probs.shape[-1] + 1, dtype=probs.dtype, device=probs.device)


def integer_durations(durations: Sequence[float]) -> list[int]:
    """Whole frames per unit (>= 1) whose running total follows the running total of fractional `durations`,
    so an utterance keeps the length the means add up to instead of one rounding error per unit."""
    out, pos = [], 0.0
    for d in durations:
        start, pos = pos, pos + d
        out.append(max(1, math.floor(pos + 0.5) - math.floor(start + 0.5)))
    return out


def check_units(units: Sequence[int], num_units: int, where: str | os.PathLike | None = None,
                line: int | None = None) -> None:
    bad = next((u for u in units if not 0 <= u < num_units), None)
    if bad is not None:
        raise CslmError(where, line, "units", f"unit {bad} is outside the duration predictor's {num_units} units",
                        kind="compat" if where is None else "data")


def save_predictor(out_dir: str | os.PathLike, model: DurationPredictor, extra: dict | None = None) -> None:
    """Write the weights and the JSON config (atomically; the config last, so a present config means complete)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / WEIGHTS_NAME) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp),
                  metadata={"format": FORMAT})
    write_json(out_dir / CONFIG_NAME, {"format": FORMAT, "config": asdict(model.config), **(extra or {})})


def read_config(path: str | os.PathLike) -> tuple[DurationConfig, dict]:
    """The config of a duration predictor directory, and the rest of its JSON (step, metrics)."""
    path = Path(path)
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise CslmError(path, None, None, f"no {CONFIG_NAME}: not a duration predictor directory (train one with "
                        "`cslm train-duration`)", kind="checkpoint", reason="missing")
    try:
        data = json.loads(cfg_path.read_text(encoding="utf-8"))
        if data.get("format") != FORMAT:
            raise CslmError(cfg_path, None, "format", f"expected {FORMAT!r}, got {data.get('format')!r}",
                            kind="checkpoint")
        config = DurationConfig(**data["config"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CslmError(cfg_path, None, "config", f"unreadable duration predictor config ({e})",
                        kind="checkpoint") from None
    config.identity()  # validates the stored identity
    return config, {k: v for k, v in data.items() if k not in ("format", "config")}


def load_predictor(path: str | os.PathLike, device: str | torch.device = "cpu") -> DurationPredictor:
    """A trained predictor from its directory, in eval mode."""
    from safetensors.torch import load_file

    config, _ = read_config(path)
    weights = Path(path) / WEIGHTS_NAME
    if not weights.is_file():
        raise CslmError(weights, None, None, "missing: the duration predictor's weights", kind="checkpoint",
                        reason="missing")
    model = DurationPredictor(config)
    try:
        model.load_state_dict(load_file(str(weights)))
    except (RuntimeError, OSError) as e:
        raise CslmError(weights, None, None, f"does not fit {CONFIG_NAME} ({str(e).splitlines()[0]})",
                        kind="checkpoint") from None
    return model.to(device).eval()


__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "DurationConfig", "DurationPredictor", "check_units", "integer_durations",
           "load_predictor", "means", "medians", "read_config", "save_predictor"]
