"""`--verify`: run the same prompts through the HF model and the megatron-core model and compare logits.

A conversion bug (a transposed QKV group, gate/up swapped, a dropped RoPE scaling field) does not fail
loudly: the model loads and produces plausible-looking text. Comparing logits catches it. Both sides run in
float32; the megatron-core side is built at the current parallel layout (world size 1 from the CLIs, any
TP x PP under torchrun) and loaded with the training loop's own checkpoint loader.

Logits are compared over the ids both models have: after vocabulary expansion the original HF model only
knows the text ids, and prompts containing speech units are skipped for it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from megatron_cslm.checkpoint.manifest import ModelManifest, resolve_checkpoint

DEFAULT_PROMPTS = (
    "The capital of France is",
    "请用一句话介绍一下你自己。",
    "<sosp><12><345><678><9><eosp> What did the speaker say?",
)
DEFAULT_ATOL = 1e-3  # float32 logits; a mapping error gives differences of order 1


@dataclass(frozen=True)
class PromptDiff:
    prompt: str
    tokens: int
    max_abs: float
    mean_abs: float
    top1_agree: float  # fraction of positions where both models' argmax agree


@dataclass(frozen=True)
class VerifyResult:
    rows: list[PromptDiff]
    atol: float
    vocab: int  # number of logits compared per position
    skipped: list[str] = field(default_factory=list)  # prompts with ids the HF model does not have

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(r.max_abs <= self.atol for r in self.rows)  # NaN compares False

    def table(self) -> str:
        lines = [f"{'prompt':<42} {'tokens':>6} {'max|diff|':>10} {'mean|diff|':>10} {'top1 agree':>10}"]
        for r in self.rows:
            short = r.prompt if len(r.prompt) <= 40 else r.prompt[:37] + "..."
            lines.append(f"{short:<42} {r.tokens:>6} {r.max_abs:>10.3e} {r.mean_abs:>10.3e} {r.top1_agree:>9.1%}")
        for prompt in self.skipped:
            lines.append(f"{prompt[:40]:<42} skipped: uses ids beyond the HF model's {self.vocab} logits")
        worst = max((r.max_abs for r in self.rows), default=float("nan"))
        verdict = "OK" if self.ok else "MISMATCH"
        lines.append(f"{verdict}: max |diff| {worst:.3e} (atol {self.atol:.1e}) over {self.vocab} logits per position")
        return "\n".join(lines)


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def hf_logits(hf_dir: str | Path, prompts: Sequence[list[int]]) -> list[torch.Tensor]:
    """float32 logits [tokens, vocab] of a HF checkpoint (transformers, no custom code)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).to(_device()).eval()
    with torch.no_grad():
        out = [model(torch.tensor([ids], device=_device())).logits[0].float().cpu() for ids in prompts]
    del model
    return out


def megatron_logits(run_dir: Path, iteration: int, manifest: ModelManifest,
                    prompts: Sequence[list[int]]) -> list[torch.Tensor] | None:
    """float32 logits [tokens, padded vocab] on the last pipeline stage (None elsewhere). Collective."""
    from megatron.core import parallel_state

    from megatron_cslm.checkpoint.save_load import load_checkpoint
    from megatron_cslm.models.chunks import build_model_chunks, forward_logits
    from megatron_cslm.models.llama import PrecisionConfig, transformer_config

    config = transformer_config(manifest.arch, precision=PrecisionConfig(dtype="fp32"),
                                tensor_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
                                pipeline_parallel_size=parallel_state.get_pipeline_model_parallel_world_size())
    model = build_model_chunks(manifest.arch, config, manifest.padded_vocab_size)
    load_checkpoint(run_dir, iteration, model, None, None, restore_rng=False)
    out = []
    with torch.no_grad():
        for ids in prompts:
            batch = {"tokens": torch.tensor([ids]), "position_ids": torch.arange(len(ids)).unsqueeze(0)}
            logits = forward_logits(model, [batch], seq_length=len(ids), micro_batch_size=1)
            out.append(logits[0][0].cpu() if logits else None)
    return out if out and out[0] is not None else None


def verify(hf_dir: str | Path, megatron_dir: str | Path, prompts: Sequence[str] = DEFAULT_PROMPTS,
           atol: float = DEFAULT_ATOL) -> VerifyResult:
    """Compare logits; collective over the initialised megatron-core parallel groups, same result on every rank."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from transformers import AutoConfig, AutoTokenizer

    run_dir, iteration = resolve_checkpoint(megatron_dir)
    manifest = ModelManifest.load(run_dir)
    vocab = min(AutoConfig.from_pretrained(str(hf_dir)).vocab_size, manifest.arch.vocab_size)
    tokenizer = AutoTokenizer.from_pretrained(str(manifest.tokenizer_dir(run_dir)))
    kept, skipped = [], []
    for prompt in prompts:
        ids = tokenizer(prompt)["input_ids"]
        (kept if max(ids) < vocab else skipped).append((prompt, ids))
    if not kept:
        raise ValueError(f"every prompt uses ids beyond the {vocab} logits both models have: {list(prompts)}")
    theirs = megatron_logits(run_dir, iteration, manifest, [ids for _, ids in kept])
    rows = None
    if theirs is not None and parallel_state.get_tensor_model_parallel_rank() == 0 \
            and parallel_state.get_data_parallel_rank() == 0:
        rows = []
        for (prompt, ids), ours, mega in zip(kept, hf_logits(hf_dir, [ids for _, ids in kept]), theirs):
            diff = (ours[:, :vocab] - mega[:, :vocab]).abs()
            agree = (ours[:, :vocab].argmax(-1) == mega[:, :vocab].argmax(-1)).float().mean().item()
            rows.append(PromptDiff(prompt, len(ids), diff.max().item(), diff.mean().item(), agree))
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, rows)
    rows = next(r for r in gathered if r is not None)
    return VerifyResult(rows, atol, vocab, [p for p, _ in skipped])


def run_verify(hf_dir: str | Path, megatron_dir: str | Path, prompts: Sequence[str] = DEFAULT_PROMPTS,
               atol: float = DEFAULT_ATOL, device: str = "auto") -> VerifyResult:
    """`verify` in this process alone (TP=PP=1); needs memory for both models in float32."""
    from megatron_cslm.distributed import parallel
    from megatron_cslm.distributed.ports import free_port

    if "WORLD_SIZE" not in os.environ:
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    parallel.initialize(parallel.ParallelConfig(), device=device)
    try:
        return verify(hf_dir, megatron_dir, prompts, atol)
    finally:
        parallel.destroy()
