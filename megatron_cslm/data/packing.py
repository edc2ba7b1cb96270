"""Offline sequence packing for SFT: best-fit-decreasing bins, a packed IndexedDataset, and its reader.

Packing is done once, offline, so a multi-node job mmaps ready bins instead of tokenizing and padding on
every rank. Storage is megatron-core's IndexedDataset: one *sequence* per sample, one *document* per bin
(`document_indices` are bin boundaries, `sequence_lengths` sample lengths), plus a parallel uint8 dataset
`<prefix>_modality` holding every token's modality (0 none, 1 TQ, 2 TA, 3 SA; nonzero = trained).

A sample of n+1 tokens x_0..x_n fills n positions of a bin: inputs x_0..x_{n-1}, labels x_1..x_n (the
shift happens inside each sample, so no label crosses a sample boundary). Positions restart at 0 for every
sample, and attention must not cross samples: `packed_seq_params` (Transformer Engine THD), per-bin
`cu_seqlens` (the local spec's per-sample SDPA, models/attention.py) and `block_causal_mask` (the dense
reference the tests compare against) all derive that from `cu_seqlens`. The pad tail of a bin (token 0,
loss_mask 0) is its own trailing "sample" in `cu_seqlens`, so it never attends into, or is attended by, real samples and
`cu_seqlens[-1] == seq_length` always holds, as THD kernels require.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from tqdm import tqdm

from megatron_cslm.errors import CslmError
from megatron_cslm.fileio import atomic_path

if TYPE_CHECKING:  # megatron-core is imported where it is used: its package import costs seconds (torch.compile
    # set-up), and the prompt format (data/sft.py -> here) is also what `cslm decode` needs to fail fast
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron.core.packed_seq_params import PackedSeqParams

MODALITIES = {"none": 0, "tq": 1, "ta": 2, "sa": 3}  # values stored per token in `<prefix>_modality`
OVERLONG = ("truncate", "drop")


def modality_prefix(prefix: str) -> str:
    """Prefix of the uint8 modality dataset stored beside the token dataset `prefix`."""
    return f"{prefix}_modality"


def token_dtype(vocab_size: int) -> type[np.number]:
    """Smallest IndexedDataset dtype for token ids (int32 for Llama-3 + units: 132,356 ids)."""
    from megatron.core.datasets.indexed_dataset import DType

    return DType.optimal_dtype(vocab_size)


class _FirstFit:
    """Open bins keyed by remaining capacity; finds the tightest bin with room in O(log capacity).

    A segment tree over capacities 0..capacity counts open bins per remaining capacity, so best fit is
    "the smallest capacity >= size that has a bin": a climb and a descent, not a scan over all bins.
    """

    def __init__(self, capacity: int):
        self.n = 1 << max(1, capacity).bit_length()
        self.tree = [0] * (2 * self.n)
        self.bins: dict[int, list[int]] = {}  # remaining capacity -> open bin ids (a stack)

    def _add(self, cap: int, delta: int) -> None:
        i = cap + self.n
        while i:
            self.tree[i] += delta
            i //= 2

    def push(self, cap: int, bin_id: int) -> None:
        self.bins.setdefault(cap, []).append(bin_id)
        self._add(cap, 1)

    def pop_best(self, size: int) -> tuple[int, int] | None:
        """Remove and return (capacity, bin id) of the tightest open bin with capacity >= size."""
        tree, i = self.tree, size + self.n
        if tree[i] == 0:
            while i > 1 and not (i % 2 == 0 and tree[i + 1] > 0):
                i //= 2
            if i == 1:
                return None
            i += 1
            while i < self.n:
                i = 2 * i if tree[2 * i] > 0 else 2 * i + 1
        cap = i - self.n
        self._add(cap, -1)
        return cap, self.bins[cap].pop()


def best_fit_decreasing(sizes: Sequence[int], capacity: int, seed: int = 0) -> list[list[int]]:
    """Pack items (sizes <= capacity) into bins of `capacity`: largest first, each into the fullest bin it fits.

    Deterministic for a seed: ties between equal sizes are broken by a seeded permutation, and the bins are
    returned in a seeded random order so training does not see them sorted by length.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    if sizes.size and (sizes.min() < 1 or sizes.max() > capacity):
        raise ValueError(f"item sizes must be in [1, {capacity}], got [{sizes.min()}, {sizes.max()}]")
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.permutation(len(sizes)), -sizes))
    bins: list[list[int]] = []
    free = _FirstFit(capacity)
    for i in order.tolist():
        size = int(sizes[i])
        best = free.pop_best(size)
        if best is None:
            cap, b = capacity, len(bins)
            bins.append([])
        else:
            cap, b = best
        bins[b].append(i)
        free.push(cap - size, b)
    return [bins[b] for b in rng.permutation(len(bins)).tolist()]


def packing_bound(positions: Sequence[int], seq_length: int) -> float:
    """Upper bound on the fill of any whole-sample packing of `positions` (each <= seq_length) into bins.

    Every sample over half a bin needs a bin of its own, and one too long to share with even the shortest
    sample leaves the rest of its bin empty, so no packer, however clever, can fill more than this.
    """
    positions = np.asarray(positions, dtype=np.int64)
    if not positions.size:
        return 0.0
    total = positions.sum()
    alone = positions > seq_length - positions.min()
    bins = max((positions > seq_length // 2).sum(), alone.sum() + np.ceil(positions[~alone].sum() / seq_length),
               np.ceil(total / seq_length))
    return float(total / (bins * seq_length))


def whole_sample_seq_length(longest: int) -> int:
    """The power-of-two bin size that holds a sample of `longest` positions whole (at least 1024).

    Bins are usually sized as powers of two; one that holds the longest sample truncates nothing, and with
    THD attention (TE) a long bin costs no more per token than short ones, since samples never attend across.
    """
    return max(1024, 1 << max(0, int(longest) - 1).bit_length())


@dataclass
class PackPlan:
    """Which samples go in which bin, and what happened to the others."""

    bins: list[list[int]]
    seq_length: int
    keep: np.ndarray  # tokens kept per sample (== its length unless truncated; 0 if dropped)
    truncated: list[int] = field(default_factory=list)
    dropped: dict[str, list[int]] = field(default_factory=dict)


def plan_packing(lengths: Sequence[int], first_loss: Sequence[int], seq_length: int, overlong: str = "truncate",
                 seed: int = 0) -> PackPlan:
    """Decide truncation/drops and pack. `first_loss[i]`: index of sample i's first trained token (-1: none).

    A sample of n+1 tokens needs n positions; longer than seq_length + 1 tokens it is truncated to that or
    dropped (`overlong`). Samples left without a trained label (too short, or truncated before any trained
    token) are dropped, counted by reason.
    """
    if overlong not in OVERLONG:
        raise ValueError(f"overlong must be one of {OVERLONG}, got {overlong!r}")
    lengths = np.asarray(lengths, dtype=np.int64)
    first_loss = np.asarray(first_loss, dtype=np.int64)
    keep = np.minimum(lengths, seq_length + 1)
    reasons = {
        "overlong": (lengths > seq_length + 1) if overlong == "drop" else np.zeros(len(lengths), bool),
        "no_loss_tokens": (first_loss < 1) | (first_loss >= keep),
    }
    dropped, gone = {}, np.zeros(len(lengths), bool)
    for reason, mask in reasons.items():
        mask &= ~gone
        if mask.any():
            dropped[reason] = np.flatnonzero(mask).tolist()
        gone |= mask
    keep[gone] = 0
    idx = np.flatnonzero(~gone)
    bins = [[int(idx[j]) for j in b] for b in best_fit_decreasing(keep[idx] - 1, seq_length, seed)]
    truncated = np.flatnonzero(~gone & (lengths > keep)).tolist()
    return PackPlan(bins, seq_length, keep, truncated, dropped)


def _read_unpacked(src_prefix: str) -> tuple[IndexedDataset, IndexedDataset]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tokens, modality = IndexedDataset(src_prefix), IndexedDataset(modality_prefix(src_prefix))
    if not np.array_equal(tokens.sequence_lengths, modality.sequence_lengths):
        raise CslmError(src_prefix, None, None, "token and modality datasets differ in sample lengths",
                        reason="corrupt")
    return tokens, modality


def pack_dataset(src_prefix: str, out_prefix: str, seq_length: int, overlong: str = "truncate", seed: int = 0,
                 progress: bool = True) -> dict:
    """Pack an unpacked dataset (one sample per sequence, with `<src>_modality`) into `<out_prefix>` bins.

    Outputs are written atomically. Returns packing stats: samples written/truncated/dropped, bins, fill.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    tokens, modality = _read_unpacked(src_prefix)
    first_loss = np.full(len(modality), -1, dtype=np.int64)
    for i in tqdm(range(len(modality)), desc="scanning", unit=" samples", disable=not progress):
        trained = np.flatnonzero(modality[i])
        if trained.size:
            first_loss[i] = trained[0]
    plan = plan_packing(tokens.sequence_lengths, first_loss, seq_length, overlong, seed)
    trained = np.zeros(len(MODALITIES), np.int64)
    out_mod = modality_prefix(out_prefix)
    with atomic_path(out_prefix + ".bin") as tb, atomic_path(out_prefix + ".idx") as ti, \
            atomic_path(out_mod + ".bin") as mb, atomic_path(out_mod + ".idx") as mi:
        tok_out = IndexedDatasetBuilder(str(tb), dtype=tokens.index.dtype)
        mod_out = IndexedDatasetBuilder(str(mb), dtype=np.uint8)
        for b in tqdm(plan.bins, desc="packing", unit=" bins", disable=not progress):
            for i in b:
                n = int(plan.keep[i])
                tok_out.add_item(torch.from_numpy(tokens.get(i, 0, n).astype(np.int64)))
                m = np.array(modality.get(i, 0, n))  # a writable copy of the read-only mmap
                trained += np.bincount(m[1:], minlength=len(MODALITIES))
                mod_out.add_item(torch.from_numpy(m))
            tok_out.end_document()
            mod_out.end_document()
        tok_out.finalize(str(ti))
        mod_out.finalize(str(mi))
    per_bin = [len(b) for b in plan.bins]
    kept = plan.keep[plan.keep > 0] - 1  # positions of every packed sample (dropped ones keep 0 tokens)
    positions = int(kept.sum())
    capacity = len(plan.bins) * seq_length
    longest = int(tokens.sequence_lengths.max(initial=1)) - 1
    return {
        "seq_length": seq_length, "overlong": overlong, "seed": seed,
        "samples_in": len(tokens), "samples": sum(per_bin), "truncated": len(plan.truncated),
        "longer_than_seq_length": int((tokens.sequence_lengths > seq_length + 1).sum()),
        "longest_sample": longest, "whole_sample_seq_length": whole_sample_seq_length(longest),
        "dropped": {k: len(v) for k, v in plan.dropped.items()},
        "bins": len(plan.bins), "max_samples_per_bin": max(per_bin, default=0),
        "tokens": positions, "pad_tokens": capacity - positions,
        "fill_ratio": positions / capacity if capacity else 0.0,
        "fill_bound": packing_bound(kept, seq_length),
        "loss_tokens": {name: int(trained[v]) for name, v in MODALITIES.items() if v},
    }


class PackedSFTDataset(torch.utils.data.Dataset):
    """Reads packed bins (mmap, no tokenizing at train time) as fixed-size training samples.

    Each item: tokens/labels/position_ids/modality int64 [s], loss_mask float32 [s], cu_seqlens int32
    [max_samples + 1] padded with its last value (= s) so default collate stacks bins, num_samples (real
    samples in the bin). `max_samples` defaults to the largest bin's samples + 1 (its pad tail); pass the
    same value to datasets that are batched together.
    """

    def __init__(self, prefix: str, seq_length: int, max_samples: int | None = None):
        self.prefix, self.seq_length = str(prefix), seq_length
        self.tokens, self.modality = _read_unpacked(self.prefix)
        self.doc = np.asarray(self.tokens.document_indices, dtype=np.int64)
        if not np.array_equal(self.doc, self.modality.document_indices):
            raise CslmError(prefix, None, None, "token and modality datasets differ in bin boundaries",
                            reason="corrupt")
        lengths = self.tokens.sequence_lengths.astype(np.int64)
        if len(lengths):
            fill = np.add.reduceat(lengths - 1, self.doc[:-1]) if len(self.doc) > 1 else np.zeros(0)
            if fill.size and fill.max() > seq_length:
                raise CslmError.compat(f"a bin holds {int(fill.max())} positions > --seq-length {seq_length}; it "
                                       "was packed for a longer sequence (repack, or train at its length)", prefix,
                                       "--seq-length")
        stats = Path(f"{prefix}.stats.json")  # written by build_sft_data; absent for bare pack_dataset output
        self.packed_seq_length = json.loads(stats.read_text())["seq_length"] if stats.exists() else None
        most = int(np.diff(self.doc).max()) + 1 if len(self.doc) > 1 else 1
        self.max_samples = most if max_samples is None else max_samples
        if self.max_samples < most:
            raise ValueError(f"{prefix}: max_samples={max_samples} but a bin needs {most} (samples + pad tail)")

    def __len__(self) -> int:
        return len(self.doc) - 1

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | int]:
        a, b = int(self.doc[i]), int(self.doc[i + 1])
        lengths = self.tokens.sequence_lengths[a:b].astype(np.int64)
        flat = np.concatenate(self.tokens[a:b]).astype(np.int64) if b > a else np.zeros(0, np.int64)
        mods = np.concatenate(self.modality[a:b]).astype(np.int64) if b > a else np.zeros(0, np.int64)
        ends = np.cumsum(lengths)
        is_last = np.zeros(len(flat), bool)
        is_last[ends - 1] = True
        is_first = np.zeros(len(flat), bool)
        is_first[ends - lengths] = True
        used = int(ends[-1] - len(lengths)) if b > a else 0
        s, pad = self.seq_length, self.seq_length - used
        cu = np.concatenate([[0], np.cumsum(lengths - 1)] + ([[s]] if pad else []))
        positions = np.concatenate([np.arange(n - 1) for n in lengths] + [np.arange(pad)])
        modality = np.concatenate([mods[~is_first], np.zeros(pad, np.int64)])
        return {
            "tokens": torch.from_numpy(np.concatenate([flat[~is_last], np.zeros(pad, np.int64)])),
            "labels": torch.from_numpy(np.concatenate([flat[~is_first], np.zeros(pad, np.int64)])),
            "loss_mask": torch.from_numpy((modality > 0).astype(np.float32)),
            "modality": torch.from_numpy(modality),
            "position_ids": torch.from_numpy(positions.astype(np.int64)),
            "cu_seqlens": torch.from_numpy(np.pad(cu, (0, self.max_samples + 1 - len(cu)), mode="edge")
                                           .astype(np.int32)),
            "num_samples": b - a,
        }


def _segment_ids(cu_seqlens: torch.Tensor, seq_length: int) -> torch.Tensor:
    """Sample index of every position (repeated trailing cu_seqlens values are empty samples)."""
    pos = torch.arange(seq_length, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    bounds = cu_seqlens[..., 1:].contiguous()
    return torch.searchsorted(bounds, pos.expand(*bounds.shape[:-1], seq_length).contiguous(), right=True)


def block_causal_mask(cu_seqlens: torch.Tensor, seq_length: int) -> torch.Tensor:
    """Attention mask for packed bins, True = masked out (megatron-core local spec convention).

    cu_seqlens [n+1] gives [1, s, s]; a batch [b, n+1] gives [b, 1, s, s]. Query i sees key j iff both are
    in the same sample and j <= i.
    """
    seg = _segment_ids(cu_seqlens, seq_length)
    pos = torch.arange(seq_length, device=cu_seqlens.device)
    future = pos[None, :] > pos[:, None]
    mask = (seg[..., :, None] != seg[..., None, :]) | future
    return mask.unsqueeze(-3)


def packed_seq_params(cu_seqlens: torch.Tensor, seq_length: int | None = None) -> PackedSeqParams:
    """THD PackedSeqParams for Transformer Engine attention.

    A batch [b, n+1] is flattened: the model must see its tokens as one sequence of b * s (bin k's samples
    offset by k * s). Repeated trailing values (the fixed-size padding of cu_seqlens) are dropped. No CP
    padding: with context parallelism every sample would need padding to a multiple of 2 * CP.
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = cu_seqlens if cu_seqlens.dim() == 2 else cu_seqlens[None]
    s = int(cu[0, -1]) if seq_length is None else seq_length
    offsets = torch.arange(cu.shape[0], device=cu.device, dtype=torch.int64)[:, None] * s
    flat = torch.cat([torch.zeros(1, dtype=torch.int64, device=cu.device), (cu[:, 1:].long() + offsets).flatten()])
    flat = torch.unique_consecutive(flat).to(torch.int32)
    max_len = int((flat[1:] - flat[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=flat, cu_seqlens_kv=flat, cu_seqlens_q_padded=flat,
                           cu_seqlens_kv_padded=flat, max_seqlen_q=max_len, max_seqlen_kv=max_len)
