#!/usr/bin/env python
"""`cslm megatron-to-hf` as a script (the code is megatron_cslm/cli/megatron_to_hf.py; see its --help)."""
from megatron_cslm.cli import run_tool
from megatron_cslm.cli.megatron_to_hf import main

if __name__ == "__main__":
    raise SystemExit(run_tool(main))
