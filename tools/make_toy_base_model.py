#!/usr/bin/env python
"""`cslm make-toy-base-model` as a script (the code is megatron_cslm/cli/make_toy_base_model.py; see its --help)."""
from megatron_cslm.cli import run_tool
from megatron_cslm.cli.make_toy_base_model import main

if __name__ == "__main__":
    raise SystemExit(run_tool(main))
