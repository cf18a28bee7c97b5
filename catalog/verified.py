"""What queries read: the committed shards that are as their runs' manifests recorded them.

A query never reads a shard it has not verified. Before each query the sandbox lists the current
generation, and every run (or pack) folder whose manifest is readable and whose shards are regular
files of the recorded size and sha256 gives its shards to the views; a folder that fails is left
out whole, named with the reason (`Readable.left_out`), and the answer is partial (`cli.py query`
exits 3, `--strict` refuses). So is a folder whose circuits another folder committed first: a
circuit is never shown twice, whichever run brought it.

Hashing a shard costs a read of it, so a verdict is remembered by the file's (device, inode, size,
mtime): in this process, and across processes in a small file per generation under
`$CIRCUIT_VERIFIED_CACHE` (default `~/.cache/circuit-catalog/verified`), outside the catalogue,
which queries never write. A warm query stats each shard and hashes nothing. Runs written before
manifests held checksums are checked for presence and size only, as `cli.py check` does.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from catalog.errors import first_line
from catalog.shards import MANIFEST, file_hash, read_manifest
from schema.tables import TABLES


@dataclass(frozen=True)
class LeftOut:
    folder: str  # run or pack id
    reason: str

    def __str__(self) -> str:
        return f"{self.folder} ({self.reason})"


@dataclass(frozen=True)
class Readable:
    """The shards the views of one generation may read, by table, and the folders left out."""

    files: dict[str, tuple[str, ...]]
    left_out: tuple[LeftOut, ...] = ()

    def note(self, refused: bool = False) -> str:
        """One line naming what was left out ('' when nothing was), or why a strict query was refused."""
        if not self.left_out:
            return ""
        named = "; ".join(map(str, self.left_out[:3]))
        more = f"; and {len(self.left_out) - 3} more" if len(self.left_out) > 3 else ""
        what = (f"refused (strict): {len(self.left_out)} run(s) fail their checks and would be left out" if refused
                else f"partial answer: {len(self.left_out)} run(s) that fail their checks left out of every view")
        return f"{what}: {named}{more}; `cli.py check --quarantine` moves them aside"


@dataclass
class _Folder:
    """What one folder gives the views (or why it gives nothing), and the circuits it holds."""

    shards: dict[str, str] = field(default_factory=dict)  # table -> file path
    circuits: tuple[str, ...] = ()
    order: tuple[str, str] = ("", "")  # (written_at, name): who came first
    problem: str = ""


REPEATS = "repeats circuit"  # why a folder whose circuits another folder committed first is left out
_memo: dict[tuple, tuple] = {}  # (kind, path, stamp) -> verdict, for this process
_LOCK = threading.Lock()


def readable(generation: Path) -> Readable:
    """The verified shards of every folder of a generation (see the module docstring)."""
    generation = Path(generation).resolve()
    store = _Store(generation)
    folders: dict[str, _Folder] = {}
    for entry in sorted(os.scandir(generation), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue  # the generation's own files (its readers' lock)
        folders[entry.name] = _folder(Path(entry.path), entry, store)
    store.save()
    left = [LeftOut(name, f.problem) for name, f in folders.items() if f.problem]
    owner: dict[str, str] = {}
    for name, f in sorted(((n, f) for n, f in folders.items() if not f.problem), key=lambda nf: nf[1].order):
        repeated = next((c for c in f.circuits if c in owner), None)
        if repeated is not None:
            f.problem = f"{REPEATS} {repeated} of {owner[repeated]}"
            left.append(LeftOut(name, f.problem))
            continue
        owner.update(dict.fromkeys(f.circuits, name))
    files = {t: tuple(f.shards[t] for f in folders.values() if not f.problem and t in f.shards) for t in TABLES}
    return Readable(files, tuple(sorted(left, key=lambda x: x.folder)))


def _folder(path: Path, entry: os.DirEntry, store: _Store) -> _Folder:
    if entry.is_symlink() or not entry.is_dir(follow_symlinks=False):
        return _Folder(problem="not a folder" if not entry.is_symlink() else "a symbolic link")
    manifest_path = path / MANIFEST
    try:
        st = manifest_path.lstat()
    except FileNotFoundError:
        return _Folder(problem=f"{MANIFEST} missing")
    if not _regular(st):
        return _Folder(problem=f"{MANIFEST} is not a regular file")
    key = ("manifest", str(manifest_path), _stamp(st))
    with _LOCK:
        manifest = _memo.get(key)
    if manifest is None:
        try:
            manifest = read_manifest(path)
        except ValueError as e:
            manifest = (f"{MANIFEST} {e}",)
        with _LOCK:
            _memo[key] = manifest
    if isinstance(manifest, tuple):
        return _Folder(problem=manifest[0])
    order = (str(manifest.get("written_at", "")), path.name)
    if "packed_into" in manifest:  # a packed run's marker: its rows are its pack's
        pack = path.parent / str(manifest["packed_into"])
        return _Folder(order=order) if (pack / MANIFEST).is_file() else _Folder(
            problem=f"its pack {manifest['packed_into']} is missing")
    out = _Folder(order=order)
    for table, info in manifest["tables"].items():
        shard = path / info["file"]
        problem = store.verify(shard, info)
        if problem:
            return _Folder(problem=f"{info['file']}: {problem}")
        out.shards[table] = str(shard)
    if "circuits" in out.shards:
        try:
            out.circuits = store.circuits(Path(out.shards["circuits"]))
        except (OSError, KeyError, pa.ArrowException) as e:
            return _Folder(problem=f"circuits.parquet cannot be read ({first_line(e)})")
    return out


def _parquet_problem(shard: Path) -> str:
    """'' when the shard is a Parquet file whose footer reads, else why not (a manifest may record a
    file that is none: a view over it would fail every query of its table)."""
    try:
        pq.read_metadata(shard)
    except (OSError, pa.ArrowException) as e:
        return f"not a readable Parquet file ({first_line(e)})"
    return ""


def _stamp(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _regular(st: os.stat_result) -> bool:
    import stat

    return stat.S_ISREG(st.st_mode)


class _Store:
    """The verdicts remembered across processes for one generation (see the module docstring): read
    from disk only when this process has not seen a shard before, written when that taught it
    something, so that a warm query touches neither."""

    def __init__(self, generation: Path):
        root = Path(os.environ.get("CIRCUIT_VERIFIED_CACHE") or Path.home() / ".cache" / "circuit-catalog" / "verified")
        self.path = root / (hashlib.sha256(str(generation).encode()).hexdigest()[:24] + ".json")
        self._saved: dict | None = None
        self.seen: dict[str, list] = {}
        self.learnt = False  # a verdict this process did not hold: the file is written anew

    @property
    def saved(self) -> dict:
        if self._saved is None:
            try:
                self._saved = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self._saved = {}
            if not isinstance(self._saved, dict):
                self._saved = {}
        return self._saved

    def verify(self, shard: Path, info: dict) -> str:
        """'' when the shard is as the manifest says, else what is wrong with it."""
        try:
            st = shard.lstat()
        except FileNotFoundError:
            return "missing"
        if not _regular(st):
            return "not a regular file"
        if "bytes" in info and st.st_size != info["bytes"]:
            return f"{st.st_size} bytes, the manifest says {info['bytes']}"
        stamp = list(_stamp(st))
        key = ("shard", str(shard), tuple(stamp), info.get("sha256", ""))
        with _LOCK:
            verdict = _memo.get(key)
        if verdict is None:
            self.learnt = True
            remembered = self.saved.get(str(shard))
            if remembered is not None and remembered[:4] == stamp and remembered[4] == info.get("sha256", ""):
                verdict = ""
            elif "sha256" not in info:
                verdict = _parquet_problem(shard)  # a run from before checksums: no content check
            elif file_hash(shard) != info["sha256"]:
                verdict = "its content differs from the manifest's checksum"
            else:
                verdict = _parquet_problem(shard)
            with _LOCK:
                _memo[key] = verdict
        if not verdict:
            self.seen[str(shard)] = [*stamp, info.get("sha256", "")]
        return verdict

    def circuits(self, shard: Path) -> tuple[str, ...]:
        """The circuit ids a verified circuits shard holds."""
        stamp = tuple(_stamp(shard.lstat()))
        key = ("circuits", str(shard), stamp)
        with _LOCK:
            ids = _memo.get(key)
        if ids is None:
            self.learnt = True
            remembered = self.saved.get(f"{shard}#circuits")
            if remembered is not None and tuple(remembered[0]) == stamp:
                ids = tuple(remembered[1])
            else:
                ids = tuple(pq.read_table(shard, columns=["circuit_id"]).column("circuit_id").to_pylist())
            with _LOCK:
                _memo[key] = ids
        self.seen[f"{shard}#circuits"] = [list(stamp), list(ids)]
        return ids

    def save(self) -> None:
        """Remember this generation's verdicts for the next process (best effort: a cache)."""
        if not self.learnt or self.seen == self.saved:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps(self.seen))
            os.replace(tmp, self.path)
        except OSError:
            pass
