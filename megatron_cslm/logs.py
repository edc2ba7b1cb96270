"""Logging for the whole package: one format, rank-aware levels, set up once by whoever owns the process.

Why: under torchrun every rank runs the same code, so an INFO line from each rank is multiplied by the world
size, and a warning from rank 3 must still say it came from rank 3. Library modules therefore only do
``log = logging.getLogger(__name__)`` (every name is under ``megatron_cslm``) and never print; the process's
entry point (a tool through `cli.run_tool`, `python -m megatron_cslm.pretrain|sft`) calls
`configure_logging(verbose)` once.

Invariants:
- format ``[megatron_cslm rank R] LEVEL message`` (``rank`` omitted outside a distributed launch);
- rank 0 logs INFO and above, other ranks WARNING and above; `verbose` makes every rank log DEBUG and
  turns off the noise filters of `distributed/quiet.py` (also in torchrun's workers, via CSLM_VERBOSE);
- records go to the *current* ``sys.stderr`` (looked up at each record, so pytest's capture and redirection
  after set-up see them); stdout stays for a tool's results;
- calling `configure_logging` again replaces the handler instead of adding a second one;
- records still propagate to the root logger (which has no handler unless an application or pytest's
  `caplog` adds one), so embedding code can collect them.
"""
from __future__ import annotations

import logging
import os
import sys

from megatron_cslm.distributed import quiet

PACKAGE_LOGGER = "megatron_cslm"


def process_rank() -> int | None:
    """This process's global rank from the launcher's environment (torchrun, SLURM), None if not launched."""
    for var in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(var)
        if value is not None and value.strip().isdigit():
            return int(value)
    return None


class _CurrentStderrHandler(logging.StreamHandler):
    """A StreamHandler on whatever sys.stderr is when a record is emitted."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it; the property ignores it
        pass


def log_format(rank: int | None) -> str:
    where = f"megatron_cslm rank {rank}" if rank is not None else "megatron_cslm"
    return f"[{where}] %(levelname)s %(message)s"


def configure_logging(verbose: bool = False) -> logging.Logger:
    """Set up the package logger for this process (see the module docstring) and return it.

    `verbose` also stays on when CSLM_VERBOSE is already set (a worker of a `--verbose` launch).
    """
    verbose = verbose or quiet.verbose()
    quiet.set_verbose(verbose)
    rank = process_rank()
    logger = logging.getLogger(PACKAGE_LOGGER)
    for handler in [h for h in logger.handlers if isinstance(h, _CurrentStderrHandler)]:
        logger.removeHandler(handler)
    handler = _CurrentStderrHandler()
    handler.setFormatter(logging.Formatter(log_format(rank)))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO if (rank or 0) == 0 else logging.WARNING)
    return logger
