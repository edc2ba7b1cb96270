"""Pretraining data: blended `.bin/.idx` datasets through megatron-core, and a resumable sample stream.

`--data-path 0.4 asr 0.3 interleave 0.3 replay` blends with megatron-core's BlendedMegatronDatasetBuilder
and GPTDataset (index caches built once on rank 0, reused by every rank and by resumed runs). Each sample
knows which source it came from, so the loss is reported per source. A document may carry a companion
`<prefix>_lossmask.bin/.idx` (written by tools/preprocess_data.py for masked prompts); it is read through
the same sample index so masks stay aligned with tokens.

The stream is a pure function of (seed, consumed samples, DP rank): resuming at the saved consumed-sample
count replays exactly the samples an uninterrupted run would have seen.

Start-up cost does not grow with the data: `check_indexed_dataset` reads the `.idx` and the small
`<prefix>.meta.json` written by preprocessing/packing (`data/metadata.py`: tokenizer identity, largest id),
never the `.bin` tokens; only a dataset without metadata gets a bounded sampled read.

`data_speech_tokenizer` joins the speech tokenizers recorded in the datasets' `.meta.json` with the start
checkpoint's (`cslm_model.json`): a blend of two codebooks, or data of another codebook than the model's, stops
naming both (text-only datasets carry none and blend with anything).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from megatron_cslm.compat import sample_token_ids
from megatron_cslm.errors import CslmError

logger = logging.getLogger(__name__)
SAMPLED_CHECK_DOCUMENTS = 1000  # documents read to check a dataset that has no metadata


@dataclass(frozen=True)
class DataBlend:
    prefixes: list[str]
    weights: list[float] | None

    @property
    def names(self) -> list[str]:
        """Source names for logging: the file name of each prefix (made unique if two collide)."""
        names = [Path(p).name for p in self.prefixes]
        return names if len(set(names)) == len(names) else [f"{i}_{n}" for i, n in enumerate(names)]


def parse_data_path(items: list[str]) -> DataBlend:
    """Megatron-LM's `--data-path`: either `PREFIX...` or `W1 PREFIX1 W2 PREFIX2 ...`."""
    if not items:
        raise CslmError.usage("--data-path is empty")
    try:
        float(items[0])
        weighted = True
    except ValueError:
        weighted = False
    if not weighted:
        return DataBlend(list(items), None)
    if len(items) % 2:
        raise CslmError.usage(f"--data-path with weights needs WEIGHT PREFIX pairs; got {len(items)} items: {items}")
    weights, prefixes = [], []
    for w, p in zip(items[::2], items[1::2]):
        try:
            weights.append(float(w))
        except ValueError as e:
            raise CslmError.usage(f"--data-path: {w!r} is not a weight (expected WEIGHT PREFIX pairs)") from e
        prefixes.append(p)
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise CslmError.usage(f"--data-path weights must be non-negative and not all zero: {weights}")
    return DataBlend(prefixes, weights)


def check_indexed_dataset(prefix: str, vocab_size: int, identity: dict | None = None,
                          sample_documents: int = SAMPLED_CHECK_DOCUMENTS) -> int:
    """Fail at start-up, not at step 10,000, without reading the token payload (see `data/metadata.py`).

    Checks: `.bin/.idx` present; the `.bin` holds exactly the bytes the `.idx` describes; the tokenizer
    identity recorded at preprocessing equals `identity` (the run's tokenizer, when given); the recorded
    largest id is below `vocab_size`. A dataset without metadata (Megatron-LM's preprocess_data.py) is
    accepted with a warning after reading at most `sample_documents` documents. Returns the largest id
    (recorded, or seen in the sample)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_cslm.data.metadata import identity_mismatch, metadata_path, read_dataset_metadata

    for suffix in (".bin", ".idx"):
        if not Path(prefix + suffix).exists():
            raise CslmError(prefix + suffix, None, "--data-path", "does not exist", reason="missing")
    dataset = IndexedDataset(prefix, mmap=True)  # reads the .idx; maps (does not read) the .bin
    index = dataset.index
    expected = int(index.sequence_lengths.astype(np.int64).sum()) * np.dtype(index.dtype).itemsize
    actual = os.path.getsize(prefix + ".bin")
    if actual != expected:
        raise CslmError(f"{prefix}.bin", None, "--data-path", f"has {actual} bytes but {prefix}.idx describes "
                        f"{expected} ({len(index)} sequences of {np.dtype(index.dtype).name}); the pair is "
                        "truncated or from different runs", reason="truncated")
    meta = read_dataset_metadata(prefix)
    if meta is None:
        max_id = _sampled_max_id(dataset, sample_documents)
        logger.warning("--data-path %s: no %s (not built by this project's tools); checked token ids of at most "
                       "%d sampled documents only (largest %d)", prefix, metadata_path(prefix).name,
                       sample_documents, max_id)
        source = f"a sample of {prefix}.bin"
    else:
        if identity is not None:
            mismatch = identity_mismatch(meta["tokenizer"], identity)
            if mismatch:
                raise CslmError.compat(f"--data-path {prefix}: built with another tokenizer: {mismatch}; rebuild "
                                       "it with this run's tokenizer (tools/preprocess_data.py --tokenizer-model)")
        max_id = int(meta["max_token_id"])
        source = metadata_path(prefix).name
    if max_id >= vocab_size:
        raise CslmError.compat(f"--data-path {prefix}: token id {max_id} >= the model's vocabulary size "
                               f"{vocab_size} (from {source}); the .idx/.bin was built with another tokenizer or "
                               "--num-units")
    return max_id


def data_speech_tokenizer(data_path, valid_data_path=None, start_manifest=None, start_dir: str | None = None):
    """The one speech tokenizer of the run's data and the checkpoint it starts from (None: none recorded).

    Reads only each prefix's `.meta.json`; raises a `compat` CslmError naming both tokenizers when two datasets,
    or a dataset and the start checkpoint's manifest, differ. Datasets without a record are warned about."""
    from megatron_cslm.data.metadata import dataset_speech_tokenizer, metadata_path, read_dataset_metadata
    from megatron_cslm.speech.identity import IdentityJoin, check_same

    prefixes = (parse_data_path(list(data_path)).prefixes if data_path else []) + list(valid_data_path or [])
    join = IdentityJoin()
    for prefix in dict.fromkeys(prefixes):
        if not Path(prefix + ".idx").exists():
            continue  # check_indexed_dataset names the missing file
        ident = dataset_speech_tokenizer(prefix, read_dataset_metadata(prefix))
        if ident is not None:
            join.add(ident, f"--data-path {prefix}", metadata_path(prefix))
    start = getattr(start_manifest, "speech_tokenizer", None)
    check_same(join.identity, join.where, start, f"the start checkpoint {start_dir or ''}".rstrip())
    return join.identity or start


def _sampled_max_id(dataset, documents: int) -> int:
    """Largest id in at most `documents` sequences spread evenly over the dataset (bounded reading)."""
    n = len(dataset)
    if n == 0:
        return -1
    picks = np.unique(np.linspace(0, n - 1, num=min(n, documents)).astype(np.int64))
    return max(int(dataset[int(i)].max()) if dataset[int(i)].size else -1 for i in picks)


class _TokenizerInfo:
    """What megatron-core's GPTDataset reads from a tokenizer: eod, pad and vocab_size (and an identity that
    goes into the index-cache hash, so caches built for another vocabulary are never reused)."""

    def __init__(self, vocab_size: int, eod: int, pad: int):
        self.vocab_size, self.eod, self.pad = vocab_size, eod, pad
        self.unique_identifiers = {"class": "SpeechTextTokenizer", "vocab_size": vocab_size, "eod": eod}


def _loss_masked_gpt_dataset():
    from megatron.core.datasets.gpt_dataset import GPTDataset
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    class LossMaskedGPTDataset(GPTDataset):
        """GPTDataset that also applies a companion per-token loss mask (`<prefix>_lossmask`) when present."""

        def __init__(self, indexed_dataset, dataset_path, *args, **kwargs):
            super().__init__(indexed_dataset, dataset_path, *args, **kwargs)
            mask_prefix = f"{dataset_path}_lossmask"
            self.mask_dataset = IndexedDataset(mask_prefix, mmap=True) if os.path.exists(mask_prefix + ".idx") \
                else None

        def __getitem__(self, idx):
            sample = super().__getitem__(idx)
            if self.mask_dataset is not None and idx is not None:
                tokens_dataset, self.dataset = self.dataset, self.mask_dataset
                try:
                    mask = sample_token_ids(self, idx)  # private megatron-core API, wrapped in compat.py
                finally:
                    self.dataset = tokens_dataset
                sample["loss_mask"] = sample["loss_mask"] * torch.from_numpy((mask[1:] == 1).astype(np.float32))
            return sample

    return LossMaskedGPTDataset


def build_pretrain_datasets(blend: DataBlend, *, split: str, seq_length: int, seed: int, num_samples: list[int],
                            vocab_size: int, eod_id: int, cache_dir: str | None) -> list:
    """(train, valid, test) datasets; None for a split of zero weight. Built on TP rank 0 only."""
    from megatron.core import parallel_state
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=(blend.prefixes, blend.weights), split=split,
        path_to_cache=cache_dir, tokenizer=_TokenizerInfo(vocab_size, eod_id, eod_id),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        create_attention_mask=False, mmap_bin_files=True)
    return BlendedMegatronDatasetBuilder(
        _loss_masked_gpt_dataset(), num_samples, lambda: parallel_state.get_tensor_model_parallel_rank() == 0,
        config).build()


def collate(samples: list[dict]) -> dict:
    """GPTDataset samples -> the batch dict of `training.batch.get_batch` (per-token source id for loss groups)."""
    tokens = torch.stack([torch.as_tensor(s["tokens"]) for s in samples])
    groups = torch.tensor([int(s.get("dataset_id", 0)) for s in samples]).unsqueeze(1).expand_as(tokens)
    return {"tokens": tokens, "labels": torch.stack([torch.as_tensor(s["labels"]) for s in samples]),
            "loss_mask": torch.stack([torch.as_tensor(s["loss_mask"]) for s in samples]).float(),
            "position_ids": torch.stack([torch.as_tensor(s["position_ids"]) for s in samples]),
            "loss_groups": groups.contiguous()}


def micro_batch_stream(dataset, *, consumed_samples: int, global_batch_size: int, micro_batch_size: int,
                       dp_rank: int, dp_size: int, collate_fn=collate) -> Iterator[dict]:
    """Micro-batches for one DP rank, from `consumed_samples` on; global batch k holds samples
    [k*G, (k+1)*G) split contiguously across DP ranks (Megatron-LM's pretraining sampler). Datasets are
    sized for the whole run (or repeat by epochs themselves), so running past the end is an error."""
    per_rank = global_batch_size // dp_size
    start = consumed_samples
    while True:
        base = start + dp_rank * per_rank
        for m in range(0, per_rank, micro_batch_size):
            yield collate_fn([dataset[base + m + i] for i in range(micro_batch_size)])
        start += global_batch_size
