#!/usr/bin/env python
"""`cslm tokenize-speech` as a script (the code is megatron_cslm/cli/tokenize_speech.py; see its --help)."""
from megatron_cslm.cli import run_tool
from megatron_cslm.cli.tokenize_speech import main

if __name__ == "__main__":
    raise SystemExit(run_tool(main))
