"""A plan as a markdown report (the memory of one layout by part, then every layout ranked) or as JSON.

GiB = 2^30 bytes; time to train a token budget = ceil(tokens / tokens per step) x step time.
"""
from __future__ import annotations

from megatron_cslm.plan.gpus import GIB
from megatron_cslm.plan.layouts import Estimate, Run
from megatron_cslm.plan.source import ModelSpec


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def _duration(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} d"
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def memory_table(model: ModelSpec, run: Run, e: Estimate) -> str:
    lay, opt = e.layout, "distributed" if e.layout.distributed_optimizer else "replicated"
    other = "replicated" if lay.distributed_optimizer else "distributed"
    act = e.activations
    rows = [
        ("weights (BF16" + (", padded DDP param buffer" if lay.distributed_optimizer else "") + ")",
         e.state.weights),
        ("gradients (FP32 DDP grad buffer)", e.state.gradients),
        (f"optimizer state ({opt}: FP32 main params + Adam moments)", e.state.optimizer),
        (f"activations: {e.in_flight:g} micro-batch(es) in flight x {_gib(act.saved)} GiB "
         f"(recompute {run.recompute})", int(act.saved * e.in_flight)),
        ("transient (one recomputed layer / 16-bit logits)", act.transient),
        ("reserve (CUDA context, NCCL, fragmentation)", int(run.reserve_gib * GIB)),
    ]
    total = e.total_bytes + int(run.reserve_gib * GIB)
    lines = [f"**{lay.name()}** on {run.num_gpus} x {run.gpu.name}, pipeline stage {e.stage} (the largest); "
             f"vocabulary {model.arch.vocab_size} padded to {e.padded_vocab}",
             "", "| part | GiB per GPU |", "|---|---:|"]
    lines += [f"| {name} | {_gib(value)} |" for name, value in rows]
    lines += [f"| **total** | **{_gib(total)}** of {_gib(run.gpu.memory_bytes)}: "
              f"{'fits' if e.fits else 'DOES NOT FIT'} |",
              f"| (optimizer state {other} instead) | {_gib(e.state_other_optimizer.optimizer)} |"]
    return "\n".join(lines)


def ranking_table(run: Run, estimates: list[Estimate], top: int) -> str:
    head = ("| layout | fits | GiB/GPU | state | activations | micro-batches | bubble | comm GB/step TP/PP/DP "
            "| step s | tokens/s/GPU |" + (" time to budget |" if run.train_tokens else ""))
    sep = "|---|---|---:|---:|---:|---:|---:|---|---:|---:|" + ("---:|" if run.train_tokens else "")
    lines = [head, sep]
    for e in estimates[:top]:
        reserve = int(run.reserve_gib * GIB)
        row = (f"| {e.layout.name()} | {'yes' if e.fits else 'no'} | {_gib(e.total_bytes + reserve)} "
               f"| {_gib(e.state.total)} | {_gib(e.activation_bytes)} | {e.num_microbatches} | {e.bubble:.1%} "
               f"| {e.tp_bytes / 1e9:.1f} / {e.pp_bytes / 1e9:.2f} / {e.dp_bytes / 1e9:.1f} | {e.step_s:.2f} "
               f"| {e.tokens_per_s_per_gpu:,.0f} |")
        if run.train_tokens:
            row += f" {_duration(e.train_seconds(run.train_tokens))} |"
        lines.append(row)
    if len(estimates) > top:
        lines.append(f"\n({len(estimates) - top} more layouts; --top N shows more)")
    return "\n".join(lines)


def markdown(model: ModelSpec, run: Run, chosen: Estimate, estimates: list[Estimate], top: int = 10) -> str:
    budget = f"; budget {run.train_tokens:.3g} tokens" if run.train_tokens else ""
    head = (f"# cslm plan: {model.description}\n\nseq {run.seq_length}, micro batch {run.micro_batch_size}, "
            f"global batch {run.global_batch_size} ({run.global_batch_size * run.seq_length:,} tokens/step); "
            f"{run.num_gpus} x {run.gpu.name} ({run.precision}, {run.gpu.peak_tflops(run.precision):g} TFLOP/s "
            f"dense peak, MFU {run.mfu:g}); recompute {run.recompute}; {run.spec} layer spec{budget}")
    fitting = sum(e.fits for e in estimates)
    return "\n\n".join([head, memory_table(model, run, chosen),
                        f"Layouts ranked by estimated step time ({fitting} of {len(estimates)} fit):",
                        ranking_table(run, estimates, top)]) + "\n"


def estimate_dict(e: Estimate, run: Run) -> dict:
    lay = e.layout
    out = {"layout": {"tp": lay.tp, "pp": lay.pp, "dp": lay.dp, "vpp": lay.vpp, "sequence_parallel": lay.sp,
                      "distributed_optimizer": lay.distributed_optimizer},
           "fits": e.fits, "padded_vocab_size": e.padded_vocab, "largest_stage": e.stage,
           "bytes": {"weights": e.state.weights, "gradients": e.state.gradients, "optimizer": e.state.optimizer,
                     "optimizer_if_toggled": e.state_other_optimizer.optimizer,
                     "activations_per_microbatch": e.activations.saved, "activations_in_flight": e.in_flight,
                     "activations_transient": e.activations.transient, "activations": e.activation_bytes,
                     "reserve": int(run.reserve_gib * GIB), "total": e.total_bytes + int(run.reserve_gib * GIB),
                     "capacity": run.gpu.memory_bytes},
           "num_microbatches": e.num_microbatches, "bubble": e.bubble,
           "comm_bytes_per_step": {"tp": e.tp_bytes, "pp": e.pp_bytes, "dp": e.dp_bytes},
           "seconds": {"compute": e.compute_s, "tp": e.tp_s, "pp": e.pp_s, "dp_exposed": e.dp_exposed_s,
                       "step": e.step_s},
           "tokens_per_step": e.tokens_per_step, "tokens_per_s_per_gpu": e.tokens_per_s_per_gpu}
    if run.train_tokens:
        out["train_seconds"] = e.train_seconds(run.train_tokens)
    return out


def as_json(model: ModelSpec, run: Run, chosen: Estimate, estimates: list[Estimate]) -> dict:
    return {"model": {"description": model.description, **model.arch.to_dict()},
            "run": {"seq_length": run.seq_length, "micro_batch_size": run.micro_batch_size,
                    "global_batch_size": run.global_batch_size, "gpu": run.gpu.name, "num_gpus": run.num_gpus,
                    "precision": run.precision, "recompute": run.recompute, "mfu": run.mfu,
                    "reserve_gib": run.reserve_gib, "train_tokens": run.train_tokens, "spec": run.spec},
            "chosen": estimate_dict(chosen, run), "layouts": [estimate_dict(e, run) for e in estimates]}
