"""The catalogue on disk: create, open (version check), commit runs, read-only queries.

Layout of a catalogue directory:

    catalog.duckdb            schema version, one view per table, the named-query macros
    runs/<run_id>/            committed runs: <table>.parquet shards + manifest.json
    staging/<run_id>/         runs being written by workers (invisible)

Views read `runs/*/<table>.parquet`, so committing a run is one atomic rename of
its directory from staging/ to runs/: it becomes visible all at once, queries
are never blocked, and the DuckDB file is written only by `init` and migrations.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow.parquet as pq

from catalog.errors import UserError
from catalog.macros import create_macros, macros_hash
from catalog.query import check_read_only
from catalog.shards import MANIFEST, RunWriter
from schema.derive import view_sql
from schema.tables import SCHEMA_VERSION, TABLES

DB_FILE = "catalog.duckdb"
SCHEMA_RUN = f"_schema-v{SCHEMA_VERSION}"


def init(root: str | Path) -> Catalog:
    """Create a catalogue (or open the one already there)."""
    root = Path(root)
    if (root / DB_FILE).exists():
        return open_catalog(root)
    root.mkdir(parents=True, exist_ok=True)
    _write_schema_shards(root)
    tmp = root / (DB_FILE + ".tmp")
    tmp.unlink(missing_ok=True)
    con = duckdb.connect(str(tmp))
    try:
        con.execute("CREATE TABLE _catalog (key VARCHAR PRIMARY KEY, value VARCHAR)")
        con.execute("INSERT INTO _catalog VALUES ('schema_version', ?), ('created_at', ?)",
                    [str(SCHEMA_VERSION), datetime.now(UTC).isoformat()])
        _create_views(con, root)
    finally:
        con.close()
    os.replace(tmp, root / DB_FILE)
    return Catalog(root)


def open_catalog(root: str | Path) -> Catalog:
    """Open an existing catalogue, refusing a missing one or one of a newer schema version; an older
    one, or one whose named-query macros differ from this tool's, is brought up to date."""
    root = Path(root)
    if not (root / DB_FILE).is_file():
        raise UserError(f"no catalogue at {root} (create one with `cli.py init` or `cli.py demo`)")
    cat = Catalog(root)
    info = cat.info()
    version = int(info["schema_version"])
    if version > SCHEMA_VERSION:
        raise UserError(f"catalogue {root} has schema version {version}, newer than this tool's "
                        f"{SCHEMA_VERSION}; upgrade the tool")
    if version < SCHEMA_VERSION or info.get("macros") != macros_hash():
        _migrate(root, version)
    return cat


def _migrate(root: Path, version: int) -> None:
    """Bring an older catalogue to this schema version: empty shards for the new tables, views and
    macros rebuilt on a copy of the DuckDB file that replaces it atomically. Committed runs are never
    touched, so an interrupted migration leaves the catalogue as it was."""
    if version < 1:
        raise UserError(f"catalogue {root} has schema version {version} and no migration to "
                        f"{SCHEMA_VERSION} exists; it was left unchanged")
    _write_schema_shards(root)
    tmp = root / (DB_FILE + ".migrating")
    shutil.copyfile(root / DB_FILE, tmp)
    con = duckdb.connect(str(tmp))
    try:
        _create_views(con, root)
        con.execute("UPDATE _catalog SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION)])
    finally:
        con.close()
    os.replace(tmp, root / DB_FILE)


def _write_schema_shards(root: Path) -> None:
    """One empty, typed shard per table, so every view has a file to read from the start."""
    w = RunWriter(root, SCHEMA_RUN) if not (root / "runs" / SCHEMA_RUN).exists() else None
    if w is None:
        return
    for name in TABLES:
        w.table(name)
    w.finish()
    (root / "runs").mkdir(exist_ok=True)
    try:
        os.replace(w.dir, root / "runs" / SCHEMA_RUN)
    except OSError:  # another process migrating at the same moment got there first
        if not (root / "runs" / SCHEMA_RUN).exists():
            raise
        shutil.rmtree(w.dir, ignore_errors=True)


def _create_views(con, root: Path) -> None:
    con.execute(f"SET file_search_path = '{_sql_str(root.resolve())}'")
    for name in TABLES:
        con.execute(view_sql(name, f"runs/*/{name}.parquet"))
    create_macros(con)


def _sql_str(p) -> str:
    return str(p).replace("'", "''")


class Catalog:
    """A catalogue directory. Queries use read-only DuckDB connections (cursors of one held
    instance per catalogue file, see `_instance`)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    # ---- reading -------------------------------------------------------------------------
    def connect(self, retries: float = 10.0) -> duckdb.DuckDBPyConnection:
        """A read-only connection whose relative shard paths resolve inside the catalogue."""
        con = _instance(self.root / DB_FILE, retries).cursor()
        con.execute(f"SET file_search_path = '{_sql_str(self.root.resolve())}'")
        if not sys.stderr.isatty():  # DuckDB's progress bar is for people watching, not for logs and pipes
            con.execute("SET enable_progress_bar = false")
        return con

    def close(self) -> None:
        """Let go of the DuckDB instance this process holds for the catalogue file (needed only
        before opening that file for writing in the same process)."""
        _release(str((self.root / DB_FILE).resolve()))

    def info(self) -> dict[str, str]:
        """The catalogue's own records: schema_version, created_at, macros (their fingerprint)."""
        try:
            with self.connect() as con:
                info = dict(con.execute("SELECT key, value FROM _catalog").fetchall())
        except duckdb.Error:
            info = {}
        if "schema_version" not in info:
            raise UserError(f"{self.root / DB_FILE} is not a circuit catalogue")
        return info

    def schema_version(self) -> int:
        return int(self.info()["schema_version"])

    def sql(self, query: str, params: list | None = None) -> pd.DataFrame:
        """Run a read-only SQL query and return a DataFrame (write statements are refused)."""
        check_read_only(query)
        with self.connect() as con:
            try:
                return con.execute(query, params or []).df()
            except duckdb.Error as e:
                raise UserError(f"SQL error: {_first_line(e)}") from None

    def circuits(self) -> pd.DataFrame:
        return self.sql("SELECT * FROM circuits ORDER BY created_at, task_id")

    def nodes(self, circuit_id: str, in_circuit_only: bool = False) -> pd.DataFrame:
        cond = "AND in_circuit" if in_circuit_only else ""
        return self.sql(f"SELECT * FROM nodes WHERE circuit_id = ? {cond} ORDER BY node_idx", [circuit_id])

    def edges(self, circuit_id: str) -> pd.DataFrame:
        return self.sql("SELECT * FROM edges WHERE circuit_id = ? ORDER BY src_idx, dst_idx", [circuit_id])

    # ---- writing -------------------------------------------------------------------------
    def new_run(self, run_id: str | None = None) -> RunWriter:
        """Start writing a run's shards in staging/ (invisible until committed)."""
        return RunWriter(self.root, run_id or new_id("run"))

    def commit(self, run_id: str) -> bool:
        """Make a finished run visible, all at once. Returns False if it already was."""
        final = self.root / "runs" / run_id
        staged = self.root / "staging" / run_id
        if (final / MANIFEST).exists():
            if staged.exists():
                shutil.rmtree(staged)  # a repeated commit: the committed copy wins
            return False
        if not (staged / MANIFEST).exists():
            raise UserError(f"run {run_id} is incomplete (no manifest): nothing was committed")
        manifest = json.loads((staged / MANIFEST).read_text())
        for info in manifest["tables"].values():
            path = staged / info["file"]
            if not path.exists() or pq.read_metadata(path).num_rows != info["rows"]:
                raise UserError(f"run {run_id}: shard {info['file']} is missing or damaged; nothing was committed")
        self._check_task_conflicts(staged)
        os.replace(staged, final)
        return True

    def _check_task_conflicts(self, staged: Path) -> None:
        """A task name already in the catalogue must keep its content."""
        shard = staged / "tasks.parquet"
        if not shard.exists():
            return
        with self.connect() as con:
            clash = con.execute(
                "SELECT n.task_id FROM read_parquet(?) n JOIN tasks t USING (task_id) "
                "WHERE n.content_hash <> t.content_hash LIMIT 1", [str(shard)]).fetchone()
        if clash:
            raise UserError(f"task {clash[0]!r} is already in the catalogue with other examples; "
                            "give the new task file another name")

    def staged_runs(self) -> list[str]:
        d = self.root / "staging"
        return sorted(p.name for p in d.iterdir()) if d.exists() else []


# One read-only DuckDB instance per catalogue file, held for the process: starting an instance
# costs about 25 ms, a third of a small query. It is replaced when the file is (`init` and
# migrations write a copy and rename it into place), so a held instance is never stale.
_HELD: dict[str, tuple[tuple[int, int], duckdb.DuckDBPyConnection]] = {}


def _release(key: str) -> None:
    """Close the instance held for one catalogue file, if any."""
    held = _HELD.pop(key, None)
    if held:
        held[1].close()


def _let_go() -> None:
    """Close every held instance (before a fork: a DuckDB instance must not cross one)."""
    for key in list(_HELD):
        _release(key)


os.register_at_fork(before=_let_go)


def _instance(path: Path, retries: float) -> duckdb.DuckDBPyConnection:
    key = str(path.resolve())
    try:
        st = path.stat()
    except FileNotFoundError:
        raise UserError(f"no catalogue at {path.parent}") from None
    stamp = (st.st_ino, st.st_mtime_ns)
    held = _HELD.get(key)
    if held and held[0] == stamp:
        return held[1]
    _release(key)
    deadline = time.monotonic() + retries
    while True:
        try:
            con = duckdb.connect(key, read_only=True)
            break
        except duckdb.IOException as e:  # a writer holds the file's lock for a moment
            if "lock" not in str(e).lower() or time.monotonic() > deadline:
                raise UserError(f"cannot open catalogue {path.parent}: {_first_line(e)}") from None
            time.sleep(0.2)
    _HELD[key] = (stamp, con)
    return con


def new_id(prefix: str) -> str:
    return f"{prefix}-{datetime.now(UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
