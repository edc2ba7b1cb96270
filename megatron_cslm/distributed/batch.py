"""Fetch a micro-batch on tensor-parallel rank 0 and broadcast it within the TP group.

Only TP rank 0 of each pipeline stage reads data (Megatron-LM's rule), so a 8-way TP job does not read the
same mmap'ed bytes 8 times. Tensors are sent as-is (dtype and shape travel in a small header), so the same
path serves pretraining batches, packed SFT batches and logits checks.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def broadcast_batch(batch: dict | None) -> dict:
    """Broadcast a dict of tensors from TP rank 0 to the other TP ranks (identity when TP=1)."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    if dist.get_world_size(group) == 1:
        return batch
    src = parallel_state.get_tensor_model_parallel_src_rank()
    header = [None if batch is None else {k: (v.dtype, tuple(v.shape)) for k, v in batch.items()}]
    dist.broadcast_object_list(header, src=src, group=group)
    out = {}
    for key, (dtype, shape) in header[0].items():
        t = batch[key].contiguous() if batch is not None else torch.empty(shape, dtype=dtype, device=_device())
        t = t.to(_device())
        dist.broadcast(t, src=src, group=group)
        out[key] = t
    return out


def get_batch(data_iterator: Iterator | None) -> dict:
    """This rank's micro-batch on its device. Keys: tokens, position_ids, labels, loss_mask, loss_groups and,
    for packed SFT bins, attention_mask (dense reference mask) or packed_seq_params: from `cu_seqlens` (THD,
    bins flattened: TE) or `bin_cu_seqlens` (per-bin boundaries: the local spec's per-sample attention)."""
    from megatron.core import parallel_state

    batch = next(data_iterator) if parallel_state.get_tensor_model_parallel_rank() == 0 else None
    batch = broadcast_batch(batch)
    device = _device()
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    for key, make_params in _PACKED_PARAMS.items():
        if key in batch:
            batch["packed_seq_params"] = make_params(batch.pop(key))
    return batch


def _thd_params(cu_seqlens):
    from megatron_cslm.data.packing import packed_seq_params

    return packed_seq_params(cu_seqlens)


def _bin_params(cu_seqlens):
    from megatron_cslm.models.attention import bin_packed_seq_params

    return bin_packed_seq_params(cu_seqlens)


_PACKED_PARAMS = {"cu_seqlens": _thd_params, "bin_cu_seqlens": _bin_params}  # collated key -> PackedSeqParams
