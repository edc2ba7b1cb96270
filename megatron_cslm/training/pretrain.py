"""Continual pretraining of a speech-text Llama (CSLM stage 1).

    torchrun --nproc-per-node 8 -m megatron_cslm.pretrain --config examples/configs/pretrain_llama3.1_8b.yaml

Data: blended `.bin/.idx` datasets from tools/preprocess_data.py (ASR, TTS, interleaved, translation,
cross-lingual speech, text replay), each reported as its own loss in the logs.
"""
from __future__ import annotations

import argparse

import torch.distributed as dist

from megatron_cslm.data.metadata import tokenizer_identity
from megatron_cslm.tool import add_debug_flag, run_tool
from megatron_cslm.training.arguments import build_parser
from megatron_cslm.training.data import (
    build_pretrain_datasets,
    check_indexed_dataset,
    micro_batch_stream,
    parse_data_path,
)
from megatron_cslm.training.trainer import ModelSource, Task, main


def make_task(args: argparse.Namespace, source: ModelSource, padded_vocab: int) -> Task:
    from megatron_cslm.text.tokenizer import SpeechTextTokenizer

    blend = parse_data_path(args.data_path)
    tokenizer = SpeechTextTokenizer.from_pretrained(source.tokenizer_dir)
    if dist.get_rank() == 0:  # metadata + .idx only, on one rank; errors stop the job before any index is built
        identity = tokenizer_identity(tokenizer)
        for prefix in blend.prefixes:
            check_indexed_dataset(prefix, source.arch.vocab_size, identity)
    dist.barrier()
    eod = tokenizer.eod_id
    splits = [float(x) for x in args.split.split(",")]
    train_samples = args.train_iters * args.global_batch_size
    # every validation pass reads the same first eval_iters global batches of the valid split
    has_valid_split = args.eval_interval and len(splits) > 1 and splits[1] > 0
    valid_samples = args.eval_iters * args.global_batch_size if has_valid_split \
        else 0
    train, valid, _ = build_pretrain_datasets(
        blend, split=args.split, seq_length=args.seq_length, seed=args.seed,
        num_samples=[train_samples, valid_samples, 0], vocab_size=source.arch.vocab_size, eod_id=eod,
        cache_dir=args.data_cache_path)

    def stream(dataset, consumed, dp_rank, dp_size, num_microbatches):
        if dataset is None:  # not built on this rank (TP rank > 0): batches arrive by broadcast
            return None
        return micro_batch_stream(dataset, consumed_samples=consumed, global_batch_size=args.global_batch_size,
                                  micro_batch_size=args.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size)

    return Task(train=train, valid=valid, has_valid=valid_samples > 0, stream=stream, group_names=blend.names)


def parser() -> argparse.ArgumentParser:
    return build_parser("Continual pretraining of a speech-text Llama on blended .bin/.idx data (CSLM stage 1).")


def cli_main(argv: list[str] | None = None) -> int:
    """`cslm pretrain` / `python -m megatron_cslm.pretrain`: one training job under the shared error policy."""
    return main(make_task, lambda: add_debug_flag(parser()), argv)


if __name__ == "__main__":
    raise SystemExit(run_tool(cli_main))
