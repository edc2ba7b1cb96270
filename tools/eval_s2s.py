#!/usr/bin/env python
"""`cslm eval-s2s` as a script (the code is megatron_cslm/cli/eval_s2s.py; see its --help)."""
from megatron_cslm.cli import run_tool
from megatron_cslm.cli.eval_s2s import main

if __name__ == "__main__":
    raise SystemExit(run_tool(main))
