#!/usr/bin/env python
"""`cslm make-toy-corpus` as a script (the code is megatron_cslm/cli/make_toy_corpus.py; see its --help)."""
from megatron_cslm.cli import run_tool
from megatron_cslm.cli.make_toy_corpus import main

if __name__ == "__main__":
    raise SystemExit(run_tool(main))
