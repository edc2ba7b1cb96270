"""Transitional: the helpers moved to tests/helpers/ (launch, files, belle). Import from there; this re-export
keeps test files written before the move working until they are updated."""
from tests.helpers.belle import BELLE_DIR, BELLE_ENV, belle_dir  # noqa: F401
from tests.helpers.files import load_tool, read_jsonl, write_jsonl  # noqa: F401
from tests.helpers.launch import (  # noqa: F401
    NOISE,
    ROOT,
    descendants,
    signal_workers,
    torchrun,
    torchrun_command,
    worker_env,
)
