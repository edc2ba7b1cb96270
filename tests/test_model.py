"""LlamaArch reads Meta's config.json (rope_theta + rope_scaling) and transformers 5's (rope_parameters) alike."""
import pytest
import torch
from transformers import LlamaConfig

from megatron_cslm.models.llama import ARCHS, LlamaArch, llama3_inv_freq

META_LLAMA31_8B = {  # Meta's config.json for Llama-3.1-8B-Instruct, as users have it
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0, "max_position_embeddings": 131072, "vocab_size": 128256, "tie_word_embeddings": False,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}


def test_meta_config_gives_the_named_8b_arch():
    assert LlamaArch.from_hf_config(META_LLAMA31_8B) == ARCHS["llama3.1-8b"]


def test_transformers5_rope_parameters_read_like_meta_fields():
    cfg = LlamaConfig(**{k: v for k, v in META_LLAMA31_8B.items() if k not in ("architectures", "model_type")})
    written = cfg.to_dict()  # transformers 5 writes rope_parameters
    assert "rope_parameters" in written
    assert LlamaArch.from_hf_config(written) == ARCHS["llama3.1-8b"]
    round_trip = LlamaArch.from_hf_config(ARCHS["llama3.1-8b"].to_hf_config())
    assert round_trip == ARCHS["llama3.1-8b"]


def test_rope_inverse_frequencies_match_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    arch = ARCHS["tiny"]
    cfg = LlamaConfig(**arch.to_hf_config())
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    assert torch.allclose(llama3_inv_freq(arch), inv_freq.float(), rtol=1e-6, atol=0)


def test_non_llama_and_other_rope_types_are_refused():
    with pytest.raises(ValueError, match="only Llama"):
        LlamaArch.from_hf_config({**META_LLAMA31_8B, "model_type": "mistral", "architectures": ["MistralForCausalLM"]})
    with pytest.raises(ValueError, match="only 'llama3'"):
        LlamaArch.from_hf_config({**META_LLAMA31_8B, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="'num_hidden_layers' missing"):
        LlamaArch.from_hf_config({k: v for k, v in META_LLAMA31_8B.items() if k != "num_hidden_layers"})
