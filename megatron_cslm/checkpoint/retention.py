"""Checkpoint retention (`--keep-last-n N`, `--keep-every M`): bounded disk for runs that save for days.

Why: a save of an 8B model with its distributed optimizer is ~100 GB; keeping every save fills a terabyte in
ten. NeMo keeps the last k; Megatron-LM users delete by hand. Retention here runs in the save's publish step
(`save_load.save_checkpoint`), on rank 0, right after the tracker names the new save: for synchronous saves
once every rank wrote it, for `--async-save` once megatron-core finalized the background writers of every rank.

Invariants:
- Never deleted: the checkpoint the tracker names (the latest complete one), any complete checkpoint newer than
  the tracker (a save killed between its rename and the tracker write), the last `keep_last_n` complete ones,
  and the archive: the first checkpoint at or after each multiple of `keep_every` (saves every 3 iterations
  with `--keep-every 10` archive 12, 21, 30, ...; saves need not land on the multiples). Archived checkpoints are
  never deleted, so the first one of a window stays the first one on disk and the choice is stable.
  The checkpoint a run resumed from is the tracker's until a newer save is complete on every rank, so it is
  protected until then.
- A deletion first renames `iter_X` to `iter_X.deleting` (one atomic rename), then removes it. Resume only
  follows the tracker, so a job killed at any point of a deletion leaves a resumable latest checkpoint; the
  next retention pass finishes removing `*.deleting` leftovers.
- Only `iter_XXXXXXX` directories with a `metadata.json` (complete dist_checkpointing saves) are candidates:
  `.tmp` saves in flight and foreign files are never touched.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_ITER_DIR = re.compile(r"^iter_(\d{7})$")
DELETING_SUFFIX = ".deleting"


@dataclass(frozen=True)
class RetentionPolicy:
    """keep_last_n: the newest complete checkpoints kept besides the archive (None or 0: keep all);
    keep_every: archive the first checkpoint at or after every multiple of it, forever (None: no archive)."""

    keep_last_n: int | None = None
    keep_every: int | None = None

    def __post_init__(self):
        for name in ("keep_last_n", "keep_every"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")

    @property
    def active(self) -> bool:
        return bool(self.keep_last_n)


def complete_iterations(root: str | os.PathLike) -> list[int]:
    """Iterations of complete checkpoints under `root`, ascending."""
    out = []
    for entry in Path(root).iterdir() if Path(root).is_dir() else ():
        m = _ITER_DIR.match(entry.name)
        if m and (entry / "metadata.json").exists():
            out.append(int(m.group(1)))
    return sorted(out)


def to_delete(iterations: list[int], latest: int, policy: RetentionPolicy) -> list[int]:
    """The iterations `policy` removes, given the complete ones and the tracker's `latest` (pure)."""
    if not policy.active:
        return []
    published = sorted(i for i in iterations if i <= latest)
    keep = set(published[-policy.keep_last_n:]) | {latest} | {i for i in iterations if i > latest}
    if policy.keep_every:  # the archive: the first checkpoint at or after each multiple of keep_every
        firsts: dict[int, int] = {}
        for i in published:
            firsts.setdefault(i // policy.keep_every, i)
        keep |= {i for window, i in firsts.items() if window > 0}
    return [i for i in published if i not in keep]


def apply_retention(root: str | os.PathLike, latest: int, policy: RetentionPolicy) -> list[int]:
    """Delete what `policy` does not keep under `root` (call on one rank, after the tracker names `latest`);
    returns the deleted iterations. Leftovers of an interrupted deletion are removed first."""
    root = Path(root)
    for leftover in root.glob(f"iter_*{DELETING_SUFFIX}"):
        shutil.rmtree(leftover, ignore_errors=True)
        log.info("removed %s (a deletion interrupted earlier)", leftover)
    doomed = to_delete(complete_iterations(root), latest, policy)
    for it in doomed:
        path = root / f"iter_{it:07d}"
        trash = path.with_name(path.name + DELETING_SUFFIX)
        os.replace(path, trash)  # resume can no longer see it, even if we are killed mid-rmtree
        shutil.rmtree(trash)
        log.info("deleted checkpoint %s (--keep-last-n %s, --keep-every %s; latest is iteration %d)", path,
                 policy.keep_last_n, policy.keep_every, latest)
    return doomed
