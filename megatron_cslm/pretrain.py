# ruff: noqa: E402 (the exit-signal handlers are installed before the heavy imports)
"""`python -m megatron_cslm.pretrain`: continual pretraining (CSLM stage 1).

The job lives in `megatron_cslm.training.pretrain` (also `cslm pretrain`, cli/pretrain.py); this module stays so that
launchers and Megatron-LM-style scripts that name it run unchanged."""
from megatron_cslm.training import signals  # isort: skip

signals.install()  # before the heavy imports: SLURM's pre-timeout signal may arrive during start-up

from megatron_cslm.tool import run_tool
from megatron_cslm.training.pretrain import cli_main, make_task, parser

__all__ = ["cli_main", "make_task", "parser"]

if __name__ == "__main__":
    raise SystemExit(run_tool(cli_main))
