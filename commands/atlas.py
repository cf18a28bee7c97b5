"""Questions across an atlas's per-prompt graphs (`attribute --prompts`): a thin layer over `catalog.atlas`."""

from __future__ import annotations

from pathlib import Path

import click

from commands.base import answers, main, output
from commands.options import FORMAT, POSITIVE, TEXT

GROUP_HELP = ("split the graphs by a column of prompts: label, correct, prediction, answer, root, target, n_tokens, "
              "fields.NAME (a field of the file) or all")
GROUPING = click.option("--by", "grouping", default="all", show_default=True, type=TEXT, help=GROUP_HELP)
SHARE = click.FloatRange(0, 1)


@main.group()
def atlas():
    """Questions across the per-prompt graphs of a data set (an atlas)."""


@atlas.command("list")
@FORMAT
@click.pass_obj
@answers
def list_(path: Path, fmt: str):
    """Every atlas: graphs, labels, the model's accuracy, runs."""
    import catalog
    from catalog.atlas import names

    output(names(catalog.open(path)), fmt)


@atlas.command()
@click.argument("name")
@click.option("--by", "grouping", default="label", show_default=True, type=TEXT, help=GROUP_HELP)
@FORMAT
@click.pass_obj
@answers
def summary(path: Path, name: str, grouping: str, fmt: str):
    """An atlas's graphs per group: how many, accuracy, mean probability, mean size."""
    import catalog
    from catalog.atlas import summary as summarise

    output(summarise(catalog.open(path), name, grouping), fmt)


@atlas.command()
@click.argument("name")
@GROUPING
@click.option("--min-share", default=0.0, show_default=True, type=SHARE,
              help="only features in at least this share of a group's graphs")
@FORMAT
@click.pass_obj
@answers
def recurrence(path: Path, name: str, grouping: str, min_share: float, fmt: str):
    """In what share of the graphs (of each group) each feature is in the circuit."""
    import catalog
    from catalog.atlas import recurrence as recur

    output(recur(catalog.open(path), name, grouping, min_share), fmt)


@atlas.command()
@click.argument("name")
@click.option("--min-graphs", default=10, show_default=True, type=POSITIVE,
              help="only features, and pairs, in at least this many graphs")
@FORMAT
@click.pass_obj
@answers
def cooccurrence(path: Path, name: str, min_graphs: int, fmt: str):
    """Pairs of features in the circuits of the same graphs: Jaccard overlap and lift."""
    import catalog
    from catalog.atlas import cooccurrence as cooc

    output(cooc(catalog.open(path), name, min_graphs), fmt)


@atlas.command()
@click.argument("name")
@GROUPING
@FORMAT
@click.pass_obj
@answers
def heads(path: Path, name: str, grouping: str, fmt: str):
    """The attention heads that carry the most flow, per position class (counted from the prompt's end)."""
    import catalog
    from catalog.atlas import head_flow

    output(head_flow(catalog.open(path), name, grouping), fmt)


@atlas.command()
@click.argument("name")
@click.argument("a")
@click.argument("b")
@GROUPING
@FORMAT
@click.pass_obj
@answers
def contrast(path: Path, name: str, a: str, b: str, grouping: str, fmt: str):
    """The edges that separate group A from group B (e.g. --by correct true false), by effect size."""
    import catalog
    from catalog.atlas import contrast as contrast_groups

    output(contrast_groups(catalog.open(path), name, grouping, a, b), fmt)


@atlas.command()
@click.argument("name")
@click.argument("value")
@GROUPING
@click.option("--min-share", default=0.5, show_default=True, type=SHARE,
              help="edges in at least this share of the group's graphs")
@FORMAT
@click.pass_obj
@answers
def typical(path: Path, name: str, value: str, grouping: str, min_share: float, fmt: str):
    """A group's typical graph (VALUE: the group, e.g. --by label sva_simple): its common edges."""
    import catalog
    from catalog.atlas import typical as typical_graph

    output(typical_graph(catalog.open(path), name, grouping, value, min_share), fmt)


@atlas.command()
@click.argument("name")
@FORMAT
@click.pass_obj
@answers
def graphs(path: Path, name: str, fmt: str):
    """One row per graph: its circuit, the prompt, its root, the model's prediction and label."""
    import catalog
    from catalog.atlas import graphs as list_graphs

    output(list_graphs(catalog.open(path), name), fmt)


@atlas.command()
@click.argument("name")
@click.option("--min-graphs", default=10, show_default=True, type=POSITIVE,
              help="only features in the circuits of at least this many graphs")
@click.option("--min-jaccard", default=0.5, show_default=True, type=SHARE,
              help="link two features in at least this Jaccard overlap of their graphs")
@click.option("--min-cosine", default=0.3, show_default=True, type=click.FloatRange(-1, 1),
              help="... whose decoder directions have at least this cosine")
@FORMAT
@click.pass_obj
def supernodes(path: Path, name: str, min_graphs: int, min_jaccard: float, min_cosine: float, fmt: str):
    """Group the features that play one role (found in the same graphs, writing alike) into supernodes,
    committed as a run; prints the groups."""
    import catalog
    from catalog.atlas import supernodes as members
    from compute.jobs.atlas import supernodes_job

    cat = catalog.open(path)
    run_id = supernodes_job(cat, name, min_graphs, min_jaccard, min_cosine)
    found = members(cat, name)
    click.echo(f"run {run_id}: {found.supernode.nunique()} supernodes of {len(found)} features", err=True)
    output(found, fmt)


@atlas.command()
@click.argument("name")
@click.argument("prompt_idx", type=click.IntRange(min=0))
@click.option("--supernodes", "by_supernode", is_flag=True, help="read it at the supernode level")
@FORMAT
@click.pass_obj
@answers
def graph(path: Path, name: str, prompt_idx: int, by_supernode: bool, fmt: str):
    """One prompt's graph (PROMPT_IDX: its line in the file, from 0): its attribution edges, or, with
    --supernodes, the same graph with each supernode's features merged."""
    import catalog
    from catalog.atlas import graph as prompt_graph

    output(prompt_graph(catalog.open(path), name, prompt_idx, by_supernode), fmt)
