"""Worker (4 processes): the same weights give the same logits and optimizer-step losses at any TP x PP.

Weights travel between layouts through a megatron-core dist_checkpointing save at TP=1 and loads at the others.
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_cslm.checkpoint.save_load import load_checkpoint, save_checkpoint
from megatron_cslm.distributed import parallel
from megatron_cslm.models.chunks import forward_logits
from megatron_cslm.models.llama import ARCHS, PrecisionConfig, padded_vocab_size, transformer_config
from megatron_cslm.training.config import OptimConfig
from megatron_cslm.training.setup import build_model, build_optimizer
from megatron_cslm.training.step import train_step

out_dir = Path(sys.argv[1])
arch = ARCHS["tiny"]
SEQ, GLOBAL_BATCH = 32, 4
gen = torch.Generator().manual_seed(0)
tokens = torch.randint(0, arch.vocab_size, (GLOBAL_BATCH, SEQ + 1), generator=gen)
loss_mask = (torch.rand(GLOBAL_BATCH, SEQ, generator=gen) > 0.3).float()
samples = [{"tokens": tokens[i:i + 1, :-1], "labels": tokens[i:i + 1, 1:], "loss_mask": loss_mask[i:i + 1],
            "position_ids": torch.arange(SEQ).unsqueeze(0), "loss_groups": torch.zeros(1, SEQ, dtype=torch.long)}
           for i in range(GLOBAL_BATCH)]


def setup(tp, pp, ddp):
    from megatron.core import parallel_state
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel.initialize(parallel.ParallelConfig(tp, pp), device="cpu", seed=1234)
    cfg = transformer_config(arch, tensor_parallel_size=tp, pipeline_parallel_size=pp,
                             precision=PrecisionConfig(dtype="fp32"))
    return build_model(arch, cfg, padded_vocab_size(arch.vocab_size, tp), ddp=ddp), cfg


def micro_batches(mbs):
    from megatron.core import parallel_state
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    mine = samples[dp_rank * GLOBAL_BATCH // dp:(dp_rank + 1) * GLOBAL_BATCH // dp]
    return [{k: torch.cat([s[k] for s in mine[i:i + mbs]]) for k in mine[0]} for i in range(0, len(mine), mbs)]


def main():
    results = {}
    model, _ = setup(1, 1, ddp=False)
    ref = forward_logits(model, [{k: samples[0][k] for k in ("tokens", "position_ids")}], SEQ, 1)[0]
    save_checkpoint(out_dir / "ckpt", 0, model, None, None, {"iteration": 0})
    for tp, pp in [(2, 1), (1, 2), (2, 2)]:
        model, _ = setup(tp, pp, ddp=False)
        load_checkpoint(out_dir / "ckpt", 0, model, None, None, restore_rng=False)
        out = forward_logits(model, [{k: samples[0][k] for k in ("tokens", "position_ids")}], SEQ, 1)
        if out:
            diff = out[0][..., :arch.vocab_size] - ref[..., :arch.vocab_size]
            results[f"logits_tp{tp}_pp{pp}"] = diff.abs().max().item()

    for tp, pp, mbs in [(1, 1, 1), (2, 2, 2)]:
        model, cfg = setup(tp, pp, ddp=True)
        optimizer, scheduler = build_optimizer(
            model, OptimConfig(train_iters=3, lr=1e-2, lr_warmup_fraction=0.0, clip_grad=0.5), cfg,
            global_batch_size=GLOBAL_BATCH)
        load_checkpoint(out_dir / "ckpt", 0, model, None, None, restore_rng=False)
        optimizer.reload_model_params()
        losses = []
        for _step in range(3):
            mbs_list = micro_batches(mbs)
            stats = train_step(model, optimizer, scheduler, iter(mbs_list), num_microbatches=len(mbs_list),
                               seq_length=SEQ, micro_batch_size=mbs, global_batch_size=GLOBAL_BATCH,
                               group_names=["all"])
            if stats["losses"]:
                s, n = stats["losses"]["lm loss"]
                losses.append(s / n)
        if losses:
            results[f"losses_tp{tp}_pp{pp}"] = losses

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        merged = {k: v for r in gathered for k, v in r.items()}
        (out_dir / "results.json").write_text(json.dumps(merged, indent=1))
    parallel.destroy()


if __name__ == "__main__":  # dist_checkpointing's writer spawns processes that re-import __main__
    main()
