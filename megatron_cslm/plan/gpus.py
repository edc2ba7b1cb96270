"""Accelerators `cslm plan` knows: memory, dense peak FLOP/s per precision, and link bandwidths.

Why a table: a plan is arithmetic over these figures, and the training log's MFU (models/flops.py) divides by
the same peaks, so both say the same thing about one GPU. Figures are the vendors' dense (no sparsity) peaks
from their data sheets; memory is what `nvidia-smi` reports as total (MiB), so "fits" compares like with like.
Bandwidths are per GPU and per direction: NVLink inside a node, the node's network (InfiniBand/RoCE) share
across nodes. They only rank layouts; change them with --nvlink-gbps / --network-gbps.
Pure Python: no torch import, so `cslm plan --help` is instant.
"""
from __future__ import annotations

from dataclasses import dataclass

MIB = 1024 ** 2
GIB = 1024 ** 3


@dataclass(frozen=True)
class GPU:
    name: str
    memory_mib: int          # total device memory as nvidia-smi reports it
    bf16_tflops: float       # dense peak
    fp8_tflops: float | None  # dense peak; None: no FP8 tensor cores
    nvlink_gbps: float       # GB/s per direction per GPU inside a node
    network_gbps: float      # GB/s per direction per GPU across nodes (one 400 Gb/s NIC per GPU: 50)
    gpus_per_node: int = 8

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * MIB

    def peak_tflops(self, precision: str) -> float:
        if precision == "fp8":
            if self.fp8_tflops is None:
                raise ValueError(f"{self.name} has no FP8 tensor cores; plan with --precision bf16")
            return self.fp8_tflops
        return self.bf16_tflops


GPUS: dict[str, GPU] = {g.name: g for g in (
    GPU("a100-40", 40960, 312.0, None, 300.0, 25.0),
    GPU("a100-80", 81920, 312.0, None, 300.0, 25.0),
    GPU("h100-80", 81559, 989.0, 1979.0, 450.0, 50.0),
    GPU("h200-141", 143771, 989.0, 1979.0, 450.0, 50.0),
    GPU("b200-180", 183359, 2250.0, 4500.0, 900.0, 50.0),
)}


# What CUDA's device name contains -> the table's entry (first match wins; 40 GB A100s share the 80 GB peak).
_DEVICE_NAMES = (("H200", "h200-141"), ("H100", "h100-80"), ("H800", "h100-80"), ("B200", "b200-180"),
                 ("A100", "a100-80"), ("A800", "a100-80"))


def gpu_of_device_name(device_name: str) -> GPU | None:
    """The table's GPU for a CUDA device name (`torch.cuda.get_device_name()`), or None when it is not known."""
    return next((GPUS[key] for part, key in _DEVICE_NAMES if part in device_name), None)
