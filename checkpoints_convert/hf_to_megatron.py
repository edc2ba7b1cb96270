#!/usr/bin/env python
"""`cslm hf-to-megatron` as a script (the code is megatron_cslm/cli/hf_to_megatron.py; see its --help)."""
from megatron_cslm.cli import run_tool
from megatron_cslm.cli.hf_to_megatron import main

if __name__ == "__main__":
    raise SystemExit(run_tool(main))
