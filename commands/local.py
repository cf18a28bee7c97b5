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
@click.option("--examples", "n_examples", type=POSITIVE,
              help="with --task: train examples used (default 8); with --per-prompt, the first N examples "
                   "(default all)")
@click.option("--target", type=TEXT, help="the root: logit:TOKEN, diff:TOKEN:OTHER (a logit difference) or SITE/FEATURE@POSITION (FEATURE top: the strongest there); "
                                "default the model's top next token")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path),
              help="instead of --prompt: a data set, one graph per prompt (an atlas): JSONL with a prompt field "
                   "and optional target, answer and label fields, or text with one prompt per line")
@click.option("--per-prompt", is_flag=True, help="with --task: one graph per example (an atlas named after the "
                                                 "task) instead of their mean")
@click.option("--name", "atlas_name", type=TEXT, help="with --prompts: the atlas's name (default the file's stem)")
@click.option("--shard", type=TEXT, metavar="I/N", help="atlas: only the prompts whose line (or example) number is I "
                                                         "modulo N; a job file runs the shards on many workers")
@click.option("--chunk", default=500, show_default=True, type=POSITIVE,
              help="atlas: prompts per committed run (a rerun after a kill computes only the chunks not committed)")
@LOCAL_OPTIONS
@click.pass_obj
def attribute(path: Path, prompt: str | None, task_name: str | None, n_examples: int, target: str | None,
              prompts_file: Path | None, per_prompt: bool, atlas_name: str | None, shard: str | None, chunk: int,
              zoo_name: str, model_name: str | None, dictionary_set: Path | None, dictionary_spec: Path | None,
              device: str, dtype: str, attention_mode: str, fmt: str, **options):
    """Attribution graph of a prompt (or a task) in the local replacement model, committed as a circuit;
    with --prompts (or --task --per-prompt), one graph per prompt of a data set: an atlas."""
    import catalog
    from compute.jobs.loading import zoo_tasks
    from compute.jobs.local import local_model, prompt_job, task_job

    if sum(x is not None for x in (prompt, task_name, prompts_file)) != 1:
        raise UserError("give one of --prompt, --prompts or --task")
    if target is not None and prompt is None:
        raise UserError("--target goes with --prompt (a file gives each prompt's target; a task's root is each "
                        "example's answer logit difference)")
    if task_name is not None and model_name is not None:
        raise UserError("--task names a zoo task; with --model give --prompt or --prompts")
    if per_prompt and task_name is None:
        raise UserError("--per-prompt goes with --task (--prompts is always per prompt)")
    if n_examples is not None and task_name is None:
        raise UserError("--examples goes with --task")
    if shard is not None and prompts_file is None and not per_prompt:
        raise UserError("--shard goes with --prompts or --per-prompt")
    if atlas_name is not None and prompts_file is None:
        raise UserError("--name goes with --prompts (a task's atlas is named after the task)")
    params = graph_params(**options)
    if prompts_file is not None or per_prompt:
        return _atlas(path, prompts_file, task_name, n_examples, atlas_name, _shard(shard), chunk, zoo_name,
                      model_name, dictionary_set, dictionary_spec, device, dtype, attention_mode, fmt, params)
    cat = catalog.init(path)
    handle, zoo, transcoders, attention = local_model(zoo_name, model_name, dictionary_set, dictionary_spec, device,
                                                       dtype, [prompt] if prompt else [], attention_mode)
    if task_name is not None:
        task, = zoo_tasks(zoo.tasks, [task_name], zoo_name)
        circuit_id, graphs = task_job(cat, handle, transcoders, attention, task, n_examples or 8, params)
    else:
        circuit_id, g = prompt_job(cat, handle, transcoders, attention, prompt, target, params)
        graphs = [g]
    kept = cat.sql("SELECT count(*) AS n FROM edges WHERE circuit_id = ? AND kind = 'attribution'", [circuit_id])
    click.echo(f"circuit {circuit_id}: {len(graphs)} prompt(s), root {graphs[0].root.site} "
               f"{sum(g.root_value for g in graphs) / len(graphs):+.3f} (mean), {int(kept.n[0])} edges", err=True)
    output(cat.sql("SELECT * FROM circuit_nodes(?)", [circuit_id]), fmt)


def _shard(text: str | None) -> tuple[int, int]:
    """'I/N' -> (i, n), with 0 <= i < n; none: (0, 1), every prompt."""
    if text is None:
        return 0, 1
    i, slash, n = text.partition("/")
    if not (slash and i.isdigit() and n.isdigit() and 0 <= int(i) < int(n)):
        raise UserError(f"--shard {text!r}: give I/N with 0 <= I < N, e.g. 0/4")
    return int(i), int(n)


def _atlas(path: Path, prompts_file: Path | None, task_name: str | None, n_examples: int | None,
           atlas_name: str | None, shard: tuple[int, int], chunk: int,
           zoo_name: str, model_name: str | None, dictionary_set: Path | None, dictionary_spec: Path | None,
           device: str, dtype: str, attention_mode: str, fmt: str, params) -> None:
    """`attribute --prompts FILE` / `--task T --per-prompt`: the atlas job, then its summary."""
    import catalog
    from catalog.atlas import summary
    from compute.jobs.atlas import Dropped, atlas_job, read_prompts, task_prompts
    from compute.jobs.loading import zoo_tasks
    from compute.jobs.local import local_model

    task = None
    if prompts_file is not None:
        prompts, dropped = read_prompts(prompts_file)
        name, source = atlas_name or prompts_file.stem, str(prompts_file)
        if not name.strip():
            raise UserError("the atlas needs a name (--name)")
    else:
        dropped, name = Dropped(), task_name
    cat = catalog.init(path)
    sample = [p.prompt for p in prompts[:64]] if prompts_file is not None else []  # what a checkpoint's set is measured on
    handle, zoo, transcoders, attention = local_model(zoo_name, model_name, dictionary_set, dictionary_spec, device,
                                                       dtype, sample, attention_mode)
    if prompts_file is None:
        task, = zoo_tasks(zoo.tasks, [task_name], zoo_name)
        prompts, source = task_prompts(task)[:n_examples], task.source
    result = atlas_job(cat, handle, transcoders, attention, name, prompts, params, source, dropped, chunk, task=task,
                       shard=shard)
    unit = "line" if prompts_file is not None else "example"
    lost = f"; dropped {result.dropped.total()}: {result.dropped.describe(unit)}" if result.dropped.total() else ""
    before = f" ({result.n_done} committed before)" if result.n_done else ""
    if result.n_graphs + result.n_done == 0:
        raise UserError(f"atlas {name}: no prompt could be used{lost}")
    part = f" (shard {shard[0]}/{shard[1]})" if shard[1] > 1 else ""
    click.echo(f"atlas {name}{part}: {result.n_graphs} graphs committed{before}{lost}", err=True)
    output(summary(cat, name), fmt)


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
