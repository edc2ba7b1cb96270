"""Sharded tokenization: N processes (torchrun, gloo) or N array jobs give the 1-process output byte for byte, and a
run killed with SIGKILL resumes under another world size to the same output.

Runs tools/tokenize_speech.py as users do, with the random-init S3 model and ~1 s clips.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.files import load_tool, read_jsonl, write_tsv
from tests.helpers.launch import ROOT, signal_workers, torchrun, torchrun_command, worker_env
from tests.helpers.speech import clips

TOOL = ROOT / "tools" / "tokenize_speech.py"
NUM_CLIPS = 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    import soundfile as sf

    root = tmp_path_factory.mktemp("corpus")
    rows = []
    for k, wave in enumerate(clips(NUM_CLIPS, seconds=(0.5, 1.5))):
        sf.write(root / f"u{k:02d}.wav", wave, 16000, subtype="PCM_16")
        rows.append((f"u{k:02d}", f"u{k:02d}.wav", f"text {k}", "en"))
    rows.insert(5, ("missing", "nowhere.wav", "", ""))  # rejected by whichever rank owns it
    return write_tsv(root / "m.tsv", rows)


def args(corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["--manifest", str(corpus), "--output", str(out), "--random-init", "--device", "cpu", "--workers", "0",
            "--chunk-items", "1", "--no-progress", *extra]


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "units.jsonl"
    torchrun(TOOL, 1, *args(corpus, out))
    return out


@pytest.mark.timeout(300)
def test_two_processes_byte_identical_to_one(corpus, reference, tmp_path):
    out = tmp_path / "units.jsonl"
    torchrun(TOOL, 2, *args(corpus, out))
    assert out.read_bytes() == reference.read_bytes()
    recs = read_jsonl(out)
    assert [r["id"] for r in recs] == [f"u{k:02d}" for k in range(NUM_CLIPS)]
    assert (out.parent / "units.jsonl.rejects.tsv").read_text() == \
        (reference.parent / "units.jsonl.rejects.tsv").read_text()
    stats = json.loads((out.parent / "units.jsonl.stats.json").read_text())
    assert (stats["read"], stats["written"], stats["skipped"]) == (NUM_CLIPS + 1, NUM_CLIPS, {"unreadable": 1})
    assert [s["rank"] for s in stats["per_rank"]] == [0, 1] and sum(s["read"] for s in stats["per_rank"]) == 17
    assert abs(stats["audio_seconds"] - sum(r["duration_s"] for r in recs)) < 1e-2
    assert stats["rtf"] > 0 and stats["hours_per_second"] > 0 and all(s["rtf"] > 0 for s in stats["per_rank"])
    assert not (out.parent / "units.jsonl.parts").exists()


@pytest.mark.timeout(400)
def test_sigkill_then_resume_with_another_world_size(corpus, reference, tmp_path):
    out = tmp_path / "units.jsonl"
    parts = tmp_path / "units.jsonl.parts"
    proc = subprocess.Popen(torchrun_command(TOOL, 2, *args(corpus, out)), env=worker_env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            lines = sum(p.read_bytes().count(b"\n") for p in parts.glob("part-*.jsonl")) if parts.exists() else 0
            if lines >= 3:
                break
            time.sleep(0.05)
        signal_workers(proc, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists(), "the run finished before it was killed: the test proves nothing"
    part = sorted(parts.glob("part-*-of-00002.jsonl"))[0]
    with open(part, "ab") as f:
        f.write(b'{"id": "u15", "units": [1, 2')  # a line cut off mid-write
    done = sum(p.read_bytes().count(b"\n") for p in parts.glob("part-*.jsonl"))
    assert 3 <= done < NUM_CLIPS

    torchrun(TOOL, 1, *args(corpus, out))  # resume with 1 process
    assert out.read_bytes() == reference.read_bytes()
    stats = json.loads((out.parent / "units.jsonl.stats.json").read_text())
    assert stats["already_done"] == done and stats["read"] == NUM_CLIPS + 1 - done
    assert stats["read"] == stats["written"] + stats["skipped_total"]


@pytest.mark.timeout(300)
def test_slurm_array_shards_merge_when_the_last_finishes(corpus, reference, tmp_path, capsys):
    """examples/slurm_tokenize_speech.sbatch runs one shard; the shard that finishes last merges."""
    tool = load_tool("tokenize_speech")
    out = tmp_path / "units.jsonl"
    # Shard 1 through the SLURM launcher, as array task 1 of 3 would run it.
    job = subprocess.run(["bash", str(ROOT / "examples" / "slurm_tokenize_speech.sbatch"), *args(corpus, out)],
                         env=worker_env({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "3",
                                         "PYTHON": sys.executable, "DEVICE": "cpu"}),
                         cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert job.returncode == 0, job.stderr[-4000:]
    first = json.loads(job.stdout)
    assert first["merged"] is False and not out.exists() and (first["rank"], first["world"]) == (1, 3)
    tool.main(args(corpus, out, "--shard-index", "0", "--num-shards", "3"))
    assert not out.exists()
    last = tool.main(args(corpus, out, "--shard-index", "2", "--num-shards", "3"))
    assert out.read_bytes() == reference.read_bytes()
    assert [s["rank"] for s in last["per_rank"]] == [0, 1, 2] and last["written"] == NUM_CLIPS
    # A finished output is a resume point too: nothing is redone.
    again = tool.main(args(corpus, out))
    assert again["already_done"] == NUM_CLIPS and again["written"] == 0 and out.read_bytes() == reference.read_bytes()
