"""Compaction: many small committed runs merged into a few large packs, switched in atomically.

Thousands of small runs make every query open thousands of files. `compact` merges the small
runs of the current generation (and small packs from earlier compactions) into packs of about
`target_bytes`, one shard per table each, and switches to a new generation that holds

    pack-<id>/            the merged shards + a manifest listing the runs it `contains`
    <packed run>/         the run's marker: a manifest naming its pack (`packed_into`), no shards
    <any other run>/      hard links to the files it had

in one rename (`catalog.generations.switch`): a reader sees every run unpacked or every run
packed, never both or neither, and every query answers the same before and after (the views
read a pack's rows as they read the runs'). Markers keep a packed run committed: a repeated
commit of it is still a no-op, and `cli.py check` still finds it.

Packs are written in staging/ like any run while commits go on; the new generation is assembled
and switched under the commit lock, so a run committed meanwhile is carried over. A killed
compaction leaves the catalogue as it was (its staged packs are removed by `cli.py staging
--clean`, a half-built generation by the next compaction).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from catalog import generations
from catalog.errors import UserError
from catalog.integrity import check_run
from catalog.progress import hidden
from catalog.shards import MANIFEST, ROW_GROUP, commit_lock, try_lock
from catalog.store import SCHEMA_RUN, Catalog, _migrate, new_id
from catalog.verified import readable
from schema.derive import arrow_schema
from schema.tables import SCHEMA_VERSION, TABLES

COMPACT_LOCK = ".compact.lock"


@dataclass
class Folder:
    """One entry of a generation: a run, a pack, or a packed run's marker."""
    path: Path
    manifest: dict
    text: str  # the manifest as read (a change means the folder changed)

    @property
    def bytes(self) -> int:
        return sum(t.get("bytes", 0) for t in self.manifest.get("tables", {}).values())

    @property
    def runs(self) -> list[str]:
        """The runs whose rows it holds."""
        return self.manifest.get("contains", [self.path.name])


@dataclass
class Result:
    packs: list[dict] = field(default_factory=list)  # pack_id, runs, shards merged, bytes
    generation: str = ""
    removed_generations: int = 0

    @property
    def runs_packed(self) -> int:
        return sum(p["runs"] for p in self.packs)


def plan(root: Path, target_bytes: int) -> list[list[Folder]]:
    """Groups of small folders (runs and packs under half the target) of at most `target_bytes` each,
    oldest first; a group is worth packing when it merges at least two folders."""
    small = []
    for f in _folders(generations.current(root)):
        if f.path.name == SCHEMA_RUN or "packed_into" in f.manifest or not f.manifest.get("tables"):
            continue
        if f.bytes < target_bytes / 2:
            small.append(f)
    small.sort(key=lambda f: (f.manifest.get("written_at", ""), f.path.name))
    groups, group, size = [], [], 0
    for f in small:
        if group and size + f.bytes > target_bytes:
            groups.append(group)
            group, size = [], 0
        group.append(f)
        size += f.bytes
    groups.append(group)
    return [g for g in groups if len(g) > 1]


def describe(group: list[Folder], pack_id: str = "") -> dict:
    """One pack as `cli.py compact` lists it: its id, the runs, folders, shards and bytes it merges."""
    return {"pack_id": pack_id, "runs": sum(len(f.runs) for f in group), "folders": len(group),
            "shards": sum(len(f.manifest["tables"]) for f in group), "bytes": sum(f.bytes for f in group)}


def compact(cat: Catalog, target_bytes: int = 256 << 20, progress: bool = True) -> Result:
    """Pack the small runs of a catalogue and switch to the generation holding the packs."""
    root = cat.root
    with _compaction_lock(root):
        with commit_lock(root):
            generations.convert(root)  # an old-layout catalogue, once
        untrusted = readable(generations.current(root)).left_out  # never pack past what queries leave out
        if untrusted:
            raise UserError(f"run {untrusted[0]}: `cli.py check --quarantine` moves such runs aside; "
                            "nothing was compacted")
        groups = plan(root, target_bytes)
        result = Result()
        if not groups:
            result.generation = generations.current(root).name
            return result
        for f in (f for g in groups for f in g):  # never pack damaged rows: check first
            _, _, damage = check_run(f.path)
            if damage:
                d = damage[0]
                raise UserError(f"run {d.run_id}: {d.shard} {d.problem}; `cli.py check --quarantine` moves "
                                "damaged runs aside; nothing was compacted")
        writers = []
        try:
            bar = tqdm(total=sum(f.bytes for g in groups for f in g), unit="B", unit_scale=True,
                       desc="packing", disable=hidden(progress), leave=False)
            for group in groups:
                writers.append(_write_pack(cat, group, bar))
            bar.close()
            with commit_lock(root):
                target = _assemble(root, groups, writers)
                retired = generations.switch(root, target)
                _migrate(root, SCHEMA_VERSION)  # the catalogue file's views read the new generation
                result.removed_generations = generations.remove_old(root, keep={retired})
        except BaseException:
            for w in writers:
                w.abort()
            raise
        for w, group in zip(writers, groups, strict=True):
            w.release()
            result.packs.append(describe(group, w.run_id))
        result.generation = target.name
        return result


def _folders(generation: Path) -> list[Folder]:
    out = []
    for path in sorted(p for p in generation.iterdir() if p.is_dir()):
        try:
            text = (path / MANIFEST).read_text()
            out.append(Folder(path, json.loads(text), text))
        except (OSError, ValueError):
            continue  # not a committed run (`cli.py check` names it); left where it is
    return out


def _write_pack(cat: Catalog, group: list[Folder], bar) -> object:
    """Stage one pack: each table's rows of every folder in the group, in order, in row groups of
    ROW_GROUP rows, typed by the current schema (an older shard's missing columns read as NULL, as
    the views' union_by_name reads them)."""
    w = cat.new_run(new_id("pack"))
    for table in TABLES:
        schema = arrow_schema(table)
        pending, rows = [], 0
        for f in group:
            info = f.manifest["tables"].get(table)
            if info is None:
                continue
            for batch in pq.ParquetFile(f.path / info["file"]).iter_batches(batch_size=ROW_GROUP):
                pending.append(_conform(pa.Table.from_batches([batch]), schema))
                rows += batch.num_rows
                if rows >= ROW_GROUP:
                    w.write(table, pa.concat_tables(pending))
                    pending, rows = [], 0
            bar.update(info.get("bytes", 0))
        if pending:
            w.write(table, pa.concat_tables(pending))
    w.finish(contains=[run for f in group for run in f.runs])
    return w


def _conform(data: pa.Table, schema: pa.Schema) -> pa.Table:
    columns = [data[f.name].cast(f.type) if f.name in data.column_names else pa.nulls(len(data), f.type)
               for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)


def _assemble(root: Path, groups: list[list[Folder]], writers: list) -> Path:
    """Build the next generation (under the commit lock): the packs, a marker per packed run, hard
    links for everything else, including runs committed while the packs were written."""
    now = generations.current(root)
    members = {f.path.name: f for g in groups for f in g}
    for name, f in members.items():  # quarantined, or repacked by someone else, meanwhile?
        try:
            unchanged = (now / name / MANIFEST).read_text() == f.text
        except OSError:
            unchanged = False
        if not unchanged:
            raise UserError(f"run {name} changed while the catalogue was being compacted (quarantined?); "
                            "nothing was compacted, run `cli.py compact` again")
    packed_into = {run: w.run_id for g, w in zip(groups, writers, strict=True) for f in g for run in f.runs}
    target, building = generations.start(root)
    for entry in sorted(p for p in now.iterdir() if p.is_dir()):
        if entry.name not in members and entry.name not in packed_into:
            generations.link_tree(entry, building / entry.name)
    for run, pack in packed_into.items():
        (building / run).mkdir()
        (building / run / MANIFEST).write_text(json.dumps(
            {"run_id": run, "schema_version": SCHEMA_VERSION, "packed_into": pack, "tables": {}}, indent=1))
    for w in writers:
        shutil.move(w.dir, building / w.run_id)
    building.rename(target)
    return target


class _compaction_lock:
    """One compaction at a time per catalogue (a second one is refused, not queued)."""

    def __init__(self, root: Path):
        self.path = Path(root) / "staging" / COMPACT_LOCK

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a")  # noqa: SIM115  (held for the compaction)
        if not try_lock(self.file):
            self.file.close()
            raise UserError(f"another compaction of {self.path.parent.parent} is running")
        return self

    def __exit__(self, *exc):
        self.file.close()
