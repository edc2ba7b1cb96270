"""The tool runner: `--debug`/`--verbose`, `--help` layout and exit codes, applied to every tool's `main(argv)`.

Why one place (and a root module, below `cli/`, `training/`, `convert/` and `inference/`, which all use it):
a user who runs `cslm preprocess-data`, `tools/decode.py`, a converter, a bench or `python -m
megatron_cslm.pretrain` meets the same behaviour everywhere:
- the project's errors (`megatron_cslm.errors.CslmError`) print one line,
  ``error: <file>:<line>: field '<name>' <message>``, and exit with their kind's code (table in errors.py:
  data 1, usage 2, compat 3, checkpoint 4, io 5, training 6);
- anything else is a bug and keeps Python's traceback; `--debug` prints the traceback for any error;
- numbers that must be positive are refused by argparse (`megatron_cslm.argtypes`), exit code 2.

Each tool is a module with ``main(argv) -> int | None``; `run_tool(main)` applies the policy, so the same
function serves the `cslm` command, the thin scripts in tools/ and checkpoints_convert/, and in-process tests.
"""
from __future__ import annotations

import argparse
import sys
import traceback
from typing import Callable, Sequence

from megatron_cslm.errors import EXIT_CODES_HELP, EXIT_INTERRUPTED, CslmError
from megatron_cslm.logs import configure_logging

DEBUG_FLAG = "--debug"
VERBOSE_FLAG = "--verbose"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """`--help` shows every default and keeps the tool docstring's layout (its usage examples)."""


def add_debug_flag(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Give `parser` the shared `--debug` and `--verbose` flags (read by `run_tool` before parsing; accepted
    here so argparse does not refuse them)."""
    if not any(DEBUG_FLAG in a.option_strings for a in parser._actions):
        parser.add_argument(DEBUG_FLAG, action="store_true",
                            help="on an error, print the full traceback instead of one line")
    if not any(VERBOSE_FLAG in a.option_strings for a in parser._actions):
        parser.add_argument(VERBOSE_FLAG, action="store_true",
                            help="log DEBUG on every rank and show what CPU runs hide by default (gloo's "
                                 "connection lines, CUDA/Transformer Engine/Apex fallback warnings); "
                                 "env CSLM_VERBOSE=1 does the same")
    return parser


def tool_parser(doc: str | None, show_defaults: bool = True) -> argparse.ArgumentParser:
    """The parser every tool starts from: its docstring as description, `--debug`, and every default shown
    in `--help` (`show_defaults=False` for tools whose help strings state their defaults themselves)."""
    formatter = HelpFormatter if show_defaults else argparse.RawDescriptionHelpFormatter
    return add_debug_flag(argparse.ArgumentParser(description=doc, formatter_class=formatter, epilog=EXIT_CODES_HELP))


def report_error(error: CslmError) -> int:
    """Print `error` as the one-line message of the policy; return its exit code."""
    print(f"error: {error}", file=sys.stderr, flush=True)
    return error.exit_code


def run_tool(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a tool's `main(argv)` under the shared error policy and return its exit code.

    Use as ``raise SystemExit(run_tool(main))``. A CslmError becomes one line on stderr and its kind's exit
    code; KeyboardInterrupt exits 130; any other exception propagates with its traceback. With `--debug` in
    `argv` every error shows its traceback. `SystemExit` (argparse's usage errors, `--help`) passes through.
    Logging is set up here (`logs.configure_logging`; `--verbose` in `argv` for everything, on every rank).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv
    configure_logging(verbose=VERBOSE_FLAG in argv)
    try:
        code = main(argv)
    except CslmError as e:
        if debug:
            traceback.print_exc()
        return report_error(e)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return code if isinstance(code, int) else 0  # a main may return its stats
