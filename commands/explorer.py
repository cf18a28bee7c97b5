"""The circuit explorer: a local, read-only web app over the catalogue."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from commands.base import main


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
