#!/usr/bin/env python
"""`cslm make-toy-tokenizer` as a script (the code is megatron_cslm/cli/make_toy_tokenizer.py; see its --help)."""
from megatron_cslm.cli import run_tool
from megatron_cslm.cli.make_toy_tokenizer import main

if __name__ == "__main__":
    raise SystemExit(run_tool(main))
