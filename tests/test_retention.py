"""Checkpoint retention on real directories: which saves survive, and that a deletion killed midway leaves the
latest checkpoint resumable (the trainer-level run with --async-save is in tests/test_pretrain.py)."""
from __future__ import annotations

import json
import os

import pytest

from megatron_cslm.checkpoint.retention import RetentionPolicy, apply_retention, complete_iterations, to_delete
from megatron_cslm.checkpoint.save_load import TRACKER, latest_iteration


def _save(root, it: int) -> None:
    d = root / f"iter_{it:07d}"
    d.mkdir(parents=True)
    (d / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    (root / TRACKER).write_text(f"{it}\n")


def test_25_iterations_saving_every_3_keep_the_last_2_and_the_archive(tmp_path):
    policy = RetentionPolicy(keep_last_n=2, keep_every=10)
    for it in [*range(3, 25, 3), 25]:
        _save(tmp_path, it)
        apply_retention(tmp_path, it, policy)
        assert latest_iteration(tmp_path) == it
    # 12 and 21: the first saves at or after 10 and 20; 24 and 25: the last two
    assert complete_iterations(tmp_path) == [12, 21, 24, 25]


def test_what_is_never_deleted():
    p = RetentionPolicy(keep_last_n=1)
    # a complete save newer than the tracker (killed before the tracker write) is kept, and so is the tracker's
    assert to_delete([3, 6, 9], latest=6, policy=p) == [3]
    assert to_delete([3, 6, 9], latest=9, policy=RetentionPolicy()) == []  # no policy: keep everything
    with pytest.raises(ValueError, match="keep_last_n"):
        RetentionPolicy(keep_last_n=-1)


def test_a_deletion_killed_midway_leaves_the_latest_resumable(tmp_path):
    for it in (3, 6, 9):
        _save(tmp_path, it)
    # killed after the rename of iter_3 and half-way through removing it
    trash = tmp_path / f"iter_{3:07d}.deleting"
    os.replace(tmp_path / f"iter_{3:07d}", trash)
    (trash / "metadata.json").unlink()
    assert latest_iteration(tmp_path) == 9
    assert complete_iterations(tmp_path) == [6, 9]
    # the next pass removes the leftover, then applies the policy
    assert apply_retention(tmp_path, 9, RetentionPolicy(keep_last_n=1)) == [6]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"iter_{9:07d}", TRACKER]


def test_sigkill_at_several_points_of_a_retention_pass_leaves_the_latest_resumable(tmp_path):
    """A real SIGKILL of a process deleting checkpoints, at several moments: the tracker's checkpoint is intact
    after each, and the next pass finishes the job."""
    import signal
    import subprocess
    import sys
    import time

    from megatron_cslm.checkpoint.save_load import iteration_dir

    def fill(it: int) -> None:  # many files, so a deletion takes long enough to be interrupted
        _save(tmp_path, it)
        for shard in range(400):
            (iteration_dir(tmp_path, it) / f"__{shard}_0.distcp").write_bytes(b"x" * 64)

    script = ("import sys; from megatron_cslm.checkpoint.retention import RetentionPolicy, apply_retention; "
              "print('go', flush=True); apply_retention(sys.argv[1], int(sys.argv[2]), RetentionPolicy(keep_last_n=1))")
    latest = 0
    for delay in (0.0, 0.005, 0.02, 0.05, 0.1):
        for _ in range(2):
            latest += 3
            fill(latest)
        proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path), str(latest)], stdout=subprocess.PIPE)
        proc.stdout.readline()  # imports done: the pass is starting
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert latest_iteration(tmp_path) == latest
        assert len(list(iteration_dir(tmp_path, latest).iterdir())) == 401  # metadata.json + 400 shards
    apply_retention(tmp_path, latest, RetentionPolicy(keep_last_n=1))
    assert complete_iterations(tmp_path) == [latest]
    assert not list(tmp_path.glob("*.deleting"))
