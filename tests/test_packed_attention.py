"""Per-sample packed attention (local spec, `SampleSDPAttention`) equals the dense block-diagonal mask path
(megatron-core's `DotProductAttention`, spec `local_mask`) in logits and gradients, fp32, at TP=1 and TP=2;
and `bench/train.py` runs end to end on a tiny budget."""
from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
import torch

from megatron_cslm.models.attention import bin_packed_seq_params
from tests.helpers.launch import ROOT, torchrun, worker_env

WORKER = ROOT / "tests" / "workers" / "packed_attention.py"


def _result(stdout: str) -> dict:
    return json.loads(stdout.split("RESULT")[-1].splitlines()[0])


def _check(result: dict) -> None:
    assert result["params"] > 20  # every weight's gradient was compared
    assert result["logits"] < 1e-5, result
    assert result["grads"] < 1e-5, result
    assert result["crossed"] > 1e-2, result  # attending across samples would show
    assert result["thd"] < 1e-4, result  # TE's flattened layout through the same module


def test_bin_packed_seq_params_reads_boundaries_once():
    cu = torch.tensor([[0, 3, 5, 8, 8], [0, 6, 8, 8, 8]], dtype=torch.int32)
    p = bin_packed_seq_params(cu)
    assert p.qkv_format == "sbhd" and p.max_seqlen_q == p.max_seqlen_kv == 8
    assert p.bounds == ((0, 3, 5, 8), (0, 6, 8))
    with pytest.raises(ValueError, match="bin length"):
        bin_packed_seq_params(torch.tensor([[0, 3, 7]]), 8)


@pytest.mark.timeout(120)
def test_per_sample_attention_equals_mask_path_tp1():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.run([sys.executable, str(WORKER), "1"], capture_output=True, text=True, timeout=110,
                          env=worker_env({"MASTER_PORT": str(port)}), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    _check(_result(proc.stdout))


@pytest.mark.timeout(180)
def test_per_sample_attention_equals_mask_path_tp2():
    _check(_result(torchrun(WORKER, 2, "2", timeout=170).stdout))


@pytest.mark.timeout(300)  # ~45 s on a quiet 2-core machine; the margin is for a loaded CI runner
def test_bench_train_smoke(tmp_path):
    """bench/train.py end to end on a tiny budget: both sides train, losses agree, ratio lines printed."""
    pytest.importorskip("accelerate")  # transformers' Trainer needs it
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "train.py"), "--smoke", "--work-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=290, env=worker_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-2].startswith("sft: real tokens/s vs Trainer ") and lines[-2].endswith("x")
    assert lines[-1].startswith("pretrain: real tokens/s vs Trainer ") and lines[-1].endswith("x")
