"""Quiet CPU runs: the one place that hides the fallback noise of torch, gloo and megatron-core.

Why: on a CPU-only machine every process prints the same harmless lines - megatron-core's four
"Transformer Engine and Apex are not installed" warnings (`warnings.warn` at import), torch's
"No CUDA runtime is found" (the `torch.utils.cpp_extension` logger, at import) and gloo's
"[Gloo] Rank r is connected to n peer ranks" for every process group (written by C++ straight to the stdout
file descriptor, not through c10 logging, so TORCH_CPP_LOG_LEVEL / GLOG_minloglevel do not reach it).
A two-process quickstart printed dozens of such lines around the ones that matter. A few other warnings
that no user can act on (megatron-core's and torch's internal deprecations, CUDA hints in CPU mode) are
listed below with where they come from.

How: `apply()` runs when the package is imported (megatron_cslm/__init__.py), before megatron-core or
torch.utils.cpp_extension is imported, and installs message-specific filters (nothing else is hidden);
`gloo_connection_lines_hidden()` wraps process-group creation (distributed/parallel.py) and drops exactly
the "connected to n peer ranks ... is : n" lines where n matches; a line that reports missing peers
("is NOT connected to") is passed through.

Invariants: this module imports neither torch nor megatron; `--verbose` on the entry points and tools, or
CSLM_VERBOSE=1 in the environment (inherited by torchrun's workers), turns every filter off.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import sys
import tempfile
import warnings
from typing import Iterator

VERBOSE_ENV = "CSLM_VERBOSE"

# megatron-core 0.16: core/optimizer/__init__.py, optimizer.py, clip_grads.py, fsdp mixed_precision.py; and
# TransformerConfig's deprecation of its own default cuda_graph_scope="full" (every config, GPU or not).
# Also torch's deprecations inside megatron-core's dist_checkpointing (not actionable by our users).
FALLBACK_WARNINGS = (r"Transformer Engine and Apex are not installed",
                     r"Apex is not installed", r"Transformer Engine is not installed",
                     r"full scope is deprecated",
                     r"`load_state_dict` is deprecated and will be removed",
                     r"Please use DTensor instead and we are deprecating ShardedTensor",
                     r"torch.distributed is disabled, unavailable or uninitialized, assuming the intent is to load")
# Only in CPU mode (installed by cpu_mode.enable): a CUDA tuning hint, and the non-leaf `.grad` read that
# megatron-core's DDP does through the CPU redirection of distributed/cpu_mode.py.
CPU_MODE_WARNINGS = (r"When using async grad allreduce it is recommended to set the environment variable "
                     r"CUDA_DEVICE_MAX_CONNECTIONS",
                     r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed")
CPP_EXTENSION_LOGGER = "torch.utils.cpp_extension"  # "No CUDA runtime is found, using CUDA_HOME=..."
GLOO_CONNECTED = re.compile(
    r"^\[Gloo\] Rank \d+ is connected to (\d+) peer ranks\. Expected number of connected peer ranks is : (\d+)\s*$")


def verbose() -> bool:
    """True when the user asked to see everything (CSLM_VERBOSE set to anything but '', '0', 'false')."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def set_verbose(on: bool) -> None:
    """Record `--verbose` in the environment, so torchrun workers and subprocesses inherit it, and undo or
    re-apply the filters of this process."""
    if on:
        os.environ[VERBOSE_ENV] = "1"
        warnings.filters[:] = [f for f in warnings.filters if not _is_ours(f)]
        logging.getLogger(CPP_EXTENSION_LOGGER).setLevel(logging.NOTSET)
    else:
        os.environ.pop(VERBOSE_ENV, None)
        apply()


def _is_ours(f: tuple) -> bool:
    message = f[1]
    return f[0] == "ignore" and message is not None and message.pattern in FALLBACK_WARNINGS + CPU_MODE_WARNINGS


def _ignore(messages: tuple[str, ...]) -> None:
    for message in messages:
        if not any(_is_ours(f) and f[1].pattern == message for f in warnings.filters):
            warnings.filterwarnings("ignore", message=message)  # any category: the message is specific


def apply() -> None:
    """Install the filters unless verbose. Idempotent; cheap (no imports)."""
    if verbose():
        return
    _ignore(FALLBACK_WARNINGS)
    logging.getLogger(CPP_EXTENSION_LOGGER).setLevel(logging.ERROR)


def apply_cpu_mode() -> None:
    """The CPU-mode-only filters (see CPU_MODE_WARNINGS) unless verbose."""
    if not verbose():
        _ignore(CPU_MODE_WARNINGS)


def is_gloo_connection_line(line: str) -> bool:
    """A '[Gloo] Rank r is connected to n peer ranks' line with every expected peer connected."""
    m = GLOO_CONNECTED.match(line)
    return bool(m) and m.group(1) == m.group(2)


def _flush_c_stdout() -> None:
    sys.stdout.flush()
    try:
        ctypes.CDLL(None).fflush(None)  # C/C++ buffers (std::cout syncs with stdio)
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def gloo_connection_lines_hidden() -> Iterator[None]:
    """Run the block with the stdout file descriptor captured; replay everything but gloo's connection lines.

    Wrap only short setup calls (process-group creation): their other output arrives after the block ends.
    """
    if verbose():
        yield
        return
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):  # stdout replaced by an object without a descriptor
        yield
        return
    _flush_c_stdout()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), fd)
        try:
            yield
        finally:
            _flush_c_stdout()
            os.dup2(saved, fd)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode("utf-8", errors="replace")
            kept = "".join(line for line in text.splitlines(keepends=True) if not is_gloo_connection_line(line))
            if kept:
                sys.stdout.write(kept)
                sys.stdout.flush()
