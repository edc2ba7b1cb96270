"""Every unavoidable use of private megatron-core API, in one place, checked against the supported versions.

Supported: megatron-core 0.16 to 0.19 (CI runs 0.16.1 on Python 3.11 and 0.19.2 on Python 3.12). Each
wrapper names the private symbol it needs and what changed between releases, so the next release that
breaks one breaks here, under a test that runs on both CI legs (tests/test_megatron_lm_flags.py), instead of
deep inside a training run.

- `GPTDataset._query_document_sample_shuffle_indices(idx)`: the token ids of sample `idx` (with its
  document/shuffle arithmetic) for a companion dataset (our per-token loss mask). It returned
  (tokens, document_ids) up to 0.18 and (tokens, document_ids, document boundaries) from 0.19; no public
  API exposes a sample's raw ids without also building the loss mask/positions for the text tokens.
- `DistributedOptimizer._init_optimizer_states_with_dummy_values()`: creates Adam's state on a fresh
  optimizer so megatron-core can describe the state it is about to load (megatron-core's own loader calls
  it the same way).
- `filesystem_async._get_write_results_queue()` (0.16-0.18; public `get_write_results_queue()` from 0.19):
  creates, once per process, the multiprocessing Manager queue through which asynchronous checkpoint writers
  report. The Manager is a *spawned* process (it imports the training script anew: ~3 s on 2 cores), so its
  lazy creation inside the first save made that save block training for seconds; we start it early.

Public API that changed between releases is adapted here too:
- `dist_checkpointing.save(..., async_strategy=)` appeared in 0.19 with the default "nvrx" (nvidia-resiliency-ext's
  writer and queue); our queue is megatron-core's own `AsyncCallsQueue`, so asynchronous saves ask for "mcore".
"""
from __future__ import annotations

import numpy as np

SUPPORTED_MCORE = ((0, 16), (0, 19))  # inclusive (major, minor) range


def megatron_core_version() -> tuple[int, int, int]:
    from megatron.core import package_info

    return int(package_info.MAJOR), int(package_info.MINOR), int(package_info.PATCH)


def check_megatron_core_version() -> tuple[int, int, int]:
    """The installed version, or a CslmError (kind compat, exit 3) naming it and the supported range.
    Called at training start-up (training/trainer.py:main), before any process group starts."""
    from megatron_cslm.errors import CslmError

    version = megatron_core_version()
    low, high = SUPPORTED_MCORE
    if not low <= version[:2] <= high:
        raise CslmError.compat(f"megatron-core {'.'.join(map(str, version))} is not supported: megatron_cslm is tested "
                         f"with {low[0]}.{low[1]} to {high[0]}.{high[1]}.x")
    return version


def sample_token_ids(dataset, idx: int) -> np.ndarray:
    """The `seq_length + 1` ids of sample `idx` of a megatron-core GPTDataset (0.16-0.19)."""
    out = dataset._query_document_sample_shuffle_indices(idx)
    if not isinstance(out, tuple) or len(out) not in (2, 3):
        raise TypeError(f"megatron-core {megatron_core_version()}: GPTDataset._query_document_sample_shuffle_indices "
                        f"returned {type(out).__name__} of length {len(out) if isinstance(out, tuple) else '?'}, "
                        "expected 2 (<= 0.18) or 3 (0.19) values; update megatron_cslm/compat.py")
    return out[0]


def init_optimizer_state(optimizer) -> None:
    """Materialise Adam's state of a megatron-core (distributed) optimizer that has not stepped yet."""
    optimizer._init_optimizer_states_with_dummy_values()


def start_async_checkpoint_results_queue() -> None:
    """Create megatron-core's (process-wide, cached) queue of asynchronous-save results now (0.16-0.19)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    public = getattr(filesystem_async, "get_write_results_queue", None)
    (public or filesystem_async._get_write_results_queue)()


def dist_save_async_kwargs() -> dict:
    """Extra `dist_checkpointing.save` arguments for an asynchronous save through megatron-core's own queue."""
    import inspect

    from megatron.core import dist_checkpointing

    return ({"async_strategy": "mcore"} if "async_strategy" in inspect.signature(dist_checkpointing.save).parameters
            else {})


def default_store():
    """The job's rendezvous store (torch.distributed's private `_get_default_store`), or None when there is none
    (a single process without init_process_group): the hang watchdog reports ranks through it."""
    try:
        from torch.distributed import distributed_c10d

        return distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 (no process group, or the private name moved)
        return None
