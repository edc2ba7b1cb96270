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

from megatron_cslm.argtypes import check_settings, positive_int, setting
from megatron_cslm.distributed import cpu_mode
from megatron_cslm.distributed.ports import free_port
from megatron_cslm.distributed.quiet import gloo_connection_lines_hidden
from megatron_cslm.errors import CslmError


@dataclass(frozen=True)
class ParallelConfig:
    """Parallel layout. data_parallel_size is derived: world / (TP x PP x CP)."""

    # each field is a training flag (argtypes.setting; training/arguments.py generates the flags)
    tensor_model_parallel_size: int = setting(1, "tensor-parallel size (TP)", type=positive_int)
    pipeline_model_parallel_size: int = setting(1, "pipeline-parallel size (PP)", type=positive_int)
    context_parallel_size: int = setting(1, "context-parallel size (CP)", type=positive_int)
    virtual_pipeline_model_parallel_size: int | None = setting(
        None, "model chunks per pipeline rank for megatron-core's interleaved 1F1B schedule (a smaller pipeline "
              "bubble at PP > 2; micro-batches per step must be a multiple of PP)", type=positive_int)
    num_layers_per_virtual_pipeline_stage: int | None = setting(  # resolved to the virtual size by `virtual_size`
        None, "Megatron-LM's other spelling of the interleaved schedule: layers per model chunk (virtual size = "
              "layers / (PP x this))", type=positive_int)

    def __post_init__(self):
        check_settings(self)

    def virtual_size(self, num_layers: int) -> int | None:
        """Model chunks per pipeline rank (None: one), from either Megatron-LM flag; they must agree."""
        per_stage = self.num_layers_per_virtual_pipeline_stage
        if per_stage is None:
            return self.virtual_pipeline_model_parallel_size
        pp = self.pipeline_model_parallel_size
        if num_layers % (pp * per_stage):
            raise CslmError.usage(f"--num-layers-per-virtual-pipeline-stage {per_stage}: {num_layers} layers do not "
                             f"split into PP {pp} x chunks of {per_stage}")
        vpp = num_layers // (pp * per_stage)
        if self.virtual_pipeline_model_parallel_size not in (None, vpp):
            raise CslmError.usage(f"--virtual-pipeline-model-parallel-size {self.virtual_pipeline_model_parallel_size} "
                             f"disagrees with --num-layers-per-virtual-pipeline-stage {per_stage} ({vpp} chunks "
                             f"of {num_layers} layers at PP {pp})")
        return vpp

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size

    def data_parallel_size(self, world_size: int) -> int:
        """Check the layout fits the world size and return DP."""
        mp = self.model_parallel_size
        if world_size % mp:
            raise CslmError.usage(
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
            raise CslmError.usage("no CUDA device is visible; pass --device cpu to run megatron-core in CPU mode "
                               "(gloo; for debugging and CI)")
    else:
        raise CslmError.usage(f"--device must be one of auto, cuda, cpu; got {device!r}")
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
    with gloo_connection_lines_hidden():  # one '[Gloo] Rank r is connected' line per group and rank
        _create_groups(parallel, device, world_size, rank, timeout_minutes)
    seed_everything(seed)
    return device


def _create_groups(parallel: ParallelConfig, device: str, world_size: int, rank: int, timeout_minutes: int) -> None:
    from megatron.core import parallel_state

    if not dist.is_initialized():
        init_method = None  # env://: MASTER_ADDR/MASTER_PORT, as torchrun and SLURM launchers set them
        if world_size == 1 and "MASTER_PORT" not in os.environ:
            # a lone process (a tool's --verify, an in-process test) agrees on a port with nobody: take a free
            # one, and leave the environment alone (a fixed 29500 collided with any other job on the machine,
            # and leaked into the processes this one starts later)
            init_method = f"tcp://127.0.0.1:{free_port()}"
        else:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29500")
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(
            backend="nccl" if device == "cuda" else "gloo", init_method=init_method, world_size=world_size,
            rank=rank, timeout=datetime.timedelta(minutes=timeout_minutes))
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


def use_virtual_pipeline(size: int | None) -> None:
    """Tell megatron-core the interleaved schedule's chunk count when it was derived after the groups were made
    (from --num-layers-per-virtual-pipeline-stage and the model's layer count)."""
    from megatron.core import parallel_state

    if size and parallel_state.get_virtual_pipeline_model_parallel_world_size() != size:
        parallel_state.set_virtual_pipeline_model_parallel_world_size(size)
        parallel_state.set_virtual_pipeline_model_parallel_rank(0)


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
