"""Issue 12: rank-aware logging, and CPU runs quiet by default (gloo, CUDA, TE/Apex noise) unless --verbose."""
from __future__ import annotations

import io
import logging
import subprocess
import sys

import pytest

from megatron_cslm.distributed import quiet
from megatron_cslm.distributed.quiet import is_gloo_connection_line
from megatron_cslm.logs import configure_logging
from tests.helpers.launch import NOISE, ROOT, worker_env

# The package's real start-up on CPU: megatron-core's optimizer import, parallel state on gloo, our own log.
PROCESS = """
import logging, sys
from megatron_cslm.cli import run_tool
from megatron_cslm.distributed import parallel

def main(argv):
    import megatron.core.optimizer  # noqa: F401  (the TE/Apex fallback warnings come from here)
    parallel.initialize(parallel.ParallelConfig(), device="cpu")
    print("RESULT on stdout", flush=True)
    logging.getLogger("megatron_cslm.test").info("started")
    logging.getLogger("megatron_cslm.test").debug("details")
    parallel.destroy()

raise SystemExit(run_tool(main, sys.argv[1:]))
"""


def run_process(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROCESS, *argv], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env=worker_env({"MASTER_PORT": "29617", **(env or {})}))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_cpu_process_is_quiet_by_default_and_verbose_shows_everything():
    quiet = run_process()
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert quiet.stdout == "RESULT on stdout\n"
    assert quiet.stderr.strip().splitlines() == ["[megatron_cslm] INFO started"]  # no launcher: no rank

    loud = run_process("--verbose")  # (CSLM_VERBOSE=1, what workers inherit, is the same switch: see below)
    assert loud.returncode == 0, loud.stderr[-3000:]
    both = loud.stdout + loud.stderr
    for line in NOISE:
        assert line in both, line
    assert "RESULT on stdout" in loud.stdout and "INFO started" in loud.stderr and "DEBUG details" in loud.stderr


def test_only_complete_gloo_connection_lines_are_hidden():
    assert is_gloo_connection_line("[Gloo] Rank 3 is connected to 7 peer ranks. Expected number of connected peer "
                                   "ranks is : 7\n")
    # A rank that misses peers is a problem worth seeing.
    assert not is_gloo_connection_line("[Gloo] Rank 3 is connected to 5 peer ranks. Expected number of connected "
                                       "peer ranks is : 7\n")
    assert not is_gloo_connection_line("[Gloo] Rank 3 is NOT connected to: [4, 5]")
    assert not is_gloo_connection_line("iteration 10 | lm loss 1.0")


@pytest.mark.parametrize("rank, verbose, shown", [
    ("1", "env", ["[megatron_cslm rank 1] DEBUG debug", "[megatron_cslm rank 1] INFO info",
                  "[megatron_cslm rank 1] WARNING warning"]),  # a worker of a --verbose launch
    (None, False, ["[megatron_cslm] INFO info", "[megatron_cslm] WARNING warning"]),
    ("0", False, ["[megatron_cslm rank 0] INFO info", "[megatron_cslm rank 0] WARNING warning"]),
    ("3", False, ["[megatron_cslm rank 3] WARNING warning"]),  # other ranks: warnings and errors only
    ("3", True, ["[megatron_cslm rank 3] DEBUG debug", "[megatron_cslm rank 3] INFO info",
                 "[megatron_cslm rank 3] WARNING warning"]),
])
def test_rank_aware_format_and_levels(monkeypatch, rank, verbose, shown):
    for var in ("RANK", "SLURM_PROCID", "CSLM_VERBOSE"):
        monkeypatch.delenv(var, raising=False)
    if rank is not None:
        monkeypatch.setenv("RANK", rank)
    if verbose == "env":
        monkeypatch.setenv("CSLM_VERBOSE", "1")
        verbose = False
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)  # the handler writes to the stderr of the moment
    logger = logging.getLogger("megatron_cslm")
    level, handlers = logger.level, list(logger.handlers)
    try:
        configure_logging(verbose)
        configure_logging(verbose)  # again: still one handler
        log = logging.getLogger("megatron_cslm.some.module")
        log.debug("debug")
        log.info("info")
        log.warning("warning")
    finally:
        logger.handlers[:] = handlers
        logger.setLevel(level)
        quiet.set_verbose(False)
    assert stderr.getvalue().splitlines() == shown
