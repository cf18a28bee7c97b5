"""Runs under faults: terminated and killed workers, concurrent workers, commits that fail,
and `cli.py staging`, which lists what workers left and cleans it up."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, run_cli

import catalog
from catalog.errors import UserError
from catalog.shards import OWNER_SUFFIX
from catalog.staging import clean, staged_runs
from schema.tables import TABLES


def _committed(cat: Path) -> dict[str, str]:
    return {str(p.relative_to(cat)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((cat / "runs").rglob("*")) if p.is_file()}


def _staging(cat: Path) -> list[str]:
    return sorted(p.name for p in (cat / "staging").iterdir() if p.name != ".commit.lock")


def _task_file(path: Path, verb: str = "runs", n: int = 12) -> Path:
    from compute.models import grammar

    rows = [{"clean_prefix": f"the {s}", "patch_prefix": f"the {p}", "clean_answer": f" {verb}",
             "patch_answer": " run"} for s, p in grammar.NOUNS[:n]]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _interruptible() -> None:
    """In the worker before it starts: SIGINT's default action, as a worker started from a terminal has. A
    suite run as a shell's background job (`.ci/run &`) inherits SIGINT ignored, and Python then leaves it
    ignored, so Ctrl-C could not reach the worker whatever the CLI does."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _discover(cat: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "--catalog", str(cat), "discover", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            preexec_fn=_interruptible)


def _staged(cat: Path, marker: str) -> bool:
    """Whether a staged run holds a file matching `marker` (`*`: the run's folder exists;
    `*.parquet.tmp`: it is writing its shards, at the end of the job)."""
    return bool(list((cat / "staging").glob(f"run-*/{marker}" if marker != "*" else "run-*/")))


def _wait_for_a_staged_run(cat: Path, proc: subprocess.Popen, marker: str = "*") -> None:
    """Until the worker's staged run holds a file matching `marker`."""
    deadline = time.monotonic() + 120
    while not _staged(cat, marker):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.002)


def _worker_stopped_while_staged(tmp_path: Path, marker: str, attempts: int = 5):
    """(catalogue, its committed files before, the process) of a discovery worker frozen by SIGSTOP while
    its staged run holds `marker`. A signal sent to it then acts on a run in progress, never on one that
    committed while this process was slow to notice the marker (under load the run's last second can
    pass unseen); a worker found past the marker is let finish and another started."""
    for attempt in range(attempts):
        cat = tmp_path / f"cat{attempt}"
        catalog.init(cat)
        before = _committed(cat)
        proc = _discover(cat, "--task", "sva_simple")
        _wait_for_a_staged_run(cat, proc, marker)
        proc.send_signal(signal.SIGSTOP)
        if _staged(cat, marker):
            return cat, before, proc
        proc.send_signal(signal.SIGCONT)
        proc.communicate(timeout=120)
    pytest.fail(f"no worker was caught with a staged run holding {marker!r} in {attempts} tries")


def _keys_unique(cat) -> dict[str, int]:
    """Rows beyond the first of each primary key, per table."""
    dup = {}
    for name, t in TABLES.items():
        keys = ", ".join(c.name for c in t.primary_key.columns)
        dup[name] = int(cat.sql(f"SELECT coalesce(sum(n - 1), 0) AS d FROM (SELECT {keys}, count(*) AS n "
                                f"FROM {name} GROUP BY ALL)").d[0])
    return dup


@pytest.mark.parametrize("sig,marker", [(signal.SIGTERM, "*.parquet.tmp"), (signal.SIGINT, "*")])
def test_a_stopped_worker_removes_what_it_staged(tmp_path, dicts, sig, marker):
    cat, before, proc = _worker_stopped_while_staged(tmp_path, marker)
    proc.send_signal(sig)
    proc.send_signal(signal.SIGCONT)  # the signal acts as the worker resumes, in the middle of its run
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == (143 if sig == signal.SIGTERM else 130), err
    assert "nothing partial was committed" in err and "Traceback" not in err
    assert _staging(cat) == [] and _committed(cat) == before
    assert staged_runs(cat) == []


@pytest.mark.parametrize("marker", ["*", "*.parquet.tmp"])  # as soon as it stages, and while it writes shards
def test_a_killed_worker_leaves_a_stale_run_that_staging_lists_and_cleans(tmp_path, dicts, marker):
    cat, before, proc = _worker_stopped_while_staged(tmp_path, marker)
    proc.kill()
    proc.communicate(timeout=60)
    (run,) = staged_runs(cat)
    assert run.stale and run.state in ("incomplete", "complete") and "pid" in run.owner
    r = run_cli("staging", "--format", "json", catalog=cat)
    assert r.returncode == 0 and json.loads(r.stdout)[0]["run_id"] == run.run_id
    r = run_cli("staging", "--clean", "--discard", catalog=cat)
    assert r.returncode == 0 and run.run_id in r.stdout and "removed" in r.stdout, r.stdout
    assert _staging(cat) == [] and _committed(cat) == before
    r = run_cli("staging", catalog=cat)
    assert r.stdout.strip() == "staging/ is empty"


def _stage(cat: catalog.Catalog, run_id: str, finish: bool = True, task_hash: str = "h1"):
    w = cat.new_run(run_id)
    w.write("tasks", [{"task_id": "t", "name": "t", "content_hash": task_hash, "n_examples": 1}])
    w.write("runs", [{"run_id": run_id, "kind": "test", "status": "ok"}])
    if finish:
        w.finish()
    return w


def _die(w) -> None:
    """What the operating system does to a killed worker: its lock goes, its files stay."""
    w._owner._file.close()


def test_clean_commits_finished_runs_removes_broken_ones_and_leaves_live_ones(tmp_path):
    cat = catalog.init(tmp_path / "c")
    _die(_stage(cat, "finished"))
    _die(_stage(cat, "unfinished", finish=False))
    _die(_stage(cat, "clashing", task_hash="other-content"))  # its task clashes once 'finished' is in
    live = _stage(cat, "live", finish=False)
    states = {r.run_id: r.state for r in staged_runs(cat.root)}
    assert states == {"finished": "complete", "unfinished": "incomplete", "clashing": "complete", "live": "writing"}
    done = {r.run_id: action for r, action in clean(cat)}
    assert done["finished"] == "committed" and done["unfinished"] == "removed"
    assert done["clashing"].startswith("removed (task 't' is already in the catalogue")
    assert "live" not in done and [r.run_id for r in staged_runs(cat.root)] == ["live"]
    assert cat.sql("SELECT run_id FROM runs").run_id.tolist() == ["finished"]
    live.abort()
    assert staged_runs(cat.root) == [] and not list((cat.root / "staging").glob(f"*{OWNER_SUFFIX}"))


def test_a_commit_that_fails_leaves_no_staging_and_records_a_failed_run(tmp_path, zoo, dicts, monkeypatch):
    from compute.attribution.discovery import DiscoveryParams
    from compute.jobs.discovery_job import discovery_job

    cat = catalog.init(tmp_path / "c")
    real, calls = cat.commit, []

    def broken(run_id):  # the discovery's own commit fails; recording the failure works
        calls.append(run_id)
        if len(calls) == 1:
            raise UserError(f"run {run_id}: shard nodes.parquet is missing or damaged; nothing was committed")
        return real(run_id)

    monkeypatch.setattr(cat, "commit", broken)
    with pytest.raises(UserError, match="damaged"):
        discovery_job(cat, zoo.handle, dicts, zoo.tasks["sva_simple"], DiscoveryParams(n_examples=4, ablations=()),
                      progress=False)
    monkeypatch.undo()
    assert _staging(cat.root) == []
    failed = cat.sql("SELECT status, error FROM runs")
    assert failed.status.tolist() == ["failed"] and "damaged" in failed.error[0]
    assert cat.sql("SELECT count(*) AS n FROM circuits").n[0] == 0


def test_a_task_name_clash_is_refused_before_discovery(tmp_path, dicts):
    cat = tmp_path / "cat"
    first = _task_file(tmp_path / "agreement.jsonl")
    assert run_cli("discover", "--task-file", str(first), "--no-eval", "--examples", "4", catalog=cat).returncode == 0
    other = _task_file(tmp_path / "other" / "agreement.jsonl", verb="sleeps")
    before = _committed(cat)
    r = run_cli("discover", "--task-file", str(other), catalog=cat)
    assert r.returncode == 1 and "task 'agreement' is already in the catalogue" in r.stderr
    assert "zoo model" not in r.stderr  # refused before the model was even loaded
    assert _committed(cat) == before and _staging(cat) == []


def test_two_discoveries_of_one_new_task_at_once_both_land_with_unique_keys(tmp_path, dicts):
    cat = tmp_path / "cat"
    catalog.init(cat)
    task = _task_file(tmp_path / "agreement.jsonl")
    procs = [_discover(cat, "--task-file", str(task), "--no-eval", "--examples", "8") for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    c = catalog.open(cat)
    assert c.sql("SELECT count(*) AS n FROM circuits").n[0] == 2
    assert _keys_unique(c) == dict.fromkeys(TABLES, 0)
    both = c.sql("SELECT count(DISTINCT run_id) AS runs FROM runs WHERE status = 'ok'").runs[0]
    assert both == 2 and _staging(cat) == []


def test_one_name_two_contents_at_once_one_lands_and_one_is_refused(tmp_path, dicts):
    cat = tmp_path / "cat"
    catalog.init(cat)
    a = _task_file(tmp_path / "a" / "agreement.jsonl")
    b = _task_file(tmp_path / "b" / "agreement.jsonl", verb="sleeps")
    procs = [_discover(cat, "--task-file", str(f), "--no-eval", "--examples", "8") for f in (a, b)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    results = [(p.returncode, err) for p, err in zip(procs, errs, strict=True)]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    refused = next(err for code, err in results if code == 1)
    assert "already in the catalogue" in refused and "Traceback" not in refused
    c = catalog.open(cat)
    answers = set(c.sql("SELECT DISTINCT clean_answer FROM examples WHERE task_id = 'agreement'").clean_answer)
    assert len(answers) == 1  # one task's examples, not a mix
    assert _keys_unique(c) == dict.fromkeys(TABLES, 0) and _staging(cat) == []
