"""Re-expanding deduplicated speech units to frame rate before synthesis.

Models trained on deduplicated units (`<12><12><12><7>` -> `<12><7>`) emit one id per run, but CosyVoice's
token-to-wav expects one unit per tokenizer frame (50 or 25 Hz). Three sources of durations, best last: a fixed
number of frames, each unit's mean run length measured on training data (a table), or the duration predictor
(speech/duration_model.py, `cslm train-duration`), which looks at the neighbouring units and the speaker.
Fractional durations are accumulated (`integer_durations`) so the total length follows the sum of the means.
"""
from __future__ import annotations

import json
import math
import os
from typing import Sequence

from megatron_cslm.fileio import DataError
from megatron_cslm.speech.duration_model import DurationPredictor, integer_durations
from megatron_cslm.speech.identity import SpeechTokenizerId, check_same


def expand_units(units: Sequence[int], durations: int | Sequence[float] | DurationPredictor) -> list[int]:
    """Repeat each unit by its duration in frames: an int for all units, a per-unit table of means, or a trained
    duration predictor (no speaker: its unknown-speaker embedding; see `predicted_durations`)."""
    return repeat_units(units, unit_durations(units, durations))


def unit_durations(units: Sequence[int], durations: int | Sequence[float] | DurationPredictor,
                   speaker: str | None = None, rounding: str = "mean") -> list[int]:
    """Whole frames for each unit from a fixed duration, a table of means or a predictor."""
    if isinstance(durations, DurationPredictor):
        return predicted_durations(units, durations, speaker, rounding)
    if isinstance(durations, int):
        if durations < 1:
            raise ValueError(f"a fixed unit duration must be >= 1 frame, got {durations}")
        return [durations] * len(units)
    return integer_durations([durations[u] for u in units])


def predicted_durations(units: Sequence[int], predictor: DurationPredictor, speaker: str | None = None,
                        rounding: str = "mean") -> list[int]:
    """The predictor's durations: ``mean`` accumulates expected values (right total length, for synthesis),
    ``median`` takes each unit's most central length (least per-unit error)."""
    median, mean = predictor.predict(units, speaker)
    if rounding == "median":
        return median
    if rounding != "mean":
        raise ValueError(f"rounding must be 'mean' or 'median', got {rounding!r}")
    return integer_durations(mean)


def repeat_units(units: Sequence[int], durations: Sequence[int]) -> list[int]:
    """The frame-rate stream: each unit repeated by its duration (the inverse of speech/runs.unit_runs)."""
    if len(units) != len(durations):
        raise ValueError(f"{len(units)} units but {len(durations)} durations")
    return [u for u, d in zip(units, durations) for _ in range(d)]


def check_predictor(predictor: DurationPredictor, num_units: int, identity: SpeechTokenizerId | None,
                    where: str, predictor_path: str | os.PathLike | None = None) -> None:
    """Refuse a predictor trained on another codebook than the units it will expand (both values named)."""
    if predictor.config.num_units != num_units:
        raise DataError(predictor_path, None, "num_units", f"the duration predictor has {predictor.config.num_units} "
                        f"units but {where} has {num_units}", kind="compat", reason="incompatible")
    check_same(predictor.config.identity(), f"the duration predictor {predictor_path or ''}".strip(), identity, where,
               predictor_path)


def load_duration_table(path: str | os.PathLike, num_units: int) -> list[float]:
    """Read mean frames per unit: a JSON list of `num_units` numbers or an object {"unit": frames}.

    Units missing from an object default to 1 frame (never seen deduplicated runs longer than themselves).
    """
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(path, e.lineno, None, f"malformed JSON: {e.msg}") from e
    if isinstance(data, list):
        if len(data) != num_units:
            raise DataError(path, None, None, f"expected {num_units} durations, got {len(data)}")
        items = list(enumerate(data))
    elif isinstance(data, dict):
        items = []
        for key, value in data.items():
            if not key.isdigit() or int(key) >= num_units:
                raise DataError(path, None, key, f"not a unit index in [0, {num_units})")
            items.append((int(key), value))
    else:
        raise DataError(path, None, None, "expected a JSON list or object of durations")
    table = [1.0] * num_units
    for unit, value in items:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise DataError(path, None, str(unit), f"duration must be a positive number of frames, got {value!r}")
        table[unit] = float(value)
    return table
