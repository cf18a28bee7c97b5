"""Integrity: a damaged shard (truncated, deleted, corrupted) is found by `cli.py check`, named with its
run, and quarantined, and the other runs' query results stay as they were."""

import json
import shutil

import pytest

import catalog
from catalog.errors import PartialAnswer
from catalog.shards import MANIFEST
from tests.conftest import run_cli


def test_check_names_and_quarantines_each_damaged_shard(demo_catalog, tmp_path):
    root = tmp_path / "catalog"
    shutil.copytree(demo_catalog, root)
    r = run_cli("check", catalog=root)
    assert r.returncode == 0 and "0 damaged" in r.stderr, r.stderr
    cat = catalog.open(root)
    circuits = cat.sql("SELECT circuit_id, run_id FROM circuits ORDER BY created_at")
    (a, ra), (b, rb), (c, rc) = list(circuits.itertuples(index=False, name=None))[:3]  # three runs
    kept = [str(x) for x in circuits.circuit_id if x not in (a, b, c)]
    nodes, edges = root / "runs" / ra / "nodes.parquet", root / "runs" / rb / "edges.parquet"
    nodes.write_bytes(nodes.read_bytes()[: nodes.stat().st_size // 2])  # truncated
    edges.unlink()  # deleted
    circuits_shard = root / "runs" / rc / "circuits.parquet"
    data = bytearray(circuits_shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte flipped: same size, other content
    circuits_shard.write_bytes(bytes(data))
    manifest = json.loads((root / "runs" / rc / MANIFEST).read_text())
    assert manifest["tables"]["circuits"]["bytes"] == len(data)

    damaged = {ra: "nodes.parquet", rb: "edges.parquet", rc: "circuits.parquet"}
    r = run_cli("check", "--format", "json", catalog=root)
    assert r.returncode == 1 and "3 damaged in 3 runs" in r.stderr and "Traceback" not in r.stderr
    found = {d["run_id"]: (d["shard"], d["problem"]) for d in json.loads(r.stdout)}
    assert {k: v[0] for k, v in found.items()} == damaged
    assert "bytes" in found[ra][1] and found[rb][1] == "missing" and "checksum" in found[rc][1]

    # a query never reads a damaged shard: the damaged runs are left out whole, named in one line, and the
    # answer is marked partial (exit 3); --strict refuses it
    count = "SELECT count(*) AS n FROM circuits"
    r = run_cli("query", count, "--format", "csv", catalog=root)
    assert r.returncode == 3 and r.stdout == f"n\n{len(kept)}\n", (r.stdout, r.stderr)
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("warning: partial answer: 3 run(s)") and all(x in line for x in (ra, rb, rc)), line
    assert "nodes.parquet: 12" in line and "edges.parquet: missing" in line and "circuits.parquet: its content" in line
    r = run_cli("query", count, "--strict", catalog=root)
    assert r.returncode == 1 and r.stderr.startswith("error: refused (strict): 3 run(s)") and r.stdout == ""
    query = "SELECT circuit_id, count(*) AS n, sum(effect) AS s FROM nodes WHERE list_contains(?, circuit_id) " \
            "GROUP BY ALL ORDER BY circuit_id"
    reference = catalog.open(demo_catalog).sql(query, [kept])
    with pytest.warns(PartialAnswer, match=rc):
        assert cat.sql(query, [kept]).equals(reference)  # the rest, exactly
    r = run_cli("check", "--quarantine", catalog=root)
    assert r.returncode == 1 and "3 moved to" in r.stderr
    assert sorted(p.name for p in (root / "quarantine").iterdir()) == sorted(damaged)
    assert run_cli("check", catalog=root).returncode == 0  # what is left is whole
    assert cat.sql(query, [kept]).equals(reference)  # and queries over it answer as before
