#!/usr/bin/env python
"""`cslm plan` as a script (the code is megatron_cslm/cli/plan.py; see its --help)."""
from megatron_cslm.cli.plan import main
from megatron_cslm.tool import run_tool

if __name__ == "__main__":
    raise SystemExit(run_tool(main))
