"""Offline packing: best-fit decreasing, the packed IndexedDataset, PackedSFTDataset, masks and cu_seqlens.

End-to-end tests tokenize real records with the Llama-3 tokenizer and read the packed files back.
"""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from megatron_cslm.data.packing import (
    MODALITIES,
    PackedSFTDataset,
    _FirstFit,
    best_fit_decreasing,
    block_causal_mask,
    modality_prefix,
    packed_seq_params,
    packing_bound,
    plan_packing,
    whole_sample_seq_length,
)
from megatron_cslm.data.sft import SFTConfig, SFTEncoder, build_sft_data, parse_record

WORDS = "the a city river tower museum bridge park night light old new famous long walk".split()


def _records(n: int, seed: int = 0) -> list[dict]:
    """Speech-aware records of varied length (questions 5-120 units, answers 3-60 words, 0-500 units)."""
    rng = random.Random(seed)
    out = []
    for k in range(n):
        words = rng.randrange(3, 60)
        answer = " ".join(rng.choice(WORDS) for _ in range(words)) + "."
        out.append({"id": str(k), "lang": "en", "turns": [
            {"role": "user", "text": f"Question {k}?",
             "units": [rng.randrange(4096) for _ in range(rng.randrange(5, 120))]},
            {"role": "assistant", "text": answer,
             "units": [rng.randrange(4096) for _ in range(rng.randrange(1, 500))]}]})
    return out


def _build(tmp_path, tok, records, seq_length=1024, seed=0, name="p", overlong="truncate"):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    stats = build_sft_data([path], tok, SFTConfig(), tmp_path / name, seq_length, overlong, seed, progress=False)
    return str(tmp_path / name), stats


# ------------------------------------------------------------------------------------------- bin packing


@pytest.mark.timeout(30)
def test_first_fit_structure_finds_the_tightest_bin():
    free = _FirstFit(10)
    for cap, b in [(5, 0), (3, 1), (8, 2), (3, 3)]:
        free.push(cap, b)
    assert free.pop_best(3) == (3, 3)  # exact fit, most recent bin of that capacity
    assert free.pop_best(4) == (5, 0)
    assert free.pop_best(9) is None
    assert free.pop_best(1) == (3, 1)
    assert free.pop_best(6) == (8, 2)
    assert free.pop_best(1) is None


@pytest.mark.timeout(30)
def test_best_fit_decreasing_is_valid_deterministic_and_tight():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 1000, 3000)
    bins = best_fit_decreasing(sizes, 1000, seed=3)
    assert sorted(i for b in bins for i in b) == list(range(len(sizes)))  # every item exactly once
    assert max(sizes[b].sum() for b in bins) <= 1000
    assert bins == best_fit_decreasing(sizes, 1000, seed=3)
    assert best_fit_decreasing(sizes, 1000, seed=4) != bins  # the seed changes ties and bin order
    # BFD on uniform sizes is within a few percent of the volume bound
    assert len(bins) <= 1.03 * np.ceil(sizes.sum() / 1000) + 1
    # items sorted decreasing: each bin's items are placed largest first
    assert all(list(sizes[b]) == sorted(sizes[b], reverse=True) for b in bins)
    with pytest.raises(ValueError, match="sizes must be in"):
        best_fit_decreasing([5, 1001], 1000)


@pytest.mark.timeout(30)
def test_packing_bound_is_reached_and_never_beaten():
    assert packing_bound([6, 6, 6], 10) == pytest.approx(18 / 30)  # over half a bin: one bin each
    assert packing_bound([9, 2, 2], 10) == pytest.approx(13 / 20)  # 9 shares with nothing; 2+2 share a bin
    assert packing_bound([5, 5, 4, 6], 10) == 1.0
    for sizes, cap in (([6, 6, 6], 10), ([9, 2, 2], 10), ([5, 5, 4, 6], 10)):
        bins = best_fit_decreasing(sizes, cap)
        assert sum(sizes) / (len(bins) * cap) == pytest.approx(packing_bound(sizes, cap))
    rng = np.random.default_rng(1)
    for _ in range(20):  # BFD never exceeds the bound
        sizes = rng.integers(1, 1000, 200)
        assert sizes.sum() / (len(best_fit_decreasing(sizes, 1000)) * 1000) <= packing_bound(sizes, 1000) + 1e-12
    assert [whole_sample_seq_length(n) for n in (1, 1024, 1025, 6129, 9726)] == [1024, 1024, 2048, 8192, 16384]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_plan_accounts_for_every_sample(overlong):
    lengths = [5, 20, 14, 12, 3, 30, 2]
    first_loss = [2, 3, 12, 4, -1, 5, 1]  # sample 2 trains only past its truncation, 4 trains nothing
    plan = plan_packing(lengths, first_loss, seq_length=10, overlong=overlong, seed=0)
    packed = sorted(i for b in plan.bins for i in b)
    dropped = sorted(i for v in plan.dropped.values() for i in v)
    assert sorted(packed + dropped) == list(range(len(lengths)))  # written + dropped == read
    assert max(sum(int(plan.keep[i]) - 1 for i in b) for b in plan.bins) <= 10
    if overlong == "truncate":
        assert plan.dropped == {"no_loss_tokens": [2, 4]}
        assert plan.truncated == [1, 3, 5] and [int(plan.keep[i]) for i in (1, 3, 5)] == [11, 11, 11]
    else:
        assert plan.dropped == {"overlong": [1, 2, 3, 5], "no_loss_tokens": [4]}
        assert plan.truncated == []


# ------------------------------------------------------------------------------------------- packed files


@pytest.mark.timeout(90)
def test_packed_dataset_returns_shifted_samples_with_restarting_positions(speech_tokenizer, tmp_path):
    tok, recs = speech_tokenizer, _records(40)
    prefix, stats = _build(tmp_path, tok, recs, seq_length=1024)
    enc = SFTEncoder(tok, SFTConfig())
    originals = {}
    for r in recs:
        s = enc.encode(parse_record(r, tok.num_units))
        originals[tuple(s.tokens[:1025].tolist())] = s.modality[:1025]
    ds = PackedSFTDataset(prefix, 1024)
    assert len(ds) == stats["bins"] and stats["samples"] + sum(stats["dropped"].values()) == 40
    assert ds.packed_seq_length == PackedSFTDataset(prefix, 2048).packed_seq_length == 1024  # sft warns on 2048
    seen, trained = 0, {k: 0 for k in ("tq", "ta", "sa")}
    for i in range(len(ds)):
        item = ds[i]
        cu = item["cu_seqlens"].tolist()
        n = item["num_samples"]
        assert item["tokens"].shape == item["labels"].shape == item["position_ids"].shape == (1024,)
        assert item["tokens"].dtype == item["labels"].dtype == item["modality"].dtype == torch.int64
        assert item["loss_mask"].dtype == torch.float32 and item["cu_seqlens"].dtype == torch.int32
        assert cu[0] == 0 and cu[-1] == 1024 and len(cu) == ds.max_samples + 1
        for k in range(n):  # every real sample: inputs x[:-1], labels x[1:], positions 0.., its own modality
            a, b = cu[k], cu[k + 1]
            x = item["tokens"][a:b].tolist() + [int(item["labels"][b - 1])]
            assert item["labels"][a:b - 1].tolist() == x[1:-1]
            assert item["position_ids"][a:b].tolist() == list(range(b - a))
            mod = originals[tuple(x)]  # KeyError if the sample was altered
            assert item["modality"][a:b].tolist() == mod[1:].tolist()
            assert item["loss_mask"][a:b].tolist() == (mod[1:] > 0).astype(np.float32).tolist()
            seen += 1
        used = cu[n]
        assert item["loss_mask"][used:].sum() == 0 and item["modality"][used:].sum() == 0  # pad tail
        assert item["position_ids"][used:].tolist() == list(range(1024 - used))
        for name in trained:
            trained[name] += int((item["modality"] == MODALITIES[name]).sum())
    assert seen == stats["samples"] and trained == stats["loss_tokens"]
    assert stats["tokens"] + stats["pad_tokens"] == stats["bins"] * 1024


@pytest.mark.timeout(90)
def test_packing_is_deterministic_and_microbatches_collate(speech_tokenizer, tmp_path):
    tok, recs = speech_tokenizer, _records(30, seed=1)
    a, _ = _build(tmp_path, tok, recs, seed=7, name="a")
    b, _ = _build(tmp_path, tok, recs, seed=7, name="b")
    c, _ = _build(tmp_path, tok, recs, seed=8, name="c")
    for ext in (".bin", ".idx"):
        for pre in (lambda p: p, modality_prefix):
            assert open(pre(a) + ext, "rb").read() == open(pre(b) + ext, "rb").read()
    assert open(a + ".bin", "rb").read() != open(c + ".bin", "rb").read()
    ds = PackedSFTDataset(a, 1024)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert batch["tokens"].shape == (3, 1024) and batch["cu_seqlens"].shape == (3, ds.max_samples + 1)
    assert batch["num_samples"].shape == (3,)
    mask = block_causal_mask(batch["cu_seqlens"], 1024)
    assert mask.shape == (3, 1, 1024, 1024)
    for k in range(3):
        assert torch.equal(mask[k], block_causal_mask(batch["cu_seqlens"][k], 1024))


@pytest.mark.timeout(90)
def test_overlong_samples_truncated_or_dropped_and_counted(speech_tokenizer, tmp_path):
    tok, recs = speech_tokenizer, _records(12, seed=2)
    _, full = _build(tmp_path, tok, recs, seq_length=4096, name="full")
    assert full["truncated"] == 0 and full["dropped"] == {}
    _, trunc = _build(tmp_path, tok, recs, seq_length=256, name="trunc")
    prefix, drop = _build(tmp_path, tok, recs, seq_length=256, name="drop", overlong="drop")
    assert trunc["truncated"] > 0 and trunc["samples"] == 12
    assert drop["dropped"]["overlong"] == trunc["truncated"] and drop["samples"] == 12 - trunc["truncated"]
    assert drop["records"]["read"] == drop["records"]["written"] + drop["records"]["skipped_total"] == 12
    with pytest.raises(ValueError, match="packed for a longer sequence"):
        PackedSFTDataset(tmp_path / "trunc", 128)
    ds = PackedSFTDataset(prefix, 512)  # a longer seq_length only pads more
    assert ds[0]["cu_seqlens"][-1] == 512


# ------------------------------------------------------------------------------------------- masks


@pytest.mark.timeout(30)
def test_block_causal_mask_is_causal_within_and_blocked_across_samples():
    cu = torch.tensor([0, 3, 5, 8, 8, 8], dtype=torch.int32)  # samples 0-2, 3-4, 5-7; padded with the last value
    mask = block_causal_mask(cu, 8)
    assert mask.shape == (1, 8, 8) and mask.dtype == torch.bool
    seg = [0, 0, 0, 1, 1, 2, 2, 2]
    expected = torch.tensor([[not (seg[i] == seg[j] and j <= i) for j in range(8)] for i in range(8)])
    assert torch.equal(mask[0], expected)
    # a query sees exactly its own sample's prefix
    assert (~mask[0]).sum(1).tolist() == [1, 2, 3, 1, 2, 1, 2, 3]


@pytest.mark.timeout(30)
def test_packed_seq_params_flattens_batches_to_thd():
    cu = torch.tensor([[0, 3, 5, 8, 8], [0, 6, 8, 8, 8]], dtype=torch.int32)
    p = packed_seq_params(cu)
    assert p.qkv_format == "thd"
    assert p.cu_seqlens_q.tolist() == [0, 3, 5, 8, 14, 16] and p.cu_seqlens_q.dtype == torch.int32
    assert p.cu_seqlens_kv is p.cu_seqlens_q and p.max_seqlen_q == p.max_seqlen_kv == 6
    single = packed_seq_params(cu[0])
    assert single.cu_seqlens_q.tolist() == [0, 3, 5, 8] and single.max_seqlen_q == 3


_FORWARD_WORKER = '''
import json, sys, dataclasses, torch
from megatron_cslm.models import llama as M
from megatron_cslm.distributed import parallel
from megatron_cslm.data.packing import PackedSFTDataset, block_causal_mask
parallel.initialize(parallel.ParallelConfig(), device="cpu")
arch = dataclasses.replace(M.ARCHS["tiny"], vocab_size=int(sys.argv[3]))
cfg = M.transformer_config(arch, spec="local", precision=M.PrecisionConfig(dtype="fp32"))
gpt = M.build_gpt_model(arch, cfg, padded_vocab=M.padded_vocab_size(arch.vocab_size, 1), spec="local").eval()
ds = PackedSFTDataset(sys.argv[1], int(sys.argv[2]))
batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
out = {"same": 0.0, "crossed": 0.0, "samples": 0}
with torch.no_grad():
    s = batch["tokens"].shape[1]
    v = arch.vocab_size  # padding rows are -inf logits by design; compare the real vocabulary
    packed = gpt(batch["tokens"], batch["position_ids"], block_causal_mask(batch["cu_seqlens"], s))[..., :v]
    causal = gpt(batch["tokens"], batch["position_ids"], None)[..., :v]  # plain causal: attends across samples
    for k in range(2):
        cu = batch["cu_seqlens"][k].tolist()
        for a, b in zip(cu[:int(batch["num_samples"][k])], cu[1:]):
            alone = gpt(batch["tokens"][k:k + 1, a:b], batch["position_ids"][k:k + 1, a:b], None)[..., :v]
            out["same"] = max(out["same"], (packed[k:k + 1, a:b] - alone).abs().max().item())
            if a > 0:
                out["crossed"] = max(out["crossed"], (causal[k:k + 1, a:b] - alone).abs().max().item())
            out["samples"] += 1
print("RESULT" + json.dumps(out))
'''


@pytest.mark.timeout(120)
def test_packed_forward_equals_per_sample_forwards(speech_tokenizer, tmp_path):
    """A real megatron-core GPTModel (local spec, CPU, fp32) on packed bins with `block_causal_mask` gives the
    logits of each sample run alone; a plain causal mask does not. Run in a subprocess: CPU mode and
    torch.distributed are process-global."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    prefix, stats = _build(tmp_path, speech_tokenizer, _records(16, seed=3), seq_length=512)
    assert stats["max_samples_per_bin"] > 1
    script = tmp_path / "forward.py"
    script.write_text(_FORWARD_WORKER)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(script), prefix, "512", str(speech_tokenizer.vocab_size)],
                          capture_output=True, text=True, timeout=110, env=env, cwd=root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.split("RESULT")[-1])
    assert result["samples"] >= 3
    assert result["same"] < 1e-4
    assert result["crossed"] > 1e-2
