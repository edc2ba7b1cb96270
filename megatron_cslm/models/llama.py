"""Llama-3.x on megatron-core `GPTModel`: architecture, precision and layer-spec selection.

`LlamaArch` is the published architecture, independent of parallelism and precision; it round-trips with a
Hugging Face `config.json` so converted checkpoints keep RoPE scaling (Meta's files write `rope_theta` +
`rope_scaling`, transformers 5 writes `rope_parameters`; both are read). `PrecisionConfig` and
`RecomputeConfig` are the run's choices. `build_gpt_model` turns them into a `TransformerConfig` and a
`GPTModel` whose layer spec is chosen from what is installed: Transformer Engine on CUDA, megatron-core's
local (torch) spec otherwise, with per-sample SDPA core attention (models/attention.py) so packed SFT bins
cost what their samples cost. `LAYER_SPECS` also says how each spec takes packed bins (`packed_layout`).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from megatron_cslm.errors import CslmError

LLAMA3_ROPE_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}
VOCAB_PAD_MULTIPLE = 128  # Megatron-LM's --make-vocab-size-divisible-by default; multiplied by TP


@dataclass(frozen=True)
class LlamaArch:
    """A Llama-3.x architecture. vocab_size is the unpadded size (base + speech units + specials)."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    vocab_size: int
    max_position_embeddings: int = 131072
    rope_theta: float = 500000.0
    rope_scaling: dict | None = field(default_factory=lambda: dict(LLAMA3_ROPE_SCALING))
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    kv_channels: int | None = None  # head dim; hidden_size / heads when None

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def with_vocab(self, vocab_size: int) -> "LlamaArch":
        return dataclasses.replace(self, vocab_size=vocab_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaArch":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown LlamaArch fields {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_hf_config(cls, config: dict | str | os.PathLike) -> "LlamaArch":
        """Read a Hugging Face Llama `config.json` (path, directory or dict)."""
        if not isinstance(config, dict):
            path = Path(config)
            path = path / "config.json" if path.is_dir() else path
            config = json.loads(path.read_text(encoding="utf-8"))
            source = str(path)
        else:
            source = "config"
        model_type = config.get("model_type")
        archs = config.get("architectures") or []
        if model_type != "llama" and "LlamaForCausalLM" not in archs:
            raise CslmError(source, None, "model_type", f"is {model_type!r} (architectures {archs}); only Llama "
                            "(model_type 'llama', LlamaForCausalLM) checkpoints are supported", kind="compat")
        for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size"):
            if key not in config:
                raise CslmError(source, None, key, "missing from the Llama config")
        rope = dict(config.get("rope_parameters") or {})
        theta = config.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = config.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind != "llama3":
                raise CslmError(source, None, "rope_scaling", f"has type {kind!r}; only 'llama3' is supported",
                                kind="compat")
            scaling = {k: scaling[k] for k in LLAMA3_ROPE_SCALING if k in scaling}
            scaling["rope_type"] = "llama3"
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim")
        return cls(
            num_layers=config["num_hidden_layers"],
            hidden_size=config["hidden_size"],
            ffn_hidden_size=config["intermediate_size"],
            num_attention_heads=heads,
            num_query_groups=config.get("num_key_value_heads") or heads,
            vocab_size=config["vocab_size"],
            max_position_embeddings=config.get("max_position_embeddings", 8192),
            rope_theta=float(theta),
            rope_scaling=scaling,
            norm_eps=config.get("rms_norm_eps", 1e-5),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            kv_channels=None if head_dim in (None, config["hidden_size"] // heads) else head_dim,
        )

    def to_hf_config(self, **extra: Any) -> dict:
        """HF `config.json` in the classic form (rope_theta + rope_scaling) that vLLM and transformers 4/5 read."""
        config = {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "num_hidden_layers": self.num_layers, "hidden_size": self.hidden_size,
            "intermediate_size": self.ffn_hidden_size, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_query_groups, "head_dim": self.head_dim,
            "vocab_size": self.vocab_size, "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta, "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "rms_norm_eps": self.norm_eps, "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
            "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True,
        }
        config.update(extra)
        return config


ARCHS: dict[str, LlamaArch] = {
    # Published shapes (Meta's config.json); vocab is the base Llama-3 vocabulary before speech units are added.
    "llama3.1-8b": LlamaArch(num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
                             num_query_groups=8, vocab_size=128256),
    "llama3.1-70b": LlamaArch(num_layers=80, hidden_size=8192, ffn_hidden_size=28672, num_attention_heads=64,
                              num_query_groups=8, vocab_size=128256),
    # Tiny Llama-3.1-shaped models for CPU tests and the quickstart (GQA, Llama-3 RoPE scaling kept).
    "tiny": LlamaArch(num_layers=4, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4, num_query_groups=2,
                      vocab_size=1000, max_position_embeddings=2048,
                      rope_scaling={**LLAMA3_ROPE_SCALING, "original_max_position_embeddings": 256}),
    "small": LlamaArch(num_layers=4, hidden_size=128, ffn_hidden_size=352, num_attention_heads=4, num_query_groups=2,
                       vocab_size=1000, max_position_embeddings=4096,
                       rope_scaling={**LLAMA3_ROPE_SCALING, "original_max_position_embeddings": 512}),
}


def padded_vocab_size(vocab_size: int, tensor_parallel_size: int, multiple: int = VOCAB_PAD_MULTIPLE) -> int:
    """Pad so every TP shard of the embedding is a multiple of `multiple` rows (padding rows are never sampled)."""
    step = multiple * tensor_parallel_size
    return int(math.ceil(vocab_size / step) * step)


def run_padded_vocab_size(vocab_size: int, checkpoint_padded: int | None, tensor_parallel_size: int,
                          multiple: int = VOCAB_PAD_MULTIPLE) -> int:
    """The padded vocabulary a run builds: the checkpoint's padding when it splits evenly at this TP (weights load
    as saved), otherwise padded for this TP (megatron-core loads embeddings whose padding differs; extra rows are
    zero). The trainer and `cslm plan` both use it."""
    if checkpoint_padded and checkpoint_padded % (multiple * tensor_parallel_size) == 0:
        return checkpoint_padded
    return padded_vocab_size(vocab_size, tensor_parallel_size, multiple)


@dataclass(frozen=True)
class PrecisionConfig:
    """Numerics of a run. BF16 on GPU, FP32 on CPU; FP8 through Transformer Engine only."""

    dtype: str = "bf16"  # bf16 | fp16 | fp32
    fp8: str | None = None  # e4m3 | hybrid
    fp8_recipe: str = "delayed"  # delayed | tensorwise | mxfp8 | blockwise
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: str = "max"  # max | most_recent
    fp8_first_last_layers_bf16: bool = False
    fp8_num_layers_at_start_in_bf16: int = 1
    fp8_num_layers_at_end_in_bf16: int = 1

    def torch_dtype(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.dtype]


@dataclass(frozen=True)
class RecomputeConfig:
    """Activation recomputation, as megatron-core names it (granularity full|selective)."""

    granularity: str | None = None
    method: str | None = None  # uniform | block (full granularity)
    num_layers: int | None = None


def te_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None and torch.cuda.is_available()


def _local_mask_spec():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return get_gpt_layer_local_spec(normalization="RMSNorm")


def _local_spec():
    """megatron-core's local spec with per-sample SDPA core attention (models/attention.py)."""
    from megatron_cslm.models.attention import SampleSDPAttention

    spec = _local_mask_spec()
    spec.submodules.self_attention.submodules.core_attention = SampleSDPAttention
    return spec


def _te_spec():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    return get_gpt_layer_with_transformer_engine_spec()


@dataclass(frozen=True)
class LayerSpecChoice:
    """A layer spec and how packed SFT bins reach its attention.

    packed_layout: "thd" (bins flattened to one sequence + flat cu_seqlens: Transformer Engine), "bins" (bins
    stay the batch dimension, per-bin cu_seqlens: `SampleSDPAttention`), "mask" (dense block-diagonal causal
    mask over each bin: megatron-core's `DotProductAttention`, kept as the reference in tests).
    """

    build: Any
    packed_layout: str


LAYER_SPECS = {
    "local": LayerSpecChoice(_local_spec, "bins"),
    "local_mask": LayerSpecChoice(_local_mask_spec, "mask"),
    "te": LayerSpecChoice(_te_spec, "thd"),
}


def packed_layout(spec: str | None = None) -> str:
    """How packed bins are fed to the layer spec `spec` (default: the one this machine builds)."""
    return LAYER_SPECS[spec or default_spec_name()].packed_layout


def default_spec_name() -> str:
    """TE when it is installed and a GPU is present, else megatron-core's local torch modules."""
    return "te" if te_available() else "local"


def check_parallel_fit(arch: LlamaArch, tensor_parallel_size: int, pipeline_parallel_size: int,
                       virtual_pipeline_size: int | None = None) -> None:
    """Reject layouts megatron-core would only fail on deep inside a constructor."""
    tp, pp = tensor_parallel_size, pipeline_parallel_size
    if arch.num_attention_heads % tp:
        raise CslmError.usage(f"tensor-model-parallel-size {tp} does not divide num_attention_heads "
                              f"{arch.num_attention_heads}")
    if arch.num_query_groups % tp:
        raise CslmError.usage(f"tensor-model-parallel-size {tp} does not divide the {arch.num_query_groups} KV "
                              "heads (num_query_groups); use a TP that divides it")
    if arch.ffn_hidden_size % tp:
        raise CslmError.usage(f"tensor-model-parallel-size {tp} does not divide ffn_hidden_size "
                              f"{arch.ffn_hidden_size}")
    stages = pp * (virtual_pipeline_size or 1)
    if arch.num_layers % stages:
        raise CslmError.usage(f"pipeline-model-parallel-size {pp}"
                              + (f" x virtual {virtual_pipeline_size}" if virtual_pipeline_size else "")
                              + f" does not divide num_layers {arch.num_layers}")


def transformer_config(arch: LlamaArch, *, tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1,
                       virtual_pipeline_size: int | None = None, precision: PrecisionConfig = PrecisionConfig(),
                       recompute: RecomputeConfig = RecomputeConfig(), sequence_parallel: bool = False,
                       spec: str | None = None, init_method_std: float = 0.02, deterministic: bool = False):
    """Build megatron-core's TransformerConfig for a Llama arch and a run's choices, with clear refusals."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    spec = spec or default_spec_name()
    check_parallel_fit(arch, tensor_parallel_size, pipeline_parallel_size, virtual_pipeline_size)
    on_gpu = torch.cuda.is_available()
    if precision.fp8 and spec != "te":
        raise CslmError.usage("FP8 training needs Transformer Engine on a CUDA GPU (pip install -e .[gpu]); it is "
                         "not installed or no GPU is visible. Drop --fp8-format to train in BF16/FP32.")
    if sequence_parallel and spec != "te":
        raise CslmError.usage("--sequence-parallel needs Transformer Engine (or apex) norms on a GPU; the local torch "
                         "spec used here (CPU mode or no TE) does not support it")
    if sequence_parallel and tensor_parallel_size == 1:
        raise CslmError.usage("--sequence-parallel requires tensor-model-parallel-size > 1")
    dtype = precision.torch_dtype()
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=init_method_std,
        tensor_model_parallel_size=tensor_parallel_size,
        pipeline_model_parallel_size=pipeline_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_size,
        # Batched isend/irecv (Megatron-LM's default, NCCL) on gloo delivers a batch's messages out of order:
        # the interleaved schedule's stages then received another micro-batch's activations on CPU (its
        # losses differed from PP=1's). Plain paired send/recv there.
        batch_p2p_comm=on_gpu,
        sequence_parallel=sequence_parallel,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        pipeline_dtype=dtype,
        autocast_dtype=dtype,
        attention_softmax_in_fp32=True,
        # Fusions are CUDA kernels; off on CPU.
        bias_activation_fusion=on_gpu,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=on_gpu,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        cross_entropy_loss_fusion=False,
        # CPU init of the full weight then split: identical weights whatever the TP size.
        use_cpu_initialization=not on_gpu,
        deterministic_mode=deterministic,
        recompute_granularity=recompute.granularity,
        recompute_method=recompute.method,
        recompute_num_layers=recompute.num_layers,
        fp8=precision.fp8,
        fp8_recipe=precision.fp8_recipe if precision.fp8 else "delayed",
        fp8_amax_history_len=precision.fp8_amax_history_len,
        fp8_amax_compute_algo=precision.fp8_amax_compute_algo,
        first_last_layers_bf16=precision.fp8_first_last_layers_bf16,
        num_layers_at_start_in_bf16=precision.fp8_num_layers_at_start_in_bf16,
        num_layers_at_end_in_bf16=precision.fp8_num_layers_at_end_in_bf16,
    )


def llama3_inv_freq(arch: LlamaArch) -> torch.Tensor:
    """RoPE inverse frequencies with Llama-3 scaling using *all* of the config's scaling fields.

    megatron-core's RotaryEmbedding hard-codes low/high factors 1/4 and an 8192 original context; the tiny
    test models (and any future release) need the general form, computed exactly as transformers does.
    """
    dim = arch.head_dim
    inv_freq = 1.0 / (arch.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = arch.rope_scaling
    if not s:
        return inv_freq
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_ctx = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def build_gpt_model(arch: LlamaArch, config, *, padded_vocab: int, spec: str | None = None,
                    pre_process: bool | None = None, post_process: bool | None = None,
                    vp_stage: int | None = None):
    """Build this rank's GPTModel stage (pre/post process default to the rank's PP position)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    model = GPTModel(
        config=config,
        transformer_layer_spec=LAYER_SPECS[spec or default_spec_name()].build(),
        vocab_size=padded_vocab,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(arch.rope_theta),
        vp_stage=vp_stage,
    )
    inv_freq = llama3_inv_freq(arch).to(model.rotary_pos_emb.inv_freq.device)
    model.rotary_pos_emb.inv_freq = inv_freq
    if post_process and padded_vocab > arch.vocab_size:
        model.output_layer.register_forward_hook(_padding_logits_mask(arch.vocab_size))
    return model


def _padding_logits_mask(vocab_size: int):
    """Forward hook on the output layer: logits of vocabulary-padding rows are -inf.

    Padding rows exist only so the embedding splits evenly over TP ranks; their number changes with TP.
    Masking them keeps them out of the softmax, so the loss does not depend on TP and padding is never
    sampled; they get no gradient and are stripped on export.

    The padding columns are filled in place, outside autograd: a masked copy would cost a second logits
    tensor ([s, b, vocab shard], the largest activation of the model) and a pass over it forward and back.
    Autograd need not see the fill: the gradient of a softmax-based loss at a -inf logit is exactly 0, which
    is what the masked copy's backward gave those columns, and the linear layer saves its input, not its output.
    """
    from megatron.core import parallel_state

    def hook(module, inputs, output):
        logits, bias = output
        shard = logits.shape[-1]
        first = parallel_state.get_tensor_model_parallel_rank() * shard
        if first + shard <= vocab_size:
            return output
        with torch.no_grad():
            logits[..., max(0, vocab_size - first):].fill_(float("-inf"))
        return logits, bias

    return hook

