"""Exit signals, caught from process start: SIGTERM / SIGUSR1 ask for a save and a clean exit, never a kill.

Why from process start: SLURM sends its pre-timeout SIGUSR1 (`--signal=USR1@600`) whenever the limit nears,
which can be during start-up (imports, model build, a checkpoint load: minutes at 8B). Python's default action
for SIGUSR1 is to terminate, so a handler installed only before the training loop loses the job without a word.
The entry points call `install()` before importing torch; the trainer asks `received()` once set-up is done
and at every step boundary (collectively, so all ranks stop at the same step).

Invariants:
- Handlers only record the signal; nothing is done inside a handler (it may interrupt a collective).
- `install()` is idempotent; `uninstall()` restores the handlers it replaced (`--no-exit-signal-handler`, after
  which a signal that was already recorded still counts). A trainer that installed them itself (run in-process,
  not through an entry point) restores them when it ends; an entry point's stay until the process exits, so a
  signal that arrives during teardown, after the last save, is harmless.
- Importing this module imports nothing heavy.
"""
from __future__ import annotations

import signal

EXIT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received: list[int] = []
_previous: dict[int, object] = {}  # the handlers install() replaced, restored by uninstall()


def _record(signum, frame) -> None:
    _received.append(signum)


def install() -> bool:
    """Record SIGTERM/SIGUSR1 from now on instead of dying (main thread only, as Python requires). True when this
    call installed them, False when they already were (an entry point did, at process start)."""
    if _previous:
        return False
    for sig in EXIT_SIGNALS:
        previous = signal.signal(sig, _record)
        _previous[sig] = signal.SIG_DFL if previous is None else previous
    return True


def uninstall(forget: bool = False) -> None:
    """Put back the handlers `install()` replaced (`--no-exit-signal-handler`, and the end of a run, so that a
    process that ran training in-process, and the workers it forks later, die on SIGTERM again); `forget` also
    drops the signals recorded so far."""
    for sig, handler in _previous.items():
        signal.signal(sig, handler)
    _previous.clear()
    if forget:
        _received.clear()


def received() -> list[str]:
    """Names of the exit signals received so far in this process (empty: none)."""
    return [signal.Signals(s).name for s in _received]
