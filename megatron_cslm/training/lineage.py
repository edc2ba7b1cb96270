"""One training stage as a record in the run's `cslm_model.json` lineage (read by the export's model card).

A record holds what a reader of the model card needs and what is gone once the run directory is deleted:
the data sources with their token counts (from each dataset's `<prefix>.stats.json`, written by
tools/preprocess_data.py and tools/build_sft_data.py), the main hyper-parameters and the command line.
Nothing here reads a dataset: only the small stats files.
"""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from megatron_cslm.training.config import RunConfig

HYPER_PARAMETERS = ("lr", "min_lr", "lr_decay_style", "weight_decay", "adam_beta1", "adam_beta2", "clip_grad",
                    "seq_length", "global_batch_size", "train_iters")


def dataset_summary(prefix: str, weight: float | None) -> dict:
    entry = {"prefix": str(prefix), "weight": weight}
    stats_path = Path(f"{prefix}.stats.json")
    if stats_path.exists():
        try:
            stats = json.loads(stats_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return entry
        for key in ("tokens", "documents", "samples", "text_tokens", "unit_tokens", "inputs", "speech_tokenizer"):
            if key in stats:
                entry[key] = stats[key]
        if stats.get("by_source"):
            entry["by_source"] = {k: v.get("tokens") for k, v in stats["by_source"].items()}
    return entry


def stage_record(cfg: RunConfig, stage: str, save: str, argv: list[str] | None = None) -> dict:
    from megatron_cslm.training.data import parse_data_path

    flat = cfg.flat()
    datasets = []
    for data_path in (cfg.data.data_path,):
        if data_path:
            blend = parse_data_path(list(data_path))
            weights = blend.weights or [None] * len(blend.prefixes)
            datasets += [dataset_summary(p, w) for p, w in zip(blend.prefixes, weights)]
    argv = sys.argv if argv is None else argv
    return {"stage": stage, "save": str(Path(save).resolve()),
            "data": datasets, "hyper_parameters": {k: flat[k] for k in HYPER_PARAMETERS},
            "tokens_trained": (cfg.optim.train_iters or 0) * cfg.data.global_batch_size * cfg.data.seq_length,
            "command": f"python -m megatron_cslm.{stage} " + shlex.join(argv[1:])}
