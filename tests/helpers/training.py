"""A toy pretraining run's command line and what it logged (TensorBoard scalars), shared by the training tests.

The flags come from the benches' builder (bench/_common.py:pretrain_argv), so tests and benches launch the same
run; `pretrain_args` adds the four-source toy blend, a 5% warmup and a TensorBoard directory per run.
"""
from __future__ import annotations

from pathlib import Path

from bench._common import pretrain_argv

SOURCES = ("asr", "tts", "interleave", "replay")


def pretrain_args(data: dict, out: Path, *extra) -> list[str]:
    """Flags of a CPU run of the tiny model on the toy blend (0.25 of each source), logging to `out`/tb."""
    blend = [x for name in SOURCES for x in ("0.25", data["prefixes"][name])]
    return pretrain_argv(data["tokenizer"], blend, out / "cache",
                         extra=("--lr", "3e-3", "--lr-warmup-fraction", "0.05", "--tensorboard-dir", out / "tb",
                                *extra))


def scalars(tb_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar a run logged to TensorBoard: tag -> {step: value}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
