"""Issue 16: training at cluster scale on CPU (gloo): start-up that does not read the data, asynchronous
checkpoints (resume bitwise, SIGKILL mid-save), overlapped DDP communication, profiler traces of chosen steps."""
from __future__ import annotations

import ctypes
import json
import logging
import mmap
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bench._common import evict
from megatron_cslm.errors import CslmError
from tests.helpers.launch import ROOT, signal_workers, torchrun, torchrun_command, worker_env
from tests.helpers.training import pretrain_args, scalars

# ---------------------------------------------------------------- start-up independent of data size

def _resident_fraction(path: Path) -> float:
    """Fraction of the file's pages in the page cache (mincore), i.e. read by someone since the last eviction."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
    view = np.frombuffer(mm, dtype=np.uint8)
    pages = -(-size // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(size), vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore failed")
    del view
    mm.close()
    return sum(b & 1 for b in vec) / pages


def _zeros_dataset(prefix: Path, documents: int, tokens_per_document: int) -> None:
    """A big dataset of token 0 (a valid id everywhere), written through megatron-core's builder."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
    doc = torch.zeros(tokens_per_document, dtype=torch.int64)
    for _ in range(documents):
        builder.add_document(doc, [tokens_per_document])
    builder.finalize(str(prefix) + ".idx")


@pytest.mark.timeout(400)
def test_start_up_does_not_read_the_bin(toy_pretrain, tmp_path, monkeypatch):
    """16 MiB of tokens evicted from the page cache: the whole start-up (data checks, megatron-core's index
    caches, model, optimizer) reads none of it; the first training step does read it (so the probe works)."""
    from megatron_cslm.data.metadata import write_dataset_metadata
    from megatron_cslm.text.tokenizer import SpeechTextTokenizer

    prefix = tmp_path / "big"
    _zeros_dataset(prefix, documents=1024, tokens_per_document=8192)
    write_dataset_metadata(prefix, SpeechTextTokenizer.from_pretrained(toy_pretrain["tokenizer"]), max_token_id=0)
    bin_path = Path(str(prefix) + ".bin")
    evict(bin_path)
    if _resident_fraction(bin_path) > 0.01:
        pytest.skip("this filesystem keeps evicted pages (tmpfs?): page-cache residency cannot count reads")

    # the trainer up to its first step, in this process (one rank: reads are per file, not per process)
    from megatron_cslm.distributed import parallel
    from megatron_cslm.distributed.ports import free_port
    from megatron_cslm.training.arguments import parse_args
    from megatron_cslm.training.pretrain import make_task, parser
    from megatron_cslm.training.trainer import Trainer

    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    args = parse_args(parser(), ["--device", "cpu", "--model-arch", "tiny", "--tokenizer-model",
                                 str(toy_pretrain["tokenizer"]), "--data-path", str(prefix), "--seq-length", "128",
                                 "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "1",
                                 "--eval-interval", "0", "--data-cache-path", str(tmp_path / "cache")])
    trainer = Trainer(args, make_task)
    try:
        trainer.setup()
        trainer.resume_or_init()
        assert _resident_fraction(bin_path) < 0.001, "start-up read the .bin"
        assert list((tmp_path / "cache").rglob("*.npy")), "megatron-core's index cache was not written"
        trainer.task.train[0]  # the first sample reads its tokens (so the probe sees reads)
        assert _resident_fraction(bin_path) > 0
    finally:
        trainer.close(abort=True)
        parallel.destroy()


def test_dataset_of_another_tokenizer_is_refused_by_identity(toy_pretrain, tmp_path):
    from megatron_cslm.data.metadata import read_dataset_metadata, tokenizer_identity
    from megatron_cslm.text.tokenizer import SpeechTextTokenizer
    from megatron_cslm.toy.tokenizer import toy_texts, train_toy_text_tokenizer
    from megatron_cslm.training.data import check_indexed_dataset
    from tests.helpers.toy import TOY_UNITS

    prefix = toy_pretrain["prefixes"]["asr"]
    ours = SpeechTextTokenizer.from_pretrained(toy_pretrain["tokenizer"])
    meta = read_dataset_metadata(prefix)
    assert meta["tokenizer"] == tokenizer_identity(ours)  # a saved copy of the tokenizer keeps its identity
    assert 0 < meta["max_token_id"] < ours.vocab_size
    assert check_indexed_dataset(prefix, ours.vocab_size, tokenizer_identity(ours)) == meta["max_token_id"]

    # the same sizes and layout, another vocabulary (BPE trained on half the texts)
    texts = toy_texts(toy_pretrain["corpus"])
    other = SpeechTextTokenizer(train_toy_text_tokenizer(texts[::2], tmp_path / "other", vocab_size=1024),
                                num_units=TOY_UNITS)
    assert other.vocab_size == ours.vocab_size
    with pytest.raises(ValueError, match=r"built with another tokenizer: fingerprint"):
        check_indexed_dataset(prefix, ours.vocab_size, tokenizer_identity(other))
    # the same text vocabulary extended with fewer units (the saved tokenizer already holds its units)
    fewer_units = SpeechTextTokenizer(toy_pretrain["root"] / "text_tokenizer", num_units=TOY_UNITS // 2)
    with pytest.raises(ValueError, match=r"vocab_size \d+ \(dataset\) != \d+ \(tokenizer\)"):
        check_indexed_dataset(prefix, ours.vocab_size, tokenizer_identity(fewer_units))


def test_foreign_dataset_gets_a_bounded_sampled_check_and_a_warning(tmp_path, caplog):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_cslm.training.data import check_indexed_dataset

    builder = IndexedDatasetBuilder(str(tmp_path / "foreign.bin"), dtype=np.uint16)
    for i in range(50):
        builder.add_document(torch.tensor([1, 2, 100 + i]), [3])
    builder.finalize(str(tmp_path / "foreign.idx"))
    with caplog.at_level(logging.WARNING):
        assert check_indexed_dataset(str(tmp_path / "foreign"), 1000, sample_documents=50) == 149
    assert "no foreign.meta.json" in caplog.text and "at most 50 sampled documents" in caplog.text
    # only sampled: 5 documents spread over 50 see ids up to 149 at most, never an unread one
    assert check_indexed_dataset(str(tmp_path / "foreign"), 1000, sample_documents=5) <= 149
    with pytest.raises(ValueError, match="token id 149 >= the model's vocabulary size 120"):
        check_indexed_dataset(str(tmp_path / "foreign"), 120, sample_documents=50)


def test_bin_shorter_than_its_idx_is_refused_naming_the_prefix(toy_pretrain, tmp_path):
    from megatron_cslm.training.data import check_indexed_dataset

    src = toy_pretrain["prefixes"]["tts"]
    prefix = str(tmp_path / "cut")
    for suffix in (".bin", ".idx", ".meta.json"):
        shutil.copyfile(src + suffix, prefix + suffix)
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(os.path.getsize(prefix + ".bin") - 2)
    with pytest.raises(CslmError, match=rf"{prefix}.bin: field '--data-path' has \d+ bytes but {prefix}.idx "
                                        r"describes \d+"):
        check_indexed_dataset(prefix, toy_pretrain["vocab_size"])


# ---------------------------------------------------------------- asynchronous checkpoints

def _tp2(data, out: Path, *extra) -> list[str]:
    return pretrain_args(data, out, "--tensor-model-parallel-size", "2", "--train-iters", "20", *extra)


@pytest.fixture(scope="module")
def async_uninterrupted(toy_pretrain, tmp_path_factory):
    out = tmp_path_factory.mktemp("async_a")
    torchrun("-m megatron_cslm.pretrain", 2, *_tp2(toy_pretrain, out, "--seed", "7", "--save", out / "ckpt",
                                                     "--save-interval", "5", "--async-save"))
    assert (out / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "20"
    assert not list((out / "ckpt").glob("*.tmp")), "an async save was never published"
    return scalars(out / "tb")["train/loss/lm loss"]


@pytest.mark.timeout(900)
def test_sigkill_during_async_save_resumes_bitwise_from_the_previous_checkpoint(toy_pretrain, async_uninterrupted,
                                                                                tmp_path):
    ckpt = tmp_path / "ckpt"
    args = _tp2(toy_pretrain, tmp_path / "b1", "--seed", "7", "--save", ckpt, "--save-interval", "5",
                "--async-save")
    tracker = ckpt / "latest_checkpointed_iteration.txt"
    killed_during = None
    proc = subprocess.Popen(torchrun_command("-m megatron_cslm.pretrain", 2, *args), cwd=ROOT, env=worker_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    trainers = []
    try:
        while killed_during is None:
            assert proc.poll() is None and time.time() < deadline, "run ended before an async save was caught"
            last = tracker.read_text().strip() if tracker.exists() else ""
            if last and not trainers:  # looked up ahead: killing must take microseconds, not a pgrep
                trainers = [int(pid) for pid in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                                               text=True).stdout.split()]  # torchrun's workers
            for it in (10, 15):  # a save in flight: its .tmp exists and the tracker still names the one before
                if trainers and last == str(it - 5) and (ckpt / f"iter_{it:07d}.tmp").exists():
                    for pid in trainers:
                        os.kill(pid, signal.SIGKILL)
                    killed_during = it
                    break
            time.sleep(0.002)
    finally:
        signal_workers(proc, signal.SIGKILL)  # and the background writers the trainers forked
        proc.kill()
        proc.wait()
    previous = killed_during - 5
    assert tracker.read_text().strip() == str(previous)
    assert not (ckpt / f"iter_{killed_during:07d}").exists()

    torchrun("-m megatron_cslm.pretrain", 2, *_tp2(toy_pretrain, tmp_path / "b2", "--seed", "7", "--save", ckpt,
                                                     "--save-interval", "5", "--async-save"))
    resumed = scalars(tmp_path / "b2" / "tb")["train/loss/lm loss"]
    assert sorted(resumed) == list(range(previous + 1, 21))
    assert [resumed[s] for s in range(previous + 1, 21)] == \
        [async_uninterrupted[s] for s in range(previous + 1, 21)]  # bitwise on CPU
    assert tracker.read_text().strip() == "20"


@pytest.mark.timeout(600)
def test_checkpoints_saved_with_a_cached_plan_resume_bitwise(toy_pretrain, tmp_path):
    """--ckpt-assume-constant-structure: megatron-core reuses the save plan and global metadata from the third
    save on. A checkpoint written that way (the 4th of 6, asynchronously, 2 writer processes per rank) resumes
    exactly like the uninterrupted run."""
    ckpt = tmp_path / "ckpt"
    flags = ("--seed", "7", "--train-iters", "6", "--save", ckpt, "--save-interval", "1",
             "--ckpt-assume-constant-structure", "--dist-ckpt-workers", "2")
    torchrun("-m megatron_cslm.pretrain", 2, *pretrain_args(toy_pretrain, tmp_path / "a", *flags, "--async-save"))
    uninterrupted = scalars(tmp_path / "a" / "tb")["train/loss/lm loss"]
    assert sorted(uninterrupted) == list(range(1, 7))
    for it in (5, 6):  # back to the 4th save, as if the job had died after it
        shutil.rmtree(ckpt / f"iter_{it:07d}")
    (ckpt / "latest_checkpointed_iteration.txt").write_text("4\n")
    torchrun("-m megatron_cslm.pretrain", 2, *pretrain_args(toy_pretrain, tmp_path / "b", *flags))
    resumed = scalars(tmp_path / "b" / "tb")["train/loss/lm loss"]
    assert sorted(resumed) == [5, 6]
    assert [resumed[s] for s in (5, 6)] == [uninterrupted[s] for s in (5, 6)]  # bitwise on CPU


# ---------------------------------------------------------------- overlapped communication, profiling, timers

@pytest.mark.timeout(600)
def test_overlap_gives_identical_losses_and_profile_traces_exactly_the_asked_steps(toy_pretrain, tmp_path):
    common = ["--train-iters", "6", "--ddp-bucket-size", "20000"]  # several buckets for the tiny model
    torchrun("-m megatron_cslm.pretrain", 2, *pretrain_args(toy_pretrain, tmp_path / "plain", *common))
    p = torchrun("-m megatron_cslm.pretrain", 2, *pretrain_args(toy_pretrain, tmp_path / "overlap", *common,
                                                          "--overlap-grad-reduce", "--overlap-param-gather",
                                                          "--profile", "--profile-step-start", "3",
                                                          "--profile-step-end", "4", "--profile-ranks", "1",
                                                          "--profile-dir", tmp_path / "traces",
                                                          "--manual-gc", "--manual-gc-interval", "2"))
    plain = scalars(tmp_path / "plain" / "tb")["train/loss/lm loss"]
    overlap = scalars(tmp_path / "overlap" / "tb")["train/loss/lm loss"]
    assert sorted(plain) == list(range(1, 7))
    assert [overlap[s] for s in plain] == [plain[s] for s in plain]  # DP=2, distributed optimizer

    traces = sorted((tmp_path / "traces").glob("*.pt.trace.json"))
    assert len(traces) == 1 and traces[0].name.startswith("rank1_iters3-4"), traces
    names = {e.get("name") for e in json.loads(traces[0].read_text())["traceEvents"]}
    assert {"iteration 3", "iteration 4"} <= names
    assert not names & {"iteration 1", "iteration 2", "iteration 5", "iteration 6"}

    line = next(s for s in p.stdout.splitlines() if "iteration        6/6" in s)
    for phase in ("data", "forward-backward", "optimizer", "checkpoint"):
        assert f"{phase} " in line.split("ms/step")[1], line
    assert "peak RSS" in line
    tb = scalars(tmp_path / "overlap" / "tb")
    assert tb["train/memory/peak_rss_gib"][6] > 0.1 and "train/time/forward-backward_s" in tb
