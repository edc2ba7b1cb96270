"""Core attention for the local (non-TE) spec that costs what its samples cost: PyTorch SDPA per packed sample.

megatron-core's local `DotProductAttention` materialises [b, heads, s, s] scores and refuses
`packed_seq_params`, so a packed SFT bin had to be attended with a dense block-diagonal mask: (bin length)^2
work and memory whatever its samples are. `SampleSDPAttention` is a drop-in core attention (same constructor
and forward signature, selected by the layer spec in `models/llama.py`) that attends each sample of a bin on its
own from `cu_seqlens`, the sum of each sample's length squared, as Transformer Engine's THD kernels do. It runs
wherever `torch.nn.functional.scaled_dot_product_attention` does: CPU (flash kernel) and GPUs without TE.

Invariants (checked against the dense-mask path in tests/test_packed_attention.py, fp32 max |diff| < 1e-5):
- Layouts: `qkv_format="sbhd"` with `cu_seqlens_q` of shape [b, n+1] (one row per bin; query [s, b, np, hn],
  positions and RoPE as in the unpacked model) or `"thd"` with a flat [n+1] (query [t, np, hn], TE's layout).
  Without packed params it is causal attention over the whole sequence (pretraining), or, given a dense
  `attention_mask` (True = masked, megatron's convention), that mask.
- Scaling 1/sqrt(head dim) (or `softmax_scale`); megatron's query-key layer scaling divides the scores by the
  layer number and multiplies them back inside the softmax, a no-op on the result, so it is not repeated.
- GQA: K/V heads are shared by consecutive query heads (`enable_gqa`, megatron's `repeat_interleave` order).
- Softmax: SDPA's fused kernels accumulate the softmax in fp32 for bf16/fp16 inputs, which is what
  `attention_softmax_in_fp32` asks of megatron's unfused path.
- Dropout on the attention probabilities (`attention_dropout`) only in training, under megatron's RNG
  tracker fork so tensor-parallel ranks drop independently, as `DotProductAttention` does.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide


@dataclass
class BinPackedSeqParams(PackedSeqParams):
    """`PackedSeqParams` for bins kept as the batch dimension (`qkv_format="sbhd"`).

    `cu_seqlens_q/kv` are [b, n+1] (trailing repeats = no sample); `bounds` holds the same boundaries as host
    ints, computed once per micro-batch, so no layer synchronises with the GPU to read them. `max_seqlen_q/kv`
    are the bin length: megatron-core sizes its rotary table from them when packed params are given.
    """

    bounds: tuple[tuple[int, ...], ...] = field(default=())


def bin_packed_seq_params(cu_seqlens: torch.Tensor, seq_length: int | None = None) -> BinPackedSeqParams:
    """Per-bin packed params from the collated [b, n+1] (or one bin's [n+1]) `cu_seqlens`."""
    cu = cu_seqlens if cu_seqlens.dim() == 2 else cu_seqlens[None]
    s = int(cu[0, -1]) if seq_length is None else int(seq_length)
    bounds = tuple(tuple(sorted(set(row))) for row in cu.tolist())
    if any(row[0] != 0 or row[-1] != s for row in bounds):
        raise ValueError(f"cu_seqlens rows must start at 0 and end at the bin length {s}, got {cu.tolist()}")
    return BinPackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=s,
                              max_seqlen_kv=s, bounds=bounds)


def _thd_bounds(params: PackedSeqParams) -> tuple[int, ...]:
    cu = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None else params.cu_seqlens_q
    return tuple(sorted(set(cu.tolist())))


class SampleSDPAttention(MegatronModule):
    """Drop-in for megatron-core's `DotProductAttention` (local spec) with per-sample packed attention."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None):
        super().__init__(config=config)
        from megatron.core.process_groups_config import ProcessGroupCollection

        if config.context_parallel_size != 1:
            raise ValueError("context parallelism needs Transformer Engine attention (--transformer-impl te)")
        if config.softmax_type != "vanilla" or config.window_size is not None:
            raise ValueError(f"SampleSDPAttention supports vanilla softmax without sliding windows; got "
                             f"softmax_type={config.softmax_type!r}, window_size={config.window_size}")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp = pg_collection.tp.size()
        self.attn_mask_type = attn_mask_type
        self.heads = divide(config.num_attention_heads, tp)
        self.groups = divide(config.num_query_groups, tp)
        self.head_dim = config.kv_channels
        self.softmax_scale = 1.0 / math.sqrt(self.head_dim) if softmax_scale is None else softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              causal: bool) -> torch.Tensor:
        """q [..., np, L, hn], k/v [..., ng, L, hn] -> [..., np, L, hn]."""
        p = self.dropout_p if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal,
                                              scale=self.softmax_scale, enable_gqa=self.groups != self.heads)

    def _per_sample(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    bounds: tuple[tuple[int, ...], ...]) -> torch.Tensor:
        """q [b, np, s, hn]; every bin's samples attended causally on their own, concatenated back.

        Each call keeps a batch dimension of 1: SDPA's fused CPU (flash) kernel takes only 4-D inputs and
        silently falls back to the math path, which materialises [np, L, L] scores, for 3-D ones."""
        bins = []
        for i, cuts in enumerate(bounds):
            parts = [self._sdpa(q[i:i + 1, :, a:e], k[i:i + 1, :, a:e], v[i:i + 1, :, a:e], None, True)
                     for a, e in zip(cuts[:-1], cuts[1:])]
            bins.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
        return torch.cat(bins) if len(bins) > 1 else bins[0]

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type: Optional[AttnMaskType] = None,
                attention_bias: Optional[torch.Tensor] = None,
                packed_seq_params: Optional[PackedSeqParams] = None) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("SampleSDPAttention does not take an attention bias")
        thd = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        if thd:  # [t, np, hn]: one flattened bin
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        s, b = query.shape[0], query.shape[1]
        # [s, b, heads, hn] -> [b, heads, s, hn]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        drops = self.training and self.dropout_p > 0 and not self.config.sequence_parallel
        fork = tensor_parallel.get_cuda_rng_tracker().fork() if drops else contextlib.nullcontext()
        with fork:
            if packed_seq_params is not None:
                bounds = ((_thd_bounds(packed_seq_params),) if thd
                          else getattr(packed_seq_params, "bounds", None)
                          or bin_packed_seq_params(packed_seq_params.cu_seqlens_q, s).bounds)
                out = self._per_sample(q, k, v, bounds)
            elif attention_mask is not None:
                out = self._sdpa(q, k, v, ~attention_mask, False)
            else:
                mask_type = attn_mask_type or self.attn_mask_type
                out = self._sdpa(q, k, v, None, mask_type == AttnMaskType.causal)
        # [b, np, s, hn] -> [s, b, np * hn]
        out = out.permute(2, 0, 1, 3).reshape(s, b, self.heads * self.head_dim)
        return out.squeeze(1) if thd else out

