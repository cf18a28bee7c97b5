"""Job files and `cli.py run`: expansion and checking up front, many workers and Ray giving the rows
one-by-one runs give, reruns skipping what is done and retrying what failed."""

from __future__ import annotations

import io
import textwrap

import numpy as np
import pandas as pd
import pytest

import catalog
from commands import main
from compute.jobs.jobfile import read_jobs
from tests.conftest import run_cli

SWEEP = """
[defaults]
examples = 4
no-eval = true

[[job]]
command = "discover"
task = ["sva_simple", "sva_across_pp", "sva_across_rc", "sva_within_rc", "pronoun_gender", "ioi"]
method = "atp"

[[job]]
command = "discover"
task = ["sva_simple", "ioi"]
method = "ig"
steps = 4

[[job]]
command = "discover"
task = "no_such_task"
"""


def _write(tmp_path, text: str, name: str = "jobs.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_a_job_file_expands_lists_maps_flags_and_keys_each_command_line(tmp_path):
    jobs = read_jobs(_write(tmp_path, """
        [defaults]
        examples = 16

        [[job]]
        command = "discover"
        task = ["sva_simple", "ioi"]
        method = ["ig", "atp"]
        neurons = [false, true]
        fill = false

        [[job]]
        command = "explain"
        args = [["attn_1", "top"], ["mlp_0", "3"]]
        prompt = "the cat near the dogs"
        position = -1

        [[job]]
        command = "dictionaries train"
        architecture = "topk"
        submodule = [["resid_0", "resid_1"]]
        """), main)
    assert len(jobs) == 2 * 2 * 2 + 2 + 1
    names = [j.name for j in jobs]
    assert names[0] == "discover --examples 16 --task sva_simple --method ig --no-fill"
    assert names[1] == "discover --examples 16 --task sva_simple --method ig --neurons --no-fill"
    assert "explain --examples 16" not in names[8]  # defaults go only where the command has the option...
    assert names[8:10] == ['explain --prompt the cat near the dogs --position -1 attn_1 top',
                           'explain --prompt the cat near the dogs --position -1 mlp_0 3']
    assert names[10] == "dictionaries train --architecture topk --submodule resid_0 --submodule resid_1"
    keys = [j.key for j in jobs]
    assert len(set(keys)) == len(keys)
    assert keys == [j.key for j in read_jobs(tmp_path / "jobs.toml", main)]  # stable


@pytest.mark.parametrize("text, message", [
    ("[[job]]\ncommand = 'discover'\ntask = 'ioi'\nmethod = 'magic'", "job 1 (`discover --task ioi --method magic`): Invalid value for '--method'"),
    ("[[job]]\ncommand = 'discover'\nspeed = 3", "job 1: discover has no option --speed"),
    ("[[job]]\ncommand = 'dance'", "job 1: no command 'dance'"),
    ("[[job]]\ncommand = 'serve'", "job 1: 'serve' cannot be a job"),
    ("[[job]]\ncommand = 'run'\nargs = ['jobs.toml']", "job 1: 'run' cannot be a job"),
    ("[[job]]\ncommand = 'dictionaries'", "'dictionaries' needs a subcommand"),
    ("[[job]]\ncommand = 'discover'\nneurons = 'yes'", "--neurons is a flag"),
    ("[[job]]\ntask = 'ioi'", "give its command"),
    ("[[job]\ncommand = 'discover'", "is not valid TOML"),
    ("[jobs]\ncommand = 'discover'", "unknown section 'jobs'"),
    ("[[job]]\ncommand = 'discover'\ntask = ['ioi', 'ioi']", "is listed twice"),
])
def test_a_bad_job_file_is_refused_in_one_line_before_anything_runs(tmp_path, text, message):
    r = run_cli("run", str(_write(tmp_path, text)), catalog=tmp_path / "c")
    assert r.returncode == 1 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "c").exists()  # nothing was created


def _rows(path) -> pd.DataFrame:
    """Every node of every circuit, keyed by task, method and the node's key (run and circuit ids left out)."""
    return catalog.open(path).sql("""
        SELECT c.task_id, c.method, n.component, n.layer, n.dictionary_id, n.feature_idx, n.is_error, n.position,
               n.effect, n.in_circuit, c.n_edges
        FROM nodes n JOIN circuits c USING (circuit_id)
        ORDER BY ALL""")


def _same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    keys = [c for c in a.columns if c not in ("effect",)]
    assert len(a) == len(b) > 0
    pd.testing.assert_frame_equal(a[keys].reset_index(drop=True), b[keys].reset_index(drop=True))
    # one thread per worker against two: the same sums in another order
    assert np.allclose(a.effect, b.effect, rtol=1e-4, atol=1e-5 * a.effect.abs().max())


def test_many_workers_and_ray_give_the_rows_of_one_by_one_and_a_rerun_skips_what_is_done(tmp_path, dicts):
    jobs = _write(tmp_path, SWEEP)
    for job in read_jobs(jobs, main):  # the reference: each job's command run on its own, one after another
        r = run_cli(*job.command, *job.argv, catalog=tmp_path / "one_by_one")
        assert r.returncode == (1 if "no_such_task" in job.name else 0), r.stderr
    outcomes = {}
    mirror = tmp_path / "mirror"  # the Ray workers push each job's runs there, as nodes without a shared filesystem do
    for name, args in (("eight", ["--workers", "8"]), ("ray", ["--backend", "ray", "--workers", "2", "--push", str(mirror)])):
        r = run_cli("run", str(jobs), *args, "--format", "csv", catalog=tmp_path / name)
        assert r.returncode == 1, r.stderr  # one job fails
        outcomes[name] = pd.read_csv(io.StringIO(r.stdout))
        assert "8 done, 0 skipped, 1 failed" in r.stderr, (name, r.stderr)
        _same(_rows(tmp_path / "one_by_one"), _rows(tmp_path / name))
    # the mirror holds the whole sweep: every job's runs and every job's record
    assert run_cli("pull", str(mirror), catalog=tmp_path / "gathered").returncode == 0
    pd.testing.assert_frame_equal(_rows(tmp_path / "ray"), _rows(tmp_path / "gathered"))
    sql = "SELECT kind, status, params->>'job_key' AS key FROM runs ORDER BY ALL"
    pd.testing.assert_frame_equal(catalog.open(tmp_path / "ray").sql(sql), catalog.open(tmp_path / "gathered").sql(sql))
    failed = outcomes["eight"][outcomes["eight"].status == "failed"]
    assert len(failed) == 1 and "unknown task 'no_such_task'" in failed.reason.iloc[0]
    # every run a job wrote carries the job's key; each job's end is a run of kind 'job'
    runs = catalog.open(tmp_path / "eight").sql(
        "SELECT kind, status, params->>'job_key' AS key FROM runs ORDER BY ALL")
    assert set(runs[runs.kind == "discover"].key) == set(outcomes["eight"].job_key[outcomes["eight"].status == "done"])
    assert (runs.kind == "job").sum() == 9
    # a rerun skips the done jobs and retries the failed one
    r = run_cli("run", str(jobs), "--workers", "8", "--format", "csv", catalog=tmp_path / "eight")
    again = pd.read_csv(io.StringIO(r.stdout))
    assert r.returncode == 1 and list(again.status) == ["skipped"] * 8 + ["failed"]
    assert len(catalog.open(tmp_path / "eight").sql("SELECT * FROM circuits")) == 8
    from tests.docs import blocks, page, section

    for sql in blocks("sql", section(page("sweeps.md"), "Sweeps")):  # the queries of the section
        assert len(catalog.open(tmp_path / "eight").sql(sql)) > 0


def test_the_readme_job_file_is_a_valid_job_file(tmp_path):
    from tests.docs import blocks, page, section

    (toml,) = blocks("toml", section(page("sweeps.md"), "Sweeps"))
    jobs = read_jobs(_write(tmp_path, toml), main)
    assert len(jobs) == 3 * 2 * 2 + 1 and jobs[-1].name.startswith("explain --prompt")


def test_a_job_run_again_after_its_worker_died_writes_nothing_twice(tmp_path, dicts):
    """A worker killed after its job committed (before the runner heard) runs the job again on the rerun:
    the job's runs get the same ids, so the second commit changes nothing; a stale staged copy of one
    of them (its writer killed mid-write) is replaced."""
    from commands.base import ENTRY
    from compute.jobs.command import executor

    execute = executor(ENTRY)
    root = tmp_path / "c"
    argv = ["--task", "sva_simple", "--method", "atp", "--examples", "4", "--no-eval"]
    assert execute(str(root), ["discover"], argv, "k" * 16, 1) == (0, "")
    runs = catalog.open(root).sql("SELECT run_id FROM runs WHERE kind = 'discover'").run_id
    assert len(runs) == 1 and runs[0].startswith("run-job-" + "k" * 16)
    (root / "staging" / runs[0]).mkdir()  # what a writer of that id killed mid-write leaves
    (root / "staging" / runs[0] / "nodes.parquet.tmp").write_bytes(b"half")
    assert execute(str(root), ["discover"], argv, "k" * 16, 1) == (0, "")
    assert len(catalog.open(root).sql("SELECT * FROM circuits")) == 1
    assert not (root / "staging" / runs[0]).exists()
    r = run_cli("discover", *argv, catalog=root)  # outside a job: a new run, as before
    assert r.returncode == 0 and len(catalog.open(root).sql("SELECT * FROM circuits")) == 2


def test_a_job_whose_push_fails_has_failed_and_its_rerun_pushes_its_runs(tmp_path, dicts):
    """A job's push is its last step: when the mirror cannot take its runs, the job fails with the reason
    (its runs stay committed here); run again, it commits nothing twice and pushes them."""
    from commands.base import ENTRY
    from compute.jobs.command import executor
    from compute.jobs.runner import run_job

    root, mirror = tmp_path / "c", tmp_path / "mirror"
    (tmp_path / "a-file").write_text("not a folder")
    argv = ["--task", "sva_simple", "--method", "atp", "--examples", "4", "--no-eval"]
    status, reason = run_job(executor(ENTRY), str(root), ["discover"], argv, "k" * 16, 1, str(tmp_path / "a-file" / "m"))
    assert status == 1 and reason.startswith("its runs are committed but not pushed: mirror "), reason
    assert len(catalog.open(root).sql("SELECT * FROM circuits")) == 1
    assert run_job(executor(ENTRY), str(root), ["discover"], argv, "k" * 16, 1, str(mirror)) == (0, "")
    assert len(catalog.open(root).sql("SELECT * FROM circuits")) == 1  # nothing landed twice
    (pushed,) = [p.name for p in (mirror / "runs").iterdir()]
    assert pushed.startswith("run-job-" + "k" * 16)


@pytest.mark.parametrize("url, message", [("nope://x", "mirror nope://x: "), ("c/m", "is the catalogue itself")])
def test_a_sweep_with_a_mirror_it_cannot_use_stops_before_anything_runs(tmp_path, url, message):
    jobs = _write(tmp_path, "[[job]]\ncommand = 'discover'\ntask = 'ioi'\nmethod = 'atp'\n")
    r = run_cli("run", str(jobs), "--push", url, catalog=tmp_path / "c", cwd=tmp_path)
    assert r.returncode == 1 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "c").exists()  # nothing was created, nothing ran


def test_ctrl_c_stops_a_sweep_cleanly_and_a_rerun_finishes_it(tmp_path, dicts):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) stops the runner and its workers: exit
    130, nothing left staged, the jobs done kept; the rerun runs only the rest."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT

    jobs = _write(tmp_path, """
        [[job]]
        command = "discover"
        task = ["sva_simple", "sva_across_pp", "sva_across_rc", "sva_within_rc", "pronoun_gender", "ioi"]
        method = "ig"
        steps = 4
        examples = 8
        no-eval = true
        """)
    root = tmp_path / "c"
    p = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "--catalog", str(root), "run", str(jobs),
                          "--workers", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         start_new_session=True,  # its own process group, as a terminal gives a command
                         # SIGINT as a terminal leaves it, whatever this process inherited (a shell's
                         # background job has it ignored, and Python then keeps ignoring it)
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and p.poll() is None:  # stop it once one job is done
        if (root / "runs").is_dir() and any(d.name.startswith("run-job-") for d in (root / "runs").iterdir()):
            break
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "interrupted" in err and "Traceback" not in err
    assert not [d for d in (root / "staging").iterdir() if d.name != ".commit.lock"]  # nothing half-written left
    assert 1 <= len(catalog.open(root).sql("SELECT * FROM circuits")) < 6
    recorded = len(catalog.open(root).sql("SELECT * FROM runs WHERE kind = 'job' AND status = 'ok'"))
    r = run_cli("run", str(jobs), "--workers", "2", "--format", "csv", catalog=root)
    again = pd.read_csv(io.StringIO(r.stdout))
    assert r.returncode == 0 and (again.status == "skipped").sum() == recorded
    assert (again.status == "done").sum() == 6 - recorded
    # a job that committed its circuit before the runner recorded it ran again: its circuit is not doubled
    assert len(catalog.open(root).sql("SELECT * FROM circuits")) == 6  # each job's circuit once


def test_a_large_job_file_is_counted_before_it_is_made_and_each_value_checked_once(tmp_path, monkeypatch):
    """10^5 jobs: every one made, each distinct, while click parses each option value once (not each
    combination); 10^10 jobs: refused by their count, before any is made."""
    import compute.jobs.jobfile as jobfile

    checks = []
    real = jobfile._check
    monkeypatch.setattr(jobfile, "_check", lambda *a: (checks.append(a[2]), real(*a)))
    examples, steps = ", ".join(map(str, range(1, 1001))), ", ".join(map(str, range(1, 101)))
    path = _write(tmp_path, f"""
        [[job]]
        command = "discover"
        task = "sva_simple"
        examples = [{examples}]
        steps = [{steps}]
        """)
    jobs = read_jobs(path, main, max_jobs=100_000)
    assert len(jobs) == 100_000 and len({j.key for j in jobs}) == 100_000
    assert jobs[0].argv == ("--task", "sva_simple", "--examples", "1", "--steps", "1")
    assert jobs[-1].argv == ("--task", "sva_simple", "--examples", "1000", "--steps", "100")
    assert len(checks) == 1 + 999 + 99
    with pytest.raises(Exception, match="more than 10,000 jobs"):
        read_jobs(path, main)
    monkeypatch.setattr(jobfile, "_jobs", lambda *a: pytest.fail("jobs were made before they were counted"))
    huge = _write(tmp_path, "[[job]]\ncommand = \"discover\"\n" + "".join(
        f"{k} = [{', '.join(map(str, range(1, 11)))}]\n" for k in ("examples", "steps", "seed", "a", "b", "c", "d", "e",
                                                                    "f", "g")), "huge.toml")
    with pytest.raises(Exception, match="expands to 10,000,000,000"):
        read_jobs(huge, main)


def test_a_rerun_with_push_sends_the_runs_of_the_jobs_done_before(tmp_path, dicts):
    """A sweep run without a mirror, then again with --push: every job is skipped, and the mirror gets
    their runs as well as their records, so a catalogue pulled from it holds the sweep."""
    jobs = _write(tmp_path, """
        [[job]]
        command = "discover"
        task = ["sva_simple", "ioi"]
        method = "atp"
        examples = 4
        no-eval = true
        """)
    root, mirror = tmp_path / "c", tmp_path / "mirror"
    assert run_cli("run", str(jobs), catalog=root).returncode == 0
    r = run_cli("run", str(jobs), "--push", str(mirror), catalog=root)
    assert r.returncode == 0 and "0 done, 2 skipped" in r.stderr, r.stderr
    assert run_cli("pull", str(mirror), catalog=tmp_path / "pulled").returncode == 0
    query = "SELECT task_id, n_nodes FROM circuits ORDER BY task_id"
    assert catalog.open(tmp_path / "pulled").sql(query).equals(catalog.open(root).sql(query))
