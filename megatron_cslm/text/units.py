"""Speech units as token ids: the one unit-list validator and the unit <-> id layout of a vocabulary.

Why one place: a unit id that is silently mapped to the wrong token trains the model on the wrong speech,
and nothing downstream can notice (every id is still below the vocabulary size). So every unit list the
project reads goes through `check_units`, and every unit <-> id conversion goes through a `UnitLayout`,
which is read from the tokenizer's own vocabulary (see `text.tokenizer`), never assumed.

Invariants of a `UnitLayout`: unit k has exactly one id `ids[k]`, the ids are distinct, and `unit_of_id`
inverts them (-1 for ids that are not units). When the ids are contiguous (`offset` is set) the mapping is
arithmetic; otherwise it is a table lookup. Both are vectorised numpy operations, equally fast in bulk.
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from megatron_cslm.errors import CslmError

# The canonical text form of unit k, "<k>" (no leading zeros), as the CSLM authors' data writes units.
UNIT_TOKEN = re.compile(r"<(0|[1-9][0-9]*)>")
# Any spelling of a unit number, e.g. "<012>": a second spelling of unit 12 makes a vocabulary ambiguous.
UNIT_LIKE = re.compile(r"<([0-9]+)>")


def unit_token(k: int) -> str:
    """The token string of unit k."""
    return f"<{k}>"


class UnitListError(CslmError):
    """A unit list that is not a non-empty flat list of integers in [0, num_units).

    `reason` ("wrong_type", "empty", "not_integer", "out_of_range") is the key under which tools count skipped records;
    callers turn it into their located error (file, line, field). A thin subclass of the project's one error type
    (errors.py), kept for its (reason, message) constructor.
    """

    def __init__(self, reason: str, message: str):
        super().__init__(None, None, None, message, reason=reason)


def _not_integer(units: Sequence, index: int) -> UnitListError:
    return UnitListError("not_integer", f"element {index} is {units[index]!r}, not an integer (unit ids are integers)")


def check_units(units: Sequence[int] | np.ndarray, num_units: int, allow_empty: bool = False,
                strict: bool = False) -> np.ndarray:
    """`units` as an integer array, or UnitListError naming the first bad element. Vectorised: cheap on the
    preprocessing hot path.

    `strict` also refuses JSON booleans inside an integer list (`[1, true]`), one Python check per element;
    without it a list of only booleans is refused and a mixed one is read as integers, as numpy reads it.
    """
    if not isinstance(units, (list, tuple, np.ndarray)):
        raise UnitListError("wrong_type", f"expected a list of integer unit ids, got {type(units).__name__}")
    if not len(units):
        if allow_empty:
            return np.zeros(0, dtype=np.int64)
        raise UnitListError("empty", "expected a non-empty list of unit ids")
    if strict and not isinstance(units, np.ndarray):
        bad = next((i for i, u in enumerate(units) if type(u) is not int), None)
        if bad is not None:
            raise _not_integer(units, bad)
    try:
        arr = np.asarray(units)
    except ValueError:  # ragged nesting
        arr = np.asarray(units, dtype=object)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        bad = next((i for i, u in enumerate(units) if not isinstance(u, (int, np.integer)) or isinstance(u, bool)),
                   0)
        raise _not_integer(units, bad)
    if arr.min() < 0 or arr.max() >= num_units:
        i = int(np.flatnonzero((arr < 0) | (arr >= num_units))[0])
        raise UnitListError("out_of_range", f"unit {int(arr[i])} out of range: element {i} is outside "
                                            f"[0, {num_units})")
    return arr


class UnitLayout:
    """Where the units of a vocabulary sit: `ids[k]` is the token id of unit k."""

    def __init__(self, ids: Sequence[int] | np.ndarray, vocab_size: int):
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 1 or not ids.size:
            raise ValueError("a unit layout needs at least one unit")
        if ids.min() < 0 or ids.max() >= vocab_size:
            raise ValueError(f"unit ids must lie in [0, {vocab_size}), got {int(ids.min())}..{int(ids.max())}")
        self.ids = ids
        self.vocab_size = vocab_size
        self.num_units = int(ids.size)
        first = int(ids[0])
        self.offset: int | None = first if np.array_equal(ids, np.arange(first, first + ids.size)) else None
        self.unit_of_id = np.full(vocab_size, -1, dtype=np.int64)
        self.unit_of_id[ids] = np.arange(ids.size)
        if np.count_nonzero(self.unit_of_id >= 0) != ids.size:
            raise ValueError("two units share a token id")
        self._id_list = ids.tolist()

    @classmethod
    def contiguous(cls, offset: int, num_units: int, vocab_size: int) -> "UnitLayout":
        return cls(np.arange(offset, offset + num_units), vocab_size)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UnitLayout) and self.vocab_size == other.vocab_size and \
            np.array_equal(self.ids, other.ids)

    def describe(self) -> str:
        if self.offset is not None:
            return f"{self.num_units} units at ids {self.offset}..{self.offset + self.num_units - 1}"
        return f"{self.num_units} units at non-contiguous ids ({int(self.ids.min())}..{int(self.ids.max())})"

    def id_of(self, unit: int) -> int:
        """Token id of one (already validated) unit."""
        return self._id_list[unit]

    def ids_of(self, units: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Token ids of validated units (see `check_units`): arithmetic when contiguous, else a table lookup."""
        if self.offset is not None:
            return np.add(units, self.offset, out=out, casting="unsafe")
        return np.take(self.ids, units, out=out)

    def unit_of(self, token_id: int) -> int:
        """Unit of a token id, -1 if it is not a unit (or outside the vocabulary)."""
        return int(self.unit_of_id[token_id]) if 0 <= token_id < self.vocab_size else -1

    def is_unit(self, token_id: int) -> bool:
        return self.unit_of(token_id) >= 0

    def mask(self, ids: np.ndarray) -> np.ndarray:
        """Boolean array: which of `ids` (all in [0, vocab_size)) are units."""
        return self.unit_of_id[ids] >= 0

    def token_mask(self, n: int, device=None):
        """torch bool tensor over `n` logits (n >= vocab_size, padding rows False) that is True at unit ids."""
        import torch

        mask = torch.zeros(n, dtype=torch.bool, device=device)
        mask[torch.as_tensor(self.ids, device=device)] = True
        return mask
