"""Supervised fine-tuning on packed chain-of-modality dialogue (CSLM stage 2).

    torchrun --nproc-per-node 8 -m megatron_cslm.sft --config examples/configs/sft_llama3.1_8b.yaml

Data: packed bins from tools/build_sft_data.py (mmap'ed, no tokenizing at train time). Attention never
crosses a sample boundary: per-bin `cu_seqlens` and per-sample SDPA on the local spec (models/attention.py),
THD `cu_seqlens` on TE; the dense block-diagonal mask (spec `local_mask`) is the tests' reference. The loss
is reported (and optionally weighted) per modality: question transcript (TQ), text answer (TA), speech (SA).
"""
from __future__ import annotations

import argparse
import logging
import os

import numpy as np
import torch

from megatron_cslm.data.metadata import tokenizer_identity
from megatron_cslm.data.packing import MODALITIES, PackedSFTDataset, block_causal_mask, modality_prefix
from megatron_cslm.errors import CslmError
from megatron_cslm.models.llama import packed_layout
from megatron_cslm.text.tokenizer import SpeechTextTokenizer
from megatron_cslm.tool import add_debug_flag, run_tool
from megatron_cslm.training.arguments import build_parser
from megatron_cslm.training.data import check_indexed_dataset, micro_batch_stream, parse_data_path
from megatron_cslm.training.trainer import ModelSource, Task, main

log = logging.getLogger(__name__)

GROUPS = sorted(MODALITIES, key=MODALITIES.get)  # index = modality id: none, tq, ta, sa


class EpochShuffled:
    """Index k of an endless stream over packed bins: epoch k // n visits the bins in a seeded permutation."""

    def __init__(self, datasets: list[PackedSFTDataset], seed: int):
        self.parts = datasets
        self.sizes = np.cumsum([0] + [len(d) for d in datasets])
        self.seed = seed
        self._perm: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return int(self.sizes[-1])

    def __getitem__(self, k: int) -> dict:
        epoch, i = divmod(k, len(self))
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng((self.seed, epoch)).permutation(len(self)))
        j = int(self._perm[1][i])
        part = int(np.searchsorted(self.sizes, j, side="right")) - 1
        return self.parts[part][j - int(self.sizes[part])]


def make_collate(seq_length: int, layout: str):
    """Stack bins; loss groups are modalities; the attention layout follows the layer spec (`packed_layout`)."""

    def collate(samples: list[dict]) -> dict:
        batch = {k: torch.stack([torch.as_tensor(s[k]) for s in samples])
                 for k in ("tokens", "labels", "loss_mask", "position_ids", "cu_seqlens")}
        batch["loss_groups"] = torch.stack([torch.as_tensor(s["modality"]) for s in samples])
        cu = batch.pop("cu_seqlens")
        if layout == "thd":  # TE: one flattened sequence of b*s tokens with per-sample cu_seqlens
            batch = {k: v.reshape(1, -1) for k, v in batch.items()}
            batch["cu_seqlens"] = cu
        elif layout == "bins":  # local spec: bins stay the batch dimension, cu_seqlens per bin
            batch["bin_cu_seqlens"] = cu
        else:
            batch["attention_mask"] = block_causal_mask(cu, seq_length)
        return batch

    return collate


def make_task(args: argparse.Namespace, source: ModelSource, padded_vocab: int) -> Task:
    def load(prefixes):
        datasets = [PackedSFTDataset(p, args.seq_length) for p in prefixes]
        for d in datasets:
            if d.packed_seq_length and d.packed_seq_length < args.seq_length:
                log.warning(f"{d.prefix} was packed into bins of {d.packed_seq_length} positions; at "
                            f"--seq-length {args.seq_length} every bin is padded to that. Repack it with "
                            f"build_sft_data.py --seq-length {args.seq_length}")
        most = max(d.max_samples for d in datasets)
        for d in datasets:  # batched together: one cu_seqlens width (only ever widened, so every bin fits)
            d.max_samples = most
        return EpochShuffled(datasets, args.seed)

    train_prefixes = parse_data_path(args.data_path)
    if train_prefixes.weights:
        raise CslmError.usage("--data-path for SFT takes packed prefixes without weights (all bins are used, "
                         "shuffled each epoch); repeat a prefix to upweight it")
    identity = tokenizer_identity(SpeechTextTokenizer.from_pretrained(source.tokenizer_dir))
    for prefix in train_prefixes.prefixes + (args.valid_data_path or []):  # metadata + .idx only: cheap per rank
        check_indexed_dataset(prefix, source.arch.vocab_size, identity)
        if not all(os.path.exists(modality_prefix(prefix) + suffix) for suffix in (".bin", ".idx")):
            raise CslmError(prefix, None, "--data-path", f"is not a packed SFT dataset: it has no "
                            f"{modality_prefix(prefix)}.bin/.idx (pretraining data? SFT data comes from "
                            "tools/build_sft_data.py; pretraining .bin/.idx train with megatron_cslm.pretrain)",
                            kind="compat", reason="not_sft_data")
    train = load(train_prefixes.prefixes)
    valid = load(args.valid_data_path) if args.valid_data_path else None
    collate = make_collate(args.seq_length, packed_layout(args.transformer_impl))

    def stream(dataset, consumed, dp_rank, dp_size, num_microbatches):
        return micro_batch_stream(dataset, consumed_samples=consumed, global_batch_size=args.global_batch_size,
                                  micro_batch_size=args.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                                  collate_fn=collate)

    weights = torch.tensor([0.0, *args.modality_loss_weights])
    return Task(train=train, valid=valid, has_valid=valid is not None, stream=stream, group_names=GROUPS,
                group_weights=weights)


def parser() -> argparse.ArgumentParser:
    p = build_parser("Supervised fine-tuning on packed chain-of-modality spoken dialogue (CSLM stage 2).", sft=True)
    p.set_defaults(lr=1e-5, seq_length=8192, split="100,0,0")  # SFT presets over the shared defaults
    return p


def cli_main(argv: list[str] | None = None) -> int:
    """`cslm sft` / `python -m megatron_cslm.sft`: one training job under the shared error policy."""
    return main(make_task, lambda: add_debug_flag(parser()), argv)


if __name__ == "__main__":
    raise SystemExit(run_tool(cli_main))
