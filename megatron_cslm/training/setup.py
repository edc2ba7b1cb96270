"""Model chunks wrapped in megatron-core DDP, the distributed optimizer and the LR/WD schedule."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_cslm.models.llama import LlamaArch, build_gpt_model


@dataclass(frozen=True)
class OptimConfig:
    """Adam(W) with warmup + decay (megatron-core OptimizerParamScheduler). Steps are optimizer steps."""

    lr: float = 6e-5
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    lr_warmup_fraction: float = 0.03
    lr_decay_style: str = "cosine"  # constant | linear | cosine | inverse-square-root
    use_distributed_optimizer: bool = True


def build_model(arch: LlamaArch, config, padded_vocab: int, spec: str | None = None, ddp: bool = True,
                use_distributed_optimizer: bool = True) -> list:
    """This rank's model chunk, in megatron-core DDP (grad buffers, reduce-scatter for the dist. optimizer)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    model = build_gpt_model(arch, config, padded_vocab=padded_vocab, spec=spec)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    if not ddp:
        return [model]
    config.finalize_model_grads_func = finalize_model_grads
    config.calculate_per_token_loss = True
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=use_distributed_optimizer,
        check_for_nan_in_grad=False, bucket_size=None)
    return [DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)]


def build_optimizer(model: list, optim: OptimConfig, config, train_steps: int, global_batch_size: int):
    """Distributed Adam + scheduler counting in samples, like Megatron-LM (so resume at any DP is exact)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    opt_config = OptimizerConfig(
        optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad, bf16=config.bf16, fp16=config.fp16, params_dtype=config.params_dtype,
        use_distributed_optimizer=optim.use_distributed_optimizer)
    optimizer = get_megatron_optimizer(opt_config, model, use_gloo_process_groups=torch.cuda.is_available())
    warmup = int(round(optim.lr_warmup_fraction * train_steps)) * global_batch_size
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if warmup else optim.lr, max_lr=optim.lr, min_lr=optim.min_lr,
        lr_warmup_steps=warmup, lr_decay_steps=max(train_steps * global_batch_size, 1),
        lr_decay_style=optim.lr_decay_style, start_wd=optim.weight_decay, end_wd=optim.weight_decay,
        wd_incr_steps=max(train_steps * global_batch_size, 1), wd_incr_style="constant")
    return optimizer, scheduler
