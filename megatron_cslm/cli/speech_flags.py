"""Flags the sharded speech tools share (`cslm tokenize-speech`, `cslm align-words`): one spelling, one default,
and one reading of them (`job_rank`, `audio_limits`, `default_device`)."""
from __future__ import annotations

import argparse

from megatron_cslm.argtypes import nonnegative_int, positive_float, positive_int
from megatron_cslm.errors import CslmError


def add_shard_flags(p: argparse.ArgumentParser) -> None:
    """--shard-index / --num-shards: the SLURM-array form of a sharded run (torchrun sets RANK/WORLD_SIZE)."""
    g = p.add_argument_group("sharding (torchrun sets RANK/WORLD_SIZE itself)")
    g.add_argument("--shard-index", type=nonnegative_int, default=None,
                   help="SLURM-array form: this job's shard, 0 <= K < --num-shards (e.g. $SLURM_ARRAY_TASK_ID).")
    g.add_argument("--num-shards", type=positive_int, default=None, help="SLURM-array form: number of shards.")


def add_audio_limit_flags(g, verb: str) -> None:
    """--min-seconds / --max-seconds / --min-peak; `verb` says what happens to audio outside them."""
    g.add_argument("--min-seconds", type=positive_float, default=0.1, help=f"{verb} shorter audio (seconds).")
    g.add_argument("--max-seconds", type=positive_float, default=600.0, help=f"{verb} longer audio (seconds).")
    g.add_argument("--min-peak", type=positive_float, default=1e-3,
                   help=f"{verb} silent audio: max |sample| below this (full scale = 1.0; 1e-3 = -60 dBFS).")


def job_rank(args: argparse.Namespace):
    """This process's share of the job: torchrun's RANK/WORLD_SIZE or --shard-index/--num-shards; a bad pair is a
    one-line usage error."""
    from megatron_cslm.speech.sharded import JobRank

    try:
        return JobRank.resolve(args.shard_index, args.num_shards)
    except ValueError as e:
        raise CslmError.usage(str(e), "--shard-index") from None


def audio_limits(args: argparse.Namespace):
    """The AudioLimits the --min-seconds / --max-seconds / --min-peak flags ask for."""
    from megatron_cslm.speech.audio import AudioLimits

    return AudioLimits(args.min_seconds, args.max_seconds, args.min_peak)


def default_device() -> str:
    """This rank's GPU (LOCAL_RANK) when there is one, else the CPU."""
    import os

    import torch

    return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
