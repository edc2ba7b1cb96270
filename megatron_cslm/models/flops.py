"""Model FLOPs per token and MFU: one formula for the training log and for bench/.

Counts matmul FLOPs (2 per multiply-add) like Megatron-LM: QKV with grouped KV heads, attention scores and
values over the full sequence, output projection, SwiGLU MLP (three matrices) and the logits layer. A
training step costs 3x the forward pass (backward = 2x), 4x with full activation recomputation, 3x plus the
attention core's forward once more with selective recomputation (megatron-core's default module, core_attn).
Dense peaks per GPU come from `megatron_cslm.plan.gpus` (one table for the log's MFU and `cslm plan`).
"""
from __future__ import annotations

from megatron_cslm.models.llama import LlamaArch
from megatron_cslm.plan.gpus import GPUS

# "<gpu>-<precision>" -> dense peak TFLOP/s, e.g. "h100-bf16" (names without the memory size, as before)
PEAK_TFLOPS = {f"{name.split('-')[0]}-{precision}": gpu.peak_tflops(precision)
               for name, gpu in GPUS.items() for precision in ("bf16", "fp8")
               if precision == "bf16" or gpu.fp8_tflops is not None}


def forward_flops_per_token(arch: LlamaArch, seq_length: int, vocab_size: int | None = None) -> float:
    h, hd, L = arch.hidden_size, arch.head_dim, arch.num_layers
    q, kv = arch.num_attention_heads * hd, arch.num_query_groups * hd
    per_layer = (h * (q + 2 * kv)          # QKV projection
                 + 2 * seq_length * q      # QK^T and attention x V
                 + q * h                   # output projection
                 + 3 * h * arch.ffn_hidden_size)  # SwiGLU: gate, up, down
    return 2.0 * (L * per_layer + h * (vocab_size or arch.vocab_size))


def attention_core_flops_per_token(arch: LlamaArch, seq_length: int) -> float:
    """QK^T and attention x V of one forward pass (what selective recomputation runs again)."""
    return 2.0 * arch.num_layers * 2 * seq_length * arch.num_attention_heads * arch.head_dim


def train_flops_per_token(arch: LlamaArch, seq_length: int, vocab_size: int | None = None,
                          full_recompute: bool = False, recompute: str | None = None) -> float:
    """Forward + backward (+ recomputation: `recompute` none|selective|full, or `full_recompute`)."""
    forward = forward_flops_per_token(arch, seq_length, vocab_size)
    if full_recompute or recompute == "full":
        return 4.0 * forward
    if recompute == "selective":
        return 3.0 * forward + attention_core_flops_per_token(arch, seq_length)
    return 3.0 * forward


def mfu(tokens_per_s_per_gpu: float, flops_per_token: float, peak_tflops: float = PEAK_TFLOPS["h100-bf16"]) -> float:
    """Model FLOPs utilisation: achieved model TFLOP/s per GPU over the GPU's dense peak."""
    return tokens_per_s_per_gpu * flops_per_token / (peak_tflops * 1e12)
