"""The released zoo: list it (`zoo`) and rebuild it (`zoo build`)."""

from __future__ import annotations

import time
from pathlib import Path

import click

from catalog.errors import UserError
from commands.base import main, output
from commands.options import FORMAT, Choices


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
        output(pd.DataFrame([{"artefact": n, "kind": a["kind"], "key": a["key"], "folder": a["folder"],
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
    output(table.astype(object).where(table.notna(), "") if fmt == "table" else table, fmt)
    same = sum(r.identical == "yes" for r in rows)
    click.echo(f"{same} of {len({r.artefact for r in rows})} artefacts bit-identical to the release "
               f"({time.monotonic() - start:.0f} s)", err=True)
    if new is not None:
        click.echo(f"wrote release {new['version']} ({new['bytes'] / 1e6:.2f} MB)", err=True)
    failed = [f"{r.artefact} {r.measure} {r.rebuilt} (released {r.released})" for r in rows if r.ok is False]
    if verify and failed:
        raise UserError("the rebuild falls short of the release: " + "; ".join(failed))
