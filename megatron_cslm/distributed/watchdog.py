"""A per-rank hang watchdog: a job whose steps stop completing ends, says where, and exits to be requeued.

Why: one rank that hangs (a dead node, a stuck collective, a stalled filesystem) holds every GPU of the job
until the time limit, and the log says nothing. Here each rank runs a daemon thread that expects a heartbeat
(`beat()`, once per completed step) within a timeout; when none comes it

1. dumps every thread's Python stack of this rank into the log (faulthandler, prefixed by the rank),
2. publishes where its main thread is to the job's rendezvous store (torch.distributed's TCPStore, served by a
   thread of rank 0's process, so it answers while the main threads are stuck): inside a collective (waiting
   for the others) or elsewhere (the rank the others wait for),
3. after a short grace for the other ranks' reports, logs one line naming the ranks that did not arrive at the
   collective (and the ranks that did not report at all: dead or wedged processes),
4. exits the process with EXIT_CODES["stalled"] (76), which examples/slurm_cslm.sbatch requeues on; the run
   resumes from its last complete checkpoint.

Every rank's watchdog fires on its own (ranks blocked in a collective stop beating too), so every rank's
stack reaches the log even when one rank cannot speak.

Invariants:
- The timeout is `--step-timeout-minutes` when given; otherwise it is tuned from the run itself: a generous
  start-up allowance until the first steps complete (compilation, first collectives, data warm-up), then
  max(MIN_AUTO_TIMEOUT_S, AUTO_FACTOR x the slowest of the first AUTO_STEPS steps).
- Phases that may legitimately take longer than a step (checkpoint saves, validation) run under
  `allowance(seconds)`, which extends the deadline for their duration only.
- The thread never touches CUDA or a process group: it only reads frames and talks to the store.
"""
from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading
import time
from contextlib import contextmanager

from megatron_cslm.errors import EXIT_CODES, record_exit_status

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 30 * 60.0  # before the first AUTO_STEPS steps complete (when no timeout is given)
AUTO_STEPS = 3
AUTO_FACTOR = 10.0
MIN_AUTO_TIMEOUT_S = 5 * 60.0
REPORT_GRACE_S = 5.0  # how long a firing watchdog waits for the other ranks' reports
_STORE_PREFIX = "cslm_watchdog"
_COLLECTIVE_MARKERS = (f"torch{os.sep}distributed{os.sep}", f"megatron{os.sep}core{os.sep}distributed{os.sep}",
                       "finalize_model_grads")


class StepWatchdog:
    """Expect `beat()` at least every `timeout_s` seconds (None: tuned from the first steps); else dump stacks,
    name the ranks that did not arrive and `os._exit(76)`. `rank`, `world` and `store` describe the job
    (store: a torch.distributed Store, or None to skip the cross-rank report)."""

    def __init__(self, timeout_s: float | None, rank: int, world: int, store=None, poll_s: float = 1.0,
                 exit_fn=os._exit):
        self.fixed_timeout = timeout_s
        self.rank, self.world, self.store = rank, world, store
        self.poll_s = poll_s
        self.exit_fn = exit_fn
        self.step_times: list[float] = []
        self.last_beat = time.monotonic()
        self.last_iteration: int | None = None
        self.extra_s = 0.0
        self.main_thread_id = threading.main_thread().ident
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="cslm-step-watchdog", daemon=True)
        self._thread.start()

    # -- the training loop's side -------------------------------------------------------------------------
    @property
    def timeout_s(self) -> float:
        if self.fixed_timeout is not None:
            return self.fixed_timeout
        if len(self.step_times) < AUTO_STEPS:
            return STARTUP_TIMEOUT_S
        return max(MIN_AUTO_TIMEOUT_S, AUTO_FACTOR * max(self.step_times[:AUTO_STEPS]))

    def beat(self, iteration: int) -> None:
        now = time.monotonic()
        if self.last_iteration is not None and len(self.step_times) < AUTO_STEPS:
            self.step_times.append(now - self.last_beat)
            if len(self.step_times) == AUTO_STEPS and self.fixed_timeout is None:
                log.info("step watchdog: timeout %.0f s (%.0fx the slowest of the first %d steps, at least %.0f s)",
                         self.timeout_s, AUTO_FACTOR, AUTO_STEPS, MIN_AUTO_TIMEOUT_S)
        self.last_beat, self.last_iteration = now, iteration

    @contextmanager
    def allowance(self, seconds: float):
        """Extend the deadline by `seconds` while the block runs (a save, a validation pass)."""
        self.extra_s += seconds
        try:
            yield
        finally:
            self.extra_s -= seconds
            self.last_beat = time.monotonic()  # the phase itself is not a step: measure the next one afresh

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    # -- the watchdog thread ------------------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            if self._peer_stalled() or time.monotonic() - self.last_beat > self.timeout_s + self.extra_s:
                self._fire()
                return

    def _peer_stalled(self) -> bool:
        """Another rank's watchdog fired: report now too (its collective is ours)."""
        if self.store is None:
            return False
        try:
            return self.store.check([f"{_STORE_PREFIX}/fired"])
        except Exception:  # the store went away with rank 0: our own timeout still fires
            return False

    def where_main_thread_is(self) -> tuple[bool, str]:
        """(inside a collective?, innermost project/user frame as 'file:line in function')."""
        frame = sys._current_frames().get(self.main_thread_id)
        in_collective, where = False, "unknown"
        while frame is not None:
            filename = frame.f_code.co_filename
            if any(m in filename or m == frame.f_code.co_name for m in _COLLECTIVE_MARKERS):
                in_collective = True
            if where == "unknown" and "site-packages" not in filename and "/lib/python" not in filename:
                where = f"{filename}:{frame.f_lineno} in {frame.f_code.co_name}"
            frame = frame.f_back
        return in_collective, where

    def _fire(self) -> None:
        waited = time.monotonic() - self.last_beat
        print(f"[rank {self.rank}] step watchdog: no step completed for {waited:.0f} s (timeout "
              f"{self.timeout_s + self.extra_s:.0f} s; last completed iteration {self.last_iteration}); "
              f"Python stacks of rank {self.rank}:", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        in_collective, where = self.where_main_thread_is()
        summary = self._gather(in_collective, where)
        if summary:
            print(f"[rank {self.rank}] {summary}", file=sys.stderr, flush=True)
        sys.stderr.flush()
        record_exit_status(EXIT_CODES["stalled"])
        self.exit_fn(EXIT_CODES["stalled"])

    def _gather(self, in_collective: bool, where: str) -> str:
        """Publish this rank's state, wait briefly for the others', and name who did not arrive."""
        if self.store is None or self.world <= 1:
            return "" if in_collective else f"stalled at {where}"
        try:
            self.store.set(f"{_STORE_PREFIX}/fired", "1")
            self.store.set(f"{_STORE_PREFIX}/state/{self.rank}", f"{int(in_collective)}|{where}")
        except Exception as e:  # noqa: BLE001 (the store may be gone with rank 0)
            return f"could not reach the job's store to compare ranks ({type(e).__name__})"
        deadline = time.monotonic() + REPORT_GRACE_S
        states: dict[int, str] = {}
        while time.monotonic() < deadline and len(states) < self.world:
            for r in range(self.world):
                key = f"{_STORE_PREFIX}/state/{r}"
                if r not in states:
                    try:
                        if self.store.check([key]):
                            states[r] = self.store.get(key).decode()
                    except Exception:  # noqa: BLE001
                        pass
            time.sleep(0.2)
        waiting = sorted(r for r, s in states.items() if s.startswith("1|"))
        absent = {r: s.split("|", 1)[1] for r, s in states.items() if s.startswith("0|")}
        silent = sorted(set(range(self.world)) - set(states))
        parts = []
        if absent:
            parts.append("did not arrive: " + "; ".join(f"rank {r} at {w}" for r, w in sorted(absent.items())))
        if silent:
            parts.append(f"no report from rank(s) {silent} (dead, or wedged without the GIL)")
        if waiting:
            parts.append(f"waiting in a collective: rank(s) {waiting}")
        return "stalled job: " + " | ".join(parts)


def stall_for_tests(rank: int, iteration: int) -> None:
    """Tests only: `CSLM_TEST_STALL=RANK:ITERATION:SECONDS` makes RANK sleep SECONDS inside step ITERATION
    (`*` for RANK or ITERATION: every rank / every step, e.g. to make a run outlast a SLURM time limit)."""
    spec = os.environ.get("CSLM_TEST_STALL")
    if not spec:
        return
    stall_rank, stall_iteration, seconds = spec.split(":")
    if stall_rank in ("*", str(rank)) and stall_iteration in ("*", str(iteration)):
        if stall_iteration != "*":
            log.warning("CSLM_TEST_STALL: rank %d sleeps %s s in iteration %d", rank, seconds, iteration)
        time.sleep(float(seconds))
