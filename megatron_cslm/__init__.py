"""megatron_cslm: megatron-core training stack for cross-lingual speech language models (CSLM)."""

__version__ = "0.1.0"
