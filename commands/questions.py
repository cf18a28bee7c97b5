"""Questions across circuits: compare, diff, paths, neighbours, pictures and exports."""

from __future__ import annotations

from pathlib import Path

import click

from catalog.errors import UserError
from commands.base import answers, main, output
from commands.options import CIRCUIT_SELECTION, FORMAT, POSITIVE, THRESHOLD, Choices, OutPath


@main.command()
@CIRCUIT_SELECTION
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
    output(pairs.round(3), fmt)
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
        output(d.counts(), fmt)
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
    output(df[["rank", "strength", "hops", "route", "path"]], fmt)


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

    output(near(catalog.open(path), circuit_id, node, hops, direction), fmt)


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


@main.command("import-graph")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@FORMAT
@click.pass_obj
def import_graph(path: Path, files: tuple[Path, ...], fmt: str):
    """Import attribution graphs made elsewhere (circuit-tracer's or Neuronpedia's graph JSON,
    circuit-tracer's .pt graphs, read without running code and pruned as circuit-tracer prunes, or
    `export --to circuit-tracer`) as circuits of method circuit-tracer: every file is checked before
    anything is committed, and all land in one run."""
    import pandas as pd

    import catalog
    from compute.jobs.import_graph import import_job

    run_id, done = import_job(catalog.init(path), list(files))
    output(pd.DataFrame([{"circuit_id": c, "file": str(g.path), "model": g.model_id, "nodes": len(g.nodes),
                          "edges": sum(e["kind"] == "attribution" for e in g.edges),
                          "qk_edges": sum(e["kind"] != "attribution" for e in g.edges)} for c, g in done]), fmt)
    what = "1 graph as a circuit" if len(done) == 1 else f"{len(done)} graphs as circuits"
    click.echo(f"imported {what} of run {run_id}", err=True)
