"""Staged runs: what workers left in `staging/`, and cleaning it up.

A worker stages its run in `staging/<run_id>/` while holding the lock on
`staging/<run_id>.owner` (`catalog.shards.Owner`). A run whose owner lock is free
was left by a worker that ended without committing or removing it (killed, or
older code): it is stale. A stale run with a complete manifest is committed by
`clean` (its worker had finished); any other stale run is removed. Runs whose
worker is alive are never touched.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from catalog.errors import UserError
from catalog.shards import OWNER_SUFFIX, try_lock
from catalog.store import Catalog, check_staged

STATES = ("writing", "complete", "incomplete", "committed")


@dataclass
class StagedRun:
    run_id: str
    state: str  # writing (its worker is alive), complete, incomplete or committed (a leftover copy)
    age_s: float  # seconds since it was last written to
    size_bytes: int
    owner: str  # "pid N on HOST" from the owner file, or "" when unknown
    note: str  # what keeps an incomplete run from being committed

    @property
    def stale(self) -> bool:
        return self.state != "writing"


def staged_runs(root: Path) -> list[StagedRun]:
    """Every run in staging/ (and every owner file whose run folder is gone), oldest first."""
    staging = Path(root) / "staging"
    if not staging.is_dir():
        return []
    ids = {p.name for p in staging.iterdir() if p.is_dir()}
    ids |= {p.name[: -len(OWNER_SUFFIX)] for p in staging.glob(f"*{OWNER_SUFFIX}")}
    runs = [_describe(Path(root), run_id) for run_id in sorted(ids)]
    return sorted(runs, key=lambda r: -r.age_s)


def _describe(root: Path, run_id: str) -> StagedRun:
    folder = root / "staging" / run_id
    owner_file = folder.with_name(run_id + OWNER_SUFFIX)
    alive, owner = _owner(owner_file)
    files = [p for p in folder.rglob("*") if p.is_file()] if folder.is_dir() and not folder.is_symlink() else []
    times = [p.stat().st_mtime for p in [*files, *([folder] if folder.is_dir() else [])]]
    age = time.time() - max(times) if times else 0.0
    size = sum(p.stat().st_size for p in files)
    if alive:
        state, note = "writing", ""
    elif (root / "runs" / run_id).is_dir():
        state, note = "committed", "already committed; this copy is left over"
    else:
        problem = check_staged(folder) if folder.is_dir() else "only its owner file is left"
        state, note = ("complete", "") if problem is None else ("incomplete", problem)
    return StagedRun(run_id, state, age, size, owner, note)


def _owner(path: Path) -> tuple[bool, str]:
    """(whether a live process holds the owner lock, who the file names)."""
    if not path.exists():
        return False, ""
    try:
        with open(path) as f:
            text = f.read()
            alive = not try_lock(f)
    except OSError:
        return False, ""
    try:
        info = json.loads(text)
        who = f"pid {info['pid']} on {info['host']}"
    except (ValueError, KeyError, TypeError):
        who = ""
    return alive, who


def clean(cat: Catalog, discard: bool = False) -> list[tuple[StagedRun, str]]:
    """Commit every stale run that is complete (remove it instead with `discard`), remove every
    other stale run. Returns (run, what was done) for each stale run; live ones are untouched."""
    done = []
    for run in staged_runs(cat.root):
        if not run.stale:
            continue
        folder = cat.root / "staging" / run.run_id
        owner_file = folder.with_name(run.run_id + OWNER_SUFFIX)
        with open(owner_file, "a") as lock:
            if not try_lock(lock):  # a worker claimed it since it was listed
                continue
            action = "removed"
            if run.state == "complete" and not discard:
                try:
                    cat.commit(run.run_id)
                    action = "committed"
                except UserError as e:
                    action = f"removed ({str(e).removeprefix(f'run {run.run_id}: ')})"
            if folder.is_symlink():  # the link goes, never what it points to
                folder.unlink()
                action += " (a symbolic link: the link only)"
            else:
                shutil.rmtree(folder, ignore_errors=True)
            owner_file.unlink(missing_ok=True)
            if folder.exists() or folder.is_symlink():
                action = "could not be removed"
        done.append((run, action))
    return done
