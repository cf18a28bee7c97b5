"""Integrity of committed runs: every shard as its run's manifest recorded it.

A run's manifest records each shard's size and sha256 when the run is written (`RunWriter.finish`).
`check` reads every committed run and names each shard that is missing, of another size or of
other content, and each run whose manifest cannot be read; `quarantine` moves damaged runs to
`<catalog>/quarantine/`, out of every view, so the rest stays queryable. Runs written before
manifests held checksums are checked for presence only, and counted as such. A packed run
(`catalog.compaction`) is checked through its pack; quarantining a pack takes its runs with it.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from catalog.shards import MANIFEST, commit_lock, file_hash, read_manifest
from catalog.verified import REPEATS, readable

QUARANTINE = "quarantine"


@dataclass(frozen=True)
class Damage:
    run_id: str
    shard: str  # the shard's file name, or the manifest's
    problem: str


@dataclass
class Report:
    runs: int  # committed runs, packed or not
    packs: int
    shards: int
    unverified: int  # shards whose manifest holds no checksum (older runs): checked for presence only
    damage: list[Damage]

    @property
    def damaged_runs(self) -> list[str]:
        return sorted({d.run_id for d in self.damage})


def check_run(run: Path) -> tuple[int, int, list[Damage]]:
    """(shards, unverified shards, damage) of one committed run folder."""
    if run.is_symlink() or not run.is_dir():
        return 0, 0, [Damage(run.name, run.name, "a symbolic link" if run.is_symlink() else "not a folder")]
    try:
        manifest = read_manifest(run)
        tables = manifest["tables"]
    except ValueError as e:
        return 0, 0, [Damage(run.name, MANIFEST, str(e))]
    if "packed_into" in manifest and not (run.parent / str(manifest["packed_into"]) / MANIFEST).is_file():
        return 0, 0, [Damage(run.name, MANIFEST, f"its pack {manifest['packed_into']} is missing")]
    damage, unverified = [], 0
    for info in tables.values():
        shard = run / info["file"]
        if shard.is_symlink() or (shard.exists() and not shard.is_file()):
            damage.append(Damage(run.name, info["file"], "not a regular file"))
            continue
        if not shard.is_file():
            damage.append(Damage(run.name, info["file"], "missing"))
            continue
        if "sha256" not in info:
            unverified += 1
            continue
        size = shard.stat().st_size
        if size != info["bytes"]:
            damage.append(Damage(run.name, info["file"], f"{size} bytes, the manifest says {info['bytes']}"))
        elif file_hash(shard) != info["sha256"]:
            damage.append(Damage(run.name, info["file"], "its content differs from the manifest's checksum"))
    return len(tables), unverified, damage


def check(root: Path) -> Report:
    """Check every committed run of the catalogue at `root`, and that no run repeats another's circuits
    (what queries leave out: `catalog.verified`)."""
    runs = sorted(p for p in (root / "runs").iterdir() if not p.name.startswith(".")) \
        if (root / "runs").is_dir() else []
    packs = {p.name for p in runs if p.name.startswith("pack-")}
    report = Report(len(runs) - len(packs), len(packs), 0, 0, [])
    for run in runs:
        shards, unverified, damage = check_run(run)
        report.shards += shards
        report.unverified += unverified
        report.damage += damage
    damaged = set(report.damaged_runs)
    report.damage += [Damage(x.folder, "circuits.parquet", x.reason) for x in readable(root / "runs").left_out
                      if x.folder not in damaged and x.reason.startswith(REPEATS)]
    return report


def quarantine(root: Path, run_ids: list[str]) -> list[Path]:
    """Move these committed runs (or packs) to `<catalog>/quarantine/` (one rename each: a reader sees a
    run whole or not at all); a pack's runs are no longer committed (their markers go), so they can be
    written again. Returns where they went."""
    (root / QUARANTINE).mkdir(exist_ok=True)
    moved = []
    with commit_lock(root):  # not while compaction assembles the next generation
        for run_id in run_ids:
            folder, target = root / "runs" / run_id, root / QUARANTINE / run_id
            try:
                contains = read_manifest(folder).get("contains", [])
            except ValueError:
                contains = []
            os.replace(folder, target)
            for run in contains:
                shutil.rmtree(root / "runs" / run, ignore_errors=True)
            moved.append(target)
    return moved
