"""The catalogue itself: create it, query it, list its circuits, check, clean and compact it."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from catalog.errors import UserError
from commands.base import answers, main, output
from commands.options import FORMAT, TEXT, Size


@main.command()
@click.pass_obj
def init(path: Path):
    """Create an empty catalogue."""
    import catalog

    catalog.init(path)
    click.echo(f"catalogue ready at {path}")


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
            output(pd.DataFrame([{"query": q.signature, "summary": q.summary} for q in listed()]), fmt)
        return
    if (sql is None) == (sql_file is None):
        raise UserError("give either SQL or --file, not both or neither")
    text = sql_file.read_text() if sql_file else sql
    if fmt == "csv":  # streamed a chunk at a time: an export of millions of rows is never held whole
        from catalog.query import csv_chunks

        for chunk in csv_chunks(catalog.open(path).chunks(text, strict=strict, timeout=timeout)):
            click.echo(chunk, nl=False)
        return
    output(catalog.open(path).sql(text, strict=strict, timeout=timeout), fmt)


@main.command()
@FORMAT
@click.pass_obj
@answers
def circuits(path: Path, fmt: str):
    """List the circuits in the catalogue."""
    import catalog

    output(catalog.open(path).sql("SELECT * FROM circuit_list()"), fmt)


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
    output(df, fmt)


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
        output(df, fmt)
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
            output(df, fmt)
        click.echo(f"would pack {int(df.runs.sum())} runs ({int(df.shards.sum())} shards) into {len(df)} packs; "
                   "nothing was changed", err=True)
        return
    result = compact_catalog(cat, int(target_size), progress=fmt == "table")
    df = pd.DataFrame(result.packs, columns=columns)
    if not df.empty or fmt != "table":
        output(df, fmt)
    if not result.packs:
        click.echo(f"nothing to compact (no two runs under {target_size / 2 / 2**20:,.0f} MiB, half the target size); "
                   f"generation {result.generation}", err=True)
        return
    click.echo(f"packed {result.runs_packed} runs ({int(df.shards.sum())} shards) into {len(df)} packs; "
               f"generation {result.generation} is current; {result.removed_generations} old generations "
               "removed", err=True)
