"""The project's one error type, `CslmError`, and the exit code of each kind of failure.

Why one type: every command-line tool (tools/, checkpoints_convert/, bench/, `python -m megatron_cslm.*`,
the `cslm` command) turns a CslmError into one line on stderr and an exit code, and every `--skip-bad-records`
loop counts it under its `reason`, without knowing which module raised it. Anything else that escapes a tool
is a bug and keeps its traceback (see `megatron_cslm.cli.run_tool`).

Invariants:
- `str(error)` is the located one-line message ``<file>:<line>: field '<name>' <message>``; each part is
  left out when unknown (``field 'turns[1].units' empty`` for an error not yet tied to a file).
- `kind` picks the exit code (EXIT_CODES); `reason` is the short key under which a skipped record is counted
  (``malformed_json``, ``unit_out_of_range``, ``too_short`` ...).
- Picklable with every attribute: errors raised in worker processes reach the parent intact.
- `located(path, line)` returns a copy tied to a place, so a parser that sees one record can raise without
  knowing the file and the reader that knows it adds the place.
- A ValueError subclass: code (and megatron-core callers) that catch ValueError for bad values keep doing so.

Other names of this type: `fileio.DataError` is this class itself (the name the readers import);
`speech.audio.AudioRejected`, `text.units.UnitListError` and `text.markup.MarkupError` are thin subclasses
that keep their short constructors. Nothing else in the project defines an error type.

Exit codes (the one table; README and `--help` texts point here):

| kind         | code | meaning                                                                    |
|--------------|------|----------------------------------------------------------------------------|
| (success)    | 0    |                                                                            |
| data         | 1    | bad input record or file (malformed JSON, out-of-range unit, bad audio)    |
| usage        | 2    | bad flag or flag combination (argparse uses 2 as well)                     |
| compat       | 3    | artifacts that do not fit together (tokenizer vs model units, vocabularies) |
| checkpoint   | 4    | missing, truncated or corrupt checkpoint / safetensors shard               |
| io           | 5    | an output path that cannot be written or is occupied                       |
| training     | 6    | a run stopped by the trainer (non-finite loss); the last good save is named |
| (unexpected) | 1    | a bug: Python's traceback and exit code, unchanged                         |
| (restart)    | 75   | training saved on SIGTERM/SIGUSR1 before --train-iters: run it again       |
| stalled      | 76   | no step completed within --step-timeout-minutes, or a collective timed out  |
| (interrupt)  | 130  | Ctrl-C                                                                     |

75 and 76 are the statuses a launcher requeues on (examples/slurm_cslm.sbatch): 75 is sysexits' EX_TEMPFAIL,
"try again later"; a run that stalls resumes from its last checkpoint. Every other non-zero status is a failure
that rerunning the same command will not fix. A launcher that aggregates many ranks' statuses (srun reports the
highest, and its --kill-on-bad-exit turns the others into SIGTERM deaths) names a file in
CSLM_EXIT_STATUS_FILE: the trainer writes 75 or 76 there before any rank exits (`record_exit_status`).
"""
from __future__ import annotations

import copy
import os

EXIT_CODES: dict[str, int] = {"data": 1, "usage": 2, "compat": 3, "checkpoint": 4, "io": 5, "training": 6,
                              "stalled": 76}
EXIT_RESTART = 75  # saved on a signal before the last iteration: the launcher reruns the same command
EXIT_INTERRUPTED = 130
EXIT_CODES_HELP = ("exit codes: 0 success, 1 bad input data, 2 bad flags (usage), 3 incompatible artifacts,\n"
                   "4 bad checkpoint, 5 output path refused, 6 training stopped, 75 saved on a signal (run\n"
                   "again to continue), 76 stalled (no step within the timeout), 130 interrupted.\n"
                   "Errors print one line; --debug prints the traceback of any error.")


EXIT_STATUS_FILE_ENV = "CSLM_EXIT_STATUS_FILE"


def record_exit_status(code: int) -> None:
    """Write `code` to $CSLM_EXIT_STATUS_FILE (atomically) when a launcher asked for it; else do nothing."""
    path = os.environ.get(EXIT_STATUS_FILE_ENV)
    if not path:
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{code}\n")
    os.replace(tmp, path)


class CslmError(ValueError):
    """A failure the user can fix, located by file, line and field where they exist.

    Positional arguments follow the place-first order used throughout the data readers:
    ``CslmError(path, line, field, message)``; `kind` and `reason` are keywords.
    """

    def __init__(self, path: str | os.PathLike | None = None, line: int | None = None, field: str | None = None,
                 message: str = "", *, kind: str = "data", reason: str = "invalid_record"):
        if kind not in EXIT_CODES:
            raise ValueError(f"unknown error kind {kind!r}; expected one of {sorted(EXIT_CODES)}")
        self.path = None if path is None else str(path)
        self.line, self.field, self.message, self.kind, self.reason = line, field, message, kind, reason
        super().__init__(self.located_message())

    # -- construction helpers -----------------------------------------------------------------------------
    @classmethod
    def usage(cls, message: str, field: str | None = None) -> "CslmError":
        """A bad flag value or combination; `field` is the flag (``--tp``)."""
        return cls(None, None, field, message, kind="usage", reason="usage")

    @classmethod
    def in_field(cls, field: str, message: str, reason: str = "invalid_record") -> "CslmError":
        """Bad data in one field of a record whose file and line the caller adds later with `located`."""
        return cls(None, None, field, message, reason=reason)

    @classmethod
    def compat(cls, message: str, path: str | os.PathLike | None = None, field: str | None = None) -> "CslmError":
        """Two artifacts that do not fit together; the message names both values."""
        return cls(path, None, field, message, kind="compat", reason="incompatible")

    def located(self, path: str | os.PathLike, line: int | None) -> "CslmError":
        """A copy of this error placed at `path`:`line` (the field, kind and reason are kept)."""
        err = copy.copy(self)
        err.path, err.line = str(path), line
        err.args = (err.located_message(),)
        return err

    # -- rendering ----------------------------------------------------------------------------------------
    def located_message(self) -> str:
        where = "".join(f"{p}:" for p in (self.path, self.line) if p is not None)
        what = f"field '{self.field}' " if self.field else ""
        return " ".join(x for x in (where, f"{what}{self.message}".strip()) if x)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.kind]

    def __reduce__(self):  # every attribute survives pickling (the default would pass the message only)
        return _rebuild, (type(self), dict(self.__dict__))


def _rebuild(cls: type, state: dict) -> CslmError:
    error = cls.__new__(cls)
    error.__dict__.update(state)
    error.args = (error.located_message(),)
    return error
