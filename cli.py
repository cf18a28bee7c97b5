"""circuit-catalog: discover feature circuits and question them with SQL.

    python cli.py demo                       # load the released zoo, discover every task, commit
    python cli.py query "SELECT ..." --format csv
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
import warnings
from pathlib import Path

import click

from catalog.errors import PartialAnswer, Terminated, UserError

DEFAULT_CATALOG = "circuits"
OLD_DEFAULT_CATALOG = "catalog"  # until release 1: the catalog package's folder, so a catalogue found there is moved
CATALOG_HELP = f"catalogue directory (env CIRCUIT_CATALOG, default ./{DEFAULT_CATALOG})"


class Group(click.Group):
    """Turns user errors into one line on stderr and exit code 1, never a traceback; SIGTERM stops a
    job like Ctrl-C does, so that it removes what it staged."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:  # a bare group: its help, as click shows it
            click.echo(e.ctx.get_help())
            sys.exit(0)
        except click.UsageError as e:
            hint = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
            click.echo(f"error: {e.format_message()}{hint}", err=True)
            sys.exit(1)
        except click.ClickException as e:
            click.echo(f"error: {e.format_message()}", err=True)
            sys.exit(1)
        except click.exceptions.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(1)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)

    def invoke(self, ctx):
        previous = signal.signal(signal.SIGTERM, _terminate) if _main_thread() else None
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", PartialAnswer)
                rv = super().invoke(ctx)
            notes = dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, PartialAnswer))
            for note in notes:  # runs left out of what a query read: said once, and an answer is marked
                click.echo(f"warning: {note}", err=True)
            if notes and ctx.meta.get(ANSWERS):
                sys.exit(PARTIAL)
            return rv
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except Terminated:
            click.echo("terminated: nothing partial was committed", err=True)
            sys.exit(143)
        except KeyboardInterrupt:
            click.echo("interrupted: nothing partial was committed", err=True)
            sys.exit(130)
        except BrokenPipeError:  # the reader of a pipe stopped (`| head`): nothing to say, as for SIGPIPE
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail
            sys.exit(141)
        except OSError as e:  # the machine's answer about a file: unwritable, missing, disk full
            where = f": {e.filename}" if e.filename else ""
            click.echo(f"error: {e.strerror or e}{where}", err=True)
            sys.exit(1)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


def _terminate(signum, frame):
    raise Terminated()


ANSWERS = "answers"  # ctx.meta key: the command prints an answer read from the catalogue
PARTIAL = 3  # the exit code of such an answer read without runs that could not be trusted


def answers(command):
    """Mark a command whose output is an answer read from the catalogue: when runs were left out of
    what it read (`catalog.verified`), it exits PARTIAL after its output."""
    import functools

    @functools.wraps(command)
    def marked(*args, **kwargs):
        click.get_current_context().meta[ANSWERS] = True
        return command(*args, **kwargs)

    return marked


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class OutPath(click.Path):
    """A file (or folder) the command will write: refused up front when it cannot be, so that no
    work is done for an output that would fail at the end."""

    def __init__(self, folder: bool = False):
        super().__init__(path_type=Path)
        self.folder = folder

    def convert(self, value, param, ctx):
        path = Path(super().convert(value, param, ctx))
        if path.exists() and path.is_dir() != self.folder:
            self.fail(f"{path} is a {'file' if self.folder else 'folder'}", param, ctx)
        if path.exists() and not os.access(path, os.W_OK):
            self.fail(f"{path} cannot be written", param, ctx)
        above = next(p for p in path.absolute().parents if p.exists())
        if not above.is_dir():
            self.fail(f"{above} is a file, so nothing can be written under it", param, ctx)
        if not os.access(above, os.W_OK | os.X_OK):
            self.fail(f"cannot write in {above}", param, ctx)
        return path


class Threshold(click.ParamType):
    """A finite number >= 0 (click's FloatRange lets inf through)."""

    name = "threshold"

    def convert(self, value, param, ctx):
        try:
            v = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(v) or v < 0:
            self.fail(f"{value!r} is not a finite number >= 0", param, ctx)
        return v


class Size(click.ParamType):
    """A memory size: 8G, 512M, 2.5GiB or bytes."""

    name = "size"

    def convert(self, value, param, ctx):
        from compute.attribution.budget import parse_size

        try:
            return value if isinstance(value, float) else parse_size(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)


class Choices(click.Choice):
    """The choices a module constant lists ("module:NAME"), read when a command first uses them, so
    that the CLI imports a pipeline stage (and PyTorch) only for the commands that need it."""

    def __init__(self, ref: str):
        self.ref, self.case_sensitive = ref, True

    @property
    def choices(self) -> tuple:
        import importlib

        module, name = self.ref.split(":")
        return tuple(getattr(importlib.import_module(module), name))


class FeatureOrTop(click.ParamType):
    """A feature index (0 or more), or 'top': the strongest at the place asked about."""

    name = "FEATURE|top"

    def convert(self, value, param, ctx):
        text = str(value)
        if text == "top" or text.isdigit():
            return text
        self.fail(f"{value!r} is neither a feature index (0, 1, ...) nor 'top'", param, ctx)


class Text(click.ParamType):
    """Text given on the command line, which must be UTF-8 (other bytes reach Python as lone surrogates,
    which no tokenizer or SQL parser takes)."""

    name = "text"

    def convert(self, value, param, ctx):
        try:
            str(value).encode("utf-8")
        except UnicodeEncodeError:
            self.fail(f"{os.fsencode(str(value))[:60]!r} is not UTF-8 text", param, ctx)
        return value


TEXT = Text()
FEATURE_OR_TOP = FeatureOrTop()
THRESHOLD = Threshold()
POSITIVE = click.IntRange(min=1)


@click.group(cls=Group)
@click.option("--catalog", "catalog_path", envvar="CIRCUIT_CATALOG", default=DEFAULT_CATALOG,
              show_default=True, type=click.Path(path_type=Path), help=CATALOG_HELP)
@click.pass_context
def main(ctx, catalog_path: Path):
    """A DuckDB/Parquet catalogue of sparse feature circuits."""
    from compute.allocator import keep_freed_memory

    keep_freed_memory()
    if ctx.get_parameter_source("catalog_path") == click.core.ParameterSource.DEFAULT:
        _move_old_default(Path(catalog_path))
    ctx.obj = catalog_path


def _move_old_default(new: Path) -> None:
    """The default catalogue was ./catalog, the `catalog` package's own folder: move one found there."""
    old = Path(OLD_DEFAULT_CATALOG)
    if not new.exists() and (old / "catalog.duckdb").is_file():
        from catalog.store import move

        move(old, new)
        click.echo(f"moved the catalogue from ./{old} (the catalog package's folder) to ./{new}, its new default",
                   err=True)


@main.command()
@click.pass_obj
def init(path: Path):
    """Create an empty catalogue."""
    import catalog

    catalog.init(path)
    click.echo(f"catalogue ready at {path}")


def _output(df, fmt: str) -> None:
    from catalog.query import format_frame

    click.echo(format_frame(df, fmt), nl=False)


FORMAT = click.option("--format", "fmt", type=Choices("catalog.query:FORMATS"), default="table",
                      show_default=True, help="output format")


@main.command(context_settings={"ignore_unknown_options": True})  # SQL may start with "--" (a comment)
@click.argument("sql", required=False, type=TEXT)
@click.option("--file", "sql_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="read the SQL from a file")
@click.option("--list", "list_named", is_flag=True, help="list the named queries (table macros) and exit")
@click.option("--strict", is_flag=True, help="refuse to answer when runs that fail their checks would be left out "
              "(without it: left out, named on stderr, exit 3)")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="stop the query after this long (default: no limit; Ctrl-C and SIGTERM stop it at any time)")
@FORMAT
@click.pass_obj
@answers
def query(path: Path, sql: str | None, sql_file: Path | None, list_named: bool, strict: bool,
          timeout: float | None, fmt: str):
    """Run a read-only SQL query against the catalogue (`--list`: the named queries it can call)."""
    import catalog

    if list_named:
        import pandas as pd

        from catalog.macros import listed

        if fmt == "table":
            width = max(len(q.signature) for q in listed())
            click.echo("\n".join(f"{q.signature:{width}}  {q.summary}" for q in listed()))
        else:
            _output(pd.DataFrame([{"query": q.signature, "summary": q.summary} for q in listed()]), fmt)
        return
    if (sql is None) == (sql_file is None):
        raise UserError("give either SQL or --file, not both or neither")
    text = sql_file.read_text() if sql_file else sql
    if fmt == "csv":  # streamed a chunk at a time: an export of millions of rows is never held whole
        from catalog.query import csv_chunks

        for chunk in csv_chunks(catalog.open(path).chunks(text, strict=strict, timeout=timeout)):
            click.echo(chunk, nl=False)
        return
    _output(catalog.open(path).sql(text, strict=strict, timeout=timeout), fmt)


@main.command()
@FORMAT
@click.pass_obj
@answers
def circuits(path: Path, fmt: str):
    """List the circuits in the catalogue."""
    import catalog

    _output(catalog.open(path).sql("SELECT * FROM circuit_list()"), fmt)


@main.command()
@click.option("--clean", is_flag=True, help="commit the stale runs that are complete, remove the other stale runs")
@click.option("--discard", is_flag=True, help="with --clean: remove complete stale runs too, instead of committing them")
@FORMAT
@click.pass_obj
def staging(path: Path, clean: bool, discard: bool, fmt: str):
    """Runs in staging/: those being written, and the stale ones that workers which ended without
    committing (killed, crashed) left behind; --clean commits or removes the stale ones."""
    import pandas as pd

    import catalog
    from catalog.staging import clean as clean_staging
    from catalog.staging import staged_runs

    if discard and not clean:
        raise UserError("--discard goes with --clean")
    cat = catalog.open(path)
    if clean:
        done = clean_staging(cat, discard)
        df = pd.DataFrame([{"run_id": r.run_id, "state": r.state, "action": a} for r, a in done],
                          columns=["run_id", "state", "action"])
        if fmt == "table" and df.empty:
            click.echo("no stale runs in staging/")
            return
    else:
        df = pd.DataFrame([{"run_id": r.run_id, "state": r.state, "age_s": round(r.age_s), "size_bytes": r.size_bytes,
                            "owner": r.owner, "note": r.note} for r in staged_runs(cat.root)],
                          columns=["run_id", "state", "age_s", "size_bytes", "owner", "note"])
        if fmt == "table" and df.empty:
            click.echo("staging/ is empty")
            return
    _output(df, fmt)


@main.command()
@click.option("--quarantine", "move", is_flag=True,
              help="move each damaged run to quarantine/, out of every query, so the rest stays queryable")
@FORMAT
@click.pass_obj
def check(path: Path, move: bool, fmt: str):
    """Verify every committed run: each shard present, of the size and checksum its manifest recorded.
    Names each damaged shard and its run; exit 1 if any is damaged."""
    import pandas as pd

    import catalog
    from catalog import integrity
    from catalog.integrity import QUARANTINE

    cat = catalog.open(path)
    report = integrity.check(cat.root)
    moved = integrity.quarantine(cat.root, report.damaged_runs) if move and report.damage else []
    df = pd.DataFrame([{"run_id": d.run_id, "shard": d.shard, "problem": d.problem,
                        "action": f"moved to {QUARANTINE}/" if moved else ""} for d in report.damage],
                      columns=["run_id", "shard", "problem", "action"])
    if not df.empty or fmt != "table":
        _output(df, fmt)
    unverified = f", {report.unverified} without a checksum (written before manifests held one)" \
        if report.unverified else ""
    packs = f" ({report.packs} packs)" if report.packs else ""
    click.echo(f"checked {report.runs} runs{packs}, {report.shards} shards{unverified}: "
               f"{len(report.damage)} damaged in {len(report.damaged_runs)} runs"
               + (f"; {len(moved)} moved to {cat.root / QUARANTINE}" if moved else ""), err=True)
    if report.damage:
        sys.exit(1)


@main.command()
@click.option("--target-size", type=Size(), default="256M", show_default=True,
              help="about how large each pack grows; runs under half of it are packed")
@click.option("--dry-run", is_flag=True, help="list the packs it would make, and change nothing")
@FORMAT
@click.pass_obj
def compact(path: Path, target_size: float, dry_run: bool, fmt: str):
    """Merge small committed runs into large packs, atomically (queries answer the same, faster)."""
    import pandas as pd

    import catalog
    from catalog.compaction import compact as compact_catalog
    from catalog.compaction import describe, plan

    cat = catalog.open(path)
    columns = ["pack_id", "runs", "folders", "shards", "bytes"]
    if dry_run:
        df = pd.DataFrame([describe(g, "(new)") for g in plan(cat.root, int(target_size))], columns=columns)
        if not df.empty or fmt != "table":
            _output(df, fmt)
        click.echo(f"would pack {int(df.runs.sum())} runs ({int(df.shards.sum())} shards) into {len(df)} packs; "
                   "nothing was changed", err=True)
        return
    result = compact_catalog(cat, int(target_size), progress=fmt == "table")
    df = pd.DataFrame(result.packs, columns=columns)
    if not df.empty or fmt != "table":
        _output(df, fmt)
    if not result.packs:
        click.echo(f"nothing to compact (no two runs under {target_size / 2 / 2**20:,.0f} MiB, half the target size); "
                   f"generation {result.generation}", err=True)
        return
    click.echo(f"packed {result.runs_packed} runs ({int(df.shards.sum())} shards) into {len(df)} packs; "
               f"generation {result.generation} is current; {result.removed_generations} old generations "
               "removed", err=True)


MIRROR_URL = click.argument("url", metavar="URL")


def _transfers(transfers, verb: str, url: str, fmt: str) -> None:
    """The table of a push or pull, its one-line summary, and exit 1 if a run was refused."""
    import pandas as pd

    df = pd.DataFrame([vars(t) for t in transfers], columns=["run_id", "status", "shards", "bytes", "reason"])
    shown = df if fmt != "table" else df[df.status != "present"]
    if not shown.empty or fmt != "table":
        _output(shown, fmt)
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
    import cli as this  # by its module name, not __main__: workers and Ray find the function by reference

    outcomes = run_jobs(cat, jobs, this._execute_job, workers, backend, address, progress=sys.stderr.isatty(),
                        push=push_url)
    df = pd.DataFrame([{"status": o.status, "seconds": round(o.seconds, 1), "job": o.job.name, "reason": o.reason,
                        "job_key": o.job.key} for o in outcomes])
    _output(df if fmt != "table" else df.drop(columns="job_key"), fmt)
    counts = df.status.value_counts()
    click.echo(", ".join(f"{counts.get(s, 0)} {s}" for s in ("done", "skipped", "failed")), err=True)
    if counts.get("failed", 0):
        sys.exit(1)


def _execute_job(root: str, command: list, argv: list, key: str, threads: int) -> tuple[int, str]:
    """Run one job's command in this process (a worker of `cli.py run`), its output kept from the
    terminal: (exit status, the one line that says why it failed)."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    import torch

    from compute.jobs import lifecycle

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    lifecycle.JOB_KEY = key
    err = io.StringIO()
    try:
        with redirect_stderr(err), redirect_stdout(io.StringIO()):
            main.main(["--catalog", root, *command, *argv], prog_name="cli.py")
        status = 0
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    finally:
        lifecycle.JOB_KEY = None
        torch.set_num_threads(before)
    if status == 0:
        return 0, ""
    lines = [line.strip() for line in err.getvalue().replace("\r", "\n").splitlines() if line.strip()]
    said = [line for line in lines if line.startswith(("error:", "terminated", "interrupted"))]
    reason = (said or lines or [""])[-1]
    return status, reason.removeprefix("error: ")


def _options(*options):
    """A decorator applying click options in the order given (as they appear in --help)."""
    def apply(f):
        for opt in reversed(options):
            f = opt(f)
        return f
    return apply


_discovery_options = _options(
    click.option("--method", type=Choices("compute.attribution.discovery:METHODS"), default="ig", show_default=True,
                 help="node effects: integrated gradients, attribution patching or exact patching"),
    click.option("--steps", "ig_steps", type=POSITIVE,
                 help="integrated-gradients steps (default 20)"),
    click.option("--ig-rule", type=Choices("compute.attribution.ig:RULES"),
                 help="integrated-gradients quadrature (default midpoint; left is Sparse Feature Circuits' "
                      "left Riemann sum)"),
    click.option("--aggregation", type=Choices("compute.attribution.discovery:AGGREGATIONS"), default="sum",
                 show_default=True,
                 help="sum effects over positions, or keep a node per position (none: keeps only "
                      "the shortest prompts, as SFC does)"),
    click.option("--node-threshold", default=0.1, show_default=True, type=THRESHOLD,
                 help="nodes with |effect| above it are in the circuit"),
    click.option("--edge-threshold", default=0.01, show_default=True, type=THRESHOLD,
                 help="edges with |weight| above it are kept"),
    click.option("--examples", "n_examples", default=64, show_default=True, type=POSITIVE,
                 help="train examples used"),
    click.option("--ablation", "ablations", multiple=True, type=Choices("compute.attribution.faithfulness:ABLATIONS"),
                 help="ablations for the faithfulness sweep (repeatable; default mean)"),
    click.option("--full-eval", is_flag=True,
                 help="the full faithfulness sweep: mean, zero and resample ablation, three random node sets "
                      "per size (the default, mean and one draw, costs less than discovery)"),
    click.option("--max-memory", type=Size(),
                 help="memory budget for discovery (e.g. 8G): batches sized to it, and the states of all "
                      "examples never held at once beyond it"),
    click.option("--errors", type=Choices("compute.attribution.faithfulness:ERROR_MODES"), default="node",
                 show_default=True, help="error terms in the faithfulness sweep"),
    click.option("--no-eval", is_flag=True, help="skip the faithfulness/completeness sweep"),
)


def _check_release(ctx=None, param=None, value=None):
    """Check the released zoo's files against its manifest before a command that may load it does
    anything: a damaged one is one line naming it, and nothing is written."""
    from compute import release

    release.check()
    return value


ZOO = click.option("--zoo", "zoo_name", type=Choices("compute.models.zoo:ZOOS"), default="default", show_default=True,
                   callback=_check_release, help="zoo model: default, or cued (a spurious preposition cue; task sva_pp_cue)")


def _model_options(used_with: str) -> list:
    """The options that run a command on a checkpoint instead of the zoo."""
    return [
        click.option("--model", "model_name", metavar="PATH_OR_NAME",
                     help="a Hugging Face checkpoint directory, or a TransformerLens model name in the local Hugging "
                          f"Face cache, instead of the zoo (with {used_with})"),
        click.option("--dictionaries", "dictionary_set", type=click.Path(path_type=Path),
                     help="with --model: a directory of its dictionaries (SAELens or dictionary_learning layout)"),
        click.option("--dictionary-spec", type=click.Path(path_type=Path),
                     help="JSON file mapping the set's folders to submodules, for layouts that cannot be guessed"),
        click.option("--device", type=Choices("compute.models.checkpoints:DEVICES"), default="cpu",
                     show_default=True, help="with --model: where it runs"),
        click.option("--dtype", type=Choices("compute.models.checkpoints:DTYPES"), default="float32",
                     show_default=True, help="with --model: its weights' type"),
    ]


@main.command()
@click.option("--task", "task_names", multiple=True, help="zoo task name (repeatable)")
@click.option("--task-file", "task_files", multiple=True, type=click.Path(path_type=Path),
              help="JSONL task file in the Sparse Feature Circuits format (repeatable)")
@click.option("--neurons", is_flag=True, help="use identity dictionaries (neurons as features) instead of SAEs")
@ZOO
@_options(*_model_options("--task-file"))
@click.option("--fill/--no-fill", default=True, show_default=True,
              help="with --dictionaries: neurons (identity dictionaries) where the set has no dictionary")
@_discovery_options
@click.pass_obj
def discover(path: Path, task_names, task_files, neurons: bool, zoo_name: str, model_name: str | None,
             dictionary_set: Path | None, dictionary_spec: Path | None, fill: bool, device: str, dtype: str,
             **params):
    """Discover circuits on the zoo model (or a checkpoint: --model) for zoo tasks or task files."""
    import catalog
    from compute.tasks import load_task_file

    if not task_names and not task_files:
        raise UserError("give at least one --task or --task-file")
    if model_name is None and (dictionary_set or dictionary_spec):
        raise UserError("--dictionaries and --dictionary-spec go with --model")
    if model_name is not None and task_names:
        raise UserError("--task names zoo tasks; with --model give --task-file")
    if model_name is not None and not dictionary_set and not neurons:
        raise UserError("--model needs --dictionaries DIR (or --neurons)")
    if neurons and dictionary_set:
        raise UserError("--neurons and --dictionaries: give one (neurons are what --fill puts where a set has none)")
    params = _params(params)
    tasks = [load_task_file(f) for f in task_files]  # validate files before any heavy work
    cat = catalog.init(path)
    for task in tasks:
        cat.check_task(task.name, task.content_hash)
    if model_name is not None:
        prompts = [e[k] for t in tasks for e in t.examples for k in ("clean_prefix", "patch_prefix") if e.get(k)]
        handle, dicts = _checkpoint_and_dictionaries(model_name, device, dtype, dictionary_set, dictionary_spec,
                                                     fill, prompts[:2000])
        _run_tasks(path, handle, dicts, tasks, params, basis="neurons" if neurons else "features")
        return
    zoo, dicts, identity = _zoo_and_dictionaries(zoo_name, neurons)
    for name in task_names:
        if name not in zoo.tasks:
            raise UserError(f"unknown task {name!r}; zoo tasks: {', '.join(sorted(zoo.tasks))}")
        tasks.append(zoo.tasks[name])
    _run_tasks(path, zoo.handle, identity if neurons else dicts, tasks, params)


def _checkpoint_and_dictionaries(model_name: str, device: str, dtype: str, dictionary_set: Path | None,
                                 spec: Path | None, fill: bool, prompts: list[str]):
    """A checkpoint's handle and its dictionaries (identity ones without a set), measured on the prompts."""
    from compute.dictionaries.sets import identity_set, load_set
    from compute.models.checkpoints import load_checkpoint

    click.echo(f"loading {model_name} ...", err=True)
    handle = load_checkpoint(model_name, device, dtype)
    if dictionary_set is None:
        return handle, identity_set(handle, prompts)
    dicts, filled = load_set(dictionary_set, handle, prompts, spec, fill)
    if filled:
        click.echo(f"no dictionary for {', '.join(filled)}: neurons (identity dictionaries) there", err=True)
    return handle, dicts


_local_options = _options(
    ZOO,
    *_model_options("--prompt and --dictionaries"),
    click.option("--node-budget", default=48, show_default=True, type=POSITIVE,
                 help="nodes kept (features, error terms, embeddings), by influence on the root"),
    click.option("--edge-budget", default=256, show_default=True, type=POSITIVE,
                 help="edges kept, by how much of the root flows along them"),
    click.option("--threshold", default=0.0, show_default=True, type=THRESHOLD,
                 help="hierarchical attribution: features whose attribution is under it pass nothing upstream "
                      "(0: every path counts)"),
    click.option("--qk-scores", default=4, show_default=True, type=click.IntRange(min=0),
                 help="attention scores (the strongest head moves) decomposed into query x key pairs"),
    FORMAT,
)


def _graph_params(node_budget: int, edge_budget: int, threshold: float, qk_scores: int):
    from compute.local.graph import GraphParams

    return GraphParams(node_budget=node_budget, edge_budget=edge_budget, threshold=threshold, qk_scores=qk_scores)


def _local_model(zoo_name: str, model_name: str | None, dictionary_set: Path | None, dictionary_spec: Path | None,
                 device: str, dtype: str, prompts: list[str]):
    """(model handle, zoo or None, transcoders, attention SAEs by layer): the zoo's, or a checkpoint's
    from its dictionary set (which must hold a transcoder at every MLP and an SAE at every attention
    output; the replacement model names what is missing)."""
    from compute.jobs.local import zoo_local_set

    if model_name is None:
        if dictionary_set or dictionary_spec:
            raise UserError("--dictionaries and --dictionary-spec go with --model")
        zoo, _, _ = _zoo_and_dictionaries(zoo_name)
        click.echo("its MLP transcoders and attention SAEs ...", err=True)
        return zoo.handle, zoo, *zoo_local_set(zoo)
    if dictionary_set is None:
        raise UserError("--model needs --dictionaries DIR (its MLP transcoders and attention SAEs)")
    handle, dicts = _checkpoint_and_dictionaries(model_name, device, dtype, dictionary_set, dictionary_spec, False,
                                                 prompts)
    by = {(d.site.component, d.site.layer): d for d in dicts.values()}
    n = handle.model.cfg.n_layers
    return handle, None, {i: by[("mlp", i)] for i in range(n) if ("mlp", i) in by}, \
        {i: by[("attn", i)] for i in range(n) if ("attn", i) in by}


@main.command()
@click.option("--prompt", type=TEXT, help="the prompt whose graph is computed")
@click.option("--task", "task_name", help="instead of --prompt: a zoo task, the mean of its prompts' graphs")
@click.option("--examples", "n_examples", default=8, show_default=True, type=POSITIVE,
              help="with --task: train examples used")
@click.option("--target", type=TEXT, help="the root: logit:TOKEN, diff:TOKEN:OTHER (a logit difference) or SITE/FEATURE@POSITION (FEATURE top: the strongest there); "
                                "default the model's top next token")
@_local_options
@click.pass_obj
def attribute(path: Path, prompt: str | None, task_name: str | None, n_examples: int, target: str | None,
              zoo_name: str, model_name: str | None, dictionary_set: Path | None, dictionary_spec: Path | None,
              device: str, dtype: str, fmt: str, **options):
    """Attribution graph of a prompt (or a task) in the local replacement model, committed as a circuit."""
    import catalog
    from compute.jobs.local import prompt_job, task_job

    if (prompt is None) == (task_name is None):
        raise UserError("give either --prompt or --task")
    if task_name is not None and target is not None:
        raise UserError("--target goes with --prompt (a task's root is each example's answer logit difference)")
    if task_name is not None and model_name is not None:
        raise UserError("--task names a zoo task; with --model give --prompt")
    params = _graph_params(**options)
    cat = catalog.init(path)
    handle, zoo, transcoders, attention = _local_model(zoo_name, model_name, dictionary_set, dictionary_spec, device,
                                                       dtype, [prompt] if prompt else [])
    if task_name is not None:
        if task_name not in zoo.tasks:
            raise UserError(f"unknown task {task_name!r}; zoo tasks: {', '.join(sorted(zoo.tasks))}")
        circuit_id, graphs = task_job(cat, handle, transcoders, attention, zoo.tasks[task_name], n_examples, params)
    else:
        circuit_id, g = prompt_job(cat, handle, transcoders, attention, prompt, target, params)
        graphs = [g]
    kept = cat.sql("SELECT count(*) AS n FROM edges WHERE circuit_id = ? AND kind = 'attribution'", [circuit_id])
    click.echo(f"circuit {circuit_id}: {len(graphs)} prompt(s), root {graphs[0].root.site} "
               f"{sum(g.root_value for g in graphs) / len(graphs):+.3f} (mean), {int(kept.n[0])} edges", err=True)
    _output(_local_nodes(cat, circuit_id), fmt)


def _local_nodes(cat, circuit_id: str):
    """A local circuit's nodes, strongest first, each with the token at its position (first example)."""
    from catalog.graph import first_example, node_name

    nodes = cat.sql("SELECT * FROM nodes WHERE circuit_id = ? AND in_circuit AND component <> 'metric' "
                    "ORDER BY abs(effect) DESC", [circuit_id])
    tokens, _ = first_example(cat, cat.sql("SELECT task_id FROM circuits WHERE circuit_id = ?", [circuit_id]).task_id[0])
    return nodes.assign(node=[node_name(r) for r in nodes.itertuples()],
                        token=[tokens[int(p)] if p == p and int(p) < len(tokens) else "" for p in nodes.position]
                        )[["node_idx", "node", "token", "effect"]]


@main.command()
@click.argument("site_name", metavar="SITE")
@click.argument("feature", type=FEATURE_OR_TOP)
@click.option("--prompt", required=True, type=TEXT, help="the prompt on which the feature fires")
@click.option("--position", type=int, default=-1, show_default=True, help="token position (negative: from the end)")
@_local_options
@click.pass_obj
def explain(path: Path, site_name: str, feature: str, prompt: str, position: int, zoo_name: str,
            model_name: str | None, dictionary_set: Path | None, dictionary_spec: Path | None, device: str, dtype: str,
            fmt: str, **options):
    """Why a feature fires here: its local circuit (SITE is attn_LAYER or mlp_LAYER; FEATURE a number, or
    'top' for the site's strongest feature at the position), committed as a circuit."""
    import pandas as pd

    import catalog
    from compute.jobs.local import prompt_job
    from compute.local.attribution import node_label

    params = _graph_params(**options)
    cat = catalog.init(path)
    handle, _, transcoders, attention = _local_model(zoo_name, model_name, dictionary_set, dictionary_spec, device,
                                                     dtype, [prompt])
    circuit_id, g = prompt_job(cat, handle, transcoders, attention, prompt, f"{site_name}/{feature}@{position}",
                               params)
    rep = g.rep
    click.echo(f"circuit {circuit_id}: {node_label(rep, g.root_node)} has pre-activation {g.root_value:+.3f} "
               f"(value {float(rep.values[g.root.site][g.root.position, g.root.feature]):.3f})", err=True)
    into = {src: w for src, dst, w in g.edges if dst == g.root_node}
    heads: dict[int, list] = {}
    for src, dst, head, w in g.ov:
        if dst == g.root_node:
            heads.setdefault(src, []).append((abs(w), head, w))
    layer, tokens = g.root.component_layer[1], rep.model.to_str_tokens(rep.tokens[0])
    rows = [{"node": node_label(rep, i), "token": tokens[rep.nodes[i].position], "direct": into.get(i, 0.0),
             "influence": float(g.influence[i]),
             "top_head": (f"{layer}.{max(heads[i])[1]} ({max(heads[i])[2]:+.3f})" if i in heads else "")}
            for i in g.kept]
    rows.sort(key=lambda r: -abs(r["direct"]))
    _output(pd.DataFrame(rows), fmt)
    if fmt == "table":
        for _, q in g.qk:
            click.echo(f"\nhead {q.layer}.{q.head} attends from {q.query} to {q.key}: score {q.score:+.3f}")
            top_q = sorted(zip(q.query_nodes, q.query_marginals.tolist(), strict=True), key=lambda t: -abs(t[1]))[:3]
            top_k = sorted(zip(q.key_nodes, q.key_marginals.tolist(), strict=True), key=lambda t: -abs(t[1]))[:3]
            label = lambda n: "bias" if n.site == "bias" else node_label(rep, rep.index[n])  # noqa: E731
            click.echo("  query side: " + ", ".join(f"{label(n)} {m:+.3f}" for n, m in top_q))
            click.echo("  key side:   " + ", ".join(f"{label(n)} {m:+.3f}" for n, m in top_k))


def _params(options: dict):
    from compute.attribution.discovery import FULL_EVALUATION, DiscoveryParams

    no_eval, chosen, full = options.pop("no_eval"), tuple(options.pop("ablations")), options.pop("full_eval")
    given = {k: v for k, v in options.items() if v is not None}  # the rest: DiscoveryParams' defaults
    if full:
        given.update(FULL_EVALUATION)
    if no_eval or chosen:
        given["ablations"] = () if no_eval else chosen
    return DiscoveryParams(**given)


@main.command()
@_discovery_options
@click.option("--neurons/--no-neurons", default=True, show_default=True,
              help="also discover each circuit over neurons (identity dictionaries), the baseline")
@click.pass_obj
def demo(path: Path, neurons: bool, **params):
    """Load the released zoo and its dictionaries, discover a circuit for every zoo task, commit."""
    import catalog

    start = time.monotonic()
    params["full_eval"] = params["full_eval"] or not params["ablations"]  # the zoo is small: its demo sweeps fully
    params = _params(params)
    _check_release()
    catalog.init(path)  # a bad --catalog is refused before any dictionary is measured
    zoo, dicts, identity = _zoo_and_dictionaries(identity=neurons)
    _register(path, zoo, dicts, {"architecture": "standard"})
    _run_tasks(path, zoo.handle, dicts, list(zoo.tasks.values()), params)
    if neurons:
        _run_tasks(path, zoo.handle, identity, list(zoo.tasks.values()), params, basis="neurons")
        if params.ablations:
            _print_features_vs_neurons(path)
    click.echo(f"\ndone in {time.monotonic() - start:.0f}s. Try:\n"
               f"  python cli.py --catalog {path} query \"SELECT task_id, count(*) AS nodes "
               f"FROM circuits JOIN nodes USING (circuit_id) WHERE in_circuit GROUP BY ALL\"")


def _zoo_and_dictionaries(name: str = "default", identity: bool = False):
    from compute.dictionaries.building import zoo_with_dictionaries
    from compute.models.zoo import zoo_config, zoo_path
    from compute.release import is_released

    where = "released" if is_released(zoo_path(zoo_config(name))) else "not in the release: trained on first use, then cached"
    click.echo(f"zoo model {name!r} and its dictionaries ({where}) ...", err=True)
    return zoo_with_dictionaries(zoo_config(name), identity)


def _console():
    """A rich console that stays wide when piped, so summary tables do not wrap."""
    from rich.console import Console

    c = Console()
    return c if c.is_terminal else Console(width=160)


def _print_dictionaries(dicts) -> None:
    from rich.table import Table

    t = Table(title="dictionaries (held-out tokens)")
    for col in ("submodule", "architecture", "d_sae", "FVE", "L0", "dead", "dense", "loss recovered"):
        t.add_column(col, justify="right")
    for name, d in dicts.items():
        m = d.metrics
        t.add_row(name, d.sae.architecture, str(d.sae.d_sae), f"{m['fraction_variance_explained']:.3f}",
                  f"{m['l0']:.1f}", f"{m['dead_fraction']:.1%}", f"{m['dense_fraction']:.1%}",
                  "-" if m.get("loss_recovered") is None else f"{m['loss_recovered']:.3f}")
    _console().print(t)


def _run_tasks(path: Path, handle, dicts, tasks, params, basis: str = "features") -> None:
    from rich.table import Table

    import catalog
    from compute.jobs.discover import discovery_job, top_features

    cat = catalog.init(path)
    t = Table(title=f"circuits over {basis} ({params.method}, node > {params.node_threshold}, "
                    f"edge > {params.edge_threshold})")
    for col in ("task", "accuracy", "examples", "total effect", "nodes", "edges", "faithful", "complete",
                "top nodes"):
        t.add_column(col)
    for task in tasks:
        circuit_id, c, acc = discovery_job(cat, handle, dicts, task, params)
        kept = sum(n.in_circuit for n in c.nodes)
        note = f" ({sum(c.dropped.values())} dropped)" if c.dropped else ""
        for reason, count in c.dropped.items():
            click.echo(f"{task.name}: dropped {count} examples: {reason}", err=True)
        fc = c.at_threshold(params.ablations[0]) if params.ablations else None
        if c.evaluation_note:
            click.echo(f"{task.name}: not evaluated: {c.evaluation_note}", err=True)
        t.add_row(task.name, "-" if acc is None else f"{acc:.1%}", f"{c.n_examples}{note}", f"{c.total_effect:.2f}", str(kept),
                  str(len(c.edges)), f"{fc[0]:.2f}" if fc else "-", f"{fc[1]:.2f}" if fc else "-",
                  ", ".join(top_features(c, 3)))
    _console().print(t)


def _print_features_vs_neurons(path: Path) -> None:
    from rich.table import Table

    import catalog

    df = catalog.open(path).sql("SELECT * FROM nodes_for_faithfulness(0.8)")
    t = Table(title="nodes needed for faithfulness >= 0.8 (mean ablation)")
    for col in ("task", "features", "neurons"):
        t.add_column(col, justify="right")
    for r in df.itertuples():
        t.add_row(r.task_id, *(str(int(v)) if v == v else "never" for v in (r.features, r.neurons)))
    _console().print(t)


def _circuit_selection(f):
    for opt in reversed([
        click.argument("circuit_ids", nargs=-1),
        click.option("--task", "tasks", multiple=True, help="circuits of this task (repeatable)"),
        click.option("--method", "methods", multiple=True, help="circuits found by this method (repeatable)"),
        click.option("--model", "models", multiple=True, help="circuits of this model (repeatable)"),
        click.option("--sql", "select_sql", type=TEXT, help="read-only query returning the circuit_id column"),
    ]):
        f = opt(f)
    return f


@main.command()
@_circuit_selection
@click.option("--errors", type=Choices("compute.attribution.faithfulness:ERROR_MODES"), default="node",
              show_default=True)
@click.option("--predictions", is_flag=True,
              help="draw each submodule's nested node sets instead: the method's predicted change against the "
                   "measured one")
@click.option("--out", type=OutPath(), default=Path("faithfulness.png"), show_default=True)
@click.pass_obj
@answers
def plot(path: Path, circuit_ids, tasks, methods, models, select_sql, errors: str, predictions: bool, out: Path):
    """Faithfulness and completeness curves (PNG) for circuits chosen as `compare` chooses them
    (by id, --task, --method, --model, --sql; default all); --predictions: nested node sets,
    predicted against measured."""
    import catalog
    from catalog.compare import select_circuits
    from catalog.plots import faithfulness_plot, predictions_plot

    cat = catalog.open(path)
    ids = select_circuits(cat, circuit_ids, tasks, methods, models, select_sql)
    click.echo(predictions_plot(cat, ids, out) if predictions else faithfulness_plot(cat, ids, out, errors))


@main.command()
@click.option("--task", "task_name", required=True, help="zoo task to measure again")
@click.option("--features-sql", required=True, type=TEXT,
              help="read-only query returning dictionary_id, feature_idx: the features to ablate")
@click.option("--ablation", type=Choices("compute.attribution.editing:EDIT_ABLATIONS"), default="mean", show_default=True,
              help="value the features are set to (their mean over the measured prompts, or zero)")
@click.option("--split", type=Choices("compute.tasks:SPLITS"), default="test", show_default=True)
@click.option("--out", type=OutPath(), help="also draw the accuracies (PNG)")
@ZOO
@FORMAT
@click.pass_obj
def edit(path: Path, task_name: str, features_sql: str, ablation: str, split: str, out: Path | None,
         zoo_name: str, fmt: str):
    """Ablate the features a SQL query chooses and measure a task again, per case (SHIFT)."""
    import catalog
    from compute.attribution.editing import worst_group
    from compute.jobs.edit import edit_job

    cat = catalog.open(path)
    cat.sql(features_sql)  # a bad query fails here, before the model is built
    zoo, dicts, _ = _zoo_and_dictionaries(zoo_name)
    if task_name not in zoo.tasks:
        raise UserError(f"unknown task {task_name!r}; {zoo_name} zoo tasks: {', '.join(sorted(zoo.tasks))}")
    edit_id, measures = edit_job(cat, zoo.handle, dicts, zoo.tasks[task_name], features_sql, ablation, split)
    _output(cat.sql("SELECT * FROM edit_summary(?)", [edit_id]), fmt)
    before, after = worst_group(measures)
    click.echo(f"worst-group accuracy: {before.accuracy_before:.3f} ({before.subset}) -> "
               f"{after.accuracy_after:.3f} ({after.subset})", err=True)
    if out:
        from catalog.plots import edit_plot

        click.echo(edit_plot(cat, edit_id, out), err=True)


# ---- the query layer: compare, diff, paths, pictures, exports ----------------------------------

@main.command()
@_circuit_selection
@click.option("--top-k", "k", type=POSITIVE,
              help="compare each circuit's k strongest features (default: those in the circuit)")
@click.option("--matrix", "matrix_csv", type=OutPath(), help="write the feature x circuit effect matrix as CSV")
@click.option("--out", type=OutPath(), help="draw the matrix and overlaps (PNG)")
@click.option("--basis", type=Choices("catalog.compare:BASES"),
              help="compare only circuits over this basis (default: the one they share, else features); "
                   "'all' mixes features, neurons and parameter directions")
@FORMAT
@click.pass_obj
@answers
def compare(path: Path, circuit_ids, tasks, methods, models, select_sql, k, matrix_csv, out, basis, fmt):
    """Compare circuits: shared and unique features, Jaccard overlap, rank correlation (default: all,
    one basis at a time)."""
    import catalog
    from catalog.compare import compare as compare_circuits
    from catalog.compare import select_circuits, split_by_basis

    cat = catalog.open(path)
    ids, left_out, basis = split_by_basis(cat, select_circuits(cat, circuit_ids, tasks, methods, models, select_sql),
                                          basis)
    if left_out:
        click.echo(f"comparing the {len(ids)} circuits over {basis}; left out: "
                   + ", ".join(f"{n} over {b}" for b, n in left_out.items())
                   + " (--basis chooses, --basis all mixes them)", err=True)
    cmp = compare_circuits(cat, ids, k)
    labels = cmp.circuits.set_index("circuit_id").label
    pairs = cmp.overlap.assign(a=cmp.overlap.circuit_a.map(labels), b=cmp.overlap.circuit_b.map(labels))
    pairs = pairs[["a", "b", "n_a", "n_b", "n_shared", "jaccard", "rank_corr", "circuit_a", "circuit_b"]]
    _output(pairs.round(3), fmt)
    if fmt == "table":
        counts = cmp.shared.groupby("n_circuits").size()
        click.echo(f"{len(cmp.shared)} features over {len(ids)} circuits; {len(cmp.in_all())} in all of them; "
                   f"{len(cmp.unique())} unique to one; held by k circuits: {counts.to_dict()}")
    if matrix_csv:
        cmp.matrix().to_csv(matrix_csv)
        click.echo(f"wrote {matrix_csv}", err=True)
    if out:
        click.echo(f"wrote {cmp.heatmap(out)}", err=True)


@main.command()
@click.argument("a")
@click.argument("b")
@click.option("--match", type=Choices("catalog.diff:MATCHES"), default="auto", show_default=True,
              help="how nodes correspond: structural key, decoder-direction cosine (other dictionaries or "
                   "models), or auto")
@click.option("--min-similarity", default=0.7, show_default=True, type=click.FloatRange(-1, 1),
              help="decoder cosine needed for a match")
@click.option("--tol", default=1e-9, show_default=True, type=THRESHOLD,
              help="|delta| above which a shared node or edge is 'changed'")
@click.option("--out", type=OutPath(folder=True),
              help="write nodes.csv, edges.csv, matches.csv and summary.csv to this folder")
@FORMAT
@click.pass_obj
@answers
def diff(path: Path, a: str, b: str, match: str, min_similarity: float, tol: float, out: Path | None, fmt: str):
    """What circuit B does differently from circuit A: nodes and edges added, removed, changed."""
    import catalog
    from catalog.diff import diff as diff_circuits

    d = diff_circuits(catalog.open(path), a, b, match, min_similarity, tol)
    if fmt == "table":
        click.echo(d.summary_text(), nl=False)
    else:
        _output(d.counts(), fmt)
    if out:
        for f in d.write(out):
            click.echo(f"wrote {f}", err=True)


@main.command()
@click.argument("circuit_id")
@click.option("--to", "target", type=int, help="node_idx to reach (default: the metric)")
@click.option("-k", "k", default=5, show_default=True, type=POSITIVE, help="how many paths")
@FORMAT
@click.pass_obj
@answers
def paths(path: Path, circuit_id: str, target: int | None, k: int, fmt: str):
    """The k strongest paths from the embedding to the metric (or a node): product of edge weights."""
    import catalog
    from catalog.graph import paths as strongest_paths

    df = strongest_paths(catalog.open(path), circuit_id, k, target)
    if df.empty:
        raise UserError("no path from the embedding reaches that node")
    _output(df[["rank", "strength", "hops", "route", "path"]], fmt)


@main.command()
@click.argument("circuit_id")
@click.argument("node", type=int)
@click.option("--direction", type=Choices("catalog.graph:DIRECTIONS"), default="ancestors",
              show_default=True)
@click.option("--hops", default=2, show_default=True, type=POSITIVE, help="at most this many edges away")
@FORMAT
@click.pass_obj
@answers
def neighbours(path: Path, circuit_id: str, node: int, direction: str, hops: int, fmt: str):
    """The ancestors or descendants of a node within a number of hops."""
    import catalog
    from catalog.graph import neighbours as near

    _output(near(catalog.open(path), circuit_id, node, hops, direction), fmt)


@main.command()
@click.argument("circuit_id")
@click.option("--diff", "other", help="draw the diff from CIRCUIT_ID to this circuit instead")
@click.option("--out", type=OutPath(), default=Path("circuit.html"), show_default=True)
@click.option("--max-per-row", default=40, show_default=True, type=POSITIVE,
              help="strongest nodes drawn per layer and position")
@click.pass_obj
@answers
def render(path: Path, circuit_id: str, other: str | None, out: Path, max_per_row: int):
    """Draw a circuit (or a diff of two) as one self-contained HTML file with inline SVG."""
    import catalog
    from catalog.render import render_circuit, render_diff

    cat = catalog.open(path)
    done = (render_diff(cat, circuit_id, other, out, max_per_row) if other
            else render_circuit(cat, circuit_id, out, max_per_row))
    click.echo(f"wrote {done}")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to listen on (anything but this machine's loopback shows the catalogue to the network)")
@click.option("--port", default=8765, show_default=True, type=click.IntRange(0, 65535), help="0: any free port")
@click.option("--query-timeout", default=10.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              metavar="SECONDS", help="stop any query after this long (and any whose client has gone)")
@click.pass_obj
def serve(path: Path, host: str, port: int, query_timeout: float):
    """The circuit explorer: a local, read-only web app over the catalogue (circuits, graphs, node
    dashboards, diffs, comparisons, faithfulness curves, SQL)."""
    from catalog.explorer import create_app
    from catalog.explorer import serve as run
    from catalog.explorer.app import LOOPBACK
    from compute.dictionaries.dashboards import promoted_for

    app = create_app(path, promoted=promoted_for, query_timeout=query_timeout)
    if host not in LOOPBACK:
        click.echo(f"warning: listening on {host}: anyone who can reach it can read the catalogue", err=True)

    def ready(url: str) -> None:
        click.echo(f"serving {path} at {url} (Ctrl-C stops)")
        sys.stdout.flush()

    run(app, host, port, ready)


@main.command()
@click.argument("circuit_id")
@click.option("--to", "kind", type=Choices("catalog.graph:EXPORTS"), default="circuit-tracer",
              show_default=True, help="graph JSON for circuit-tracer's and Neuronpedia's viewers, or GraphML")
@click.option("--out", type=OutPath(), required=True)
@click.pass_obj
@answers
def export(path: Path, circuit_id: str, kind: str, out: Path):
    """Export a circuit for other tools: circuit-tracer / Neuronpedia graph JSON, or GraphML."""
    import catalog
    from catalog.graph import write_circuit_tracer_json, write_graphml

    cat = catalog.open(path)
    done = write_graphml(cat, circuit_id, out) if kind == "graphml" else write_circuit_tracer_json(cat, circuit_id, out)
    click.echo(f"wrote {done}")


# ---- dictionaries -------------------------------------------------------------------------------

@main.group(invoke_without_command=True)
@FORMAT
@click.pass_context
def dictionaries(ctx, fmt: str):
    """List the catalogue's dictionaries and their quality (train or import them with the subcommands)."""
    if ctx.invoked_subcommand is None:
        import catalog

        ctx.meta[ANSWERS] = True
        _output(catalog.open(ctx.obj).sql("SELECT * FROM dictionary_quality()"), fmt)


@dictionaries.command("train")
@click.option("--architecture", type=Choices("compute.dictionaries.training:TRAINABLE"),
              default="standard", show_default=True)
@click.option("--submodule", "only", multiple=True,
              help="embed, attn_0, mlp_0, resid_0, ... (repeatable; default: all; transcoders: mlp_L)")
@click.option("--expansion", type=POSITIVE, help="features per input dimension")
@click.option("--l1", "l1_coefficient", type=THRESHOLD, help="L1 penalty (standard, transcoder)")
@click.option("--k", type=POSITIVE, help="active features per token (topk)")
@click.option("--l0", "l0_coefficient", type=THRESHOLD, help="L0 penalty (jumprelu)")
@click.option("--steps", type=POSITIVE, help="training steps")
@ZOO
@click.pass_obj
def dictionaries_train(path: Path, architecture: str, only, zoo_name: str, **options):
    """Train dictionaries on the zoo model (cached), measure them, and register them with dashboards
    (options left out take the defaults of compute.dictionaries.training.SAEConfig)."""
    import catalog
    from compute.dictionaries.building import build_dictionaries
    from compute.dictionaries.training import SAEConfig
    from compute.models.zoo import build_zoo, zoo_config

    catalog.init(path)
    zoo = build_zoo(zoo_config(zoo_name))
    given = {k: v for k, v in options.items() if v is not None}
    dicts = build_dictionaries(zoo, SAEConfig(architecture=architecture, **given), only=tuple(only))
    _register(path, zoo, dicts, {"architecture": architecture, **given})


@dictionaries.command("import")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--hook", help="hook it reads (default: from its config)")
@ZOO
@click.pass_obj
def dictionaries_import(path: Path, source: Path, hook: str | None, zoo_name: str):
    """Import a dictionary (an SAELens directory, or dictionary_learning's ae.pt + config.json),
    check it fits the model, measure it and register it with dashboards."""
    import catalog
    from compute.dictionaries.building import import_dictionary
    from compute.models.zoo import build_zoo, zoo_config

    catalog.init(path)
    zoo = build_zoo(zoo_config(zoo_name))
    d = import_dictionary(zoo, source, hook)
    _register(path, zoo, {d.site.name: d}, {"imported_from": str(source)})


def _register(path: Path, zoo, dicts, params: dict) -> None:
    import catalog
    from compute.jobs.register import dictionary_job

    cat = catalog.init(path)
    _print_dictionaries(dicts)
    run_id, n_rows = dictionary_job(cat, zoo.handle, dicts, params=params)
    ids = ", ".join(d.dictionary_id for d in dicts.values())
    click.echo(f"registered {len(dicts)} dictionaries ({ids}) with {n_rows} dashboard activations in run {run_id}")


@main.command()
@click.argument("dictionary")
@click.argument("feature", type=int)
@click.option("-n", "n", default=10, show_default=True, type=POSITIVE, help="top examples and promoted tokens to show")
@FORMAT
@click.pass_obj
@answers
def feature(path: Path, dictionary: str, feature: int, n: int, fmt: str):
    """A feature's dashboard: density, maximum activation, top activating examples (the token
    in [brackets]) and the output tokens its decoder direction promotes."""
    import catalog
    from compute.dictionaries.dashboards import feature_dashboard

    dash = feature_dashboard(catalog.open(path), dictionary, feature, n)
    if fmt != "table":
        _output(dash.examples.assign(dictionary_id=dash.dictionary_id, feature_idx=feature), fmt)
        return
    value = "curvature" if dash.kind == "parameter" else "activation"
    click.echo(f"{dash.dictionary_id} feature {feature} ({dash.hook_name}): density {dash.density:.4f}, "
               f"max {value} {dash.max_activation:.3f}{f', label {dash.label!r}' if dash.label else ''}")
    click.echo("\ntop activating examples:")
    for r in dash.examples.itertuples():
        click.echo(f"  {r.value:8.3f}  {r.text}")
    if dash.examples.empty:
        click.echo("  (none: the feature never fired on the dashboard corpus)")
    if dash.kind != "parameter":
        click.echo("\npromoted tokens (W_dec · W_U):")
        click.echo("  " + "  ".join(f"{t} {v:+.2f}" for t, v in dash.promoted))


# ---- parameter-space features -------------------------------------------------------------------

@main.command()
@click.option("--model", "model_name", type=Choices("compute.jobs.decompose:MODELS"), default="zoo", show_default=True,
              help="xor, tms (the toy models of seed 002) or zoo")
@click.option("--params", "params", multiple=True,
              help="parameter to decompose, as the model names it, e.g. W, b, blocks.0.attn.W_K or blocks.0.attn.W_K[2] "
                   "(one head); repeatable (default: xor W b, tms W, zoo blocks.0.attn.W_K[0])")
@click.option("--features", "n_features", type=POSITIVE, help="directions to find (default: xor 3, tms 5, zoo 8)")
@click.option("--steps", type=POSITIVE, help="optimisation steps per restart")
@click.option("--interference", type=THRESHOLD, help="weight of the low-interference loss (λ)")
@click.option("--restarts", type=POSITIVE, help="seeded restarts; the lowest loss is kept")
@click.option("--seed", type=click.IntRange(min=0), help="seed of the initial directions")
@click.option("--task", "task_names", multiple=True,
              help="zoo task: a circuit of the directions' curvature at its answer position (repeatable)")
@click.option("-n", "n", default=3, show_default=True, type=POSITIVE, help="top examples shown per direction")
@ZOO
@FORMAT
@click.pass_obj
def decompose(path: Path, model_name: str, params, n_features, steps, interference, restarts, seed, task_names,
              n: int, zoo_name: str, fmt: str):
    """Features in parameter space (sparse Hessian eigendecomposition): directions in weight space along
    which some inputs' outputs change sharply, registered as a dictionary of kind parameter."""
    from dataclasses import replace

    import catalog
    from compute.jobs.decompose import DEFAULT_CONFIGS, DecomposeSpec, decomposition_job

    given = {k: v for k, v in {"n_features": n_features, "steps": steps, "interference": interference,
                               "restarts": restarts, "seed": seed}.items() if v is not None}
    tasks = []
    if task_names:
        if model_name != "zoo":
            raise UserError("--task needs --model zoo")
        from compute.models.zoo import build_zoo, zoo_config

        zoo_tasks = build_zoo(zoo_config(zoo_name)).tasks
        for name in task_names:
            if name not in zoo_tasks:
                raise UserError(f"unknown task {name!r}; zoo tasks: {', '.join(sorted(zoo_tasks))}")
            tasks.append(zoo_tasks[name])
    spec = DecomposeSpec(model_name, tuple(params), replace(DEFAULT_CONFIGS[model_name], **given), zoo_name)
    cat = catalog.init(path)
    run_id, found, circuit_ids = decomposition_job(cat, spec, tasks)
    top = cat.sql("SELECT f.feature_idx, round(f.max_activation, 4) AS max_curvature, round(f.density, 4) AS density, "
                  "t.value, t.text FROM features f, LATERAL (SELECT * FROM top_examples(f.dictionary_id, f.feature_idx, ?)) t "
                  "WHERE f.dictionary_id = ? ORDER BY f.feature_idx, t.value DESC", [n, found.dictionary_id])
    _output(top.assign(value=top.value.round(4)), fmt)
    click.echo(f"run {run_id}: dictionary {found.dictionary_id} ({len(found.directions)} directions over "
               f"{found.directions.shape[1]} parameters: {', '.join(found.params)})"
               + (f"; circuits {', '.join(circuit_ids)} (method curvature)" if circuit_ids else ""), err=True)


# ---- benchmarks ---------------------------------------------------------------------------------

@main.group()
def benchmark():
    """Benchmarks whose numbers go into the catalogue."""


@benchmark.command()
@click.option("--l1", "l1s", multiple=True, type=THRESHOLD, help="L1 coefficients (repeatable; default 0.1 0.3 1 3)")
@click.option("--size", "sizes", multiple=True, type=POSITIVE,
              help="dictionary sizes (repeatable; default 32 64 128 256)")
@click.option("--d", "d", default=32, show_default=True, type=click.IntRange(min=2), help="activation dimension")
@click.option("--features", "n_features", default=64, show_default=True, type=POSITIVE, help="ground-truth features")
@click.option("--steps", default=3000, show_default=True, type=POSITIVE, help="training steps per SAE")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--out", type=OutPath(), default=Path("toy_benchmark.png"), show_default=True,
              help="heat-map grid (PNG)")
@FORMAT
@click.pass_obj
def toy(path: Path, l1s, sizes, d: int, n_features: int, steps: int, seed: int, out: Path, fmt: str):
    """Dictionaries on synthetic data of known features: L1 x size sweep, MMCS, dead features, PCA."""
    import pandas as pd

    import catalog
    from catalog.plots import sweep_heatmaps
    from compute.dictionaries.toy_benchmark import ToyData, ToySweep
    from compute.jobs.benchmark import toy_benchmark_job

    sweep = ToySweep(steps=steps, **({"l1_coefficients": tuple(sorted(l1s))} if l1s else {}),
                     **({"sizes": tuple(sorted(sizes))} if sizes else {}))
    run_id, rows = toy_benchmark_job(catalog.init(path), ToyData(d=d, n_features=n_features, seed=seed), sweep)
    _output(pd.DataFrame(rows)[["method", "l1_coefficient", "d_sae", "mse", "l0", "mmcs_truth", "mmcs_larger",
                                "dead_features"]].round(4), fmt)
    click.echo(f"run {run_id}: rows in dictionary_sweeps; heat maps in {sweep_heatmaps(rows, out)}", err=True)


@benchmark.command()
@click.option("--out", type=OutPath(), default=Path("parameters.png"), show_default=True,
              help="each toy input's curvature along each direction (PNG)")
@FORMAT
@click.pass_obj
def parameters(path: Path, out: Path, fmt: str):
    """Parameter-space features on the toys of seed 002: XOR's three directions and TMS's five, checked
    (top inputs) and scored against TMS's true components (MMCS, ML2R) beside APD's and SPD's."""
    import pandas as pd

    import catalog
    from catalog.plots import curvature_heatmaps
    from compute.jobs.decompose import PUBLISHED, parameter_benchmark_job

    _check_release()

    run_id, rows = parameter_benchmark_job(catalog.init(path))
    table = pd.DataFrame(rows)[["toy", "passed", "top_inputs", "mmcs", "ml2r", "dictionary_id"]]
    _output(table.assign(top_inputs=table.top_inputs.map("; ".join)), fmt)
    published = "; ".join(f"{k} MMCS {m:.3f}, ML2R {r:.3f}" for k, (m, r) in PUBLISHED.items())
    click.echo(f"run {run_id}: rows in parameter_benchmarks (published on TMS 5-2: {published}); "
               f"curvatures drawn in {curvature_heatmaps(rows, out)}", err=True)
    if not all(r["passed"] for r in rows):
        raise UserError("a check did not hold: " + "; ".join(r["check"] for r in rows if not r["passed"]))


@benchmark.command("ground-truth")
@click.option("--model", "names", multiple=True, type=Choices("compute.groundtruth.planted:MODELS"),
              help="planted models (repeatable; default all)")
@click.option("--method", "methods", multiple=True, type=Choices("compute.jobs.ground_truth:METHODS"),
              help="discovery methods (repeatable; default all)")
@FORMAT
@click.pass_obj
def ground_truth(path: Path, names, methods, fmt: str):
    """Every discovery method on the planted-circuit models (hand-set weights; strict interchange
    intervention training): node, edge and component precision, recall and AUROC against the planted
    circuit, and the planted circuits' own faithfulness."""
    import catalog
    from compute.groundtruth.planted import MODELS
    from compute.jobs.ground_truth import METHODS, failed_checks, ground_truth_job

    _check_release()

    cat = catalog.init(path)
    run_id, scored, models = ground_truth_job(cat, tuple(names) or MODELS, tuple(methods) or METHODS)
    _output(cat.sql("SELECT model, task_id, method, level, n_true, round(precision, 3) AS precision, "
                    "round(recall, 3) AS recall, round(auroc, 3) AS auroc, circuit_id FROM ground_truth_scores() "
                    "WHERE list_contains(?, circuit_id)", [[r["circuit_id"] for r in scored]]), fmt)
    for m in models:
        click.echo(f"{m['name']}: accuracy {m['accuracy']:.0%}; planted circuit faithfulness {m['faithfulness']:.3f}, "
                   f"its complement's {m['completeness']:.3f}", err=True)
    click.echo(f"run {run_id}: the truth in planted, the models in planted_models, the scores in evaluations "
               "(named query ground_truth_scores)", err=True)
    failed = failed_checks(scored, models)
    if failed:
        raise UserError("a check did not hold: " + "; ".join(failed))


# ---- the released zoo ---------------------------------------------------------------------------

@main.group(invoke_without_command=True)
@FORMAT
@click.pass_context
def zoo(ctx, fmt: str):
    """The release: the trained zoo models, their dictionaries, the planted and toy models that every
    command loads (rebuild them with `zoo build`)."""
    if ctx.invoked_subcommand is None:
        import pandas as pd

        from compute import release
        from compute.rebuild import current_keys

        release.check()
        m = release.manifest()
        if m is None:
            raise UserError(f"no release at {release.release_root()}: every artefact is trained on first use")
        click.echo(f"release {m['version']} ({release.release_root()}): trained {m['date']} on {m['processor']} "
                   f"({m['kernel_path']} kernels, torch {m['torch']}), {m['bytes'] / 1e6:.2f} MB", err=True)
        current = current_keys()
        _output(pd.DataFrame([{"artefact": n, "kind": a["kind"], "key": a["key"], "folder": a["folder"],
                               "files": len(a["files"]), "bytes": a["bytes"],
                               "current": current.get(n) == (a["kind"], a["key"])}
                              for n, a in m["artefacts"].items()]), fmt)
        if not all(current.get(n) == (a["kind"], a["key"]) for n, a in m["artefacts"].items()):
            click.echo("a configuration changed since this release: what is not current trains on first use; "
                       "`cli.py zoo build --release` makes a new release", err=True)


@zoo.command("build")
@click.option("--verify", is_flag=True, help="exit 1 if a rebuilt model misses the released one's accuracy on "
              "a task, or a rebuilt dictionary its variance explained by more than 0.01")
@click.option("--release", "write", is_flag=True,
              help="make what was built the new release (a new version and manifest) unless it is the release's own")
@click.option("--cache", "cache", type=click.Path(file_okay=False, path_type=Path),
              help="build in this cache folder and keep it (default: a temporary one, removed after)")
@click.option("--only", "only", multiple=True, type=Choices("compute.rebuild:ARTEFACTS"),
              help="rebuild this artefact only (repeatable; what it is trained on is built too)")
@FORMAT
def zoo_build(verify: bool, write: bool, cache: Path | None, only: tuple[str, ...], fmt: str):
    """Train every released artefact again from its configuration on this machine's kernel path and
    compare it with the released one: bit-identical, or else both measured side by side."""
    import pandas as pd

    from compute.cache import kernel_path, processor
    from compute.rebuild import rebuild

    start = time.monotonic()
    click.echo(f"rebuilding the release on {processor()} ({kernel_path()} kernels) ...", err=True)
    rows, new = rebuild(cache, write, only)
    table = pd.DataFrame([vars(r) for r in rows])
    _output(table.astype(object).where(table.notna(), "") if fmt == "table" else table, fmt)
    same = sum(r.identical == "yes" for r in rows)
    click.echo(f"{same} of {len({r.artefact for r in rows})} artefacts bit-identical to the release "
               f"({time.monotonic() - start:.0f} s)", err=True)
    if new is not None:
        click.echo(f"wrote release {new['version']} ({new['bytes'] / 1e6:.2f} MB)", err=True)
    failed = [f"{r.artefact} {r.measure} {r.rebuilt} (released {r.released})" for r in rows if r.ok is False]
    if verify and failed:
        raise UserError("the rebuild falls short of the release: " + "; ".join(failed))


if __name__ == "__main__":
    main()
