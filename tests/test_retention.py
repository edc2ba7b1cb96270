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
