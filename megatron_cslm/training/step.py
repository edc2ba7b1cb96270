"""One optimizer step and one evaluation pass over megatron-core's pipeline schedules.

The loss is carried as (sum over loss-masked tokens, token count) with `calculate_per_token_loss`, so
megatron-core's `finalize_model_grads` divides by the global token count: averaging over micro-batches and
data-parallel ranks is exact whatever the padding or masking, and a TP=2 run logs what TP=1 x DP=2 logs.
Every loss is also split by a per-token group id (data source in pretraining, TQ/TA/SA in SFT).
"""
from __future__ import annotations

import contextlib
from functools import partial
from typing import Iterator, Sequence

import torch
import torch.distributed as dist

from megatron_cslm.distributed.batch import get_batch


def loss_func(batch: dict, group_names: Sequence[str], group_weights: torch.Tensor | None,
              output_tensor: torch.Tensor):
    """Per-token cross entropy -> (weighted sum, token count, {"lm loss": [sum, n], group: [sum, n]})."""
    losses = output_tensor.float()  # [b, s]: GPTModel returns per-token losses when labels are given
    mask = batch["loss_mask"].float()
    groups = batch["loss_groups"]
    masked = losses * mask
    weights = mask if group_weights is None else mask * group_weights.to(losses.device)[groups]
    total = (losses * weights).sum()
    count = mask.sum().to(torch.int)
    stats = torch.zeros(len(group_names) + 1, 2, dtype=torch.float64, device=losses.device)
    stats[0, 0], stats[0, 1] = masked.sum().detach().double(), mask.sum().double()
    flat_groups = groups.reshape(-1) + 1
    stats[:, 0].index_add_(0, flat_groups, masked.detach().reshape(-1).double())
    stats[:, 1].index_add_(0, flat_groups, mask.reshape(-1).double())
    return total, count, {"stats": stats}


def forward_step(group_names: Sequence[str], group_weights: torch.Tensor | None,
                 data_iterator: Iterator, model: torch.nn.Module):
    """megatron-core forward_step_func: this stage's batch through the model, loss on the last stage."""
    batch = get_batch(data_iterator)
    output = model(batch.get("tokens"), batch.get("position_ids"), batch.get("attention_mask"),
                   labels=batch.get("labels"), packed_seq_params=batch.get("packed_seq_params"))
    return output, partial(loss_func, batch, group_names, group_weights)


def reduce_loss_stats(losses: list[dict], group_names: Sequence[str]) -> dict[str, tuple[float, float]]:
    """Sum per-micro-batch [sum, count] stats over micro-batches and the data-parallel group.

    Only meaningful on the last pipeline stage (the one that computes losses); returns {} elsewhere.
    """
    from megatron.core import parallel_state

    if not losses:
        return {}
    stats = torch.stack([x["stats"] for x in losses]).sum(0)
    dist.all_reduce(stats, group=parallel_state.get_data_parallel_group())
    names = ["lm loss", *group_names]
    return {name: (float(stats[i, 0]), float(stats[i, 1])) for i, name in enumerate(names)}


def run_schedule(model: list, data_iterator: Iterator, *, num_microbatches: int, seq_length: int,
                 micro_batch_size: int, forward_only: bool, group_names: Sequence[str],
                 group_weights: torch.Tensor | None = None) -> list[dict]:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    return get_forward_backward_func()(
        forward_step_func=partial(forward_step, group_names, group_weights),
        data_iterator=data_iterator, model=model, num_microbatches=num_microbatches,
        seq_length=seq_length, micro_batch_size=micro_batch_size, forward_only=forward_only)


def train_step(model: list, optimizer, scheduler, data_iterator: Iterator, *, num_microbatches: int,
               seq_length: int, micro_batch_size: int, global_batch_size: int, group_names: Sequence[str],
               group_weights: torch.Tensor | None = None, timers=None) -> dict:
    """Forward/backward over all micro-batches, then one optimizer step. Returns reduced stats.
    `timers` (training.profiling.PhaseTimers), when given, receives the forward-backward and optimizer times."""
    phase = timers.phase if timers is not None else (lambda name: contextlib.nullcontext())
    with phase("forward-backward"):
        for chunk in model:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        losses = run_schedule(model, data_iterator, num_microbatches=num_microbatches, seq_length=seq_length,
                              micro_batch_size=micro_batch_size, forward_only=False, group_names=group_names,
                              group_weights=group_weights)
    with phase("optimizer"):
        update_ok, grad_norm, _ = optimizer.step()
        if update_ok:
            scheduler.step(increment=global_batch_size)
    return {"losses": reduce_loss_stats(losses, group_names), "grad_norm": grad_norm, "update_ok": update_ok}


@torch.no_grad()
def evaluate(model: list, data_iterator: Iterator, *, num_batches: int, num_microbatches: int, seq_length: int,
             micro_batch_size: int, group_names: Sequence[str]) -> dict[str, tuple[float, float]]:
    """Validation loss over `num_batches` global batches (same token-exact reduction as training)."""
    for chunk in model:
        chunk.eval()
    totals: dict[str, list[float]] = {}
    for _ in range(num_batches):
        losses = run_schedule(model, data_iterator, num_microbatches=num_microbatches, seq_length=seq_length,
                              micro_batch_size=micro_batch_size, forward_only=True, group_names=group_names)
        for name, (s, n) in reduce_loss_stats(losses, group_names).items():
            acc = totals.setdefault(name, [0.0, 0.0])
            acc[0] += s
            acc[1] += n
    for chunk in model:
        chunk.train()
    return {k: (v[0], v[1]) for k, v in totals.items()}
