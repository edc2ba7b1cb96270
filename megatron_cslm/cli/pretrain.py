"""`cslm pretrain`: continual pretraining (CSLM stage 1) under the shared error policy (`megatron_cslm.tool.run_tool`).

A thin wrapper: the job itself is `megatron_cslm.training.pretrain` (flags generated from training/config.py);
run it under torchrun for several processes (`torchrun ... -m megatron_cslm.pretrain`).
"""
from __future__ import annotations

from megatron_cslm.training import signals  # isort: skip

signals.install()  # before the job's imports (torch, megatron-core): SLURM's pre-timeout signal may come then

from megatron_cslm.training.pretrain import cli_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return cli_main(argv)
