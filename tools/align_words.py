#!/usr/bin/env python
"""`cslm align-words` as a script (the code is megatron_cslm/cli/align_words.py; see its --help)."""
from megatron_cslm.cli import run_tool
from megatron_cslm.cli.align_words import main

if __name__ == "__main__":
    raise SystemExit(run_tool(main))
