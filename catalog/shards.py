"""Writing one run's Parquet shards: temporary names, rename into place, manifest last.

A worker never touches the DuckDB file. It streams each table into
`staging/<run_id>/<table>.parquet.tmp` (row groups as they come), renames it when
the table is complete, and writes `manifest.json` last. A run without a
manifest is incomplete and can never be committed.

While it writes, the worker holds an exclusive lock on `staging/<run_id>.owner` (which
names its process and host). The operating system drops the lock when the process
ends, however it ends, so a staged run whose owner file is not locked is stale:
`catalog.staging` lists such runs and commits or removes them.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from catalog.errors import UserError
from schema.derive import arrow_schema, to_arrow
from schema.tables import SCHEMA_VERSION, TABLES

MANIFEST = "manifest.json"
# Rows per Parquet row group: DuckDB reads a file in parallel by row group, and skips row groups
# by their statistics, so one big circuit must not be one row group (pyarrow's default is 1M rows).
ROW_GROUP = 128 * 1024


def file_hash(path: Path) -> str:
    """sha256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(folder: Path) -> dict:
    """A committed folder's manifest, checked for the shape every reader relies on (a `tables` mapping
    of known tables to their file, rows, bytes and sha256); ValueError saying what is wrong otherwise."""
    path = Path(folder) / MANIFEST
    try:
        m = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError("missing") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot be read ({type(e).__name__})") from None
    if not isinstance(m, dict) or not isinstance(m.get("tables"), dict):
        raise ValueError("cannot be read (it has no tables)")
    for table, info in m["tables"].items():
        if table not in TABLES:
            raise ValueError(f"names an unknown table {str(table)[:40]!r}")
        if not (isinstance(info, dict) and info.get("file") == f"{table}.parquet" and isinstance(info.get("bytes"), int)
                and isinstance(info.get("rows", 0), int) and isinstance(info.get("sha256", ""), str)):
            raise ValueError(f"cannot be read (its entry for {table})")
    if not isinstance(m.get("packed_into", ""), str) or not isinstance(m.get("contains", []), list):
        raise ValueError("cannot be read (its pack entries)")
    return m


class TableWriter:
    """Streams rows of one table into a shard; visible under its final name only when closed."""

    def __init__(self, path: Path, table: str):
        self.table, self.path, self.rows = table, path, 0
        self.tmp = path.with_name(path.name + ".tmp")
        self._writer = pq.ParquetWriter(self.tmp, arrow_schema(table))

    def write(self, rows: list[dict] | pa.Table) -> None:
        data = rows if isinstance(rows, pa.Table) else to_arrow(self.table, rows)
        if len(data):
            data = data.cast(arrow_schema(self.table))
            _refuse_nan(self.table, data)
            self._writer.write_table(data, row_group_size=ROW_GROUP)
            self.rows += len(data)

    def close(self) -> None:
        self._writer.close()
        os.replace(self.tmp, self.path)


OWNER_SUFFIX = ".owner"
_OWNED: dict[Path, Owner] = {}  # the runs this process is staging, by owner file


class Owner:
    """The lock a worker holds on `staging/<run_id>.owner` while its run is staged."""

    def __init__(self, staging: Path, run_id: str):
        staging.mkdir(parents=True, exist_ok=True)
        self.path = staging / f"{run_id}{OWNER_SUFFIX}"
        self._file = open(self.path, "a+")  # noqa: SIM115  (held open: the lock lives as long as the file)
        if not try_lock(self._file):
            self._file.close()
            raise FileExistsError(f"run {run_id} is already being written")
        self._file.truncate(0)
        self._file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                     "started_at": datetime.now(UTC).isoformat()}))
        self._file.flush()
        _OWNED[self.path] = self

    def release(self) -> None:
        """Remove the owner file and let go of the lock (after commit or abort)."""
        if not self._file.closed:
            self.path.unlink(missing_ok=True)
            self._file.close()
        _OWNED.pop(self.path, None)


def release_owner(root: Path, run_id: str) -> None:
    """Let go of a run this process was staging (called once the run is committed)."""
    owner = _OWNED.get(Path(root) / "staging" / f"{run_id}{OWNER_SUFFIX}")
    if owner is not None:
        owner.release()


COMMIT_LOCK = ".commit.lock"


@contextmanager
def commit_lock(root: Path) -> Iterator[None]:
    """Hold the catalogue's commit lock (an exclusive lock on staging/.commit.lock) in the body."""
    lock = Path(root) / "staging" / COMMIT_LOCK
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def try_lock(f) -> bool:
    """Take an exclusive lock on an open file without waiting; False if another process holds it."""
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _refuse_nan(table: str, data: pa.Table) -> None:
    """NaN is never stored: a number that could not be computed is NULL, with its reason."""
    for field in data.schema:
        if pa.types.is_floating(field.type) and pc.any(pc.is_nan(data[field.name])).as_py():
            raise UserError(f"{table}.{field.name} would hold NaN (a model or dictionary that gives NaN?); "
                            "nothing was committed")


class RunWriter:
    """All shards of one run, in `<catalog>/staging/<run_id>/`, owned by this process."""

    def __init__(self, root: Path, run_id: str):
        self.run_id = run_id
        self.dir = root / "staging" / run_id
        self._owner = Owner(root / "staging", run_id)  # locked before the folder exists
        try:
            if self.dir.exists():  # left by a writer of this run id that died: we hold its lock now
                shutil.rmtree(self.dir)
            self.dir.mkdir(exist_ok=False)
        except BaseException:
            self._owner.release()
            raise
        self._open: dict[str, TableWriter] = {}
        self._done: dict[str, int] = {}

    def table(self, name: str) -> TableWriter:
        """The streaming writer of a table (opened on first use)."""
        if name not in TABLES:
            raise KeyError(f"unknown table {name}")
        if name not in self._open:
            self._open[name] = TableWriter(self.dir / f"{name}.parquet", name)
        return self._open[name]

    def write(self, name: str, rows: list[dict] | pa.Table) -> None:
        self.table(name).write(rows)

    def finish(self, **extra) -> Path:
        """Close every shard and write the manifest (last, atomically), with each shard's rows, size and
        sha256 (what `catalog.integrity` checks), and any `extra` entries (a pack's `contains`)."""
        for name, w in self._open.items():
            w.close()
            self._done[name] = w.rows
        self._open.clear()
        manifest = {"run_id": self.run_id, "schema_version": SCHEMA_VERSION,
                    "written_at": datetime.now(UTC).isoformat(),
                    "tables": {n: {"file": f"{n}.parquet", "rows": r, "bytes": (self.dir / f"{n}.parquet").stat().st_size,
                                   "sha256": file_hash(self.dir / f"{n}.parquet")} for n, r in self._done.items()},
                    **extra}
        tmp = self.dir / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, self.dir / MANIFEST)
        return self.dir

    def abort(self) -> None:
        """Drop everything this run staged (it stays invisible), and let go of it."""
        for w in self._open.values():
            try:
                w._writer.close()
            except Exception:  # noqa: S110  (the file is removed just below)
                pass
        self._open.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
        self.release()

    def release(self) -> None:
        """Let go of the run's owner lock (once it is committed or aborted)."""
        self._owner.release()
