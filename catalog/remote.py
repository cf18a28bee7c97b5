"""Mirrors: committed runs exchanged with object storage (or any fsspec filesystem).

Object stores (s3://, gs://, az://) have no rename and no lock, so the catalogue's commit
protocol cannot run on one; a mirror is where machines that share no filesystem meet. It holds
committed runs only, written the object-store way:

    <url>/runs/<run_id>/<sha256>.parquet   a shard, named by its content
    <url>/runs/<run_id>/manifest.json      the run's manifest, put last: the run is in the mirror
                                           once its manifest is (one PUT, atomic on every store)

`push` uploads every committed run (and pack) of a catalogue that the mirror lacks, each shard
checked against its manifest first; `pull` downloads every run the catalogue lacks into
staging/, checks each shard's size and sha256 against the manifest, and commits it like any run
(commit lock, task-name check). A killed push leaves shards without a manifest, which no pull
reads; a killed pull leaves a stale staged run (`cli.py staging --clean`). Many machines push to
one mirror at once without collisions: run ids are unique, shards are named by content, and a
manifest names exactly its run's shards. A mirror is untrusted input: names, manifests and
shards are checked before anything is written, and a run that fails a check is named and left out.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fsspec.implementations.local import LocalFileSystem
from tqdm import tqdm

from catalog import generations
from catalog.errors import UserError, first_line
from catalog.integrity import check_run
from catalog.progress import hidden
from catalog.shards import MANIFEST, RunWriter, commit_lock, file_hash, read_manifest
from catalog.store import SCHEMA_RUN, Catalog, init
from schema.tables import SCHEMA_VERSION, TABLES

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")  # a run or pack id, as every writer makes them
_SHA = re.compile(r"[0-9a-f]{64}")


@dataclass
class Transfer:
    run_id: str
    status: str  # pushed / pulled, present (already there), refused
    shards: int = 0
    bytes: int = 0
    reason: str = ""


class _Store:
    """A mirror's filesystem whose failures are one line naming the mirror: each backend raises its own
    kinds (network, credentials, permissions, a missing bucket), and none of them should reach the user
    as a traceback."""

    def __init__(self, fs, url: str):
        self.fs, self.url = fs, url

    def __getattr__(self, name: str):
        method = getattr(self.fs, name)

        def call(*args, **kwargs):
            try:
                return method(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - every backend's failure, as one line
                raise UserError(f"mirror {self.url}: {type(e).__name__}: {first_line(e) or 'no message'}") from None
        return call


def open_mirror(url: str, holding_runs: bool = False):
    """(filesystem, base path) of a mirror URL, or one line saying why it cannot be used (with
    `holding_runs`, a mirror that holds no runs cannot: a mistyped one, most likely)."""
    import fsspec

    try:
        fs, base = fsspec.core.url_to_fs(url)
    except ImportError as e:  # fsspec names the package a protocol needs (s3fs, gcsfs, adlfs)
        raise UserError(f"mirror {url}: {first_line(e)}") from None
    except (ValueError, OSError) as e:
        raise UserError(f"mirror {url}: {first_line(e)}") from None
    fs, base = _Store(fs, url), base.rstrip("/")
    fs.invalidate_cache()  # fsspec keeps listings per instance: what another machine pushed since must show
    if holding_runs and not fs.exists(f"{base}/runs"):
        raise UserError(f"mirror {url} holds no runs (nothing at {base}/runs); nothing was pulled")
    return fs, base


def push(cat: Catalog, url: str, progress: bool = True, only: Callable[[str], bool] | None = None) -> list[Transfer]:
    """Upload the committed runs and packs the mirror lacks (a packed run travels in its pack); with
    `only`, just the runs whose id it accepts."""
    fs, base = check_mirror(cat.root, url)
    local = isinstance(fs.fs, LocalFileSystem)
    there = _mirrored(fs, base)
    there |= _packed(fs, base, there)  # a run another machine pushed in a pack is there too
    folders = [p for p in sorted(generations.current(cat.root).iterdir())
               if not p.name.startswith(".") and p.name != SCHEMA_RUN and (only is None or only(p.name))]
    out = []
    for folder in tqdm(folders, desc="pushing runs", unit="run", disable=hidden(progress)):
        if folder.is_symlink() or not folder.is_dir():
            out.append(Transfer(folder.name, "refused", reason="a symbolic link or a file, not a run's folder"))
            continue
        try:
            manifest = read_manifest(folder)
        except ValueError as e:
            out.append(Transfer(folder.name, "refused", reason=f"{MANIFEST} {e}; `cli.py check` says more"))
            continue
        if "packed_into" in manifest:
            continue  # its rows are in its pack
        if folder.name in there or (manifest.get("contains") and set(manifest["contains"]) <= there):
            out.append(Transfer(folder.name, "present"))
            continue
        _, unverified, damage = check_run(folder)
        if damage or unverified:
            why = f"{damage[0].shard} {damage[0].problem}" if damage else "its manifest holds no checksums (an older run)"
            out.append(Transfer(folder.name, "refused", reason=f"{why}; `cli.py check` says more"))
            continue
        tables = manifest["tables"].values()
        target = f"{base}/runs/{folder.name}"
        try:
            if local:  # a folder needs its folders; on object storage makedirs could create a bucket
                fs.makedirs(target, exist_ok=True)
            for info in tables:  # shards first ...
                fs.put_file(str(folder / info["file"]), f"{target}/{info['sha256']}.parquet")
            fs.pipe_file(f"{target}/{MANIFEST}", (folder / MANIFEST).read_bytes())  # ... the manifest last
        except UserError as e:
            raise UserError(f"{e} (writing run {folder.name}; the runs pushed before it are complete there)") from None
        out.append(Transfer(folder.name, "pushed", len(manifest["tables"]), sum(i["bytes"] for i in tables)))
    return out


def pull(root: Path, url: str, progress: bool = True) -> list[Transfer]:
    """Download and commit the mirror's runs and packs that the catalogue at `root` lacks (created
    if need be, once the mirror is known to hold runs)."""
    fs, base = check_mirror(root, url, holding_runs=True)
    names, unreadable = _listing(fs, base)
    cat = init(root)
    out = [Transfer(name[:80], "refused", reason=why) for name, why in unreadable]
    for name in tqdm(sorted(names), desc="pulling runs", unit="run", disable=hidden(progress)):
        if (generations.current(cat.root) / name / MANIFEST).is_file():
            out.append(Transfer(name, "present"))
            continue
        try:
            out.append(_pull_one(cat, fs, f"{base}/runs/{name}", name))
        except UserError as e:
            out.append(Transfer(name, "refused", reason=str(e)))
        except FileExistsError:  # another pull of the same mirror is staging it right now
            out.append(Transfer(name, "refused", reason="another process is writing this run now; pull again later"))
    return out


def _mirrored(fs, base: str) -> set[str]:
    """The ids of the runs in the mirror (those whose manifest is there), each a safe folder name."""
    return _listing(fs, base)[0]


def _listing(fs, base: str) -> tuple[set[str], list[tuple[str, str]]]:
    """(the ids of the runs in the mirror, (entry, why) for each entry of its runs/ that no pull can
    read: a name no writer makes, a symbolic link, a file). A folder without a manifest is a push
    still under way (or killed): no pull reads it, and it is not named."""
    runs = f"{base}/runs"
    if not fs.exists(runs):
        return set(), []
    if fs.isfile(runs):
        raise UserError(f"mirror {fs.url}: {runs} is a file, not a folder of runs")
    names = {p.rstrip("/").split("/")[-2] for p in fs.glob(f"{runs}/*/{MANIFEST}")}
    bad = []
    for entry in fs.ls(runs, detail=True):
        name = str(entry["name"]).rstrip("/").split("/")[-1]
        if entry.get("islink"):
            bad.append((name, "a symbolic link in the mirror, not a run's folder"))
        elif entry.get("type") != "directory":
            bad.append((name, "a file in the mirror's runs/, not a run's folder"))
        elif not _NAME.fullmatch(name):
            bad.append((name, "not a run id this tool writes"))
    unreadable = {n for n, _ in bad}
    return {n for n in names if n not in unreadable and n != SCHEMA_RUN}, sorted(bad)


def _packed(fs, base: str, names: set[str]) -> set[str]:
    """The runs that the mirror's packs hold."""
    held = set()
    for name in names:
        if name.startswith("pack-"):
            try:
                held |= set(_checked_manifest(fs.cat_file(f"{base}/runs/{name}/{MANIFEST}"), name).get("contains", []))
            except UserError:
                continue  # a pack that cannot be read holds nothing a push could skip
    return held


def check_mirror(root: Path, url: str, holding_runs: bool = False):
    """(filesystem, base path) of a mirror the catalogue at `root` can exchange runs with (see
    `open_mirror`), or one line saying why not: the catalogue itself, or a place inside it, cannot be."""
    fs, base = open_mirror(url, holding_runs)
    if isinstance(fs.fs, LocalFileSystem):
        target = Path(fs.fs._strip_protocol(url)).resolve()
        if target == root.resolve() or root.resolve() in target.parents:
            raise UserError(f"mirror {url} is the catalogue itself (or inside it); give another place")
    return fs, base


def _checked_manifest(raw: bytes, name: str) -> dict:
    """The mirror's manifest of run `name`, if it is one this catalogue can commit; else why not."""
    try:
        m = json.loads(raw)
        tables = m["tables"]
        ok = (isinstance(m, dict) and m.get("run_id") == name and isinstance(tables, dict) and tables
              and isinstance(m.get("schema_version"), int) and "packed_into" not in m)
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise UserError("its manifest is not a committed run's manifest")
    if m["schema_version"] > SCHEMA_VERSION:
        raise UserError(f"written by schema version {m['schema_version']}, newer than this tool's {SCHEMA_VERSION}")
    for table, info in tables.items():
        if not (table in TABLES and isinstance(info, dict) and info.get("file") == f"{table}.parquet"
                and isinstance(info.get("rows"), int) and isinstance(info.get("bytes"), int)
                and isinstance(info.get("sha256"), str) and _SHA.fullmatch(info["sha256"])):
            raise UserError(f"its manifest's entry for {str(table)[:40]!r} is not a shard this tool writes")
    contains = m.get("contains", [])
    if not (isinstance(contains, list) and all(isinstance(r, str) and _NAME.fullmatch(r) for r in contains)
            and len(set(contains)) == len(contains) and name not in contains):
        raise UserError("its manifest's list of packed runs is not a list of other runs' ids")
    return m


def _pull_one(cat: Catalog, fs, remote: str, name: str) -> Transfer:
    manifest = _checked_manifest(fs.cat_file(f"{remote}/{MANIFEST}"), name)
    writer = RunWriter(cat.root, name)  # staging/<name>/, owned by this process until committed
    try:
        for info in manifest["tables"].values():
            local = writer.dir / info["file"]
            source = f"{remote}/{info['sha256']}.parquet"
            if not fs.exists(source):
                raise UserError(f"shard {info['file']} is missing from the mirror")
            if fs.size(source) != info["bytes"]:
                raise UserError(f"shard {info['file']} has {fs.size(source)} bytes in the mirror, "
                                f"the manifest says {info['bytes']}")
            fs.get_file(source, str(local))
            if file_hash(local) != info["sha256"]:
                raise UserError(f"shard {info['file']} differs from the manifest's checksum")
        (writer.dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if manifest.get("contains"):
            _commit_pack(cat, writer, manifest)
        elif not cat.commit(name):
            return Transfer(name, "present")  # committed by another process meanwhile
    except BaseException:
        writer.abort()
        raise
    return Transfer(name, "pulled", len(manifest["tables"]), sum(i["bytes"] for i in manifest["tables"].values()))


def _commit_pack(cat: Catalog, writer: RunWriter, manifest: dict) -> None:
    """Commit a pack from a mirror, with a marker for each run it holds (as compaction leaves them),
    unless one of those runs is committed here already (its rows would then count twice)."""
    runs = generations.current(cat.root)
    with commit_lock(cat.root):
        here = [r for r in manifest["contains"] if (runs / r).exists()]
        if here:
            raise UserError(f"it packs runs this catalogue has already ({', '.join(here[:3])}"
                            f"{', …' if len(here) > 3 else ''}); pull before compacting, or compact here")
        cat.check_conflicts(writer.dir)
        markers = writer.dir / ".markers"
        for run_id in manifest["contains"]:
            (markers / run_id).mkdir(parents=True)
            (markers / run_id / MANIFEST).write_text(json.dumps(
                {"run_id": run_id, "schema_version": manifest["schema_version"], "packed_into": writer.run_id,
                 "tables": {}}, indent=1))
        for marker in sorted(markers.iterdir()):  # the markers first: a pack never shows without them
            marker.rename(runs / marker.name)
        markers.rmdir()
        writer.dir.rename(runs / writer.run_id)
    writer.release()
