"""Layouts (TP x PP x DP, optional VPP) for a run, their memory per GPU and estimated step time, ranked.

Step time model (stated so its ranking can be judged):
- compute: the model FLOPs of a step (models/flops.py, with recomputation) / (GPUs x dense peak x MFU), where
  MFU (--mfu) is the fraction of peak the GEMMs reach; times (1 + pipeline bubble), the bubble of 1F1B being
  (PP - 1) / (micro-batches x VPP) (Narayanan et al. 2021);
- tensor parallelism: per layer and micro-batch, 4 collectives forward and 4 backward (all-gather /
  reduce-scatter with sequence parallelism, 2+2 all-reduces without: the same volume), each moving
  s*b*h*2 bytes x (TP-1)/TP per GPU, 4 more forward with full recomputation; on NVLink when TP fits in a node;
  on the critical path;
- pipeline: one activation forward and one gradient backward per micro-batch and stage boundary
  (s*b*h*2 / TP with sequence parallelism); on the critical path;
- data parallelism: the distributed optimizer reduce-scatters FP32 gradients and all-gathers 16-bit weights
  (N x (4 + 2) x (DP-1)/DP bytes per GPU for its N parameters), plain DDP all-reduces FP32 gradients
  (2 x N x 4 x (DP-1)/DP); over the network when a DP group spans nodes; with --overlap-grad-reduce only what
  exceeds the compute time is exposed.
Volumes are per GPU per step; bandwidths per GPU per direction (plan/gpus.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_cslm.models.flops import train_flops_per_token
from megatron_cslm.plan.gpus import GIB, GPU
from megatron_cslm.plan.memory import Activations, Layout, StateBytes, activation_bytes, in_flight, state_bytes
from megatron_cslm.plan.source import ModelSpec

ACT_BYTES = 2  # activations in BF16 (also under FP8: TE keeps FP8 copies of GEMM inputs only beside them)


@dataclass(frozen=True)
class Run:
    """What the user asks for, independent of layout."""

    seq_length: int
    micro_batch_size: int
    global_batch_size: int
    gpu: GPU
    num_gpus: int
    precision: str = "bf16"  # bf16 | fp8
    recompute: str = "none"
    mfu: float = 0.4
    reserve_gib: float = 4.0  # CUDA context, NCCL buffers, allocator fragmentation
    train_tokens: float | None = None
    spec: str = "te"


@dataclass(frozen=True)
class Estimate:
    layout: Layout
    padded_vocab: int
    stage: int  # the pipeline stage with the largest footprint
    state: StateBytes
    state_other_optimizer: StateBytes  # the same rank with the distributed optimizer toggled
    activations: Activations
    in_flight: float
    activation_bytes: int  # saved x in flight + transient
    total_bytes: int
    fits: bool
    num_microbatches: int
    compute_s: float
    bubble: float
    tp_bytes: float
    pp_bytes: float
    dp_bytes: float
    tp_s: float
    pp_s: float
    dp_exposed_s: float
    step_s: float
    tokens_per_step: int

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.tokens_per_step / self.step_s / self.layout.world

    def train_seconds(self, tokens: float) -> float:
        return math.ceil(tokens / self.tokens_per_step) * self.step_s


def check_layout(model: ModelSpec, run: Run, layout: Layout) -> str | None:
    """Why `layout` cannot run, or None."""
    arch = model.arch
    if layout.world != run.num_gpus:
        return f"TP x PP x DP = {layout.world} != {run.num_gpus} GPUs"
    for what, n in (("attention heads", arch.num_attention_heads), ("KV heads", arch.num_query_groups),
                    ("ffn_hidden_size", arch.ffn_hidden_size)):
        if n % layout.tp:
            return f"TP {layout.tp} does not divide the {n} {what}"
    if arch.num_layers % (layout.pp * (layout.vpp or 1)):
        return f"PP x VPP does not divide {arch.num_layers} layers"
    if run.global_batch_size % (run.micro_batch_size * layout.dp):
        return f"global batch {run.global_batch_size} is not a multiple of micro batch x DP"
    if layout.vpp and (run.global_batch_size // (run.micro_batch_size * layout.dp)) % layout.pp:
        return "the interleaved schedule needs micro-batches to be a multiple of PP"
    return None


def estimate(model: ModelSpec, run: Run, layout: Layout) -> Estimate:
    arch, gpu = model.arch, run.gpu
    padded = model.padded_vocab(layout.tp)
    m = run.global_batch_size // (run.micro_batch_size * layout.dp)
    worst = None
    for stage in range(layout.pp):
        state = state_bytes(arch, padded, layout, pp_rank=stage, spec=run.spec)
        acts = activation_bytes(arch, run.seq_length, run.micro_batch_size, layout, padded, recompute=run.recompute,
                                first=stage == 0, last=stage == layout.pp - 1, act_bytes=ACT_BYTES, spec=run.spec)
        n = in_flight(layout, stage, m)
        act_total = int(acts.saved * n) + acts.transient
        total = state.total + act_total
        if worst is None or total > worst[-1]:
            worst = (stage, state, acts, n, act_total, total)
    stage, state, acts, n, act_total, total = worst
    other = state_bytes(arch, padded, Layout(**{**layout.__dict__,
                                                "distributed_optimizer": not layout.distributed_optimizer}),
                        pp_rank=stage, spec=run.spec)
    fits = total + run.reserve_gib * GIB <= gpu.memory_bytes

    tokens = run.global_batch_size * run.seq_length
    flops = train_flops_per_token(arch, run.seq_length, padded, recompute=run.recompute) * tokens
    peak = gpu.peak_tflops(run.precision) * 1e12
    compute = flops / (layout.world * peak * run.mfu)
    bubble = (layout.pp - 1) / (m * (layout.vpp or 1))
    sbh = run.seq_length * run.micro_batch_size * arch.hidden_size * ACT_BYTES
    layers = arch.num_layers // layout.pp
    tp_ops = 8 + (4 if run.recompute == "full" else 0)
    tp_bytes = tp_ops * sbh * (layout.tp - 1) / layout.tp * layers * m
    pp_bytes = 2 * sbh / (layout.tp if layout.sp else 1) * m if layout.pp > 1 else 0.0
    n_params = state.gradients / 4  # FP32 gradient buffer elements of this rank
    frac = (layout.dp - 1) / layout.dp
    dp_bytes = n_params * (4 + 2) * frac if layout.distributed_optimizer else 2 * n_params * 4 * frac
    bw = {True: gpu.nvlink_gbps * 1e9, False: gpu.network_gbps * 1e9}
    per_node = gpu.gpus_per_node
    tp_s = tp_bytes / bw[layout.tp <= per_node]
    pp_s = pp_bytes / bw[layout.tp * layout.pp <= per_node]
    dp_s = dp_bytes / bw[layout.tp * layout.pp * layout.dp <= per_node]
    dp_exposed = max(0.0, dp_s - compute) if layout.overlap_grad_reduce else dp_s
    step = compute * (1 + bubble) + tp_s + pp_s + dp_exposed
    return Estimate(layout, padded, stage, state, other, acts, n, act_total, total, fits, m, compute, bubble,
                    tp_bytes, pp_bytes, dp_bytes, tp_s, pp_s, dp_exposed, step, tokens)


def candidate_layouts(model: ModelSpec, run: Run, *, distributed_optimizer: bool = True,
                      vpp: tuple[int, ...] = (), overlap_grad_reduce: bool = True,
                      bucket_size: int | None = None) -> list[Layout]:
    """Every TP (within a node) x PP x DP over the GPUs that the model and batch allow; VPP sizes from `vpp`."""
    out = []
    for tp in range(1, min(run.num_gpus, run.gpu.gpus_per_node) + 1):
        if run.num_gpus % tp:
            continue
        for pp in range(1, run.num_gpus // tp + 1):
            if (run.num_gpus // tp) % pp:
                continue
            for v in (None, *vpp):
                if v and pp == 1:
                    continue
                layout = Layout(tp, pp, run.num_gpus // (tp * pp), v, distributed_optimizer,
                                overlap_grad_reduce=overlap_grad_reduce, bucket_size=bucket_size)
                if check_layout(model, run, layout) is None:
                    out.append(layout)
    return out


def rank(model: ModelSpec, run: Run, layouts: list[Layout]) -> list[Estimate]:
    """Estimates, fitting layouts first, each group by step time."""
    return sorted((estimate(model, run, lay) for lay in layouts), key=lambda e: (not e.fits, e.step_s))
