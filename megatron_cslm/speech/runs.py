"""Runs of a repeated speech unit: the deduplicated units and each run's length in frames.

Why its own module: the unit extractor's writer (speech/sharded.py) stores durations next to the units and the
document builders (data/chunking.py) deduplicate units; both read this one definition, and speech/ may not
import data/ (tests/test_layering.py). Invariant: ``sum(durations) == len(units)`` and expanding each merged
unit by its duration gives the input back.
"""
from __future__ import annotations

from typing import Sequence


def unit_runs(units: Sequence[int]) -> tuple[list[int], list[int]]:
    """Merge runs of a repeated unit: (units, durations in frames), e.g. `1 1 2 2 2 3` -> `1 2 3`, `2 3 1`.
    The durations let a speech decoder restore the timing that deduplication removes."""
    out, durations = [], []
    for u in units:
        if out and out[-1] == u:
            durations[-1] += 1
        else:
            out.append(u)
            durations.append(1)
    return out, durations
