"""Model FLOPs per token and MFU: one formula for the training log and for bench/.

Counts matmul FLOPs (2 per multiply-add) like Megatron-LM: QKV with grouped KV heads, attention scores and
values over the full sequence, output projection, SwiGLU MLP (three matrices) and the logits layer. A
training step costs 3x the forward pass (backward = 2x), 4x with full activation recomputation.
"""
from __future__ import annotations

from megatron_cslm.models.llama import LlamaArch

PEAK_TFLOPS = {"h100-bf16": 989.0, "h200-bf16": 989.0, "a100-bf16": 312.0, "h100-fp8": 1979.0}


def forward_flops_per_token(arch: LlamaArch, seq_length: int, vocab_size: int | None = None) -> float:
    h, hd, L = arch.hidden_size, arch.head_dim, arch.num_layers
    q, kv = arch.num_attention_heads * hd, arch.num_query_groups * hd
    per_layer = (h * (q + 2 * kv)          # QKV projection
                 + 2 * seq_length * q      # QK^T and attention x V
                 + q * h                   # output projection
                 + 3 * h * arch.ffn_hidden_size)  # SwiGLU: gate, up, down
    return 2.0 * (L * per_layer + h * (vocab_size or arch.vocab_size))


def train_flops_per_token(arch: LlamaArch, seq_length: int, vocab_size: int | None = None,
                          full_recompute: bool = False) -> float:
    return (4.0 if full_recompute else 3.0) * forward_flops_per_token(arch, seq_length, vocab_size)


def mfu(tokens_per_s_per_gpu: float, flops_per_token: float, peak_tflops: float = PEAK_TFLOPS["h100-bf16"]) -> float:
    """Model FLOPs utilisation: achieved model TFLOP/s per GPU over the GPU's dense peak."""
    return tokens_per_s_per_gpu * flops_per_token / (peak_tflops * 1e12)
