"""Bytes per GPU: weights, gradients, optimizer state (exact) and activations (a stated formula).

Weights, gradients, optimizer state: what megatron-core allocates, reproduced index by index
- DDP (`distributed/param_and_grad_buffer.py`) groups a chunk's parameters by (param dtype, grad dtype) into one
  contiguous buffer each, laid out in reverse `named_parameters()` order. This project reduces gradients in FP32
  (`grad_reduce_in_fp32=True`, training/setup.py), so every gradient element costs 4 bytes. With the distributed
  optimizer each parameter starts on a multiple of 64 elements and each bucket ends on a multiple of
  lcm(DP, 128); the parameters themselves are moved into a padded param buffer of the same layout. Buckets are
  cut at `bucket_size` elements only with --overlap-grad-reduce and only on the first pipeline stage's first
  chunk (bucket_size default max(40M, 1M x DP)); a tied embedding gets a bucket of its own when PP > 1.
- The distributed optimizer gives DP rank r the r-th 1/DP slice of every bucket; for each parameter element in
  its slice it keeps Adam's exp_avg and exp_avg_sq in FP32 (8 bytes) and, for 16-bit parameters, an FP32 main
  copy (4 bytes). Without it every rank keeps all of them for all its parameters. (torch's fallback Adam also
  keeps one 4-byte `step` tensor per parameter tensor; TE/Apex FusedAdam, used on GPUs, keep it per group: not
  counted.)

Activations: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models"
(arXiv 2205.05198), section 4: bytes saved for backward per layer = s*b*h*(34 + 5*a*s/h) for a GPT layer in
16-bit with dropout and s^2 attention scores. Adjusted to this project's Llama layers (no dropout, no biases, no
s^2 scores: SDPA/flash attention saves q, k, v, its output and a FP32 log-sum-exp of b*heads*s), counting what
each op saves, in elements of s*b (q = heads*head_dim, kv = groups*head_dim, f = ffn_hidden_size):
- RMSNorm: its input and its output (the next GEMM's input); megatron-core's local torch norm is a composite of
  ops that also saves x*rstd: 3h per norm locally, 2h with Transformer Engine's fused norm; plus FP32 rstd (1).
- QKV GEMM output (q + 2kv: SDPA keeps v as a view of it), RoPE'd q and k (q + kv), attention output (q, which
  linear_proj saves too); local RoPE also saves 4 cos/sin tables of s*head_dim per layer.
- SwiGLU: fc1's output (2f), silu(gate) and the product fc2 consumes (2f); the local composite keeps one more f
  (silu's result and the product are distinct from the gate*up operand), TE's fused kernel keeps only its input.
  Local: 6h + 3q + 3kv + 5f; TE: 4h + 3q + 3kv + 3f (+ stats). Selective recompute (megatron-core's default
  module, core_attn) drops the log-sum-exp only: with flash attention there are no s^2 scores left to save.
  Full recompute (uniform, 1 layer per checkpoint) keeps each layer's input (h) and, while one layer is being
  back-propagated, that layer's full set (`recompute_peak`).
- First stage: token ids (8 bytes each). Last stage: the final norm (as above), FP32 logits of the local
  vocabulary shard (megatron-core's vocab-parallel cross entropy upcasts and keeps exp(logits)), labels (8) and
  the loss mask (1).
With tensor parallelism q, kv, f, heads and the vocabulary divide by TP; h-sized terms divide by TP only with
sequence parallelism. A pipeline stage under 1F1B holds min(PP - stage, micro-batches) micro-batches in flight
(stage 0: PP); the interleaved schedule multiplies stage 0's by 1 + (PP - 1) / (PP x VPP) (Megatron-LM's
theoretical_memory_usage.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from megatron_cslm.models.llama import LlamaArch
from megatron_cslm.plan.params import ParamInfo, chunk_params, stage_layers

GRAD_BYTES = 4  # grad_reduce_in_fp32=True (training/setup.py)
ADAM_BYTES = 8  # exp_avg + exp_avg_sq, FP32
MAIN_PARAM_BYTES = 4  # FP32 master copy of a 16-bit parameter


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    vpp: int | None = None
    distributed_optimizer: bool = True
    sequence_parallel: bool | None = None  # None: on when TP > 1 (as examples/train_llama3.1_8b.sh does)
    overlap_grad_reduce: bool = True
    bucket_size: int | None = None  # DDP bucket in parameters; None: megatron-core's default

    @property
    def sp(self) -> bool:
        return self.tp > 1 if self.sequence_parallel is None else self.sequence_parallel

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    def name(self) -> str:
        return f"TP{self.tp} PP{self.pp} DP{self.dp}" + (f" VPP{self.vpp}" if self.vpp else "")


@dataclass
class Buffer:
    """One DDP param/grad buffer: its padded size and, per bucket, (start, end, [(param, start, end)])."""

    param_bytes: int
    numel: int = 0
    buckets: list = field(default_factory=list)


def buffer_layout(params: list[ParamInfo], param_bytes: int, dp: int, distributed_optimizer: bool,
                  bucket_size: int | None) -> Buffer:
    """megatron-core `_ParamAndGradBuffer.__init__`'s index arithmetic (0.16-0.19), element for element."""
    def pad(n: int, d: int) -> int:
        return -(-n // d) * d

    bucket_end_pad = math.lcm(dp, 128)
    buf = Buffer(param_bytes)
    start = bucket_start = 0
    members: list = []

    def close(end: int) -> int:
        nonlocal bucket_start, members
        end = pad(end, bucket_end_pad) if distributed_optimizer else end
        buf.buckets.append((bucket_start, end, members))
        bucket_start, members = end, []
        return end

    end = 0
    for p in reversed(params):
        if distributed_optimizer:
            start = pad(start, 64)
        alone = p.shared_embedding and distributed_optimizer
        if alone and members:
            start = close(start)
        end = start + p.numel
        members.append((p, start, end))
        if (bucket_size is not None and end - bucket_start >= bucket_size) or alone:
            start = close(end)
        else:
            start = end
    if members:
        close(end)
    buf.numel = buf.buckets[-1][1] if buf.buckets else 0
    return buf


@dataclass(frozen=True)
class StateBytes:
    weights: int
    gradients: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer


def chunk_buffers(arch: LlamaArch, padded_vocab: int, layout: Layout, pp_rank: int, chunk: int = 0,
                  param_bytes: int = 2, spec: str = "te") -> list[Buffer]:
    """The DDP buffers of one model chunk of pipeline stage `pp_rank`."""
    vpp = layout.vpp or 1
    params = chunk_params(arch, padded_vocab, layout.tp, first=pp_rank == 0 and chunk == 0,
                          last=pp_rank == layout.pp - 1 and chunk == vpp - 1,
                          layers=stage_layers(arch.num_layers, layout.pp, layout.vpp), spec=spec)
    bucket_size = None
    if layout.overlap_grad_reduce and pp_rank == 0 and chunk == 0:
        bucket_size = layout.bucket_size or max(40_000_000, 1_000_000 * layout.dp)
    groups: dict[int, list[ParamInfo]] = {}
    for p in params:
        groups.setdefault(4 if p.fp32 else param_bytes, []).append(p)
    return [buffer_layout(ps, nbytes, layout.dp, layout.distributed_optimizer, bucket_size)
            for nbytes, ps in groups.items()]


def state_bytes(arch: LlamaArch, padded_vocab: int, layout: Layout, *, pp_rank: int = 0, dp_rank: int | None = None,
                param_bytes: int = 2, spec: str = "te") -> StateBytes:
    """Weights, gradient buffer and optimizer state of one rank; dp_rank None: the largest over DP ranks."""
    buffers = [buf for chunk in range(layout.vpp or 1)
               for buf in chunk_buffers(arch, padded_vocab, layout, pp_rank, chunk, param_bytes, spec)]
    ranks = range(layout.dp) if dp_rank is None else (dp_rank,)
    return max((_rank_state(buffers, layout, r) for r in ranks), key=lambda s: s.total)


def _rank_state(buffers: list[Buffer], layout: Layout, dp_rank: int) -> StateBytes:
    weights = grads = optim = 0
    for buf in buffers:
        per_elem = ADAM_BYTES + (MAIN_PARAM_BYTES if buf.param_bytes < 4 else 0)
        grads += buf.numel * GRAD_BYTES
        if layout.distributed_optimizer:
            weights += buf.numel * buf.param_bytes
            for b_start, b_end, members in buf.buckets:
                shard = (b_end - b_start) // layout.dp
                lo, hi = b_start + dp_rank * shard, b_start + (dp_rank + 1) * shard
                owned = sum(max(0, min(e, hi) - max(s, lo)) for _, s, e in members)
                optim += owned * per_elem
        else:
            n = sum(e - s for _, _, members in buf.buckets for _, s, e in members)
            weights += n * buf.param_bytes
            optim += n * per_elem
    return StateBytes(weights, grads, optim)


RECOMPUTE = ("none", "selective", "full")
# Per layer, elements of s*b saved for backward: (h, q, kv, f) coefficients (derivation in the module docstring).
LAYER_TERMS = {"local": (6, 3, 3, 5), "te": (4, 3, 3, 3)}
STATS_BYTES = 4  # RMSNorm rstd, attention log-sum-exp, RoPE tables: FP32
ROPE_TABLES = {"local": 4, "te": 1}  # cos/sin tables of s*head_dim kept per layer (local) / per stage (TE fused)


@dataclass(frozen=True)
class Activations:
    """Bytes saved for backward by one micro-batch on one rank. `transient`: held only for a moment, not per
    micro-batch in flight (full recompute: one layer's set while it is back-propagated; the last stage: the
    16-bit logits beside their FP32 copy during the loss)."""

    layers: int
    embedding: int
    head: int
    transient: int = 0

    @property
    def saved(self) -> int:
        return self.layers + self.embedding + self.head


def activation_bytes(arch: LlamaArch, seq: int, mbs: int, layout: Layout, padded_vocab: int, *,
                     recompute: str = "none", layers: int | None = None, first: bool = True, last: bool = True,
                     act_bytes: int = 2, spec: str = "te") -> Activations:
    """One micro-batch's saved activations on one TP rank of a stage with `layers` layers."""
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {RECOMPUTE}, got {recompute!r}")
    t, sb = layout.tp, seq * mbs
    t_sp = t if layout.sp else 1
    h, hd = arch.hidden_size, arch.head_dim
    q, kv, f = arch.num_attention_heads * hd, arch.num_query_groups * hd, arch.ffn_hidden_size
    layers = stage_layers(arch.num_layers, layout.pp) if layers is None else layers
    ch, cq, ckv, cf = LAYER_TERMS[spec]
    norms_per_layer = 2
    full_layer = (sb * (ch * h // t_sp + (cq * q + ckv * kv + cf * f) // t) * act_bytes
                  + norms_per_layer * sb // t_sp * STATS_BYTES)
    lse = mbs * arch.num_attention_heads // t * seq * STATS_BYTES
    rope = seq * hd * STATS_BYTES
    if recompute == "full":
        per_stage = layers * sb * h // t_sp * act_bytes + rope
        peak = full_layer + lse + ROPE_TABLES[spec] * rope
    else:
        per_layer = full_layer + (lse if recompute == "none" else 0)
        per_stage = layers * per_layer + (layers * rope * 4 if spec == "local" else rope)
        peak = 0
    embedding = sb * 8 if first else 0  # token ids (int64) kept by the embedding's backward
    head = 0
    if last:
        norm_h = (3 if spec == "local" else 2) * sb * h // t_sp * act_bytes + sb // t_sp * STATS_BYTES
        head = norm_h + sb * padded_vocab // t * 4 + sb * 8 + sb  # FP32 exp(logits), labels, loss mask
        peak = max(peak, sb * padded_vocab // t * act_bytes)
    return Activations(per_stage, embedding, head, peak)


def in_flight(layout: Layout, stage: int, num_microbatches: int) -> float:
    """Micro-batches whose activations a stage holds at the 1F1B peak (interleaving: Megatron-LM's penalty)."""
    n = min(layout.pp - stage, num_microbatches)
    if layout.vpp and layout.pp > 1:
        n *= 1 + (layout.pp - 1) / (layout.pp * layout.vpp)
    return n
