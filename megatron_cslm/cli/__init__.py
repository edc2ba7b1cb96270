"""The project's command-line tools, one module per `cslm` subcommand (cli/main.py lists them).

The policy they share lives below this package so that every layer can use it without importing `cli/`:
argument types in `megatron_cslm.argtypes`, the tool runner (`run_tool`, `--debug`, exit codes, `--help`
layout) in `megatron_cslm.tool`. They are re-exported here for the tools and scripts that import them from
`megatron_cslm.cli`; library code (speech/, text/, data/, models/, distributed/, checkpoint/, training/,
convert/, inference/) imports the root modules instead (tests/test_layering.py).
"""
from __future__ import annotations

from megatron_cslm.argtypes import nonnegative_float, nonnegative_int, positive_float, positive_int
from megatron_cslm.tool import (
           DEBUG_FLAG,
           VERBOSE_FLAG,
           HelpFormatter,
           add_debug_flag,
           report_error,
           run_tool,
           tool_parser,
)

__all__ = ["DEBUG_FLAG", "VERBOSE_FLAG", "HelpFormatter", "add_debug_flag", "nonnegative_float", "nonnegative_int",
           "positive_float", "positive_int", "report_error", "run_tool", "tool_parser"]
