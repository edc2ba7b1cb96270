"""Model chunks wrapped in megatron-core DDP, the distributed optimizer and the LR/WD schedule.

The one place where the run's typed configs (`training/config.py`) become megatron-core's
DistributedDataParallelConfig, OptimizerConfig and OptimizerParamScheduler. The schedule counts samples, like
Megatron-LM, so a resume at another data-parallel size continues exactly.
"""
from __future__ import annotations

import torch

from megatron_cslm.errors import CslmError
from megatron_cslm.models.chunks import build_model_chunks
from megatron_cslm.models.llama import LlamaArch
from megatron_cslm.training.config import CheckpointConfig, CommConfig, OptimConfig


def build_model(arch: LlamaArch, config, padded_vocab: int, spec: str | None = None, ddp: bool = True,
                use_distributed_optimizer: bool = True, comm: CommConfig = CommConfig()) -> list:
    """This rank's model chunks, in megatron-core DDP (grad buffers, reduce-scatter for the dist. optimizer).

    One chunk, or `config.virtual_pipeline_model_parallel_size` chunks for megatron-core's interleaved 1F1B
    schedule (chunk i holds virtual stage i; its layers' checkpoint keys are global, so a save loads at any
    PP/VPP). As in Megatron-LM, chunks after the first put all their parameters in one bucket. With
    `comm.overlap_grad_reduce` each bucket's reduce starts as soon as its gradients are ready (the schedule gets
    DDP's no_sync/start_grad_sync, one per chunk); with `comm.overlap_param_gather` the distributed optimizer's
    all-gather runs under the next forward (DDP forward pre-hooks)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    models = build_model_chunks(arch, config, padded_vocab, spec)
    if not ddp:
        return models
    config.finalize_model_grads_func = finalize_model_grads
    config.calculate_per_token_loss = True
    if comm.overlap_param_gather and not (use_distributed_optimizer and comm.overlap_grad_reduce):
        raise CslmError.usage("--overlap-param-gather needs the distributed optimizer and --overlap-grad-reduce")
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=comm.overlap_grad_reduce,
        overlap_param_gather=comm.overlap_param_gather, use_distributed_optimizer=use_distributed_optimizer,
        check_for_nan_in_grad=False, bucket_size=comm.ddp_bucket_size)
    chunks = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=model, disable_bucketing=i > 0)
              for i, model in enumerate(models)]
    if comm.overlap_grad_reduce:  # Megatron-LM's training.py: the schedule drives DDP's bucketed reduce
        no_sync, grad_sync = [c.no_sync for c in chunks], [c.start_grad_sync for c in chunks]
        config.no_sync_func = no_sync[0] if len(chunks) == 1 else no_sync
        config.grad_sync_func = grad_sync[0] if len(chunks) == 1 else grad_sync
    return chunks


def per_chunk(model: list, make_iterator):
    """The data iterator(s) a schedule takes: one, or one per model chunk under the interleaved schedule (each
    chunk reads every micro-batch once, in order, so each gets its own iterator over the same stream)."""
    return make_iterator() if len(model) == 1 else [make_iterator() for _ in model]


def schedule_of(optim: OptimConfig, global_batch_size: int) -> dict:
    """The LR schedule a run trains with, resolved to iterations (saved in checkpoints, compared on resume)."""
    return {"lr": optim.lr, "min_lr": optim.min_lr, "lr_decay_style": optim.lr_decay_style,
            "lr_warmup_iters": optim.warmup_iters(), "lr_decay_iters": optim.decay_iters(),
            "train_iters": optim.train_iters, "global_batch_size": global_batch_size}


def build_optimizer(model: list, optim: OptimConfig, config, global_batch_size: int,
                    checkpoint: CheckpointConfig = CheckpointConfig()):
    """Distributed Adam + scheduler counting in samples, like Megatron-LM (so resume at any DP is exact)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    opt_config = OptimizerConfig(
        optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad, bf16=config.bf16, fp16=config.fp16, params_dtype=config.params_dtype,
        use_distributed_optimizer=optim.use_distributed_optimizer)
    optimizer = get_megatron_optimizer(opt_config, model, use_gloo_process_groups=torch.cuda.is_available())
    warmup = optim.warmup_iters() * global_batch_size
    decay = max(optim.decay_iters() * global_batch_size, 1)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if warmup else optim.lr, max_lr=optim.lr, min_lr=optim.min_lr,
        lr_warmup_steps=warmup, lr_decay_steps=decay, lr_decay_style=optim.lr_decay_style,
        start_wd=optim.weight_decay, end_wd=optim.weight_decay, wd_incr_steps=decay, wd_incr_style="constant",
        # the trainer has already compared the schedule with the checkpoint's (trainer.check_schedule)
        override_opt_param_scheduler=checkpoint.override_opt_param_scheduler,
        use_checkpoint_opt_param_scheduler=not checkpoint.override_opt_param_scheduler)
    return optimizer, scheduler
