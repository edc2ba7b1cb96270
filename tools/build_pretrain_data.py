#!/usr/bin/env python
"""`cslm build-pretrain-data` as a script (the code is megatron_cslm/cli/build_pretrain_data.py; see its --help)."""
from megatron_cslm.cli import run_tool
from megatron_cslm.cli.build_pretrain_data import main

if __name__ == "__main__":
    raise SystemExit(run_tool(main))
