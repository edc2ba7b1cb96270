"""The parameters one rank owns, named and ordered as megatron-core's `GPTModel.named_parameters()` yields them.

Why the order matters: megatron-core's DDP lays parameters into its contiguous param/grad buffers in reverse
order, and with the distributed optimizer pads each parameter's start to 64 elements and each bucket's end to
lcm(DP, 128): the padding, hence the bytes, depends on the sequence of sizes. Orders were read from
megatron-core (0.16-0.19) and checked on CPU for the local spec (tests/test_plan.py):
- local spec (megatron-core's torch modules): per layer input_layernorm, linear_proj, linear_qkv,
  pre_mlp_layernorm, linear_fc1, linear_fc2; its RMSNorm weights are created in FP32 whatever the params
  dtype (WrappedTorchNorm), so they sit in a buffer of their own;
- Transformer Engine spec: the norms are fused into linear_qkv / linear_fc1 (`layer_norm_weight`, created in
  the params dtype before the weight).
Shapes: QKV rows (heads + 2 x KV groups) x head_dim / TP; fc1 rows 2 x ffn / TP (SwiGLU gate and up); the
embedding and output layer hold padded_vocab / TP rows. With tied embeddings and PP > 1 the last stage keeps
its own copy of the output weight (marked shared_embedding, bucketed alone by the distributed optimizer).
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_cslm.models.llama import LlamaArch


@dataclass(frozen=True)
class ParamInfo:
    name: str
    numel: int
    fp32: bool = False           # created in FP32 whatever --bf16 says (local-spec norms)
    shared_embedding: bool = False


def stage_layers(num_layers: int, pp: int, vpp: int | None = None) -> int:
    """Layers in one model chunk (uniform split, as check_parallel_fit requires)."""
    return num_layers // (pp * (vpp or 1))


def chunk_params(arch: LlamaArch, padded_vocab: int, tp: int, *, first: bool, last: bool, layers: int,
                 spec: str = "te") -> list[ParamInfo]:
    """Parameters of one model chunk on one TP rank. `first`/`last`: the chunk holds the embedding / the head."""
    h, hd = arch.hidden_size, arch.head_dim
    q, kv, f = arch.num_attention_heads * hd, arch.num_query_groups * hd, arch.ffn_hidden_size
    local = spec != "te"
    out: list[ParamInfo] = []
    if first:
        out.append(ParamInfo("embedding.word_embeddings.weight", padded_vocab // tp * h))
    for i in range(layers):
        p = f"decoder.layers.{i}."
        if local:
            out += [ParamInfo(p + "input_layernorm.weight", h, fp32=True),
                    ParamInfo(p + "self_attention.linear_proj.weight", h * q // tp),
                    ParamInfo(p + "self_attention.linear_qkv.weight", (q + 2 * kv) // tp * h),
                    ParamInfo(p + "pre_mlp_layernorm.weight", h, fp32=True),
                    ParamInfo(p + "mlp.linear_fc1.weight", 2 * f // tp * h),
                    ParamInfo(p + "mlp.linear_fc2.weight", h * f // tp)]
        else:
            out += [ParamInfo(p + "self_attention.linear_proj.weight", h * q // tp),
                    ParamInfo(p + "self_attention.linear_qkv.layer_norm_weight", h),
                    ParamInfo(p + "self_attention.linear_qkv.weight", (q + 2 * kv) // tp * h),
                    ParamInfo(p + "mlp.linear_fc1.layer_norm_weight", h),
                    ParamInfo(p + "mlp.linear_fc1.weight", 2 * f // tp * h),
                    ParamInfo(p + "mlp.linear_fc2.weight", h * f // tp)]
    if last:
        out.append(ParamInfo("decoder.final_layernorm.weight", h, fp32=local))
        if not arch.tie_word_embeddings:
            out.append(ParamInfo("output_layer.weight", padded_vocab // tp * h))
        elif not first:  # tied, PP > 1: the last stage's copy of the embedding, all-reduced with it
            out.append(ParamInfo("output_layer.weight", padded_vocab // tp * h, shared_embedding=True))
    if first and not last and arch.tie_word_embeddings:
        out[0] = ParamInfo(out[0].name, out[0].numel, shared_embedding=True)
    return out
