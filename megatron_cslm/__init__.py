"""megatron_cslm: megatron-core training stack for cross-lingual speech language models (CSLM)."""

from megatron_cslm.distributed import quiet as _quiet

_quiet.apply()  # before megatron-core / torch.utils.cpp_extension are imported: see distributed/quiet.py

__version__ = "0.1.0"
