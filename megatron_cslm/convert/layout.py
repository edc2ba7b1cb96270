"""Where each Llama weight lives in a Hugging Face checkpoint and in a megatron-core `dist_checkpointing` one.

megatron-core stores GLOBAL tensors, so one checkpoint serves every TP/PP layout:

* decoder layers are stacked on a leading axis of size num_layers (global layer numbering; the PP offset is
  applied by `TransformerBlock.sharded_state_dict`), one chunk per layer;
* `linear_qkv` rows are grouped per KV group: [q heads of group g, k_g, v_g] for g in groups, which is what
  lets TP split the fused matrix into contiguous row blocks;
* `linear_fc1` is [gate; up] (`apply_swiglu_sharded_factory` saves the two halves as separately sharded
  pieces of one global tensor, so the global layout does not depend on TP);
* norms use Transformer Engine's fused names (`linear_qkv.layer_norm_weight`, `linear_fc1.layer_norm_weight`)
  for both specs: megatron-core's local spec maps `input_layernorm.`/`pre_mlp_layernorm.` onto them through
  `sharded_state_dict_keys_map`, so the same files load into the local (CPU) and TE (GPU) models;
* every linear layer carries an `_extra_state` object (None for the local spec; TE accepts None too).

HF and megatron-core both apply RoPE with the rotate-half convention, so q/k rows need no permutation.

`layer_row_map` states the same layout as row blocks (which rows of which HF tensor land at which rows of
which megatron tensor), so the converters can read each block straight into its place in a fused buffer and
write each HF tensor straight from the blocks of a fused one, without a `torch.cat` or a copy; `fuse_qkv`,
`split_qkv` and the `*_layer_to_*` functions are the tensor-level statement of it, and both must agree.
`layer_chunks` cuts a layer into the bounded row chunks both converters stream (a stored chunk of the
megatron checkpoint each, with the HF row blocks it holds).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_cslm.models.llama import LlamaArch

EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
QKV = "decoder.layers.self_attention.linear_qkv.weight"
PROJ = "decoder.layers.self_attention.linear_proj.weight"
FC1 = "decoder.layers.mlp.linear_fc1.weight"
FC2 = "decoder.layers.mlp.linear_fc2.weight"
ATTN_NORM = "decoder.layers.self_attention.linear_qkv.layer_norm_weight"
MLP_NORM = "decoder.layers.mlp.linear_fc1.layer_norm_weight"
LAYER_KEYS = (ATTN_NORM, QKV, PROJ, MLP_NORM, FC1, FC2)
EXTRA_STATE_MODULES = ("decoder.layers.self_attention.linear_qkv", "decoder.layers.self_attention.linear_proj",
                       "decoder.layers.mlp.linear_fc1", "decoder.layers.mlp.linear_fc2")


def extra_state_key(module: str, layer: int, num_layers: int) -> str:
    """Unique key megatron-core gives a per-layer `_extra_state` ShardedObject (`ShardedObject.unique_key`)."""
    return f"{module}._extra_state/shard_{layer}_{num_layers}"


def hf_layer_names(i: int) -> dict[str, str]:
    prefix = f"model.layers.{i}."
    return {
        "attn_norm": prefix + "input_layernorm.weight",
        "q": prefix + "self_attn.q_proj.weight",
        "k": prefix + "self_attn.k_proj.weight",
        "v": prefix + "self_attn.v_proj.weight",
        "o": prefix + "self_attn.o_proj.weight",
        "mlp_norm": prefix + "post_attention_layernorm.weight",
        "gate": prefix + "mlp.gate_proj.weight",
        "up": prefix + "mlp.up_proj.weight",
        "down": prefix + "mlp.down_proj.weight",
    }


@dataclass(frozen=True)
class RowBlock:
    """`rows` rows of HF part `part` starting at `hf_row` are rows `megatron_row`.. of megatron tensor `key`."""
    key: str
    part: str
    hf_row: int
    megatron_row: int
    rows: int


def layer_row_map(arch: LlamaArch) -> list[RowBlock]:
    """Every row block of one decoder layer, in megatron row order within each tensor (LAYER_KEYS order)."""
    groups, d, f, h = arch.num_query_groups, arch.head_dim, arch.ffn_hidden_size, arch.hidden_size
    per_group = arch.num_attention_heads // groups
    qkv = []
    for g in range(groups):
        base = g * (per_group + 2) * d
        qkv += [RowBlock(QKV, "q", g * per_group * d, base, per_group * d),
                RowBlock(QKV, "k", g * d, base + per_group * d, d),
                RowBlock(QKV, "v", g * d, base + (per_group + 1) * d, d)]
    return [RowBlock(ATTN_NORM, "attn_norm", 0, 0, h), *qkv, RowBlock(PROJ, "o", 0, 0, h),
            RowBlock(MLP_NORM, "mlp_norm", 0, 0, h), RowBlock(FC1, "gate", 0, 0, f), RowBlock(FC1, "up", 0, f, f),
            RowBlock(FC2, "down", 0, 0, h)]


def row_chunks(rows: int, row_bytes: int, chunk_bytes: int, multiple: int = 1) -> list[tuple[int, int]]:
    """(first row, rows) of consecutive chunks of at most `chunk_bytes` (at least `multiple` rows, and a
    multiple of it, so fixed-size blocks of rows never straddle two chunks)."""
    per = max(multiple, chunk_bytes // row_bytes // multiple * multiple)
    return [(r, min(per, rows - r)) for r in range(0, rows, per)]


@dataclass(frozen=True)
class LayerChunk:
    """Rows `row`.. (`rows` of them) of one layer's slice of stacked tensor `key`, and the HF row blocks they
    hold: `sources` is (part, HF row, row within the chunk, rows) per block, in megatron row order."""
    key: str
    row: int
    rows: int
    sources: tuple[tuple[str, int, int, int], ...]


def layer_chunks(arch: LlamaArch, chunk_bytes: int, itemsize: dict[str, int]) -> list[LayerChunk]:
    """One decoder layer cut into row chunks of at most `chunk_bytes` per stacked tensor (LAYER_KEYS order; a
    norm is one chunk): the unit both converters stream, each a chunk of the megatron checkpoint and the
    `layer_row_map` blocks in it. `itemsize`: bytes per element of each megatron key."""
    blocks, chunks = layer_row_map(arch), []
    for key, shape in megatron_layer_shapes(arch).items():
        parts = [b for b in blocks if b.key == key]
        spans = [(0, shape[0])] if len(shape) == 1 else row_chunks(shape[0], shape[1] * itemsize[key], chunk_bytes)
        for r, rows in spans:
            sources = tuple((b.part, b.hf_row + lo - b.megatron_row, lo - r, hi - lo) for b in parts
                            for lo, hi in [(max(r, b.megatron_row), min(r + rows, b.megatron_row + b.rows))]
                            if lo < hi)
            chunks.append(LayerChunk(key, r, rows, sources))
    return chunks


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]


def hf_tensor_specs(arch: LlamaArch) -> list[TensorSpec]:
    """Every tensor of a HF LlamaForCausalLM with this arch, in Meta's file order (embeddings, layers, head)."""
    h, d, f, v = arch.hidden_size, arch.head_dim, arch.ffn_hidden_size, arch.vocab_size
    q_rows, kv_rows = arch.num_attention_heads * d, arch.num_query_groups * d
    shapes = {"attn_norm": (h,), "q": (q_rows, h), "k": (kv_rows, h), "v": (kv_rows, h), "o": (h, q_rows),
              "mlp_norm": (h,), "gate": (f, h), "up": (f, h), "down": (h, f)}
    specs = [TensorSpec("model.embed_tokens.weight", (v, h))]
    for i in range(arch.num_layers):
        specs += [TensorSpec(name, shapes[part]) for part, name in hf_layer_names(i).items()]
    specs.append(TensorSpec("model.norm.weight", (h,)))
    if not arch.tie_word_embeddings:
        specs.append(TensorSpec("lm_head.weight", (v, h)))
    return specs


def megatron_layer_shapes(arch: LlamaArch) -> dict[str, tuple[int, ...]]:
    """Shape of one layer's slice of each stacked megatron-core layer tensor (without the layer axis)."""
    h, d, f = arch.hidden_size, arch.head_dim, arch.ffn_hidden_size
    qkv_rows = (arch.num_attention_heads + 2 * arch.num_query_groups) * d
    return {ATTN_NORM: (h,), QKV: (qkv_rows, h), PROJ: (h, arch.num_attention_heads * d), MLP_NORM: (h,),
            FC1: (2 * f, h), FC2: (h, f)}


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: LlamaArch) -> torch.Tensor:
    """HF q/k/v projections -> megatron-core's per-group [q_g..., k_g, v_g] rows."""
    groups, d, h = arch.num_query_groups, arch.head_dim, arch.hidden_size
    per_group = arch.num_attention_heads // groups
    return torch.cat([q.reshape(groups, per_group * d, h), k.reshape(groups, d, h), v.reshape(groups, d, h)],
                     dim=1).reshape(-1, h)


def split_qkv(qkv: torch.Tensor, arch: LlamaArch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `fuse_qkv`."""
    groups, d, h = arch.num_query_groups, arch.head_dim, arch.hidden_size
    per_group = arch.num_attention_heads // groups
    q, k, v = qkv.reshape(groups, (per_group + 2) * d, h).split([per_group * d, d, d], dim=1)
    return q.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)


def hf_layer_to_megatron(t: dict[str, torch.Tensor], arch: LlamaArch) -> dict[str, torch.Tensor]:
    """One layer's HF tensors (keyed by `hf_layer_names` parts) -> megatron-core layer slices."""
    return {ATTN_NORM: t["attn_norm"], QKV: fuse_qkv(t["q"], t["k"], t["v"], arch), PROJ: t["o"],
            MLP_NORM: t["mlp_norm"], FC1: torch.cat([t["gate"], t["up"]]), FC2: t["down"]}


def megatron_layer_to_hf(t: dict[str, torch.Tensor], arch: LlamaArch) -> dict[str, torch.Tensor]:
    """Inverse of `hf_layer_to_megatron` (views into the megatron tensors, no copies)."""
    q, k, v = split_qkv(t[QKV], arch)
    gate, up = t[FC1].chunk(2)
    return {"attn_norm": t[ATTN_NORM], "q": q, "k": k, "v": v, "o": t[PROJ], "mlp_norm": t[MLP_NORM],
            "gate": gate, "up": up, "down": t[FC2]}
