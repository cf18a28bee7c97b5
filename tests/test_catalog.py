"""Storage rules: one schema, all-or-nothing runs, idempotent commits, read-only queries."""

import os
import shutil

import duckdb
import pytest

import catalog
from catalog.errors import UserError
from catalog.macros import NAMED_QUERIES
from schema.derive import arrow_schema, column_docs
from schema.tables import SCHEMA_VERSION, TABLES


def _task_run(cat, run_id, content_hash="h1"):
    w = cat.new_run(run_id)
    w.write("tasks", [{"task_id": "t", "name": "t", "content_hash": content_hash, "n_examples": 1}])
    w.write("runs", [{"run_id": run_id, "kind": "test", "status": "ok"}])
    return w


def test_empty_catalogue_has_every_table_typed(tmp_path):
    cat = catalog.init(tmp_path / "c")
    for name, cols in column_docs().items():
        df = cat.sql(f"SELECT * FROM {name}")
        assert list(df.columns) == [c for c, _, _ in cols] and df.empty
    desc = cat.sql("DESCRIBE nodes").set_index("column_name")["column_type"]
    assert desc["feature_idx"] == "BIGINT" and desc["effect"] == "DOUBLE" and desc["in_circuit"] == "BOOLEAN"
    assert set(TABLES) >= {"models", "dictionaries", "features", "tasks", "examples", "runs", "circuits",
                           "nodes", "edges", "activations", "evaluations"}
    assert arrow_schema("examples").field("clean_tokens").type.value_type.equals(
        arrow_schema("tasks").field("name").type)


def test_run_is_invisible_until_committed_and_commit_is_idempotent(tmp_path):
    cat = catalog.init(tmp_path / "c")
    w = _task_run(cat, "r1")
    assert cat.sql("SELECT count(*) AS n FROM tasks").n[0] == 0  # still writing
    w.finish()
    assert cat.sql("SELECT count(*) AS n FROM tasks").n[0] == 0  # finished, not committed
    assert cat.commit("r1") is True
    assert cat.sql("SELECT count(*) AS n FROM tasks").n[0] == 1
    assert cat.commit("r1") is False
    assert cat.sql("SELECT count(*) AS n FROM runs").n[0] == 1


def test_killed_worker_leaves_nothing_and_cannot_be_committed(tmp_path):
    cat = catalog.init(tmp_path / "c")
    _task_run(cat, "crashed")  # no finish(): shards are .tmp, there is no manifest
    with pytest.raises(UserError, match="incomplete"):
        cat.commit("crashed")
    assert cat.sql("SELECT count(*) AS n FROM tasks").n[0] == 0


def test_dimension_rows_are_deduplicated_and_task_content_is_guarded(tmp_path):
    cat = catalog.init(tmp_path / "c")
    for r in ("a", "b"):
        _task_run(cat, r).finish()
        cat.commit(r)
    assert cat.sql("SELECT count(*) AS n FROM tasks").n[0] == 1
    _task_run(cat, "c", content_hash="other").finish()
    with pytest.raises(UserError, match="already in the catalogue"):
        cat.commit("c")
    assert cat.sql("SELECT content_hash FROM tasks").content_hash.tolist() == ["h1"]


@pytest.mark.parametrize("sql", ["DROP VIEW nodes", "CREATE TABLE x AS SELECT 1", "INSERT INTO nodes VALUES (1)",
                                 "COPY (SELECT 1) TO 'x.csv'", "ATTACH 'other.db'", "SET threads = 1",
                                 "SELECT 1; DELETE FROM tasks"])
def test_write_statements_are_refused(tmp_path, sql):
    cat = catalog.init(tmp_path / "c")
    with pytest.raises(UserError, match="read-only"):
        cat.sql(sql)
    assert not (tmp_path / "x.csv").exists()


def test_newer_catalogue_version_is_refused_unchanged(tmp_path):
    root = tmp_path / "c"
    catalog.init(root)
    con = duckdb.connect(str(root / "catalog.duckdb"))
    con.execute("UPDATE _catalog SET value = '99' WHERE key = 'schema_version'")
    con.close()
    before = (root / "catalog.duckdb").read_bytes()
    with pytest.raises(UserError, match="schema version 99"):
        catalog.open(root)
    assert (root / "catalog.duckdb").read_bytes() == before


def test_version_1_catalogue_is_migrated_keeping_its_data(tmp_path):
    """A catalogue written before the edit tables and named queries existed opens, gains them, and
    keeps its runs."""
    root = tmp_path / "c"
    cat = catalog.init(root)
    w = cat.new_run("run-old")
    w.write("tasks", [{"task_id": "t", "name": "t", "n_examples": 3}])
    w.finish()
    cat.commit("run-old")
    shutil.move(root / "runs" / f"_schema-v{SCHEMA_VERSION}", root / "runs" / "_schema-v1")  # what v1 wrote
    for table in ("edits", "edit_features"):
        (root / "runs" / "_schema-v1" / f"{table}.parquet").unlink()
    cat.close()  # this process holds the file read-only; let go before writing to it
    con = duckdb.connect(str(root / "catalog.duckdb"))
    con.execute("DROP VIEW edits")
    con.execute("DROP VIEW edit_features")
    for q in NAMED_QUERIES:
        con.execute(f"DROP MACRO {'' if q.scalar else 'TABLE '}{q.name}")
    con.execute("UPDATE _catalog SET value = '1' WHERE key = 'schema_version'")
    con.close()
    migrated = catalog.open(root)
    assert migrated.schema_version() == SCHEMA_VERSION
    assert migrated.sql("SELECT count(*) AS n FROM edits")["n"][0] == 0
    assert migrated.sql("SELECT * FROM diff_summary('a', 'b')").empty  # the named queries exist
    assert migrated.sql("SELECT task_id, n_examples FROM tasks").to_dict("records") == [{"task_id": "t",
                                                                                       "n_examples": 3}]
    assert catalog.open(root).schema_version() == SCHEMA_VERSION  # a second open has nothing to do


def test_missing_and_foreign_catalogues_are_refused(tmp_path):
    with pytest.raises(UserError, match="no catalogue"):
        catalog.open(tmp_path / "nowhere")
    (tmp_path / "f").mkdir()
    duckdb.connect(str(tmp_path / "f" / "catalog.duckdb")).close()
    with pytest.raises(UserError, match="not a circuit catalogue"):
        catalog.open(tmp_path / "f")


def test_outdated_named_queries_are_recreated_on_open(tmp_path):
    """The macros are code: a catalogue whose stored set differs from this tool's gets them anew."""
    root = tmp_path / "c"
    catalog.init(root)
    con = duckdb.connect(str(root / "catalog.duckdb"))
    con.execute("DROP MACRO TABLE node_diff")
    con.execute("UPDATE _catalog SET value = 'older' WHERE key = 'macros'")
    con.close()
    cat = catalog.open(root)
    assert cat.sql("SELECT * FROM node_diff('a', 'b')").empty
    assert cat.info()["macros"] != "older" and cat.schema_version() == SCHEMA_VERSION


def test_a_held_catalogue_sees_its_file_replaced(tmp_path):
    """The catalogue file's records are read once per version of the file; when the file is replaced
    (a migration elsewhere writes a copy and renames it into place), the next read sees the new one."""
    root = tmp_path / "c"
    cat = catalog.init(root)
    assert cat.info()["schema_version"] == str(SCHEMA_VERSION)
    copy = root / "copy.duckdb"
    shutil.copyfile(root / "catalog.duckdb", copy)
    con = duckdb.connect(str(copy))
    con.execute("INSERT INTO _catalog VALUES ('note', 'replaced')")
    con.close()
    os.replace(copy, root / "catalog.duckdb")
    assert cat.info()["note"] == "replaced"


def _count_circuits(root, q):
    q.put(int(catalog.open(root).sql("SELECT count(*) AS n FROM circuits").n[0]))


def test_a_forked_process_queries_the_catalogue(tmp_path):
    """The held DuckDB instance is closed before a fork (an instance must not cross one), so a
    forked child opens its own and the parent reopens on its next query."""
    import multiprocessing

    cat = catalog.init(tmp_path / "c")
    assert cat.sql("SELECT count(*) AS n FROM circuits").n[0] == 0
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_count_circuits, args=(tmp_path / "c", q))
    p.start()
    assert q.get(timeout=60) == 0
    p.join(timeout=60)
    assert p.exitcode == 0
    assert cat.sql("SELECT count(*) AS n FROM circuits").n[0] == 0
