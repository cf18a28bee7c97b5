"""Many jobs and many machines: job files run by workers or Ray, mirrors pushed and pulled."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from catalog.errors import UserError
from commands.base import ENTRY, main, output
from commands.options import FORMAT, POSITIVE, Choices

MIRROR_URL = click.argument("url", metavar="URL")


def _transfers(transfers, verb: str, url: str, fmt: str) -> None:
    """The table of a push or pull, its one-line summary, and exit 1 if a run was refused."""
    import pandas as pd

    df = pd.DataFrame([vars(t) for t in transfers], columns=["run_id", "status", "shards", "bytes", "reason"])
    shown = df if fmt != "table" else df[df.status != "present"]
    if not shown.empty or fmt != "table":
        output(shown, fmt)
    counts = df.status.value_counts()
    moved = counts.get(verb, 0)
    click.echo(f"{moved} run{'' if moved == 1 else 's'} {verb} ({int(df.bytes.sum()):,} bytes), {counts.get('present', 0)} "
               f"already there, {counts.get('refused', 0)} refused: {url}", err=True)
    if counts.get("refused", 0):
        sys.exit(1)


@main.command()
@MIRROR_URL
@FORMAT
@click.pass_obj
def push(path: Path, url: str, fmt: str):
    """Upload the committed runs a mirror lacks: object storage (s3://bucket/path, gs://, az:// with
    s3fs, gcsfs or adlfs installed) or any fsspec URL or folder. Damaged runs are named and left out."""
    import catalog
    from catalog.remote import push as push_runs

    _transfers(push_runs(catalog.open(path), url, progress=fmt == "table"), "pushed", url, fmt)


@main.command()
@MIRROR_URL
@FORMAT
@click.pass_obj
def pull(path: Path, url: str, fmt: str):
    """Download and commit the runs of a mirror (see `push`) that the catalogue lacks, each shard checked
    against its manifest's checksum; a run that fails a check is named and left out."""
    from catalog.remote import pull as pull_runs

    _transfers(pull_runs(path, url, progress=fmt == "table"), "pulled", url, fmt)


@main.command()
@click.argument("job_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--workers", default=1, show_default=True, type=POSITIVE, help="jobs run at once")
@click.option("--backend", type=Choices("compute.jobs.runner:BACKENDS"), default="local", show_default=True,
              help="local: worker processes on this machine; ray: Ray tasks (a local Ray, or --address)")
@click.option("--address", help="with --backend ray: the cluster to join (e.g. ray://head:10001 or auto)")
@click.option("--push", "push_url", metavar="URL",
              help="a mirror (see `push`) each job pushes its runs to, with the jobs' records: for workers that "
                   "share no filesystem")
@click.option("--max-jobs", default=10_000, show_default=True, type=POSITIVE,
              help="refuse a job file that expands to more jobs than this")
@FORMAT
@click.pass_obj
def run(path: Path, job_file: Path, workers: int, backend: str, address: str | None, push_url: str | None,
        max_jobs: int, fmt: str):
    """Run a job file (TOML: cli.py commands, lists expanded) on many workers; jobs already done are
    skipped, failed ones run again."""
    import pandas as pd

    import catalog
    from catalog.remote import check_mirror
    from compute.jobs.jobfile import read_jobs
    from compute.jobs.runner import run_jobs

    if address and backend != "ray":
        raise UserError("--address is for --backend ray")
    jobs = read_jobs(job_file, main, max_jobs)
    if push_url:  # a mirror that cannot be used stops the sweep before anything is created or run
        check_mirror(path, push_url)
    cat = catalog.init(path)
    outcomes = run_jobs(cat, jobs, ENTRY, workers, backend, address, progress=sys.stderr.isatty(),
                        push=push_url)
    df = pd.DataFrame([{"status": o.status, "seconds": round(o.seconds, 1), "job": o.job.name, "reason": o.reason,
                        "job_key": o.job.key} for o in outcomes])
    output(df if fmt != "table" else df.drop(columns="job_key"), fmt)
    counts = df.status.value_counts()
    click.echo(", ".join(f"{counts.get(s, 0)} {s}" for s in ("done", "skipped", "failed")), err=True)
    if counts.get("failed", 0):
        sys.exit(1)
