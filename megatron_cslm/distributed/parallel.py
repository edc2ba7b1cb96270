"""torch.distributed + megatron-core parallel_state from torchrun's environment.

One entry point for every launcher (torchrun, srun, tests): the device decides the backend (NCCL on CUDA,
gloo on CPU), and the parallel layout is checked against the world size before any group is built, so a
wrong `--tensor-model-parallel-size` fails with arithmetic instead of a hang.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_cslm.distributed import cpu_mode
from megatron_cslm.distributed.quiet import gloo_connection_lines_hidden


@dataclass(frozen=True)
class ParallelConfig:
    """Parallel layout. data_parallel_size is derived: world / (TP x PP x CP)."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size

    def data_parallel_size(self, world_size: int) -> int:
        """Check the layout fits the world size and return DP."""
        mp = self.model_parallel_size
        if world_size % mp:
            raise ValueError(
                f"world size {world_size} is not divisible by TP x PP x CP = {self.tensor_model_parallel_size} x "
                f"{self.pipeline_model_parallel_size} x {self.context_parallel_size} = {mp}; launch a multiple of "
                f"{mp} processes or change the parallel sizes")
        return world_size // mp


def resolve_device(device: str) -> str:
    """'cpu' enters megatron-core CPU mode (refused when CUDA is present); 'auto' (for tools such as the
    converters' --verify, not training) picks CUDA when present and CPU mode otherwise."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        cpu_mode.enable()
    elif device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("no CUDA device is visible; pass --device cpu to run megatron-core in CPU mode "
                               "(gloo; for debugging and CI)")
    else:
        raise ValueError(f"--device must be one of auto, cuda, cpu; got {device!r}")
    return device


def use_slurm_ranks() -> None:
    """One process per GPU under srun (no torchrun, Megatron-LM's SLURM way): torch.distributed's env://
    variables from SLURM's. Only inside a job step (srun sets SLURM_STEP_NUM_TASKS; a batch script or salloc
    shell does not), and torchrun's variables win when both are present (torchrun inside an srun task)."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ or "SLURM_STEP_NUM_TASKS" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_STEP_NUM_TASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")


def initialize(parallel: ParallelConfig, device: str = "auto", seed: int = 1234, timeout_minutes: int = 30) -> str:
    """Initialise torch.distributed (from torchrun env vars) and megatron-core parallel_state; seed RNGs.

    Works for a single process without torchrun too (world size 1). Returns the resolved device.
    """
    device = resolve_device(device)
    use_slurm_ranks()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    parallel.data_parallel_size(world_size)  # fail early, before any collective
    if parallel.virtual_pipeline_model_parallel_size and device == "cpu":
        raise ValueError("virtual pipeline parallelism is not supported in --device cpu mode")
    with gloo_connection_lines_hidden():  # one '[Gloo] Rank r is connected' line per group and rank
        _create_groups(parallel, device, world_size, rank, timeout_minutes)
    seed_everything(seed)
    return device


def _create_groups(parallel: ParallelConfig, device: str, world_size: int, rank: int, timeout_minutes: int) -> None:
    from megatron.core import parallel_state

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(
            backend="nccl" if device == "cuda" else "gloo", world_size=world_size, rank=rank,
            timeout=datetime.timedelta(minutes=timeout_minutes))
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor_model_parallel_size,
            pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
            context_parallel_size=parallel.context_parallel_size,
            distributed_timeout_minutes=timeout_minutes,
            # megatron-core adds gloo twins of its NCCL groups for CPU-side collectives; on a gloo world the
            # groups are gloo already
            create_gloo_process_groups=device == "cuda",
        )


def seed_everything(seed: int) -> None:
    """Seed python/numpy/torch and megatron-core's model-parallel RNG tracker (offset by PP rank like Megatron-LM)."""
    import random

    import numpy as np
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    """Tear down groups so tests and tools can exit cleanly."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
