"""Console + TensorBoard (+ optional W&B) logging of a training run, from the rank that sees the loss.

Losses arrive as (sum, token count) per group, so a logged loss is the exact token average over the
interval, not an average of per-step averages.
"""
from __future__ import annotations

import math
import time

from megatron_cslm.models.flops import mfu
from megatron_cslm.training.profiling import PHASES, memory_stats


class TrainingLogger:
    def __init__(self, *, enabled: bool, tensorboard_dir: str | None, wandb_project: str | None,
                 flops_per_token: float, peak_tflops: float | None, world_size: int, config: dict):
        self.enabled = enabled
        self.flops_per_token, self.peak_tflops, self.world_size = flops_per_token, peak_tflops, world_size
        self.writer = self.wandb = None
        self._reset()
        if not enabled:
            return
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=tensorboard_dir, max_queue=10)
        if wandb_project:
            import wandb

            self.wandb = wandb.init(project=wandb_project, config=config)

    def _reset(self) -> None:
        self.sums: dict[str, list[float]] = {}
        self.tokens = 0
        self.steps = 0
        self.start = time.perf_counter()

    def accumulate(self, losses: dict[str, tuple[float, float]], tokens: int) -> None:
        for name, (s, n) in losses.items():
            acc = self.sums.setdefault(name, [0.0, 0.0])
            acc[0] += s
            acc[1] += n
        self.tokens += tokens
        self.steps += 1

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        if self.writer:
            for k, v in values.items():
                self.writer.add_scalar(f"{prefix}{k}", v, step)
            self.writer.flush()
        if self.wandb:
            self.wandb.log({f"{prefix}{k}": v for k, v in values.items()}, step=step)

    def flush(self, iteration: int, lr: float, grad_norm: float | None, total_iters: int,
              phases: dict[str, float] | None = None) -> dict[str, float]:
        """Write the interval's averages; returns them (losses per group, throughput, MFU, seconds per step
        of each phase in `phases` (summed over the interval), memory)."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        losses = {name: s / n for name, (s, n) in self.sums.items() if n > 0}
        tokens_per_s = self.tokens / elapsed
        per_gpu = tokens_per_s / self.world_size
        values = {f"loss/{k}": v for k, v in losses.items()}
        values.update({
            "lr": lr, "grad_norm": grad_norm if grad_norm is not None else float("nan"),
            "throughput/tokens_per_s": tokens_per_s, "throughput/tokens_per_s_per_gpu": per_gpu,
            "throughput/tflops_per_gpu": per_gpu * self.flops_per_token / 1e12,
            "time/step_s": elapsed / max(self.steps, 1),
        })
        if self.peak_tflops:  # None: no known peak for this device (no MFU rather than a meaningless one)
            values["throughput/mfu"] = mfu(per_gpu, self.flops_per_token, self.peak_tflops)
        steps = max(self.steps, 1)
        values.update({f"time/{name}_s": seconds / steps for name, seconds in (phases or {}).items()})
        values.update(memory_stats())
        if self.enabled:
            parts = " | ".join(f"{k} {v:.4f}" for k, v in sorted(losses.items()))
            print(f" iteration {iteration:8d}/{total_iters} | {parts} | lr {lr:.3e} | grad norm "
                  f"{values['grad_norm']:.3f} | {tokens_per_s:,.0f} tok/s | "
                  f"{values['throughput/tflops_per_gpu']:.3g} TFLOP/s/GPU | "
                  f"{_mfu_text(values)}"
                  f"{1000 * values['time/step_s']:.0f} ms/step{_phase_text(values)} | {_memory_text(values)}",
                  flush=True)
            self.scalars("train/", values, iteration)
        self._reset()
        return values

    def validation(self, iteration: int, losses: dict[str, tuple[float, float]]) -> dict[str, float]:
        avg = {name: s / n for name, (s, n) in losses.items() if n > 0}
        if self.enabled:
            parts = " | ".join(f"{k} {v:.4f} (ppl {math.exp(min(v, 50)):.2f})" for k, v in sorted(avg.items()))
            print(f" validation at iteration {iteration} | {parts}", flush=True)
            self.scalars("valid/loss/", avg, iteration)
        return avg

    def close(self) -> None:
        if self.writer:
            self.writer.close()
        if self.wandb:
            self.wandb.finish()


def _phase_text(values: dict[str, float]) -> str:
    """' (data 3 | forward-backward 120 | optimizer 8 | checkpoint 0 ms)' for the phases measured."""
    parts = [f"{name} {1000 * values[f'time/{name}_s']:.0f}" for name in PHASES if f"time/{name}_s" in values]
    return f" ({' | '.join(parts)} ms)" if parts else ""


def _mfu_text(values: dict[str, float]) -> str:
    return f"MFU {100 * values['throughput/mfu']:.3g}% | " if "throughput/mfu" in values else ""


def _memory_text(values: dict[str, float]) -> str:
    if "memory/max_allocated_gib" in values:
        return f"peak GPU memory {values['memory/max_allocated_gib']:.2f} GiB"
    return f"peak RSS {values['memory/peak_rss_gib']:.2f} GiB"
