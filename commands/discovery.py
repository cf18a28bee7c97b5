"""Circuit discovery on the zoo or a checkpoint (`discover`, `demo`), its curves (`plot`) and
editing a model by ablating chosen features (`edit`)."""

from __future__ import annotations

import time
from pathlib import Path

import click

from catalog.errors import UserError
from commands.base import answers, console, main, output
from commands.dictionaries import register
from commands.options import (
    CIRCUIT_SELECTION,
    DISCOVERY_OPTIONS,
    FORMAT,
    TEXT,
    ZOO,
    Choices,
    OutPath,
    check_release,
    discovery_params,
    model_options,
    options,
)
from compute.jobs.loading import checkpoint_and_dictionaries, zoo_and_dictionaries, zoo_tasks


@main.command()
@click.option("--task", "task_names", multiple=True, help="zoo task name (repeatable)")
@click.option("--task-file", "task_files", multiple=True, type=click.Path(path_type=Path),
              help="JSONL task file in the Sparse Feature Circuits format (repeatable)")
@click.option("--neurons", is_flag=True, help="use identity dictionaries (neurons as features) instead of SAEs")
@ZOO
@options(*model_options("--task-file"))
@click.option("--fill/--no-fill", default=True, show_default=True,
              help="with --dictionaries: neurons (identity dictionaries) where the set has no dictionary")
@DISCOVERY_OPTIONS
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
    params = discovery_params(params)
    tasks = [load_task_file(f) for f in task_files]  # validate files before any heavy work
    cat = catalog.init(path)
    for task in tasks:
        cat.check_task(task.name, task.content_hash)
    if model_name is not None:
        prompts = [e[k] for t in tasks for e in t.examples for k in ("clean_prefix", "patch_prefix") if e.get(k)]
        handle, dicts = checkpoint_and_dictionaries(model_name, device, dtype, dictionary_set, dictionary_spec,
                                                    fill, prompts[:2000])
        _run_tasks(path, handle, dicts, tasks, params, basis="neurons" if neurons else "features")
        return
    zoo, dicts, identity = zoo_and_dictionaries(zoo_name, neurons)
    tasks += zoo_tasks(zoo.tasks, task_names, zoo_name)
    _run_tasks(path, zoo.handle, identity if neurons else dicts, tasks, params)


@main.command()
@DISCOVERY_OPTIONS
@click.option("--neurons/--no-neurons", default=True, show_default=True,
              help="also discover each circuit over neurons (identity dictionaries), the baseline")
@click.pass_obj
def demo(path: Path, neurons: bool, **params):
    """Load the released zoo and its dictionaries, discover a circuit for every zoo task, commit."""
    import catalog

    start = time.monotonic()
    params["full_eval"] = params["full_eval"] or not params["ablations"]  # the zoo is small: its demo sweeps fully
    params = discovery_params(params)
    check_release()
    catalog.init(path)  # a bad --catalog is refused before any dictionary is measured
    zoo, dicts, identity = zoo_and_dictionaries(identity=neurons)
    register(path, zoo, dicts, {"architecture": "standard"})
    _run_tasks(path, zoo.handle, dicts, list(zoo.tasks.values()), params)
    if neurons:
        _run_tasks(path, zoo.handle, identity, list(zoo.tasks.values()), params, basis="neurons")
        if params.ablations:
            _print_features_vs_neurons(path)
    click.echo(f"\ndone in {time.monotonic() - start:.0f}s. Try:\n"
               f"  python cli.py --catalog {path} query \"SELECT task_id, count(*) AS nodes "
               f"FROM circuits JOIN nodes USING (circuit_id) WHERE in_circuit GROUP BY ALL\"")


def _run_tasks(path: Path, handle, dicts, tasks, params, basis: str = "features") -> None:
    """Discover and commit a circuit per task (one run each), then print a summary row per circuit."""
    from rich.table import Table

    import catalog
    from compute.jobs.discovery_job import discovery_job, top_features

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
    console().print(t)


def _print_features_vs_neurons(path: Path) -> None:
    """The demo's last table: nodes each task needs for faithfulness >= 0.8, over features and neurons."""
    from rich.table import Table

    import catalog

    df = catalog.open(path).sql("SELECT * FROM nodes_for_faithfulness(0.8)")
    t = Table(title="nodes needed for faithfulness >= 0.8 (mean ablation)")
    for col in ("task", "features", "neurons"):
        t.add_column(col, justify="right")
    for r in df.itertuples():
        t.add_row(r.task_id, *(str(int(v)) if v == v else "never" for v in (r.features, r.neurons)))
    console().print(t)


@main.command()
@CIRCUIT_SELECTION
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
    zoo, dicts, _ = zoo_and_dictionaries(zoo_name)
    task, = zoo_tasks(zoo.tasks, [task_name], zoo_name)
    edit_id, measures = edit_job(cat, zoo.handle, dicts, task, features_sql, ablation, split)
    output(cat.sql("SELECT * FROM edit_summary(?)", [edit_id]), fmt)
    before, after = worst_group(measures)
    click.echo(f"worst-group accuracy: {before.accuracy_before:.3f} ({before.subset}) -> "
               f"{after.accuracy_after:.3f} ({after.subset})", err=True)
    if out:
        from catalog.plots import edit_plot

        click.echo(edit_plot(cat, edit_id, out), err=True)
