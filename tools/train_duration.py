#!/usr/bin/env python
"""`cslm train-duration` as a script (the code is megatron_cslm/cli/train_duration.py; see its --help)."""
from megatron_cslm.cli import run_tool
from megatron_cslm.cli.train_duration import main

if __name__ == "__main__":
    raise SystemExit(run_tool(main))
