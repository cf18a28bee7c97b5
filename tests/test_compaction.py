"""Compaction: small runs merged into packs, switched in atomically. Every query answers the same
before and after, readers and writers working through a compaction never see a half state or lose
a run, and a damaged pack is found and quarantined like a damaged run."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import time
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest
from conftest import run_cli

import catalog
from catalog import generations, integrity
from catalog.compaction import compact
from catalog.errors import UserError
from catalog.shards import MANIFEST
from catalog.staging import clean, staged_runs
from schema.tables import TABLES
from tests.synthetic import layered_circuit, write_circuit

DICTS = {(c, layer): f"d-{c}{layer}" for c, layer in
         [("embed", -1)] + [(c, i) for i in range(2) for c in ("attn", "mlp", "resid")]}


def _fill(cat, n: int, seed: int = 0, prefix: str = "c") -> list[str]:
    rng = np.random.default_rng(seed)
    ids = []
    for i in range(n):
        nodes, edges = layered_circuit(rng, 2, 6, 40, DICTS, 30)
        ids.append(write_circuit(cat, nodes, edges, task_id=f"task{i % 3}", circuit_id=f"{prefix}{i:03d}"))
    return ids


def _every_answer(query) -> dict[str, pd.DataFrame]:
    """Every table in full and the named queries, as a reader would ask them, sorted where unordered."""
    ids = query("SELECT list(circuit_id ORDER BY circuit_id) AS ids FROM circuits").ids[0]
    ids = [str(i) for i in ids]
    out = {t: query(f"SELECT * FROM {t} ORDER BY ALL") for t in TABLES}
    a, b = ids[0], ids[1]
    named = {"overlap": f"SELECT * FROM feature_overlap({ids})", "shared": f"SELECT * FROM shared_features({ids})",
             "node_diff": f"SELECT * FROM node_diff('{a}', '{b}')", "edge_diff": f"SELECT * FROM edge_diff('{a}', '{b}')",
             "summary": f"SELECT * FROM diff_summary('{a}', '{b}')", "paths": f"SELECT * FROM circuit_paths('{a}', 3)",
             "list": "SELECT * FROM circuit_list()"}
    for name, sql in named.items():
        out[name] = query(f"SELECT * FROM ({sql}) ORDER BY ALL")
    return out


def _same(a: dict[str, pd.DataFrame], b: dict[str, pd.DataFrame]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name], check_exact=False, rtol=1e-12, obj=name)


def _shards(root: Path) -> int:
    return sum(1 for _ in generations.current(root).glob("*/*.parquet"))


def test_compaction_keeps_every_answer_and_merges_the_shards(demo_catalog, tmp_path):
    root = tmp_path / "catalog"
    shutil.copytree(demo_catalog, root)  # a copy has a plain runs/ folder: the old layout, converted first
    assert not (root / "runs").is_symlink()
    cat = catalog.open(root)
    _fill(cat, 8)  # and small synthetic runs beside the demo's
    before, shards_before = _every_answer(cat.sql), _shards(root)
    runs_before = sorted(p.name for p in (root / "runs").iterdir() if p.is_dir())

    r = run_cli("compact", "--dry-run", "--format", "json", catalog=root)
    planned = json.loads(r.stdout)
    assert r.returncode == 0 and "nothing was changed" in r.stderr and len(planned) == 1, r.stderr
    assert not (root / "runs").is_symlink() and _shards(root) == shards_before
    r = run_cli("compact", "--target-size", "100M", "--format", "json", catalog=root)
    assert r.returncode == 0, r.stderr
    packs = json.loads(r.stdout)
    assert [{**p, "pack_id": "(new)"} for p in packs] == planned
    assert len(packs) == 1 and packs[0]["runs"] == len(runs_before) - 1  # all but the schema run
    assert "generation g-" in r.stderr and "Traceback" not in r.stderr
    assert (root / "runs").is_symlink()
    _same(before, _every_answer(cat.sql))
    assert _shards(root) < shards_before / 5
    # the catalogue file's own views (any DuckDB client) read the new generation too
    con = duckdb.connect(str(root / "catalog.duckdb"), read_only=True)
    con.execute(f"SET file_search_path = '{root}'")
    _same(before, _every_answer(lambda q: con.execute(q).df()))
    con.close()

    # every run is still committed (a marker names its pack): a repeated commit changes nothing
    assert sorted(p.name for p in (root / "runs").iterdir() if p.is_dir()) == sorted([*runs_before, packs[0]["pack_id"]])
    marker = json.loads((root / "runs" / runs_before[-1] / MANIFEST).read_text())
    assert marker["packed_into"] == packs[0]["pack_id"] and marker["tables"] == {}
    check = run_cli("check", catalog=root)
    assert check.returncode == 0 and "(1 packs)" in check.stderr and "0 damaged" in check.stderr, check.stderr

    # commits go on into the new generation; a second compaction packs the new runs with the pack
    new = _fill(cat, 3, seed=1, prefix="n")
    assert set(new) <= set(cat.sql("SELECT circuit_id FROM circuits").circuit_id)
    before = _every_answer(cat.sql)
    r = run_cli("compact", "--target-size", "100M", catalog=root)
    assert r.returncode == 0 and "packed" in r.stderr, r.stderr
    _same(before, _every_answer(cat.sql))
    assert len(generations.listed(root)) == 2  # the current one and the one just retired

    r = run_cli("compact", "--target-size", "100M", catalog=root)
    assert r.returncode == 0 and "nothing to compact" in r.stderr, r.stderr


def test_a_repeated_commit_of_a_packed_run_is_a_no_op(tmp_path):
    cat = catalog.init(tmp_path / "catalog")
    _fill(cat, 3)
    run_id = cat.sql("SELECT run_id FROM circuits WHERE circuit_id = 'c000'").run_id[0]
    compact(cat, progress=False)
    rng = np.random.default_rng(0)
    nodes, edges = layered_circuit(rng, 2, 6, 40, DICTS, 30)
    w = cat.new_run(run_id)  # the same run written again, as a job re-run after its worker died would
    w.write("runs", [{"run_id": run_id, "kind": "synthetic", "status": "ok"}])
    w.finish()
    assert cat.commit(run_id) is False
    assert cat.sql("SELECT count(*) AS n FROM runs WHERE run_id = ?", [run_id]).n[0] == 1


def _reader(root: str, stop, counts, done) -> None:
    """Query without pause: every circuit whole (its edges all there, once), no circuit twice. `done`
    counts the queries as they finish (the test waits on it: a slow machine must not cut the reads short)."""
    cat = catalog.open(root)
    bad = ("SELECT count(*) AS n FROM circuits c LEFT JOIN (SELECT circuit_id, count(*) AS e FROM edges GROUP BY 1) "
           "USING (circuit_id) WHERE coalesce(e, 0) != c.n_edges")
    queries = errors = half = 0
    seen = 0
    while not stop.is_set():
        try:
            n = cat.sql("SELECT count(*) AS n, count(DISTINCT circuit_id) AS d FROM circuits")
            if n.n[0] != n.d[0] or cat.sql(bad).n[0] or n.n[0] < seen:
                half += 1
            seen = max(seen, int(n.n[0]))
            queries += 1
            done.value += 1
        except Exception:  # noqa: BLE001  (counted: the test wants none)
            errors += 1
    counts.put((queries, errors, half))


def _writer(root: str, n: int) -> None:
    _fill(catalog.open(root), n, seed=7, prefix="w")


def test_readers_and_writers_never_see_a_half_state_through_compactions(tmp_path):
    root = tmp_path / "catalog"
    cat = catalog.init(root)
    _fill(cat, 12)
    ctx = mp.get_context("spawn")
    stop, counts, done = ctx.Event(), ctx.Queue(), ctx.Value("i", 0)
    reader = ctx.Process(target=_reader, args=(str(root), stop, counts, done))
    writer = ctx.Process(target=_writer, args=(str(root), 30))
    reader.start()
    started = time.monotonic()
    while done.value == 0 and time.monotonic() - started < 120:  # the reader is reading before anything moves
        time.sleep(0.05)
    writer.start()
    switches = 0
    while reader.is_alive() and (writer.is_alive() or switches < 3 or done.value <= 20):
        if compact(cat, target_bytes=1 << 20, progress=False).packs:
            switches += 1
    writer.join()
    compact(cat, target_bytes=1 << 20, progress=False)
    stop.set()
    queries, errors, half = counts.get(timeout=60)
    reader.join()
    assert writer.exitcode == 0 and switches >= 3
    assert (queries > 20, errors, half) == (True, 0, 0)
    ids = cat.sql("SELECT circuit_id FROM circuits").circuit_id
    assert len(ids) == len(set(ids)) == 42  # none lost, none twice
    assert integrity.check(root).damage == []


def test_a_damaged_pack_is_named_and_quarantined_with_its_runs(tmp_path):
    root = tmp_path / "catalog"
    cat = catalog.init(root)
    _fill(cat, 4)
    packed_run = cat.sql("SELECT run_id FROM circuits WHERE circuit_id = 'c000'").run_id[0]
    pack = compact(cat, progress=False).packs[0]["pack_id"]
    kept = _fill(cat, 2, seed=3, prefix="k")
    query = "SELECT circuit_id, count(*) AS n, sum(weight) AS w FROM edges GROUP BY ALL ORDER BY ALL"
    reference = cat.sql(query)
    shard = root / "runs" / pack / "edges.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    r = run_cli("check", "--format", "json", catalog=root)
    assert r.returncode == 1 and [d["run_id"] for d in json.loads(r.stdout)] == [pack], r.stdout
    r = run_cli("check", "--quarantine", catalog=root)
    assert r.returncode == 1 and "1 moved to" in r.stderr
    assert (root / "quarantine" / pack).is_dir() and run_cli("check", catalog=root).returncode == 0
    assert cat.sql(query).equals(reference[reference.circuit_id.isin(kept)].reset_index(drop=True))
    # its runs are no longer committed, so they can be written again (a job's rerun keeps its run id)
    assert not (root / "runs" / packed_run).exists()
    w = cat.new_run(packed_run)
    w.write("runs", [{"run_id": packed_run, "kind": "synthetic", "status": "ok"}])
    w.finish()
    assert cat.commit(packed_run) is True

    # a marker whose pack went missing is damage too, named by its run
    pack = compact(cat, progress=False).packs[0]["pack_id"]
    shutil.rmtree(root / "runs" / pack)
    r = run_cli("check", catalog=root)
    assert r.returncode == 1 and f"its pack {pack} is missing" in r.stdout


def test_compaction_refuses_damaged_runs_and_changes_nothing(tmp_path):
    root = tmp_path / "catalog"
    cat = catalog.init(root)
    _fill(cat, 3)
    run_id = cat.sql("SELECT run_id FROM circuits WHERE circuit_id = 'c001'").run_id[0]
    shard = root / "runs" / run_id / "nodes.parquet"
    shard.write_bytes(shard.read_bytes()[:100])
    link = os.readlink(root / "runs")
    r = run_cli("compact", catalog=root)
    assert r.returncode == 1 and run_id in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert os.readlink(root / "runs") == link and [p.name for p in generations.listed(root)] == ["g-000000"]
    assert staged_runs(root) == []


def test_a_compaction_killed_before_its_switch_leaves_the_catalogue_as_it_was(tmp_path, monkeypatch):
    root = tmp_path / "catalog"
    cat = catalog.init(root)
    _fill(cat, 4)
    before = _every_answer(cat.sql)

    def killed(*args):
        raise KeyboardInterrupt  # what a Ctrl-C between assembling and switching looks like

    monkeypatch.setattr(generations, "switch", killed)
    with pytest.raises(KeyboardInterrupt):
        compact(cat, progress=False)
    monkeypatch.undo()
    _same(before, _every_answer(cat.sql))
    assert staged_runs(root) == []  # its pack was dropped
    # a worker's kill leaves the pack staged: cleaning removes it, never commits it
    w = cat.new_run("pack-left-over")
    w.write("runs", [{"run_id": "x", "kind": "synthetic", "status": "ok"}])
    w.finish(contains=["x"])
    w.release()
    with pytest.raises(UserError, match="pack of an unfinished compaction"):
        cat.commit("pack-left-over")
    assert [(r.run_id, a) for r, a in clean(cat)] == [("pack-left-over", "removed")]
    # the half-built generation it left is removed by the next compaction, which works
    assert compact(cat, progress=False).packs
    assert sorted(p.name for p in (root / "generations").iterdir()) == ["g-000000", "g-000002"]
    _same(before, _every_answer(cat.sql))


def test_a_second_compaction_at_once_is_refused(tmp_path):
    from catalog.compaction import _compaction_lock

    cat = catalog.init(tmp_path / "catalog")
    _fill(cat, 2)
    with _compaction_lock(cat.root), pytest.raises(UserError, match="another compaction"):
        compact(cat, progress=False)


def test_compaction_through_a_relative_path_keeps_the_generation_it_retired(tmp_path):
    cat = catalog.init(tmp_path / "catalog")
    _fill(cat, 3)
    for seed in (1, 2):
        r = run_cli("compact", catalog=Path("catalog"), cwd=tmp_path)
        assert r.returncode == 0 and "packed" in r.stderr, r.stderr
        _fill(cat, 2, seed=seed, prefix=f"s{seed}")
    assert [p.name for p in generations.listed(tmp_path / "catalog")] == ["g-000001", "g-000002"]
    assert cat.sql("SELECT count(*) AS n FROM circuits").n[0] == 7


def test_a_query_reading_across_compactions_finishes_on_its_generation(tmp_path):
    root = tmp_path / "catalog"
    cat = catalog.init(root)
    rng = np.random.default_rng(5)
    for i in range(3):
        nodes, edges = layered_circuit(rng, 2, 30, 3000, DICTS, 100)
        write_circuit(cat, nodes, edges, circuit_id=f"big{i}")
    expected = cat.sql("SELECT count(*) AS n, sum(weight) AS w FROM edges").iloc[0]
    first = generations.current(root)
    chunks = cat.chunks("SELECT weight FROM edges", vectors=1)  # 2,048 rows a chunk, read slowly
    read = [next(chunks)]
    for seed in (1, 2, 3):  # three compactions while it reads: its generation is not removed under it
        _fill(cat, 2, seed=seed, prefix=f"s{seed}")
        assert compact(cat, progress=False).packs
    assert first.is_dir() and generations.current(root) != first
    read += list(chunks)
    weights = pd.concat(read).weight
    assert (len(weights), weights.sum()) == pytest.approx((expected.n, expected.w))
    _fill(cat, 2, seed=4, prefix="s4")
    compact(cat, progress=False)  # nobody reads it now
    assert not first.exists() and len(generations.listed(root)) == 2
