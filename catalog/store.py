"""The catalogue on disk: create, open (version check), commit runs, read-only queries.

Layout of a catalogue directory:

    catalog.duckdb            schema version, one view per table, the named-query macros
    runs -> generations/g-N   the current generation (`catalog.generations`)
    runs/<run_id>/            committed runs: <table>.parquet shards + manifest.json
    staging/<run_id>/         runs being written by workers (invisible)

Views read `<generation>/*/<table>.parquet`, so committing a run is one atomic rename of
its directory from staging/ to runs/: it becomes visible all at once, queries
are never blocked, and the DuckDB file is written only by `init`, migrations and compaction.
"""

from __future__ import annotations

import atexit
import contextvars
import json
import os
import shutil
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from catalog import generations
from catalog.errors import PartialAnswer, UserError, first_line
from catalog.macros import create_macros, macros_hash
from catalog.query import check_read_only, sql_error
from catalog.shards import MANIFEST, RunWriter, commit_lock, release_owner
from catalog.verified import readable
from schema.derive import view_sql
from schema.tables import SCHEMA_VERSION, TABLES

DB_FILE = "catalog.duckdb"
SCHEMA_RUN = f"_schema-v{SCHEMA_VERSION}"


def init(root: str | Path) -> Catalog:
    """Create a catalogue (or open the one already there)."""
    root = Path(root)
    _check_folder(root)
    if (root / DB_FILE).exists():
        return open_catalog(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create a catalogue at {root}: {e.strerror}") from None
    generations.create(root)
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


def move(old: Path, new: Path) -> list[str]:
    """Move the catalogue in `old` (a folder it may share with other files, as the `catalog` package's
    folder was its default) into `new`, which must not exist yet: its file, generations, staged and
    quarantined runs; the other files of `old` stay. Returns the names moved."""
    from catalog.integrity import QUARANTINE

    old, new = Path(old), Path(new)
    if new.exists() or new.is_symlink():
        raise UserError(f"cannot move the catalogue in {old} to {new}: {new} exists")
    new.mkdir(parents=True)
    with commit_lock(old):  # no commit lands in the old folder while it moves
        names = [p.name for p in sorted(old.iterdir()) if p.name.startswith(DB_FILE) or p.name in (
            generations.RUNS, generations.GENERATIONS, "staging", QUARANTINE)]
        for name in names:
            os.rename(old / name, new / name)  # runs is a relative link into generations: it moves along
    return names


def open_catalog(root: str | Path) -> Catalog:
    """Open an existing catalogue, refusing a missing one or one of a newer schema version; an older
    one, or one whose named-query macros differ from this tool's, is brought up to date."""
    root = Path(root)
    _check_folder(root)
    if not (root / DB_FILE).is_file():
        raise UserError(f"no catalogue at {root} (create one with `cli.py init` or `cli.py demo`)")
    cat = Catalog(root)
    info = cat.info()
    version = int(info["schema_version"])
    if version > SCHEMA_VERSION:
        raise UserError(f"catalogue {root} has schema version {version}, newer than this tool's "
                        f"{SCHEMA_VERSION}; upgrade the tool")
    if _outdated(root, info):
        with commit_lock(root):  # one migration at a time (compaction migrates under this lock too)
            info = cat.info()
            if _outdated(root, info):  # unless another process just did it
                _migrate(root, int(info["schema_version"]))
    return cat


def _outdated(root: Path, info: dict) -> bool:
    """Whether the catalogue file needs `_migrate`: an older schema, other named queries, or views that
    read another generation than the current one."""
    return (int(info["schema_version"]) < SCHEMA_VERSION or info.get("macros") != macros_hash()
            or info.get("views", generations.RUNS) != generations.views_base(root))


def _check_folder(root: Path) -> None:
    """A catalogue is a folder: refuse a path that is a file (or something under one)."""
    for p in (root, *root.parents):
        if p.exists():
            if not p.is_dir():
                raise UserError(f"{p} is a file, not a catalogue folder")
            return


def _migrate(root: Path, version: int) -> None:
    """Bring an older catalogue to this schema version: empty shards for the new tables, views and
    macros rebuilt on a copy of the DuckDB file that replaces it atomically. Committed runs are never
    touched, so an interrupted migration leaves the catalogue as it was. Compaction calls it too, to
    point the views at the new generation."""
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
    finally:
        w.release()


def _create_views(con, root: Path) -> None:
    """The views and named queries of the catalogue file, for any DuckDB client opened in the
    catalogue folder (shard paths relative to it)."""
    con.execute(f"SET file_search_path = '{_sql_str(root.resolve())}'")
    base = generations.views_base(root)
    for name in TABLES:
        con.execute(view_sql(name, f"{base}/*/{name}.parquet"))
    create_macros(con)
    con.execute("INSERT OR REPLACE INTO _catalog VALUES ('macros', ?), ('views', ?)", [macros_hash(), base])


def _sql_str(p) -> str:
    return str(p).replace("'", "''")


class Catalog:
    """A catalogue directory. Queries run in its sandbox: an in-memory DuckDB instance held for
    the process, whose views read the committed shards and which can open no other file
    (`_sandbox`)."""

    def __init__(self, root: Path, timeout: float | None = None):
        self.root = Path(root)
        self.timeout = timeout  # the time limit of each query that names none (the explorer sets one)

    # ---- reading -------------------------------------------------------------------------
    def connect(self, strict: bool = False) -> duckdb.DuckDBPyConnection:
        """A connection to the catalogue's sandbox (a cursor of the held instance), reading the current
        generation's verified shards. `sql` and `chunks` hold that generation while they read, so that
        compaction never removes it under them; a query on this connection that outlives two
        compactions may fail."""
        return _sandbox(self.root, generations.current(self.root), strict).cursor()

    def close(self) -> None:
        """Let go of the DuckDB instances this process holds for the catalogue (needed only
        before opening its file for writing in the same process)."""
        _release(_key(self.root))

    def info(self) -> dict[str, str]:
        """The catalogue file's own records: schema_version, created_at, macros (their fingerprint)."""
        info = _file_info(self.root / DB_FILE)
        if "schema_version" not in info:
            raise UserError(f"{self.root / DB_FILE} is not a circuit catalogue")
        return info

    def schema_version(self) -> int:
        return int(self.info()["schema_version"])

    def sql(self, query: str, params: list | None = None, limit: int | None = None,
            strict: bool = False, timeout: float | None = None) -> pd.DataFrame:
        """Run a read-only SQL query and return a DataFrame (write statements are refused); with a
        limit, only the first `limit` rows are fetched (DuckDB stops producing the rest). Runs whose
        shards fail their checks are left out with a `PartialAnswer` warning naming them (`strict`:
        the query is refused instead). The query stops at Ctrl-C or SIGTERM, and after `timeout`
        seconds (`stoppable`)."""
        check_read_only(query)
        with generations.reading(self.root) as gen, _sandbox(self.root, gen, strict).cursor() as con, \
                self._errors():
            def answer() -> pd.DataFrame:
                result = con.execute(query, params or [])
                if limit is None:
                    return result.df()
                rows = result.fetchmany(limit)
                return pd.DataFrame(rows, columns=[d[0] for d in result.description or []])

            return stoppable(con, answer, self.timeout if timeout is None else timeout)

    def chunks(self, query: str, params: list | None = None, vectors: int = 32, strict: bool = False,
               timeout: float | None = None) -> Iterator[pd.DataFrame]:
        """A read-only query's result as DataFrames of `vectors` × 2048 rows (the last may be shorter; an
        empty result is one empty frame with its columns), for results too large to hold at once. A
        mistake in the query is raised by this call, before any chunk is asked for. Untrusted runs are
        left out, and the query stops, as `sql` says (`timeout` bounds the query and each chunk)."""
        check_read_only(query)
        timeout = self.timeout if timeout is None else timeout
        held = ExitStack()  # the generation and the cursor, held until the last chunk is read
        try:
            generation = held.enter_context(generations.reading(self.root))
            con = held.enter_context(_sandbox(self.root, generation, strict).cursor())
            with self._errors():
                result = stoppable(con, lambda: con.execute(query, params or []), timeout)
        except BaseException:
            held.close()
            raise

        def stream() -> Iterator[pd.DataFrame]:
            with held, self._errors():
                df = stoppable(con, lambda: result.fetch_df_chunk(vectors), timeout)
                yield df  # the first chunk, even empty: it carries the columns
                while len(df):
                    df = stoppable(con, lambda: result.fetch_df_chunk(vectors), timeout)
                    if len(df):
                        yield df

        return stream()

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """DuckDB's errors while a query runs, as the user sees them."""
        try:
            yield
        except duckdb.InterruptException:  # Ctrl-C or SIGINT while DuckDB ran: an interrupt, not an SQL error
            if threading.current_thread() is threading.main_thread():
                raise KeyboardInterrupt from None
            raise UserError("query interrupted (the process is stopping)") from None  # a server's request
        except duckdb.Error as e:
            raise UserError(sql_error(e)) from None  # never a damaged shard's: queries read verified ones

    def shards(self, table: str) -> tuple[str, ...]:
        """The verified shard files a query of this table reads now (`catalog.verified`)."""
        return readable(generations.current(self.root)).files[table]

    def left_out(self) -> str:
        """One line naming the runs queries leave out now ('' when none is): `catalog.verified`."""
        return readable(generations.current(self.root)).note()

    def circuits(self) -> pd.DataFrame:
        return self.sql("SELECT * FROM circuits ORDER BY created_at, task_id")

    def nodes(self, circuit_id: str, in_circuit_only: bool = False) -> pd.DataFrame:
        cond = "AND in_circuit" if in_circuit_only else ""
        return self.sql(f"SELECT * FROM nodes WHERE circuit_id = ? {cond} ORDER BY node_idx", [circuit_id])

    def check_task(self, task_id: str, content_hash: str) -> None:
        """Refuse a task whose name the catalogue already holds with other examples."""
        self._check_tasks({task_id: content_hash})

    def _check_tasks(self, tasks: dict[str, str]) -> None:
        if not tasks:
            return
        held = self.sql("SELECT task_id, content_hash FROM tasks WHERE list_contains(?, task_id)", [list(tasks)])
        for task_id, content_hash in held.itertuples(index=False):
            if content_hash != tasks[task_id]:
                raise UserError(f"task {task_id!r} is already in the catalogue with other examples; "
                                "give the new task file another name")

    # ---- writing -------------------------------------------------------------------------
    def new_run(self, run_id: str | None = None) -> RunWriter:
        """Start writing a run's shards in staging/ (invisible until committed)."""
        return RunWriter(self.root, run_id or new_id("run"))

    def commit(self, run_id: str) -> bool:
        """Make a finished run visible, all at once. Returns False if it already was.

        Commits take the catalogue's commit lock, so that checking a run against what is
        committed (a task name must keep its content) and renaming it into place are one step."""
        final = self.root / "runs" / run_id
        staged = self.root / "staging" / run_id
        with commit_lock(self.root):
            if (final / MANIFEST).exists():
                if staged.exists():
                    shutil.rmtree(staged)  # a repeated commit: the committed copy wins
                release_owner(self.root, run_id)
                return False
            problem = check_staged(staged)
            if problem:
                raise UserError(f"run {run_id}: {problem}; nothing was committed")
            self.check_conflicts(staged)
            (self.root / "runs").mkdir(exist_ok=True)
            os.replace(staged, final)
        release_owner(self.root, run_id)
        return True

    def check_conflicts(self, staged: Path) -> None:
        """Refuse a staged run that the catalogue contradicts or already holds (the caller holds the
        commit lock)."""
        self._check_task_conflicts(staged)
        self._check_circuit_conflicts(staged)

    def _check_circuit_conflicts(self, staged: Path) -> None:
        """A circuit is committed once, whichever run brings it (a mirror may hold a copy of one under
        another run id): its rows would otherwise count twice."""
        shard = staged / "circuits.parquet"
        if not shard.exists():
            return
        ids = pq.read_table(shard, columns=["circuit_id"]).column("circuit_id").to_pylist()
        held = self.sql("SELECT circuit_id, run_id FROM circuits WHERE list_contains(?, circuit_id)", [ids]) \
            if ids else None
        if held is not None and len(held):
            first = held.iloc[0]
            more = f" and {len(held) - 1} more" if len(held) > 1 else ""
            raise UserError(f"its circuit {first.circuit_id}{more} is committed already (run {first.run_id}); "
                            "nothing was committed")

    def _check_task_conflicts(self, staged: Path) -> None:
        """A task name already in the catalogue must keep its content."""
        shard = staged / "tasks.parquet"
        if shard.exists():
            rows = pq.read_table(shard, columns=["task_id", "content_hash"]).to_pylist()
            self._check_tasks({r["task_id"]: r["content_hash"] for r in rows})


# Whether the one who asked has gone (the explorer's client closed its connection): a query running for
# this context is then interrupted. Set per request; None outside one.
stop_when: contextvars.ContextVar[Callable[[], bool] | None] = contextvars.ContextVar("stop_when", default=None)
_RUNNING: set[duckdb.DuckDBPyConnection] = set()  # connections a query is running on, to interrupt at exit


def stoppable(con: duckdb.DuckDBPyConnection, work, timeout: float | None = None):
    """`work()` (DuckDB calls on `con`) in a thread of its own, so that this one stays free to take a
    signal: Ctrl-C and SIGTERM (raised here as KeyboardInterrupt and `Terminated`), the end of `timeout`
    seconds and `stop_when` interrupt DuckDB, which stops within a moment. DuckDB holds no Python lock
    while it works, and a signal reaches Python only between bytecodes of the main thread."""
    done = threading.Event()
    box: dict = {}

    def run() -> None:
        _name_thread(b"query")  # what `top -H` and /proc/<pid>/task/*/comm show while a query runs
        try:
            box["value"] = work()
        except BaseException as e:  # raised in the caller's thread below
            box["error"] = e
        finally:
            done.set()

    worker = threading.Thread(target=run, name="query", daemon=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    gone = stop_when.get()
    with _LOCK:
        _RUNNING.add(con)
    worker.start()
    try:
        while not done.wait(0.05):
            if deadline is not None and time.monotonic() > deadline:
                raise UserError(f"query stopped after {timeout:g} s (its time limit)")
            if gone is not None and gone():
                raise UserError("query stopped: the client went away")
    except BaseException:
        con.interrupt()
        done.wait()
        raise
    finally:
        with _LOCK:
            _RUNNING.discard(con)
    if "error" in box:
        raise box["error"]
    return box["value"]


def _name_thread(name: bytes) -> None:
    """Name the calling thread for the operating system (Linux; elsewhere nothing happens)."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, name, 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def interrupt_running() -> None:
    """Interrupt every query this process is running (before it exits: a DuckDB instance torn down
    under a running query aborts the process)."""
    with _LOCK:
        running = list(_RUNNING)
    for con in running:
        con.interrupt()


def check_staged(staged: Path) -> str | None:
    """What keeps a staged run from being committed (a symbolic link or a special file in its place,
    no manifest, a shard missing or of the wrong length), or None when it is complete."""
    if staged.is_symlink():
        return "it is a symbolic link, not a folder of the catalogue's own"
    foreign = next((p for p in staged.rglob("*") if p.is_symlink() or not (p.is_file() or p.is_dir())), None)
    if foreign is not None:
        return f"{foreign.relative_to(staged)} is not a regular file"
    if not (staged / MANIFEST).exists():
        return "it is incomplete (no manifest)"
    try:
        manifest = json.loads((staged / MANIFEST).read_text())
        if "contains" in manifest:
            return "it is a pack of an unfinished compaction (only `cli.py compact` switches packs in)"
        for info in manifest["tables"].values():
            path = staged / info["file"]
            if not path.exists() or pq.read_metadata(path).num_rows != info["rows"]:
                return f"shard {info['file']} is missing or damaged"
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException):
        return "its manifest or a shard cannot be read"
    return None


# The sandbox: one in-memory DuckDB instance per catalogue, held for the process (starting an
# instance costs about 25 ms, a third of a small query). Its views read the committed shards of
# the current generation by absolute path, its macros are the named queries; it may open files
# in that generation and nothing else (DuckDB's allowed_directories with external access off: no
# other file, no network, no extension), it never spills to disk, and its configuration is
# locked, so user SQL cannot lift any of it. It never goes stale: views and macros come from this
# code, the views find newly committed runs by their glob on every query, and when compaction
# switches generations the next query gets a new sandbox (the old one is left to the queries
# still running on it).
_HELD: dict[str, list] = {}  # catalogue -> [generation, instance, the files its views read]
_RETIRED: list[duckdb.DuckDBPyConnection] = []
_INFO: dict[str, tuple[tuple[int, int, int], dict]] = {}
_LOCK = threading.Lock()


def _key(root: Path) -> str:
    return str(Path(root).resolve())


def _sandbox(root: Path, generation: Path, strict: bool = False) -> duckdb.DuckDBPyConnection:
    """The held instance whose views read the verified shards of `generation` (a new instance when
    compaction switched; its views read again when the verified shards changed). What was left out is
    said by a `PartialAnswer` warning, or refused with `strict`."""
    key = _key(root)
    if not (Path(key) / DB_FILE).is_file():
        raise UserError(f"no catalogue at {root}")
    found = readable(generation)
    if found.left_out and strict:
        raise UserError(found.note(refused=True))
    with _LOCK:
        held = _HELD.get(key)
        if held is None or held[0] != generation:
            if held is not None:
                _RETIRED.append(held[1])
            held = _HELD[key] = [generation, _new_sandbox(generation, found.files), found.files]
        elif held[2] != found.files:  # only the views whose shards changed (a commit touches some tables)
            _verified_views(held[1], {t: f for t, f in found.files.items() if held[2].get(t) != f})
            held[2] = found.files
        con = held[1]
    if found.left_out:
        warnings.warn(found.note(), PartialAnswer, stacklevel=3)
    return con


def _verified_views(con: duckdb.DuckDBPyConnection, files: dict[str, tuple[str, ...]]) -> None:
    """One view per table over exactly these shards (checked ones: `catalog.verified`)."""
    try:
        for name, shards in files.items():
            con.execute(view_sql(name, list(shards)))
    except duckdb.Error as e:
        raise UserError(f"the catalogue's shards cannot be read: {first_line(e)}; `cli.py check` names "
                        "damaged runs") from None


def _new_sandbox(runs: Path, files: dict[str, tuple[str, ...]]) -> duckdb.DuckDBPyConnection:
    """An in-memory instance whose views read these shards of the generation `runs`, with the named
    queries, that may read files under `runs` and nothing else."""
    con = duckdb.connect(":memory:")
    _verified_views(con, files)
    create_macros(con)
    settings = {"temp_directory": "",  # no spilling: a query that needs more memory fails instead
                "allowed_directories": [f"{runs}/"], "enable_external_access": False,
                "autoload_known_extensions": False, "autoinstall_known_extensions": False,
                "enable_progress_bar": sys.stderr.isatty()}  # for people watching, not for logs and pipes
    for name, value in settings.items():
        con.execute(f"SET {name} = {_sql_literal(value)}")
    con.execute("SET lock_configuration = true")
    return con


def _sql_literal(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_sql_literal(v) for v in value) + "]"
    return f"'{_sql_str(value)}'"


def _release(key: str) -> None:
    """Close the sandbox held for one catalogue, if any."""
    held = _HELD.pop(key, None)
    if held is not None:
        held[1].close()


def _let_go() -> None:
    """Close every held instance (before a fork: a DuckDB instance must not cross one; at exit, once
    the queries still running are interrupted)."""
    interrupt_running()
    deadline = time.monotonic() + 5
    while _RUNNING and time.monotonic() < deadline:
        time.sleep(0.01)
    for key in list(_HELD):
        _release(key)
    while _RETIRED:
        _RETIRED.pop().close()


os.register_at_fork(before=_let_go)
atexit.register(_let_go)  # closed before the interpreter tears DuckDB's bindings down


def _file_info(path: Path, retries: float = 10.0) -> dict[str, str]:
    """The `_catalog` records of a catalogue file (read once per version of the file)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise UserError(f"no catalogue at {path.parent}") from None
    key, stamp = str(path.resolve()), (st.st_ino, st.st_mtime_ns, st.st_size)
    cached = _INFO.get(key)
    if cached and cached[0] == stamp:
        return dict(cached[1])
    deadline = time.monotonic() + retries
    while True:
        try:
            con = duckdb.connect(key, read_only=True)
            break
        except duckdb.InterruptException:
            raise KeyboardInterrupt from None
        except duckdb.IOException as e:  # a writer holds the file's lock for a moment
            if "lock" not in str(e).lower() or time.monotonic() > deadline:
                raise UserError(f"cannot open catalogue {path.parent}: {first_line(e)}") from None
            time.sleep(0.2)
        except duckdb.Error as e:
            raise UserError(f"{path} is not a circuit catalogue ({first_line(e)})") from None
    try:
        info = dict(con.execute("SELECT key, value FROM _catalog").fetchall())
    except duckdb.InterruptException:  # never read as "no information": the catalogue is not at fault
        raise KeyboardInterrupt from None
    except duckdb.Error:
        info = {}
    finally:
        con.close()
    _INFO[key] = (stamp, info)
    return dict(info)


def new_id(prefix: str) -> str:
    return f"{prefix}-{datetime.now(UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
