"""Mirrors: committed runs pushed to object storage (fsspec's in-memory store, which has no rename and no
lock, and a plain folder) and pulled into other catalogues: the same rows, every shard checked, and a
mirror treated as untrusted input."""

import json
import logging
import shutil

import pytest

import catalog
from catalog.shards import MANIFEST
from tests.conftest import run_cli

ROWS = {  # every table's rows in a stable order (run ids kept: a pulled run is the same run)
    "circuits": "SELECT * EXCLUDE (created_at) FROM circuits ORDER BY circuit_id",
    "nodes": "SELECT * FROM nodes ORDER BY circuit_id, node_idx",
    "edges": "SELECT * FROM edges ORDER BY ALL",
    "runs": "SELECT run_id, kind, status FROM runs ORDER BY run_id",
    "examples": "SELECT * FROM examples ORDER BY task_id, example_idx",
}


def _same_rows(a, b) -> None:
    for table, sql in ROWS.items():
        x, y = catalog.open(a).sql(sql), catalog.open(b).sql(sql)
        assert len(x) > 0 and x.equals(y), table


def _lines(r) -> list[str]:
    return [ln for ln in r.stderr.splitlines() if ln.strip()]


def test_push_and_pull_through_object_storage_give_the_same_rows_and_repeat_as_no_ops(demo_catalog, tmp_path):
    url = f"memory://{tmp_path.name}/mirror"
    runs = sorted(p.name for p in (demo_catalog / "runs").iterdir() if p.is_dir() and p.name[0] not in "_.")
    r = run_cli("push", url, "--format", "json", catalog=demo_catalog)
    assert r.returncode == 0, r.stderr
    pushed = json.loads(r.stdout)
    assert sorted(t["run_id"] for t in pushed) == runs and {t["status"] for t in pushed} == {"pushed"}
    assert f"{len(runs)} runs pushed" in r.stderr

    copy = tmp_path / "copy"
    r = run_cli("pull", url, catalog=copy)
    assert r.returncode == 0 and f"{len(runs)} runs pulled" in r.stderr, r.stderr
    _same_rows(demo_catalog, copy)
    assert run_cli("check", catalog=copy).returncode == 0
    # again: nothing moves either way
    assert f"0 runs pushed (0 bytes), {len(runs)} already there" in run_cli("push", url, catalog=demo_catalog).stderr
    assert f"0 runs pulled (0 bytes), {len(runs)} already there" in run_cli("pull", url, catalog=copy).stderr
    assert not list((copy / "staging").glob("run-*"))  # nothing left staged


def test_a_pack_travels_with_its_runs_and_never_lands_twice(demo_catalog, tmp_path):
    packed = tmp_path / "packed"
    shutil.copytree(demo_catalog, packed, symlinks=True)
    assert run_cli("compact", catalog=packed).returncode == 0
    mirror = tmp_path / "mirror"  # a plain folder works as a mirror too
    r = run_cli("push", str(mirror), "--format", "json", catalog=packed)
    (pack,) = json.loads(r.stdout)
    assert r.returncode == 0 and pack["run_id"].startswith("pack-") and pack["status"] == "pushed"

    fresh = tmp_path / "fresh"
    assert run_cli("pull", str(mirror), catalog=fresh).returncode == 0
    _same_rows(demo_catalog, fresh)
    r = run_cli("check", catalog=fresh)
    assert r.returncode == 0 and "(1 packs)" in r.stderr
    # the runs it packs are committed there: committing one again (from another mirror) changes nothing
    unpacked = f"memory://{tmp_path.name}/unpacked"
    assert run_cli("push", unpacked, catalog=demo_catalog).returncode == 0
    r = run_cli("pull", unpacked, catalog=fresh)
    assert r.returncode == 0 and "0 runs pulled" in r.stderr, r.stderr
    _same_rows(demo_catalog, fresh)

    # into a catalogue that has those runs unpacked, the pack would count them twice: refused, named
    plain = tmp_path / "plain"
    shutil.copytree(demo_catalog, plain, symlinks=True)
    r = run_cli("pull", str(mirror), "--format", "json", catalog=plain)
    (refused,) = json.loads(r.stdout)
    assert r.returncode == 1 and refused["status"] == "refused" and "already" in refused["reason"]
    _same_rows(demo_catalog, plain)
    # and a push from the unpacked catalogue knows its runs are in the mirror's pack
    assert "0 runs pushed (0 bytes)" in run_cli("push", str(mirror), catalog=plain).stderr


def test_two_machines_pushing_at_once_leave_one_mirror_of_whole_runs(demo_catalog, tmp_path):
    """Two catalogues push into one mirror at the same moment, as two processes (one holds every run, the
    other a copy that shares half of them): no collision, and a pull gets every run whole."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    other = tmp_path / "other"
    shutil.copytree(demo_catalog, other, symlinks=True)
    runs = sorted(p for p in (other / "runs").iterdir() if p.is_dir() and p.name[0] not in "_.")
    for p in runs[::2]:  # the other machine holds half of the runs
        shutil.rmtree(p)
    mirror = tmp_path / "mirror"
    pushes = [subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "--catalog", str(c), "push", str(mirror)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for c in (demo_catalog, other)]
    for p in pushes:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    copy = tmp_path / "copy"
    assert run_cli("pull", str(mirror), catalog=copy).returncode == 0
    _same_rows(demo_catalog, copy)
    assert run_cli("check", catalog=copy).returncode == 0


def _damage(manifest: dict, shard_dir, how: str) -> None:
    """Damage one run in a folder mirror, as a broken upload or an attacker might."""
    nodes = manifest["tables"]["nodes"]
    obj = shard_dir / f"{nodes['sha256']}.parquet"
    if how == "flipped byte":
        data = bytearray(obj.read_bytes())
        data[len(data) // 2] ^= 0xFF
        obj.write_bytes(bytes(data))
    elif how == "truncated":
        obj.write_bytes(obj.read_bytes()[:100])
    elif how == "missing":
        obj.unlink()
    elif how == "path in a file name":
        nodes["file"] = "../../../escaped.parquet"
    elif how == "newer schema":
        manifest["schema_version"] += 1
    elif how == "not a manifest":
        manifest.clear()
    elif how == "a pack of itself":
        manifest["contains"] = [manifest["run_id"]]
    (shard_dir / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("how,says", [
    ("flipped byte", "differs from the manifest's checksum"),
    ("truncated", "bytes in the mirror"),
    ("missing", "missing from the mirror"),
    ("path in a file name", "not a shard this tool writes"),
    ("newer schema", "newer than this tool's"),
    ("not a manifest", "not a committed run's manifest"),
    ("a pack of itself", "not a list of other runs' ids"),
])
def test_a_damaged_or_hostile_run_in_a_mirror_is_named_and_left_out(demo_catalog, tmp_path, how, says):
    mirror = tmp_path / "mirror"
    assert run_cli("push", str(mirror), catalog=demo_catalog).returncode == 0
    victim = catalog.open(demo_catalog).sql("SELECT run_id FROM circuits ORDER BY run_id LIMIT 1").run_id[0]
    shard_dir = mirror / "runs" / victim
    _damage(json.loads((shard_dir / MANIFEST).read_text()), shard_dir, how)

    copy = tmp_path / "copy"
    r = run_cli("pull", str(mirror), "--format", "json", catalog=copy)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    refused = [t for t in json.loads(r.stdout) if t["status"] != "pulled"]
    assert [(t["run_id"], t["status"]) for t in refused] == [(victim, "refused")] and says in refused[0]["reason"]
    assert "1 refused" in _lines(r)[-1]
    assert not (copy / "runs" / victim).exists() and not list((copy / "staging").glob("run-*"))
    assert not (tmp_path / "escaped.parquet").exists() and not (copy.parent / "escaped.parquet").exists()
    count = "SELECT count(*) AS n FROM nodes JOIN circuits USING (circuit_id) WHERE run_id <> ?"
    assert catalog.open(copy).sql(count, [victim]).n[0] == catalog.open(demo_catalog).sql(count, [victim]).n[0] > 0
    assert catalog.open(copy).sql("SELECT count(*) AS n FROM circuits WHERE run_id = ?", [victim]).n[0] == 0


def test_a_damaged_local_run_is_not_pushed(demo_catalog, tmp_path):
    root = tmp_path / "catalog"
    shutil.copytree(demo_catalog, root, symlinks=True)
    victim = catalog.open(root).sql("SELECT run_id FROM circuits ORDER BY run_id LIMIT 1").run_id[0]
    shard = root / "runs" / victim / "edges.parquet"
    shard.write_bytes(shard.read_bytes()[:-10])
    r = run_cli("push", str(tmp_path / "mirror"), "--format", "csv", catalog=root)
    assert r.returncode == 1 and f"{victim},refused" in r.stdout and "cli.py check" in r.stdout
    assert not (tmp_path / "mirror" / "runs" / victim).exists()


@pytest.mark.parametrize("url,says", [
    ("nope://bucket/x", "nope"),
    ("gs://bucket/catalog", "gcsfs"),  # a store whose package is not installed: fsspec names it
    ("no_such_mirror", "holds no runs"),
])
def test_a_mirror_that_cannot_be_used_is_one_line_and_creates_nothing(tmp_path, url, says):
    r = run_cli("pull", url, catalog=tmp_path / "new", cwd=tmp_path)
    assert r.returncode == 1 and len(_lines(r)) == 1 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "new").exists()


def test_a_catalogue_is_not_its_own_mirror(demo_catalog):
    for url in (str(demo_catalog), str(demo_catalog / "sub")):
        r = run_cli("push", url, catalog=demo_catalog)
        assert r.returncode == 1 and "the catalogue itself" in r.stderr


def test_the_readme_mirror_commands_run_as_written(tmp_path, dicts):
    from tests.conftest import run_readme_commands
    from tests.docs import page, section

    outputs = run_readme_commands("node1", section(page("sweeps.md"), "Mirrors"), tmp_path)
    assert [ln.split()[:2] for ln in outputs[-1].stdout.splitlines() if ln.split()[:1] in (["ioi"], ["sva_simple"])] \
        == [["ioi", "atp"], ["sva_simple", "atp"]]
    for node in ("node1", "node2"):  # each node's circuits, pulled whole
        ids = list(catalog.open(tmp_path / node).sql("SELECT circuit_id FROM circuits").circuit_id)
        q = "SELECT * FROM nodes WHERE list_contains(?, circuit_id) ORDER BY circuit_id, node_idx"
        mine, pulled = catalog.open(tmp_path / node).sql(q, [ids]), catalog.open(tmp_path / "lab").sql(q, [ids])
        assert len(ids) == 1 and len(mine) > 0 and mine.equals(pulled)


@pytest.fixture
def s3(monkeypatch):
    """A local S3 endpoint (moto's server: S3's own protocol, no rename, no lock) with an empty bucket,
    reached the way a user reaches theirs: fsspec's environment configuration and AWS credentials."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # not a line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for key, value in {"FSSPEC_S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    import fsspec.config  # read the environment again, as a new process does (the suite's CLI runs in-process)

    monkeypatch.setattr(fsspec.config, "conf", {})
    fsspec.config.set_conf_env(fsspec.config.conf)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="lab")
    yield boto3.client("s3", endpoint_url=endpoint)
    server.stop()


def test_push_and_pull_through_s3(demo_catalog, tmp_path, s3):
    """The commands against S3's protocol (the first as a user runs it, a process of its own)."""
    url = "s3://lab/circuits"
    r = run_cli("push", url, catalog=demo_catalog, separate=True)
    assert r.returncode == 0 and "0 refused" in r.stderr, r.stderr
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="lab", Prefix="circuits/runs/")["Contents"]]
    runs = {k.split("/")[2] for k in keys}
    assert len(runs) == len([p for p in (demo_catalog / "runs").iterdir() if p.is_dir() and p.name[0] not in "_."])
    assert all(k.endswith((".parquet", MANIFEST)) for k in keys)
    copy = tmp_path / "copy"
    r = run_cli("pull", url, catalog=copy)
    assert r.returncode == 0 and f"{len(runs)} runs pulled" in r.stderr, r.stderr
    _same_rows(demo_catalog, copy)
    # a run whose upload was cut off before its manifest is not in the mirror
    s3.delete_object(Bucket="lab", Key=next(k for k in keys if k.endswith(MANIFEST)))
    r = run_cli("pull", url, "--format", "csv", catalog=tmp_path / "other")
    assert r.returncode == 0 and f"{len(runs) - 1} runs pulled" in r.stderr, r.stderr
    # a bucket that is not there: one line that names the mirror, nothing written
    r = run_cli("push", "s3://no-such-bucket/circuits", catalog=demo_catalog)
    assert r.returncode == 1 and len(_lines(r)) == 1 and "mirror s3://no-such-bucket/circuits" in r.stderr, r.stderr
    r = run_cli("pull", "s3://no-such-bucket/circuits", catalog=tmp_path / "none")
    assert r.returncode == 1 and len(_lines(r)) == 1 and "holds no runs" in r.stderr, r.stderr
    assert not (tmp_path / "none").exists()
