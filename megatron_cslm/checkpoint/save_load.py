"""Checkpoints in megatron-core `dist_checkpointing` format, Megatron-LM's directory layout.

    <dir>/iter_0000020/                   dist_checkpointing save (model, optimizer, scheduler, data position)
    <dir>/iter_0000020/extra_state/rank_00003.pt   per-rank RNG states (they differ by TP/PP rank)
    <dir>/latest_checkpointed_iteration.txt        written last, atomically

A save goes to `iter_XXXXXXX.tmp` and is renamed only after every rank finished, so a job killed mid-save
leaves a `.tmp` directory that resume never picks. Asynchronous saves (`AsyncCheckpointer`, megatron-core's
`async_sharded_save` + `AsyncCallsQueue`) keep that invariant: the rename and the tracker are the save's
finalize step, which megatron-core runs only once the background writers of *all* ranks are done. Global tensors
make checkpoints loadable at any TP/PP.
"""
from __future__ import annotations

import os
import random
import shutil
import threading
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_cslm.checkpoint.retention import RetentionPolicy, apply_retention
from megatron_cslm.compat import dist_save_async_kwargs, init_optimizer_state, start_async_checkpoint_results_queue
from megatron_cslm.errors import CslmError
from megatron_cslm.fileio import atomic_open

TRACKER = "latest_checkpointed_iteration.txt"
# Each DP rank writes its own optimizer shard in parallel (no gather); resumable at another DP size.
# Moving to another TP/PP starts a new optimizer (SFT does) or re-saves weights only (--no-save-optim).
OPTIM_SHARDING = {"distrib_optim_sharding_type": "dp_reshardable"}


def iteration_dir(root: str | os.PathLike, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def latest_iteration(root: str | os.PathLike) -> int | None:
    """The iteration named by the tracker file, or None for a fresh run. A tracker naming a missing or
    incomplete directory is an error: silently restarting from scratch would throw away a run."""
    tracker = Path(root) / TRACKER
    if not tracker.exists():
        return None
    text = tracker.read_text().strip()
    try:
        iteration = int(text)
    except ValueError as e:
        raise CslmError(tracker, 1, None, f"expected an iteration number, found {text!r}", kind="checkpoint",
                        reason="corrupt") from e
    path = iteration_dir(root, iteration)
    if not (path / "metadata.json").exists():
        raise CslmError(tracker, 1, None, f"names iteration {iteration} but {path} is missing or incomplete",
                        kind="checkpoint", reason="missing")
    return iteration


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {"python": random.getstate(), "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": _tracker_states()}


def _tracker_states() -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    return get_cuda_rng_tracker().get_states()


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _unwrapped(model: list) -> list:
    return [chunk.module if hasattr(chunk, "module") else chunk for chunk in model]


def _model_keys(model: list) -> list[str]:
    """Megatron-LM's names: "model" for one chunk, "model0", "model1", ... for virtual pipeline stages. Only the
    nesting differs: tensors are matched by their global keys, so a save loads at any PP/VPP."""
    return ["model"] if len(model) == 1 else [f"model{i}" for i in range(len(model))]


def _sharded_state(model: list, optimizer, scheduler, common: dict, is_loading: bool = False) -> dict:
    state = {key: chunk.sharded_state_dict() for key, chunk in zip(_model_keys(model), _unwrapped(model))}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(dict(state), is_loading=is_loading,
                                                          metadata=OPTIM_SHARDING)
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    state["cslm"] = common
    return state


def _materialize_optimizer_state(optimizer) -> None:
    """A fresh torch Adam has no state (no 'step'), which megatron-core's distributed optimizer needs to
    describe what it is about to load; megatron-core's own zero-gradient step creates it (values are then
    overwritten by the load)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not opt.optimizer.state:
            init_optimizer_state(opt)  # private megatron-core API, wrapped in compat.py


def _restore_adam_steps(optimizer, loaded: dict | list) -> None:
    """megatron-core 0.16 loads torch-Adam state with one `step` tensor shared by every parameter (and copies
    stale values into it), so after a resume the bias-correction step advanced once per parameter per
    update. Give each parameter its own step with the saved value: resumed == uninterrupted, bitwise."""
    for opt, saved in zip(getattr(optimizer, "chained_optimizers", [optimizer]),
                          loaded if isinstance(loaded, list) else [loaded]):
        steps = {g["step"] for g in saved["optimizer"]["param_groups"] if g.get("step") is not None}
        if len(steps) != 1:
            continue
        step = float(steps.pop())
        for param_state in opt.optimizer.state.values():
            if "step" in param_state:
                param_state["step"] = torch.tensor(step)


class SaveStrategies:
    """megatron-core `torch_dist` save strategies kept for the whole run, one per checkpoint structure.

    `workers` is the number of writer processes per rank (Megatron-LM's `--dist-ckpt-workers`, default 1:
    with more, an asynchronous save's writers compete with training for the host's cores). With
    `assume_constant_structure` (Megatron-LM's `--ckpt-assume-constant-structure`) megatron-core reuses the
    save plan and global metadata once two saves agreed, and the sharding-integrity check (an all-gather of
    every rank's shard metadata) runs on the first save only. A structure is keyed by whether the optimizer
    is in the save, the one thing that changes within a run (a step-0 save has no optimizer state), so a
    cached plan is never applied to a state it was not made for.
    """

    def __init__(self, workers: int = 1, assume_constant_structure: bool = False):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers, self.assume_constant_structure = workers, assume_constant_structure
        self._by_structure: dict[bool, object] = {}

    def get(self, with_optimizer: bool) -> tuple[object, bool]:
        """(strategy, validate_access_integrity) for the next save of this structure."""
        from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

        first = with_optimizer not in self._by_structure
        if first:
            self._by_structure[with_optimizer] = TorchDistSaveShardedStrategy(
                "torch_dist", 1, thread_count=self.workers, cached_metadata=self.assume_constant_structure)
        return self._by_structure[with_optimizer], first or not self.assume_constant_structure


def save_checkpoint(root: str | os.PathLike, iteration: int, model: list, optimizer, scheduler,
                    common: dict, async_queue=None, strategies: SaveStrategies | None = None,
                    retention: RetentionPolicy | None = None) -> Path:
    """Collective save. `common` (iteration, consumed samples, args) must be identical on every rank.

    With `async_queue` (a megatron-core `AsyncCallsQueue`, see `AsyncCheckpointer`) the tensor payload is
    written by a background process and this returns once it is scheduled; the rename to `iter_XXXXXXX`
    and the tracker happen in a finalize step that megatron-core runs only after every rank's writer
    finished. A crash before that leaves `iter_XXXXXXX.tmp` and the previous tracker. `retention` runs on rank 0
    after the tracker names this save (checkpoint/retention.py)."""
    from megatron.core import dist_checkpointing

    rank = dist.get_rank()
    final = iteration_dir(root, iteration)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    common = {**common, "optimizer_saved": optimizer is not None}
    strategy, validate = (strategies or SaveStrategies()).get(optimizer is not None)
    asynchronous = async_queue is not None
    request = dist_checkpointing.save(_sharded_state(model, optimizer, scheduler, common), str(tmp), strategy,
                                      validate_access_integrity=validate, async_sharded_save=asynchronous,
                                      **(dist_save_async_kwargs() if asynchronous else {}))
    (tmp / "extra_state").mkdir(exist_ok=True)
    with atomic_open(tmp / "extra_state" / f"rank_{rank:05d}.pt", "wb") as f:
        torch.save(_rng_state(), f)

    def publish() -> None:  # every rank's files are complete: make the save visible to resume
        dist.barrier()
        if rank == 0:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            with atomic_open(Path(root) / TRACKER) as f:
                f.write(f"{iteration}\n")
            if retention is not None:
                apply_retention(root, iteration, retention)
        dist.barrier()

    if request is None:
        publish()
    else:
        request.add_finalize_fn(publish)
        async_queue.schedule_async_request(request)
    return final


class AsyncCheckpointer:
    """Owns megatron-core's queue of asynchronous saves (`--async-save`).

    Every method is collective (megatron-core agrees across ranks on which saves are done). `poll()` once per
    step publishes saves that finished; `wait()` blocks until all are published (before another save, on
    a signal, at the end of training). One save in flight at a time, like Megatron-LM: a new save first
    waits for the previous one, so a slow filesystem never piles up copies of the state."""

    def __init__(self, strategies: SaveStrategies | None = None, retention: RetentionPolicy | None = None):
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self.queue = AsyncCallsQueue(persistent=False)
        self.strategies = strategies or SaveStrategies()
        self.retention = retention
        # The writers' result queue lives in a spawned Manager process that takes seconds to start: start it
        # now, beside the model and data set-up, instead of inside the first save (where training would wait).
        self._results_queue = threading.Thread(target=start_async_checkpoint_results_queue, daemon=True)
        self._results_queue.start()

    @property
    def pending(self) -> int:
        return self.queue.get_num_unfinalized_calls()

    def save(self, root, iteration: int, model: list, optimizer, scheduler, common: dict) -> Path:
        self._results_queue.join()
        self.wait()
        return save_checkpoint(root, iteration, model, optimizer, scheduler, common, async_queue=self.queue,
                               strategies=self.strategies, retention=self.retention)

    def poll(self) -> list[int]:
        return self.queue.maybe_finalize_async_calls(blocking=False)

    def wait(self) -> list[int]:
        return self.queue.maybe_finalize_async_calls(blocking=True)

    def close(self, abort: bool = False) -> None:
        """Publish pending saves and stop the writers; `abort` (after an error) stops them without the collective
        wait, leaving unfinished saves as `.tmp`."""
        if not abort:
            self.wait()
        self.queue.close(abort=abort)


def load_checkpoint(root: str | os.PathLike, iteration: int, model: list, optimizer, scheduler,
                    restore_rng: bool = True) -> dict:
    """Load model (+ optimizer/scheduler when given) from `root` at `iteration`; returns the common state."""
    from megatron.core import dist_checkpointing

    path = iteration_dir(root, iteration)
    if not dist_checkpointing.load_common_state_dict(str(path)).get("cslm", {}).get("optimizer_saved", False):
        optimizer = None  # weights-only save (--no-save-optim, init-only runs, converted HF)
    if optimizer is not None:
        _materialize_optimizer_state(optimizer)
    state = dist_checkpointing.load(_sharded_state(model, optimizer, scheduler, {}, is_loading=True), str(path))
    for key, chunk in zip(_model_keys(model), _unwrapped(model)):
        chunk.load_state_dict(state[key], strict=True)
    if optimizer is not None:
        with torch.no_grad():  # megatron-core 0.16's dp_reshardable loader copies into params that need grad
            optimizer.load_state_dict(state["optimizer"])
        _restore_adam_steps(optimizer, state["optimizer"])
    if scheduler is not None and "opt_param_scheduler" in state:
        scheduler.load_state_dict(state["opt_param_scheduler"])
    extra = path / "extra_state" / f"rank_{dist.get_rank():05d}.pt"
    if restore_rng and extra.exists():
        _set_rng_state(torch.load(extra, weights_only=True))
    return state.get("cslm", {})
