"""What a run costs, per phase: timers, torch.profiler traces of chosen steps, memory, manual GC.

Why: tuning a cluster job needs to know where a step's time goes (data, forward-backward, optimizer,
checkpoint), a trace of a few chosen steps on a few chosen ranks (tracing every step of every rank would
cost more than the job), the peak memory, and Python's garbage collector out of the step (at scale one
rank's GC pause stalls every rank at the next collective: Megatron-LM's `--manual-gc`).

Invariants:
- Phase times are wall seconds of this rank, summed over the log interval and reported per step; the data
  time is measured inside the schedule (the iterator is pulled there) and is *subtracted* from
  forward-backward, so the phases add up to the step.
- `--profile` traces exactly iterations [--profile-step-start, --profile-step-end] (1-based optimizer
  steps, both included) on the ranks in --profile-ranks; each traced step is a `iteration N` range in the
  trace. Traces are Chrome-trace JSON files (`*.pt.trace.json`): TensorBoard's profiler plugin reads the
  directory, Perfetto (ui.perfetto.dev) opens a file.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import resource
import time
from collections import defaultdict
from pathlib import Path
from typing import Iterator

import torch

from megatron_cslm.errors import CslmError
from megatron_cslm.plan.gpus import gpu_of_device_name

logger = logging.getLogger(__name__)

PHASES = ("data", "forward-backward", "optimizer", "checkpoint")


class PhaseTimers:
    """Wall-clock seconds per phase, accumulated until `take()`."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] += seconds

    def take(self) -> dict[str, float]:
        """The accumulated seconds per phase (every one of PHASES, 0 when it did not run; forward-backward net
        of data time); resets."""
        out = {name: 0.0 for name in PHASES} | dict(self.seconds)
        if "forward-backward" in out:
            out["forward-backward"] = max(out["forward-backward"] - out.get("data", 0.0), 0.0)
        self.seconds = defaultdict(float)
        return out


class TimedIterator:
    """Wraps a data iterator: time spent in `next()` goes to the `data` phase."""

    def __init__(self, iterator: Iterator, timers: PhaseTimers):
        self.iterator, self.timers = iterator, timers

    def __iter__(self):
        return self

    def __next__(self):
        with self.timers.phase("data"):
            return next(self.iterator)


def memory_stats() -> dict[str, float]:
    """Peak GPU memory (GiB) when on CUDA, else this process's peak and current resident set (GiB)."""
    if torch.cuda.is_available():
        return {"memory/max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                "memory/max_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with open("/proc/self/statm") as f:
        rss_pages = int(f.read().split()[1])
    return {"memory/peak_rss_gib": peak_kib / 2**20, "memory/rss_gib": rss_pages * os.sysconf("SC_PAGE_SIZE") / 2**30}


def measured_cpu_matmul_tflops(n: int = 1024, repeats: int = 5) -> float:
    """This process's fp32 matmul rate (best of `repeats` n x n x n products): the peak CPU MFU is taken against.

    Why measured: a CPU has no published dense peak the way a GPU does, and a GPU's peak divided into CPU
    throughput (0.0008% MFU) says nothing. Against what this process's own GEMMs reach, the figure answers
    the question MFU asks: how much of the achievable matmul rate the training step keeps busy.
    """
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up (thread pool, first-touch)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best / 1e12


def device_peak_tflops(device: torch.device | str) -> tuple[float | None, str]:
    """(peak TFLOP/s, where it came from) for MFU: a known GPU's dense bf16 peak, the measured matmul rate on a
    CPU, or (None, reason) for a GPU this table does not know (then pass --peak-tflops; no MFU is logged)."""
    device = torch.device(device)
    if device.type == "cpu":
        return measured_cpu_matmul_tflops(), "measured CPU fp32 matmul peak"
    name = torch.cuda.get_device_name(device)
    gpu = gpu_of_device_name(name)
    if gpu is None:
        return None, f"unknown GPU {name!r}: pass --peak-tflops for MFU"
    return gpu.bf16_tflops, f"{name} dense bf16 peak ({gpu.name} in plan/gpus.py)"


class StepProfiler:
    """torch.profiler over iterations [start, end] on the chosen ranks; a no-op elsewhere."""

    def __init__(self, *, enabled: bool, start: int, end: int, ranks: list[int], rank: int, trace_dir: str | Path,
                 cuda: bool):
        if enabled and end < start:
            raise CslmError.usage(f"--profile-step-end {end} < --profile-step-start {start}")
        if enabled and start < 1:
            raise CslmError.usage(f"--profile-step-start {start}: iterations count from 1")
        self.active_here = enabled and rank in ranks
        self.start, self.end, self.rank = start, end, rank
        self.trace_dir = Path(trace_dir)
        self.cuda = cuda
        self.profiler = None
        self._range = None

    def before_step(self, iteration: int) -> None:
        """Called with the iteration about to run (1-based)."""
        if not self.active_here or not self.start <= iteration <= self.end:
            return
        if iteration == self.start:
            from torch.profiler import ProfilerActivity, profile, tensorboard_trace_handler

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            self.trace_dir.mkdir(parents=True, exist_ok=True)
            handler = tensorboard_trace_handler(str(self.trace_dir),
                                                worker_name=f"rank{self.rank}_iters{self.start}-{self.end}")
            self.profiler = profile(activities=activities, record_shapes=True, profile_memory=True,
                                    on_trace_ready=handler)
            self.profiler.__enter__()
        if self.profiler is not None:
            self._range = torch.profiler.record_function(f"iteration {iteration}")
            self._range.__enter__()

    def after_step(self, iteration: int) -> None:
        if self._range is not None:
            self._range.__exit__(None, None, None)
            self._range = None
        if self.profiler is not None and iteration >= self.end:
            self.close()

    def close(self) -> None:
        """Stop and write the trace (also on an early exit inside the window)."""
        if self._range is not None:
            self._range.__exit__(None, None, None)
            self._range = None
        if self.profiler is not None:
            self.profiler.__exit__(None, None, None)  # on_trace_ready writes the trace
            logger.info("wrote profiler trace of iterations %d-%d on rank %d to %s", self.start, self.end,
                        self.rank, self.trace_dir)
            self.profiler = None


class ManualGC:
    """Megatron-LM's --manual-gc: automatic GC off, a full collection every `interval` steps on every rank
    at the same step (so the pause never lands between two ranks' collectives)."""

    def __init__(self, enabled: bool, interval: int):
        if enabled and interval < 0:
            raise CslmError.usage(f"--manual-gc-interval must be >= 0, got {interval}")
        self.enabled, self.interval = enabled, interval
        if enabled:
            gc.disable()
            gc.collect()

    def after_step(self, iteration: int) -> None:
        if self.enabled and self.interval and iteration % self.interval == 0:
            gc.collect()

    def close(self) -> None:
        if self.enabled:
            gc.enable()


def profile_dir(profiling, tensorboard_dir: str | None) -> Path:
    """Traces go to --profile-dir, else <tensorboard-dir>/profile, else ./profile."""
    if profiling.profile_dir:
        return Path(profiling.profile_dir)
    return Path(tensorboard_dir) / "profile" if tensorboard_dir else Path("profile")
