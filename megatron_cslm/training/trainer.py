"""The trainer shared by pretraining and SFT: setup, resume/init, the training loop, close.

What differs between the stages is data: a `Task` gives the datasets, how to batch them and the names
(and weights) of the loss groups. Everything else (parallelism, optimizer, checkpoint/resume semantics,
logging) is one code path, `Trainer.run`, whose steps read as a list:

    setup()            process groups, batch arithmetic, where to resume/start from, model, optimizer, data
    resume_or_init()   load the run's own checkpoint (or Megatron-LM's --load), or initial weights
    train()            steps; after each: NaN stop, log, validation, exit signal, save
    close()

Resume rules (Megatron-LM's, plus ours where they add something):
- the run's own `--save` directory wins when it holds a checkpoint (a restarted job continues);
- else `--load X` resumes X (iteration, optimizer, scheduler, RNG; `--no-load-optim`, `--no-load-rng` drop
  parts), or with `--finetune` takes X's weights only and starts at iteration 0 (like `--load-init X`);
- a resume whose LR schedule (lr, min-lr, warmup/decay/train iterations, global batch size, decay style)
  differs from the checkpoint's stops naming both values, unless `--override-opt_param-scheduler` (the
  command line wins) or `--use-checkpoint-opt_param-scheduler` (the checkpoint wins).
"""
from __future__ import annotations

import argparse
import contextlib
import faulthandler
import logging
import math
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from megatron_cslm.checkpoint.manifest import ModelManifest, copy_notices, load_any_manifest, read_common_state
from megatron_cslm.checkpoint.retention import RetentionPolicy
from megatron_cslm.checkpoint.save_load import (
    AsyncCheckpointer,
    SaveStrategies,
    latest_iteration,
    load_checkpoint,
    save_checkpoint,
)
from megatron_cslm.compat import default_store
from megatron_cslm.distributed import parallel
from megatron_cslm.distributed.watchdog import StepWatchdog, stall_for_tests
from megatron_cslm.errors import EXIT_RESTART, CslmError, record_exit_status
from megatron_cslm.models.flops import train_flops_per_token
from megatron_cslm.models.llama import ARCHS, LlamaArch, run_padded_vocab_size, transformer_config
from megatron_cslm.training import signals
from megatron_cslm.training.config import RunConfig
from megatron_cslm.training.data import data_speech_tokenizer
from megatron_cslm.training.lineage import stage_record
from megatron_cslm.training.logger import TrainingLogger
from megatron_cslm.training.profiling import (
    ManualGC,
    PhaseTimers,
    StepProfiler,
    TimedIterator,
    device_peak_tflops,
    profile_dir,
)
from megatron_cslm.training.setup import build_model, build_optimizer, per_chunk, schedule_of
from megatron_cslm.training.step import evaluate, train_step

log = logging.getLogger(__name__)
SAVE_ALLOWANCE_S = 30 * 60.0  # extra watchdog time for a checkpoint save or a validation pass


@dataclass
class Task:
    """The data side of a run. `stream(dataset, consumed_samples)` yields this DP rank's micro-batches."""

    train: object  # None on ranks that receive batches by broadcast (TP rank > 0)
    valid: object | None
    has_valid: bool  # the same on every rank, unlike `valid`
    stream: Callable
    group_names: list[str]
    group_weights: torch.Tensor | None = None


@dataclass
class ModelSource:
    arch: LlamaArch
    tokenizer_dir: Path
    checkpoint_padded_vocab: int | None = None  # rows of the checkpoint we start from, if any
    manifest: ModelManifest | None = None  # the start checkpoint's (lineage, base model), if any


@dataclass(frozen=True)
class StartPoint:
    """Where the weights come from: a resume (`resume=True`: iteration, optimizer, scheduler, RNG) or initial
    weights only (--load-init, --load --finetune). `directory` None: random initialisation."""

    directory: str | None = None
    iteration: int = 0
    resume: bool = False


def find_start(cfg: RunConfig) -> StartPoint:
    ck = cfg.checkpoint
    if ck.ckpt_format != "torch_dist":
        raise CslmError.usage(f"--ckpt-format {ck.ckpt_format!r}: only torch_dist (megatron-core dist_checkpointing) "
                         "is supported")
    if ck.finetune and not ck.load:
        raise CslmError.usage("--finetune needs --load (the checkpoint whose weights to start from)")
    if ck.load and ck.finetune and cfg.model.load_init:
        raise CslmError.usage("give --load-init X or --load X --finetune, not both")
    if ck.save and (at := latest_iteration(ck.save)) is not None:
        return StartPoint(ck.save, at, resume=True)
    if ck.load and not ck.finetune and (at := latest_iteration(ck.load)) is not None:
        return StartPoint(ck.load, at, resume=True)
    init = ck.load if ck.finetune else cfg.model.load_init
    if init:
        return StartPoint(init, latest_iteration(init) or 0, resume=False)
    if ck.load:
        log.warning("--load %s holds no checkpoint (no latest_checkpointed_iteration.txt); starting from "
                    "--model-arch", ck.load)
    return StartPoint()


def resolve_model(cfg: RunConfig, start: StartPoint) -> ModelSource:
    """Architecture from the checkpoint we resume or start from (its cslm_model.json), or a named arch
    resized to the tokenizer's vocabulary."""
    from megatron_cslm.text.tokenizer import SpeechTextTokenizer

    m = cfg.model
    if start.directory:
        manifest = load_any_manifest(start.directory, m.tokenizer_model)  # ours, or Megatron-LM's args
        tokenizer_dir = Path(m.tokenizer_model) if m.tokenizer_model else manifest.tokenizer_dir(start.directory)
        return ModelSource(manifest.arch, tokenizer_dir, manifest.padded_vocab_size, manifest)
    if m.model_arch not in ARCHS:
        raise CslmError.usage(f"--model-arch {m.model_arch!r} is not one of {sorted(ARCHS)}")
    if not m.tokenizer_model:
        raise CslmError.usage("--model-arch runs need --tokenizer-model (a saved SpeechTextTokenizer directory)")
    tokenizer = SpeechTextTokenizer.from_pretrained(m.tokenizer_model)
    return ModelSource(ARCHS[m.model_arch].with_vocab(tokenizer.vocab_size), Path(m.tokenizer_model))


SCHEDULE_FLAGS = {"train_iters": "--train-iters", "global_batch_size": "--global-batch-size", "lr": "--lr",
                  "min_lr": "--min-lr", "lr_decay_style": "--lr-decay-style",
                  "lr_warmup_iters": "--lr-warmup-iters/--lr-warmup-fraction", "lr_decay_iters": "--lr-decay-iters"}


def check_schedule(cfg: RunConfig, saved: dict | None, where: str) -> None:
    """Megatron-LM's rule: a resumed run's LR schedule must equal the checkpoint's unless a flag says which wins."""
    ck = cfg.checkpoint
    if ck.override_opt_param_scheduler and ck.use_checkpoint_opt_param_scheduler:
        raise CslmError.usage("give --override-opt_param-scheduler or --use-checkpoint-opt_param-scheduler, not both")
    if not saved or ck.override_opt_param_scheduler or ck.use_checkpoint_opt_param_scheduler:
        return
    now = schedule_of(cfg.optim, cfg.data.global_batch_size)
    diffs = [f"{flag} {now[key]} (checkpoint: {saved[key]})" for key, flag in SCHEDULE_FLAGS.items()
             if key in saved and saved[key] != now[key]]
    if diffs:
        raise CslmError.usage(f"the LR schedule differs from the one {where} was trained with: {', '.join(diffs)}; "
                         "pass --override-opt_param-scheduler to use the command line's schedule or "
                         "--use-checkpoint-opt_param-scheduler to keep the checkpoint's")


class _ExitSignal:
    """SIGTERM/SIGUSR1 (what SLURM sends before the time limit) -> checkpoint at the next step boundary. The
    handlers are in place from process start (training/signals.py); `--no-exit-signal-handler` restores the
    default actions."""

    def __init__(self, enabled: bool):
        if not enabled:
            signals.uninstall()
        self.owned = enabled and signals.install()  # installed here (in-process run), not by an entry point

    def any_rank(self) -> bool:
        flag = torch.tensor([int(bool(signals.received()))], dtype=torch.int32,
                            device="cuda" if torch.cuda.is_available() else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def _broadcast_from_last(values: list[float]) -> list[float]:
    """Loss values live on the last pipeline stage; every rank needs them to agree on NaN stops."""
    t = torch.tensor(values, dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
    dist.broadcast(t, src=dist.get_world_size() - 1)
    return t.tolist()


def _plain(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (str, int, float, bool, list, type(None)))}


class Trainer:
    """One training run. `make_task(args, source, padded_vocab)` builds the stage's data (see `Task`)."""

    def __init__(self, args: argparse.Namespace, make_task: Callable[[argparse.Namespace, ModelSource, int], Task]):
        self.args = args  # the task reads its own flags from here; the trainer reads `cfg`
        self.cfg = RunConfig.from_args(args)
        self.make_task = make_task
        module = make_task.__module__  # pretrain | sft (named in the lineage); "__main__" under python -m
        self.stage = Path(sys.modules[module].__file__).stem if module == "__main__" else module.rsplit(".", 1)[-1]
        self.iteration = 0
        self.consumed = 0
        self.exit_signal = _ExitSignal(self.cfg.checkpoint.exit_signal_handler)
        self.stopped_on_signal = False
        # made by setup() / train(); close() skips what an error left unmade
        self.checkpointer = self.logger = self.profiler = self.manual_gc = self.timers = self.watchdog = None

    def run(self) -> int:
        """Train; returns the exit status: 0 when --train-iters is reached, EXIT_RESTART (75) when a signal
        stopped the run first (after a save if anything was new), so a launcher knows to run it again."""
        self.setup()
        self.resume_or_init()
        if self.exit_signal.any_rank():  # a signal during start-up: nothing trained yet, nothing new to save
            log.info(f"exiting on signal {', '.join(signals.received()) or '(another rank)'} during start-up, "
                     f"at iteration {self.iteration}: nothing new to save")
            self.stopped_on_signal = True
        else:
            self.train()
        if self.stopped_on_signal and self.iteration < self.cfg.optim.train_iters:
            if dist.get_rank() == 0:
                record_exit_status(EXIT_RESTART)
            dist.barrier()  # written before any rank exits (a launcher may kill the rest on the first exit)
            return EXIT_RESTART
        return 0

    # -- setup ---------------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        self.device = parallel.initialize(cfg.parallel, device=cfg.runtime.device, seed=cfg.runtime.seed,
                                          timeout_minutes=cfg.runtime.distributed_timeout_minutes)
        self.world = dist.get_world_size()
        self.dp = cfg.parallel.data_parallel_size(self.world)
        data = cfg.data
        if data.global_batch_size % (data.micro_batch_size * self.dp):
            raise CslmError.usage(f"--global-batch-size {data.global_batch_size} is not a multiple of micro batch "
                             f"{data.micro_batch_size} x data-parallel size {self.dp}")
        self.num_microbatches = data.global_batch_size // (data.micro_batch_size * self.dp)
        self.start = find_start(cfg)
        if self.start.resume and not cfg.checkpoint.no_load_optim:  # before any expensive work
            common = read_common_state(self.start.directory, self.start.iteration)
            check_schedule(cfg, common.get("schedule"), f"{self.start.directory} iteration {self.start.iteration}")
        self.source = resolve_model(cfg, self.start)
        # the data's one speech codebook, = the start checkpoint's (training/data.py); cslm_model.json records it
        self.speech_tokenizer = data_speech_tokenizer(cfg.data.data_path, cfg.data.valid_data_path,
                                                      self.source.manifest, self.start.directory)
        tp = cfg.parallel.tensor_model_parallel_size
        self.padded_vocab = run_padded_vocab_size(self.source.arch.vocab_size, self.source.checkpoint_padded_vocab,
                                                  tp, cfg.model.make_vocab_size_divisible_by)
        m = cfg.model
        vpp = cfg.parallel.virtual_size(self.source.arch.num_layers)
        parallel.use_virtual_pipeline(vpp)
        config = transformer_config(self.source.arch, tensor_parallel_size=tp,
                                    pipeline_parallel_size=cfg.parallel.pipeline_model_parallel_size,
                                    virtual_pipeline_size=vpp,
                                    precision=m.precision(self.device), recompute=m.recompute(),
                                    sequence_parallel=m.sequence_parallel, spec=m.transformer_impl)
        self.task = self.make_task(self.args, self.source, self.padded_vocab)  # data errors before the model
        self.model = build_model(self.source.arch, config, self.padded_vocab, spec=m.transformer_impl,
                                 use_distributed_optimizer=cfg.optim.use_distributed_optimizer, comm=cfg.comm)
        ck = cfg.checkpoint
        self.save_strategies = SaveStrategies(ck.dist_ckpt_workers, ck.ckpt_assume_constant_structure)
        self.retention = RetentionPolicy(ck.keep_last_n, ck.keep_every)
        self.checkpointer = AsyncCheckpointer(self.save_strategies, self.retention) if ck.async_save else None
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg.optim, config, data.global_batch_size,
                                                         checkpoint=cfg.checkpoint)

    # -- resume / init -------------------------------------------------------------------------------------
    def resume_or_init(self) -> None:
        cfg, start = self.cfg, self.start
        if start.resume:
            ck = cfg.checkpoint
            load_optim = not ck.no_load_optim
            common = load_checkpoint(start.directory, start.iteration, self.model,
                                     self.optimizer if load_optim else None, self.scheduler if load_optim else None,
                                     restore_rng=not ck.no_load_rng)
            self.iteration, self.consumed = common["iteration"], common["consumed_samples"]
            if not load_optim:  # a fresh optimizer; the schedule (counted in samples) continues where it was
                self.optimizer.reload_model_params()
                self.scheduler.step(increment=self.consumed)
            log.info(f"resumed from {start.directory} at iteration {self.iteration} "
                     f"({self.consumed} samples consumed)")
        elif start.directory:
            load_checkpoint(start.directory, start.iteration, self.model, None, None, restore_rng=False)
            self.optimizer.reload_model_params()
            log.info(f"initialised weights from {start.directory} (iteration {start.iteration})")
        if cfg.checkpoint.save and dist.get_rank() == 0:
            self.write_run_manifest()

    def write_run_manifest(self) -> None:
        """--save's cslm_model.json: architecture, padded vocabulary, tokenizer, and the lineage of stages
        (the start checkpoint's plus this one) with the licence/notice files of the start checkpoint."""
        save, start = self.cfg.checkpoint.save, self.source.manifest
        record = stage_record(self.cfg, self.stage, save)
        lineage = [r for r in (start.lineage if start else ()) if r.get("save") != record["save"]] + [record]
        ModelManifest(self.source.arch, self.padded_vocab, str(self.source.tokenizer_dir.resolve()),
                      start.base_model if start else None, tuple(lineage), self.speech_tokenizer).save(save)
        if self.start.directory:
            copy_notices(self.start.directory, save)

    # -- the loop ------------------------------------------------------------------------------------------
    def train(self) -> None:
        from megatron.core import parallel_state

        cfg = self.cfg
        data, lg = cfg.data, cfg.logging
        self.dp_rank = parallel_state.get_data_parallel_rank()
        flops = train_flops_per_token(self.source.arch, data.seq_length, self.padded_vocab,
                                      full_recompute=cfg.model.recompute_granularity == "full")
        logs_here = dist.get_rank() == self.world - 1
        peak = lg.peak_tflops
        if peak is None and logs_here:
            peak, source = device_peak_tflops(self.device)
            log.info("MFU against %s%s", source, f" ({peak * 1e3:.1f} GFLOP/s)" if peak else "")
        self.logger = TrainingLogger(enabled=logs_here, tensorboard_dir=lg.tensorboard_dir,
                                     wandb_project=lg.wandb_project, flops_per_token=flops,
                                     peak_tflops=peak, world_size=self.world, config=cfg.flat())
        self.timers = PhaseTimers()
        rt = cfg.runtime
        self.watchdog = StepWatchdog(None if rt.step_timeout_minutes is None else 60.0 * rt.step_timeout_minutes,
                                     rank=dist.get_rank(), world=self.world, store=default_store())

        def timed_stream():
            stream = self.task.stream(self.task.train, self.consumed, self.dp_rank, self.dp, self.num_microbatches)
            return None if stream is None else TimedIterator(stream, self.timers)

        train_iter = per_chunk(self.model, timed_stream)
        pr = cfg.profiling
        self.profiler = StepProfiler(enabled=pr.profile, start=pr.profile_step_start, end=pr.profile_step_end,
                                     ranks=list(pr.profile_ranks), rank=dist.get_rank(),
                                     trace_dir=profile_dir(pr, lg.tensorboard_dir), cuda=self.device == "cuda")
        self.manual_gc = ManualGC(pr.manual_gc, pr.manual_gc_interval)
        train_iters = cfg.optim.train_iters
        if train_iters == 0:  # an init-only run: write the initial weights (e.g. to start several runs alike)
            self.save()
        while self.iteration < train_iters:
            self.profiler.before_step(self.iteration + 1)
            stall_for_tests(dist.get_rank(), self.iteration + 1)
            stats = train_step(self.model, self.optimizer, self.scheduler, train_iter,
                               global_batch_size=data.global_batch_size, group_weights=self.task.group_weights,
                               timers=self.timers, **self._step_kwargs())
            self.profiler.after_step(self.iteration + 1)
            self.manual_gc.after_step(self.iteration + 1)
            if self.checkpointer is not None:  # publish async saves that every rank has finished (collective)
                with self.timers.phase("checkpoint"):
                    self.checkpointer.poll()
            self.iteration += 1
            self.consumed += data.global_batch_size
            self.watchdog.beat(self.iteration)
            self.check_finite(stats)
            self.logger.accumulate(stats["losses"], data.global_batch_size * data.seq_length)
            last = self.iteration == train_iters
            if self.iteration % lg.log_interval == 0 or last:
                self.logger.flush(self.iteration, self.scheduler.get_lr(self.optimizer.param_groups[0]),
                                  stats["grad_norm"], train_iters, phases=self.timers.take())
            if self.task.has_valid and lg.eval_interval and (self.iteration % lg.eval_interval == 0 or last):
                self.validate()
            if self.exit_signal.any_rank():
                self.save()
                self.wait_for_saves()
                log.info(f"exiting on signal after iteration {self.iteration}")
                self.stopped_on_signal = True
                break
            if self.iteration % cfg.checkpoint.save_interval == 0 or last:
                self.save()

    def _step_kwargs(self) -> dict:
        return dict(num_microbatches=self.num_microbatches, seq_length=self.cfg.data.seq_length,
                    micro_batch_size=self.cfg.data.micro_batch_size, group_names=self.task.group_names)

    def check_finite(self, stats: dict) -> None:
        total = stats["losses"].get("lm loss", (0.0, 1.0)) if stats["losses"] else (0.0, 1.0)
        loss_sum, = _broadcast_from_last([total[0]])
        if not math.isfinite(loss_sum):
            save = self.cfg.checkpoint.save
            last = latest_iteration(save) if save else None
            # raised on every rank; exits with the "training" code (megatron_cslm/errors.py)
            raise CslmError(message=f"loss is {loss_sum} at iteration {self.iteration}; stopping without saving. "
                            f"Last good checkpoint: {f'{save} iteration {last}' if last is not None else 'none'}",
                            kind="training", reason="non_finite_loss")

    def validate(self) -> None:
        valid_iter = per_chunk(self.model, lambda: self.task.stream(self.task.valid, 0, self.dp_rank, self.dp,
                                                                    self.num_microbatches))
        with self._params_gathered(), self._allowance():
            losses = evaluate(self.model, valid_iter, num_batches=self.cfg.logging.eval_iters, **self._step_kwargs())
        self.logger.validation(self.iteration, losses)

    @contextlib.contextmanager
    def _params_gathered(self):
        """With --overlap-param-gather the last step's all-gather is still pending (it runs under the next
        forward): finish it before weights are read outside a training step (save, validation)."""
        overlapped = self.cfg.comm.overlap_param_gather
        if overlapped:
            for chunk in self.model:
                chunk.disable_forward_pre_hook(param_sync=True)
        try:
            yield
        finally:
            if overlapped:
                for chunk in self.model:
                    chunk.enable_forward_pre_hook()

    def _allowance(self):
        """Saves and validation may outlast a step: the watchdog gives them SAVE_ALLOWANCE_S more."""
        if self.watchdog is None:
            return contextlib.nullcontext()
        return self.watchdog.allowance(SAVE_ALLOWANCE_S)

    def wait_for_saves(self) -> None:
        """Block until pending asynchronous saves are published (collective; a no-op for synchronous saves)."""
        if self.checkpointer is not None and self.checkpointer.pending:
            with self.timers.phase("checkpoint"), self._allowance():
                self.checkpointer.wait()
            log.info(f"asynchronous checkpoint saves complete (latest: {latest_iteration(self.cfg.checkpoint.save)})")

    def save(self) -> None:
        ck = self.cfg.checkpoint
        if not ck.save:
            return
        it = self.iteration
        with_optim = it > 0 and not ck.no_save_optim  # an optimizer that never stepped has no state
        common = {"iteration": it, "consumed_samples": self.consumed, "args": _plain(vars(self.args)),
                  "schedule": schedule_of(self.cfg.optim, self.cfg.data.global_batch_size)}
        optimizer = self.optimizer if with_optim else None
        with self.timers.phase("checkpoint"), self._params_gathered(), self._allowance():
            if self.checkpointer is not None:  # returns once the background writers started
                self.checkpointer.save(ck.save, it, self.model, optimizer, self.scheduler, common)
                log.info(f"saving checkpoint at iteration {it} to {ck.save} in the background")
            else:
                save_checkpoint(ck.save, it, self.model, optimizer, self.scheduler, common,
                                strategies=self.save_strategies, retention=self.retention)
                log.info(f"saved checkpoint at iteration {it} to {ck.save}")

    def close(self, abort: bool = False) -> None:
        """Finish pending saves and close writers and loggers; runs on every exit. After an error (`abort`) only
        what set-up got to create is closed, and pending asynchronous saves are abandoned without the collective
        wait (other ranks may be gone): they stay `.tmp` and are never resumed from."""
        if self.checkpointer is not None:
            if not abort and self.timers is not None:
                self.wait_for_saves()
            self.checkpointer.close(abort=abort)
        for part in (self.watchdog, self.profiler, self.manual_gc, self.logger):
            if part is not None:
                part.close()


def _is_collective_timeout(error: RuntimeError) -> bool:
    """A torch.distributed collective that ran past its timeout (gloo: 'Timed out waiting ...'; NCCL:
    DistBackendError '... timeout ...'; NCCL's own watchdog may abort the process first)."""
    text = str(error).lower()
    return "timed out" in text or (isinstance(error, dist.DistBackendError) and "timeout" in text)


def main(make_task, parser_factory, argv: list[str] | None = None) -> int:
    """Run one training job; run it under `megatron_cslm.cli.run_tool`, which prints a CslmError as one line and
    exits with its kind's code (usage 2, data 1, checkpoint 4, training 6; errors.py)."""
    from megatron_cslm.compat import check_megatron_core_version
    from megatron_cslm.training.arguments import parse_args

    args = parse_args(parser_factory(), argv)
    check_megatron_core_version()
    trainer = Trainer(args, make_task)
    failed = True
    try:
        code = trainer.run()
        failed = False
        return code
    except RuntimeError as e:
        if not _is_collective_timeout(e):
            raise
        # --distributed-timeout-minutes ran out: end like a stall (stacks in the log, exit 76, requeued)
        traceback.print_exc()
        faulthandler.dump_traceback(all_threads=True)
        rank = dist.get_rank() if dist.is_initialized() else os.environ.get("RANK", "?")  # (also during set-up)
        raise CslmError(message=f"rank {rank}: a collective timed out after "
                        f"{trainer.cfg.runtime.distributed_timeout_minutes} min ({str(e).splitlines()[0][:200]})",
                        kind="stalled", reason="collective_timeout") from e
    finally:
        trainer.close(abort=failed)
        parallel.destroy()
        if trainer.exit_signal.owned:  # run in-process: leave SIGTERM as it was found (forked workers die on it)
            signals.uninstall(forget=True)
