"""Run megatron-core on CPU (gloo) for laptop debugging and CI.

megatron-core assumes CUDA throughout: it allocates with `device="cuda"` or `torch.cuda.current_device()`,
seeds and forks a CUDA RNG tracker, asserts `tensor.type() == 'torch.cuda.FloatTensor'`, and records CUDA
streams and events. None of that changes the maths, so CPU mode makes those calls land on the CPU:

1. a `TorchFunctionMode` rewrites CUDA devices in tensor factories, `Tensor.to` and `Tensor.cuda` to CPU,
   drops `pin_memory` and reports `Tensor.type()` with the `torch.cuda.` prefix megatron-core asserts on;
2. the `torch.cuda` helpers megatron-core calls (device index, streams, events, synchronize, RNG, NVTX,
   memory stats) are replaced with CPU equivalents: the "CUDA" RNG *is* the CPU generator, so the
   model-parallel RNG tracker forks real states and dropout stays reproducible.

It is switched on explicitly (`--device cpu`) and refused on a machine with CUDA, where it would silently
train a GPU job on CPU. Sequence parallel needs TE/apex norms and THD packing needs TE: both are rejected
by the config layer in this mode.
"""
from __future__ import annotations

import contextlib
import time
import types

import torch
from torch.overrides import TorchFunctionMode

from megatron_cslm.distributed import quiet

_state: dict = {"mode": None}


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)  # a bare index means a CUDA ordinal


def _cpu_if_cuda(device):
    return torch.device("cpu") if _is_cuda_device(device) else device


class _CudaToCpu(TorchFunctionMode):
    """Rewrites CUDA placement to CPU for every torch call made while active."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = _cpu_if_cuda(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to:
            args = tuple(_cpu_if_cuda(a) if i > 0 and not isinstance(a, torch.Tensor) else a
                         for i, a in enumerate(args))
            kwargs.pop("non_blocking", None)
        elif func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return "torch.cuda." + func(*args).split(".")[-1]
        elif func is torch.Tensor.pin_memory:
            return args[0]
        return func(*args, **kwargs)


class _Event:
    """Stand-in for torch.cuda.Event: CPU work is synchronous, so events are always complete."""

    def __init__(self, *args, **kwargs):
        self._time = None

    def record(self, stream=None):
        self._time = time.perf_counter()

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, end: "_Event") -> float:
        return (end._time - self._time) * 1000.0


class _Stream:
    """Stand-in for torch.cuda.Stream: one implicit CPU stream."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        event = event or _Event()
        event.record()
        return event

    def synchronize(self):
        pass

    def query(self):
        return True


def _noop():
    """A fresh no-op per replaced name: torch._dynamo rejects one object registered under two torch names."""
    def noop(*args, **kwargs):
        return None
    return noop


def _cuda_replacements() -> dict:
    stream = _Stream()
    return {
        "current_device": lambda: 0,
        "set_device": _noop(),
        "device_count": lambda: 1,
        "synchronize": _noop(),
        "empty_cache": _noop(),
        "current_stream": lambda *a, **k: stream,
        "default_stream": lambda *a, **k: stream,
        "Stream": _Stream,
        "Event": _Event,
        "stream": lambda *a, **k: contextlib.nullcontext(),
        "set_stream": _noop(),
        "get_rng_state": lambda device=None: torch.get_rng_state(),
        "set_rng_state": lambda state, device=None: torch.set_rng_state(state),
        "manual_seed": lambda seed: torch.default_generator.manual_seed(seed),
        "manual_seed_all": _noop(),  # torch.manual_seed calls it after seeding the CPU generator
        "memory_allocated": lambda *a, **k: 0,
        "max_memory_allocated": lambda *a, **k: 0,
        "memory_reserved": lambda *a, **k: 0,
        "max_memory_reserved": lambda *a, **k: 0,
        "reset_peak_memory_stats": _noop(),
        "memory_stats": lambda *a, **k: {},
        "nvtx": types.SimpleNamespace(range_push=_noop(), range_pop=_noop(),
                                      range=lambda *a, **k: contextlib.nullcontext(), mark=_noop()),
    }


def _patch_megatron_rng() -> None:
    """megatron-core sets CUDA RNG states through `_lazy_call`, which queues forever without CUDA."""
    from megatron.core.tensor_parallel import random as mp_random

    mp_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)


def refuse_if_cuda(cuda_available: bool) -> None:
    """CPU mode on a GPU machine would quietly train a GPU job at CPU speed: refuse it."""
    if cuda_available:
        raise RuntimeError(
            "--device cpu was requested but CUDA is available on this machine; CPU mode is for machines without "
            "a GPU (laptops, CI). Drop --device cpu to train on the GPU.")


def enable() -> None:
    """Enter CPU mode for the rest of the process (idempotent). Refuses when CUDA is available."""
    if _state["mode"] is not None:
        return
    refuse_if_cuda(torch.cuda.is_available())
    quiet.apply_cpu_mode()
    for name, value in _cuda_replacements().items():
        setattr(torch.cuda, name, value)
    torch.cuda.random.get_rng_state = torch.cuda.get_rng_state
    torch.cuda.random.set_rng_state = torch.cuda.set_rng_state
    _patch_megatron_rng()
    mode = _CudaToCpu()
    mode.__enter__()
    _state["mode"] = mode


def is_enabled() -> bool:
    return _state["mode"] is not None
