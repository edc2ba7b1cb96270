"""Random-weight Hugging Face Llama checkpoints (sharded like Meta's) built from a config, and their tensors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

TINY = dict(vocab_size=128256, hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048, rope_theta=500000.0, rms_norm_eps=1e-5,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 256},
            bos_token_id=128000, eos_token_id=128001)


def make_hf_llama(out: Path, tokenizer_json: Path, seed: int = 0, **overrides) -> Path:
    """Random-weight HF Llama directory, sharded (with an index) like Meta's, norms randomised too."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, "tie_word_embeddings": False, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0, 0.1) if "norm" in name else p.normal_(0.0, 0.05)
    model.save_pretrained(out, max_shard_size="20MB")
    shutil.copyfile(tokenizer_json, out / "tokenizer.json")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
        "clean_up_tokenization_spaces": False}))
    return out


def load_hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for shard in sorted(directory.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def rewrite_tensor(directory: Path, name: str, fn) -> None:
    """Replace one tensor of a sharded HF checkpoint in place (to build bad or tampered inputs)."""
    from safetensors.torch import load_file, save_file

    shard = directory / json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = fn(tensors[name])
    save_file(tensors, shard, metadata={"format": "pt"})
