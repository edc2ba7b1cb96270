#!/usr/bin/env python
"""`cslm synthesize` as a script (the code is megatron_cslm/cli/synthesize.py; see its --help)."""
from megatron_cslm.cli import run_tool
from megatron_cslm.cli.synthesize import main

if __name__ == "__main__":
    raise SystemExit(run_tool(main))
