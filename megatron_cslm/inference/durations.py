"""Re-expanding deduplicated speech units to frame rate before synthesis.

Models trained on deduplicated units (`<12><12><12><7>` -> `<12><7>`) emit one id per run, but CosyVoice's
token-to-wav expects one unit per 20 ms frame (50 Hz). Without predicted durations the best available is a
duration per unit: a fixed number of frames, or each unit's mean run length measured on training data.
Fractional means are accumulated so the total length follows the sum of the means.
"""
from __future__ import annotations

import json
import math
import os
from typing import Sequence

from megatron_cslm.fileio import DataError


def expand_units(units: Sequence[int], durations: int | Sequence[float]) -> list[int]:
    """Repeat each unit by its duration in frames: an int for all units, or a per-unit table of means."""
    if isinstance(durations, int):
        if durations < 1:
            raise ValueError(f"a fixed unit duration must be >= 1 frame, got {durations}")
        return [u for u in units for _ in range(durations)]
    out: list[int] = []
    pos = 0.0
    for u in units:
        start, pos = pos, pos + durations[u]
        out += [u] * max(1, math.floor(pos + 0.5) - math.floor(start + 0.5))
    return out


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
