"""The circuit explorer: a local web app over the catalogue (read-only but for the prompt box's graphs)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from commands.base import main
from commands.options import ZOO, model_options, options


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to listen on (anything but this machine's loopback shows the catalogue to the network)")
@click.option("--port", default=8765, show_default=True, type=click.IntRange(0, 65535), help="0: any free port")
@click.option("--query-timeout", default=10.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              metavar="SECONDS", help="stop any query after this long (and any whose client has gone)")
@click.option("--prompt-box/--no-prompt-box", default=True, show_default=True,
              help="the front page's prompt box: a new prompt's graph computed by the server (the model and its "
                   "dictionaries loaded once, in the background from the start) and committed as a circuit")
@ZOO
@options(*model_options("--dictionaries: the prompt box's model"))
@click.option("--attention", "attention_mode", type=click.Choice(["auto", "saes", "frozen"]), default="auto",
              show_default=True, help="the prompt box's graphs: attention as SAE nodes or a frozen path")
@click.pass_obj
def serve(path: Path, host: str, port: int, query_timeout: float, prompt_box: bool, zoo_name: str,
          model_name: str | None, dictionary_set: Path | None, dictionary_spec: Path | None, device: str, dtype: str,
          attention_mode: str):
    """The circuit explorer: a local web app over the catalogue (circuits, graphs, node dashboards,
    diffs, comparisons, faithfulness curves, atlases, SQL); its only write is the prompt box's graph."""
    from catalog.explorer import create_app
    from catalog.explorer import serve as run
    from catalog.explorer.app import LOOPBACK
    from compute.dictionaries.dashboards import promoted_for

    grapher = None
    if prompt_box:
        from compute.jobs.local import PromptGrapher, local_model

        grapher = PromptGrapher(lambda: local_model(zoo_name, model_name, dictionary_set, dictionary_spec, device,
                                                    dtype, [], attention_mode))
    app = create_app(path, promoted=promoted_for, query_timeout=query_timeout, grapher=grapher)
    if grapher is not None:
        grapher.start()
    if host not in LOOPBACK:
        click.echo(f"warning: listening on {host}: anyone who can reach it can read the catalogue", err=True)

    def ready(url: str) -> None:
        click.echo(f"serving {path} at {url} (Ctrl-C stops)")
        sys.stdout.flush()

    run(app, host, port, ready)
