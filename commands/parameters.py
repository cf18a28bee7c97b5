"""Features in parameter space: `decompose`."""

from __future__ import annotations

from pathlib import Path

import click

from catalog.errors import UserError
from commands.base import main, output
from commands.options import FORMAT, POSITIVE, THRESHOLD, ZOO, Choices


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
        from compute.jobs.loading import zoo_tasks
        from compute.models.zoo import build_zoo, zoo_config

        tasks = zoo_tasks(build_zoo(zoo_config(zoo_name)).tasks, task_names, zoo_name)
    spec = DecomposeSpec(model_name, tuple(params), replace(DEFAULT_CONFIGS[model_name], **given), zoo_name)
    cat = catalog.init(path)
    run_id, found, circuit_ids = decomposition_job(cat, spec, tasks)
    top = cat.sql("SELECT feature_idx, round(max_activation, 4) AS max_curvature, round(density, 4) AS density, "
                  "value, text FROM dictionary_examples(?, ?)", [found.dictionary_id, n])
    output(top.assign(value=top.value.round(4)), fmt)
    click.echo(f"run {run_id}: dictionary {found.dictionary_id} ({len(found.directions)} directions over "
               f"{found.directions.shape[1]} parameters: {', '.join(found.params)})"
               + (f"; circuits {', '.join(circuit_ids)} (method curvature)" if circuit_ids else ""), err=True)
