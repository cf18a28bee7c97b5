"""Local circuits: a prompt's attribution graph in the replacement model (`attribute`), and why a
feature fires (`explain`)."""

from __future__ import annotations

from pathlib import Path

import click

from catalog.errors import UserError
from commands.base import main, output
from commands.options import FEATURE_OR_TOP, LOCAL_OPTIONS, POSITIVE, TEXT, graph_params


@main.command()
@click.option("--prompt", type=TEXT, help="the prompt whose graph is computed")
@click.option("--task", "task_name", help="instead of --prompt: a zoo task, the mean of its prompts' graphs")
@click.option("--examples", "n_examples", default=8, show_default=True, type=POSITIVE,
              help="with --task: train examples used")
@click.option("--target", type=TEXT, help="the root: logit:TOKEN, diff:TOKEN:OTHER (a logit difference) or SITE/FEATURE@POSITION (FEATURE top: the strongest there); "
                                "default the model's top next token")
@LOCAL_OPTIONS
@click.pass_obj
def attribute(path: Path, prompt: str | None, task_name: str | None, n_examples: int, target: str | None,
              zoo_name: str, model_name: str | None, dictionary_set: Path | None, dictionary_spec: Path | None,
              device: str, dtype: str, attention_mode: str, fmt: str, **options):
    """Attribution graph of a prompt (or a task) in the local replacement model, committed as a circuit."""
    import catalog
    from compute.jobs.loading import zoo_tasks
    from compute.jobs.local import local_model, prompt_job, task_job

    if (prompt is None) == (task_name is None):
        raise UserError("give either --prompt or --task")
    if task_name is not None and target is not None:
        raise UserError("--target goes with --prompt (a task's root is each example's answer logit difference)")
    if task_name is not None and model_name is not None:
        raise UserError("--task names a zoo task; with --model give --prompt")
    params = graph_params(**options)
    cat = catalog.init(path)
    handle, zoo, transcoders, attention = local_model(zoo_name, model_name, dictionary_set, dictionary_spec, device,
                                                       dtype, [prompt] if prompt else [], attention_mode)
    if task_name is not None:
        task, = zoo_tasks(zoo.tasks, [task_name], zoo_name)
        circuit_id, graphs = task_job(cat, handle, transcoders, attention, task, n_examples, params)
    else:
        circuit_id, g = prompt_job(cat, handle, transcoders, attention, prompt, target, params)
        graphs = [g]
    kept = cat.sql("SELECT count(*) AS n FROM edges WHERE circuit_id = ? AND kind = 'attribution'", [circuit_id])
    click.echo(f"circuit {circuit_id}: {len(graphs)} prompt(s), root {graphs[0].root.site} "
               f"{sum(g.root_value for g in graphs) / len(graphs):+.3f} (mean), {int(kept.n[0])} edges", err=True)
    output(cat.sql("SELECT * FROM circuit_nodes(?)", [circuit_id]), fmt)


@main.command()
@click.argument("site_name", metavar="SITE")
@click.argument("feature", type=FEATURE_OR_TOP)
@click.option("--prompt", required=True, type=TEXT, help="the prompt on which the feature fires")
@click.option("--position", type=int, default=-1, show_default=True, help="token position (negative: from the end)")
@LOCAL_OPTIONS
@click.pass_obj
def explain(path: Path, site_name: str, feature: str, prompt: str, position: int, zoo_name: str,
            model_name: str | None, dictionary_set: Path | None, dictionary_spec: Path | None, device: str, dtype: str,
            attention_mode: str, fmt: str, **options):
    """Why a feature fires here: its local circuit (SITE is attn_LAYER or mlp_LAYER; FEATURE a number, or
    'top' for the site's strongest feature at the position), committed as a circuit."""
    import pandas as pd

    import catalog
    from compute.jobs.local import inputs_of_root, local_model, prompt_job, score_parts
    from compute.local.contributions import node_label

    params = graph_params(**options)
    cat = catalog.init(path)
    handle, _, transcoders, attention = local_model(zoo_name, model_name, dictionary_set, dictionary_spec, device,
                                                     dtype, [prompt], attention_mode)
    circuit_id, g = prompt_job(cat, handle, transcoders, attention, prompt, f"{site_name}/{feature}@{position}",
                               params)
    rep = g.rep
    click.echo(f"circuit {circuit_id}: {node_label(rep, g.root_node)} has pre-activation {g.root_value:+.3f} "
               f"(value {float(rep.values[g.root.site][g.root.position, g.root.feature]):.3f})", err=True)
    output(pd.DataFrame(inputs_of_root(g)), fmt)
    if fmt == "table":
        for head, query_side, key_side in score_parts(g):
            click.echo(f"\n{head}\n  query side: {query_side}\n  key side:   {key_side}")


@main.command()
@click.option("--prompt", required=True, type=TEXT, help="the prompt to intervene on")
@click.option("--set", "set_", multiple=True, type=TEXT, metavar="SITE/FEATURE@POS=VALUE",
              help="set a feature's value (repeatable)")
@click.option("--scale", multiple=True, type=TEXT, metavar="SITE/FEATURE@POS=FACTOR",
              help="multiply a feature's value (repeatable)")
@click.option("--zero", multiple=True, type=TEXT, metavar="SITE/FEATURE@POS", help="zero a feature (repeatable)")
@click.option("--target", type=TEXT, help="the logit measured: logit:TOKEN or diff:TOKEN:OTHER; default the model's "
                                          "top next token")
@click.option("--top", default=5, show_default=True, type=POSITIVE, help="top next tokens shown before and after")
@LOCAL_OPTIONS
@click.pass_obj
def steer(path: Path, prompt: str, set_, scale, zero, target: str | None, top: int, zoo_name: str,
          model_name: str | None, dictionary_set: Path | None, dictionary_spec: Path | None, device: str, dtype: str,
          attention_mode: str, fmt: str, **options):
    """Set, scale or zero features in the real model (the dictionary spliced in, its error term kept):
    the target logit's change beside the graph's linear prediction, and the top tokens before and
    after; committed as a run of kind steer."""
    import pandas as pd

    import catalog
    from compute.jobs.local import local_model, steer_job

    given = [("set", s) for s in set_] + [("scale", s) for s in scale] + [("zero", s) for s in zero]
    if not given:
        raise UserError("give at least one --set, --scale or --zero")
    cat = catalog.init(path)
    handle, _, transcoders, attention = local_model(zoo_name, model_name, dictionary_set, dictionary_spec, device,
                                                     dtype, [prompt], attention_mode)
    run_id, result = steer_job(cat, handle, transcoders, attention, prompt, target, given)
    output(pd.DataFrame(result.rows), fmt)
    if fmt == "table":
        decode = handle.model.to_string
        for name, logits in (("before", result.logits_before), ("after", result.logits_after)):
            best = logits.softmax(-1).topk(top)
            click.echo(f"{name:>6}: " + "  ".join(f"{decode([int(i)])!r} {p:.3f}" for p, i in
                                                    zip(best.values.tolist(), best.indices.tolist(), strict=True)))
    click.echo(f"run {run_id}: target {result.before:+.3f} -> {result.after:+.3f} "
               f"(change {result.after - result.before:+.3f}; the graph predicts {result.predicted_joint:+.3f})",
               err=True)
