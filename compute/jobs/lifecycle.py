"""A run's life: one job, one run, written as shards and committed all or nothing.

A failure inside the job is recorded as a run with status 'failed' and its error (and
nothing else); an interrupt (Ctrl-C, SIGTERM) leaves nothing, staged or committed.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from catalog.shards import RunWriter
from catalog.store import Catalog, new_id


def code_version() -> str:
    here = Path(__file__).resolve().parent.parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"0.1.0+{sha}" if sha else "0.1.0"


# The key of the job-file job this process is running (`cli.py run` sets it), recorded in the params of
# every run the job writes, so that a sweep's runs can be found by job.
JOB_KEY: str | None = None


def run_row(kind: str, params: dict) -> dict:
    """The `runs` row of a job starting now (its status and end are set when it ends).

    Inside a job-file job, the run id is derived from the job's key and the run's kind and params:
    a job that runs again after its worker died (possibly after it committed) writes the same runs
    under the same ids, and committing a run already committed changes nothing, so no run lands twice."""
    run_id = new_id("run")
    if JOB_KEY is not None:
        params = {**params, "job_key": JOB_KEY}
        what = hashlib.sha256(json.dumps([kind, params], sort_keys=True, default=str).encode()).hexdigest()[:12]
        run_id = job_runs(JOB_KEY) + what
    return {"run_id": run_id, "kind": kind, "params": params, "code_version": code_version(), "started_at": now()}


def job_runs(key: str) -> str:
    """The prefix of the ids of the runs the job of this key writes."""
    return f"{JOB_RUN}{key}-"


def job_of(run_id: str) -> str | None:
    """The key of the job that wrote this run (None for a run no job wrote)."""
    key = run_id.removeprefix(JOB_RUN).split("-", 1)[0]
    return key if run_id.startswith(job_runs(key)) else None


JOB_RUN = "run-job-"


@contextmanager
def run(cat: Catalog, row: dict, record_failure: bool = True) -> Iterator[RunWriter]:
    """A writer for one run, committed all or nothing: on success the run's row (status ok) is
    written last and the run committed; on an error or interrupt its shards are removed, and an
    error is recorded as a failed run unless record_failure is False."""
    writer = cat.new_run(row["run_id"])
    try:
        yield writer
        writer.write("runs", [{**row, "status": "ok", "finished_at": now()}])
        writer.finish()
        cat.commit(row["run_id"])
    except BaseException as e:  # an error, Ctrl-C or SIGTERM (catalog.errors.Terminated)
        writer.abort()
        if record_failure and isinstance(e, Exception):
            _record_failure(cat, row, e)
        raise
    finally:
        writer.release()


def now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def record_end(cat: Catalog, row: dict, status: str, error: str | None = None) -> None:
    """Commit a run that holds only its `runs` row, ended now with this status (and error), under a
    new run id; should that fail, nothing of it stays staged."""
    w = cat.new_run(new_id("run"))
    try:
        w.write("runs", [{**row, "run_id": w.run_id, "status": status, "finished_at": now(), "error": error}])
        w.finish()
        cat.commit(w.run_id)
    except BaseException:
        w.abort()
        raise
    finally:
        w.release()


def _record_failure(cat: Catalog, row: dict, error: Exception) -> None:
    """Commit a run of status 'failed' with the error. Should that fail too, the original error is the
    one the caller raises."""
    try:
        record_end(cat, row, "failed", f"{type(error).__name__}: {error}")
    except Exception:
        pass
