"""Checkpoint conversion between Hugging Face Llama and megatron-core `dist_checkpointing`, streaming.

    hf_to_megatron   HF directory -> run directory (iter_0000000/, cslm_model.json, tokenizer/), with optional
                     vocabulary expansion for speech units
    megatron_to_hf   run directory (any TP x PP) -> HF directory loadable by AutoModelForCausalLM
    verify           logits of both sides on a few prompts

Supporting modules: `layout` (names and fused layouts), `safetensors_io` and `dist_ckpt` (tensor-at-a-time
readers and writers), `vocab` (rows for new and padding ids); `megatron_cslm.checkpoint.manifest` is cslm_model.json.
"""
from megatron_cslm.checkpoint.manifest import ModelManifest
from megatron_cslm.convert.hf_to_megatron import convert_hf_to_megatron
from megatron_cslm.convert.megatron_to_hf import convert_megatron_to_hf

__all__ = ["ModelManifest", "convert_hf_to_megatron", "convert_megatron_to_hf"]
