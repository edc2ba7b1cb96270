"""Worker (4 gloo processes): `cslm plan`'s weight, gradient and optimizer bytes equal what megatron-core allocates.

For each layout (TP x PP x DP over the 4 ranks, with and without the distributed optimizer, untied and tied
embeddings, bucketed and not) the worker re-initialises megatron-core's groups, builds the model, DDP and
optimizer the way the trainer does (training/setup.py), takes one optimizer step so Adam's state exists, and
sums the bytes of the distinct storages behind the parameters, the gradient buffers and the optimizer state
(Adam's per-tensor `step` counters excluded, as the plan documents). Writes results.json on rank 0.
"""
import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_cslm.distributed import parallel
from megatron_cslm.models.llama import LlamaArch, PrecisionConfig, padded_vocab_size, transformer_config
from megatron_cslm.plan.memory import Layout, state_bytes
from megatron_cslm.training.config import CommConfig, OptimConfig
from megatron_cslm.training.setup import build_model, build_optimizer

# hidden 96: norm weights are not multiples of the 64-element alignment, so the padding rules are exercised
ARCH = LlamaArch(num_layers=4, hidden_size=96, ffn_hidden_size=200, num_attention_heads=8, num_query_groups=4,
                 vocab_size=1100, max_position_embeddings=256, rope_scaling=None)
BUCKET = 9000  # small DDP buckets (with --overlap-grad-reduce) so bucket padding and sharding are exercised


def storages(tensors) -> dict[int, int]:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None}


def measure(layout: Layout, arch: LlamaArch) -> dict:
    from megatron.core import parallel_state
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel.initialize(parallel.ParallelConfig(layout.tp, layout.pp), device="cpu", seed=1)
    cfg = transformer_config(arch, tensor_parallel_size=layout.tp, pipeline_parallel_size=layout.pp,
                             precision=PrecisionConfig(dtype="bf16"))
    padded = padded_vocab_size(arch.vocab_size, layout.tp)
    comm = CommConfig(overlap_grad_reduce=layout.overlap_grad_reduce, ddp_bucket_size=layout.bucket_size)
    model = build_model(arch, cfg, padded, spec="local", use_distributed_optimizer=layout.distributed_optimizer,
                        comm=comm)
    optimizer, _ = build_optimizer(model, OptimConfig(train_iters=10, use_distributed_optimizer=
                                                      layout.distributed_optimizer), cfg, 8)
    optimizer.step()  # Adam's state is created lazily, at the first step
    params = list(model[0].parameters())
    weights = storages(params)
    grads = storages(getattr(p, "main_grad", None) for p in params)
    opt_tensors = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in opt.optimizer.param_groups:
            opt_tensors += group["params"]
        for state in opt.optimizer.state.values():
            opt_tensors += [v for k, v in state.items() if k != "step" and torch.is_tensor(v)]
    optim = {k: v for k, v in storages(opt_tensors).items() if k not in weights and k not in grads}
    pp_rank, dp_rank = parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_data_parallel_rank()
    plan = state_bytes(arch, padded, layout, pp_rank=pp_rank, dp_rank=dp_rank, param_bytes=2, spec="local")
    return {"measured": [sum(weights.values()), sum(grads.values()), sum(optim.values())],
            "plan": [plan.weights, plan.gradients, plan.optimizer]}


def main():
    results = {}
    for tp, pp in [(2, 2), (2, 1), (1, 2), (1, 1), (4, 1)]:
        for dist_opt in (True, False):
            ties = (False, True) if pp > 1 else (False,)
            for tied in ties:
                layout = Layout(tp=tp, pp=pp, dp=4 // (tp * pp), distributed_optimizer=dist_opt,
                                overlap_grad_reduce=dist_opt, bucket_size=BUCKET)
                arch = dataclasses.replace(ARCH, tie_word_embeddings=tied)
                mine = measure(layout, arch)
                gathered = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, mine)
                results[f"{layout.name()} distopt={dist_opt} tied={tied}"] = gathered
    if dist.get_rank() == 0:
        Path(sys.argv[1], "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
