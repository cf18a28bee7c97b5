"""Dictionaries: list, train and import them; a feature's dashboard."""

from __future__ import annotations

from pathlib import Path

import click

from commands.base import ANSWERS, answers, console, main, output
from commands.options import FORMAT, POSITIVE, THRESHOLD, ZOO, Choices


@main.group(invoke_without_command=True)
@FORMAT
@click.pass_context
def dictionaries(ctx, fmt: str):
    """List the catalogue's dictionaries and their quality (train or import them with the subcommands)."""
    if ctx.invoked_subcommand is None:
        import catalog

        ctx.meta[ANSWERS] = True
        output(catalog.open(ctx.obj).sql("SELECT * FROM dictionary_quality()"), fmt)


@dictionaries.command("train")
@click.option("--architecture", type=Choices("compute.dictionaries.training:TRAINABLE"),
              default="standard", show_default=True)
@click.option("--submodule", "only", multiple=True,
              help="embed, attn_0, mlp_0, resid_0, ... (repeatable; default: all; transcoders: mlp_L)")
@click.option("--expansion", type=POSITIVE, help="features per input dimension")
@click.option("--l1", "l1_coefficient", type=THRESHOLD, help="L1 penalty (standard, transcoder)")
@click.option("--k", type=POSITIVE, help="active features per token (topk)")
@click.option("--l0", "l0_coefficient", type=THRESHOLD, help="L0 penalty (jumprelu)")
@click.option("--steps", type=POSITIVE, help="training steps")
@ZOO
@click.pass_obj
def dictionaries_train(path: Path, architecture: str, only, zoo_name: str, **options):
    """Train dictionaries on the zoo model (cached), measure them, and register them with dashboards
    (options left out take the defaults of compute.dictionaries.training.SAEConfig)."""
    import catalog
    from compute.dictionaries.building import build_dictionaries
    from compute.dictionaries.training import SAEConfig
    from compute.models.zoo import build_zoo, zoo_config

    catalog.init(path)
    zoo = build_zoo(zoo_config(zoo_name))
    given = {k: v for k, v in options.items() if v is not None}
    dicts = build_dictionaries(zoo, SAEConfig(architecture=architecture, **given), only=tuple(only))
    register(path, zoo, dicts, {"architecture": architecture, **given})


@dictionaries.command("import")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--hook", help="hook it reads (default: from its config)")
@ZOO
@click.pass_obj
def dictionaries_import(path: Path, source: Path, hook: str | None, zoo_name: str):
    """Import a dictionary (an SAELens directory, or dictionary_learning's ae.pt + config.json),
    check it fits the model, measure it and register it with dashboards."""
    import catalog
    from compute.dictionaries.building import import_dictionary
    from compute.models.zoo import build_zoo, zoo_config

    catalog.init(path)
    zoo = build_zoo(zoo_config(zoo_name))
    d = import_dictionary(zoo, source, hook)
    register(path, zoo, {d.site.name: d}, {"imported_from": str(source)})


def register(path: Path, zoo, dicts, params: dict) -> None:
    """Measure dictionaries, print their quality and register them with dashboards, one run."""
    import catalog
    from compute.jobs.register import dictionary_job

    cat = catalog.init(path)
    print_dictionaries(dicts)
    run_id, n_rows = dictionary_job(cat, zoo.handle, dicts, params=params)
    ids = ", ".join(d.dictionary_id for d in dicts.values())
    click.echo(f"registered {len(dicts)} dictionaries ({ids}) with {n_rows} dashboard activations in run {run_id}")


@main.command()
@click.argument("dictionary")
@click.argument("feature", type=int)
@click.option("-n", "n", default=10, show_default=True, type=POSITIVE, help="top examples and promoted tokens to show")
@FORMAT
@click.pass_obj
@answers
def feature(path: Path, dictionary: str, feature: int, n: int, fmt: str):
    """A feature's dashboard: density, maximum activation, top activating examples (the token
    in [brackets]) and the output tokens its decoder direction promotes."""
    import catalog
    from compute.dictionaries.dashboards import feature_dashboard

    dash = feature_dashboard(catalog.open(path), dictionary, feature, n)
    if fmt != "table":
        output(dash.examples.assign(dictionary_id=dash.dictionary_id, feature_idx=feature), fmt)
        return
    value = "curvature" if dash.kind == "parameter" else "activation"
    click.echo(f"{dash.dictionary_id} feature {feature} ({dash.hook_name}): density {dash.density:.4f}, "
               f"max {value} {dash.max_activation:.3f}{f', label {dash.label!r}' if dash.label else ''}")
    click.echo("\ntop activating examples:")
    for r in dash.examples.itertuples():
        click.echo(f"  {r.value:8.3f}  {r.text}")
    if dash.examples.empty:
        click.echo("  (none: the feature never fired on the dashboard corpus)")
    if dash.kind != "parameter":
        click.echo("\npromoted tokens (W_dec · W_U):")
        click.echo("  " + "  ".join(f"{t} {v:+.2f}" for t, v in dash.promoted))


def print_dictionaries(dicts) -> None:
    """The dictionaries' held-out quality as a table."""
    from rich.table import Table

    t = Table(title="dictionaries (held-out tokens)")
    for col in ("submodule", "architecture", "d_sae", "FVE", "L0", "dead", "dense", "loss recovered"):
        t.add_column(col, justify="right")
    for name, d in dicts.items():
        m = d.metrics
        t.add_row(name, d.sae.architecture, str(d.sae.d_sae), f"{m['fraction_variance_explained']:.3f}",
                  f"{m['l0']:.1f}", f"{m['dead_fraction']:.1%}", f"{m['dense_fraction']:.1%}",
                  "-" if m.get("loss_recovered") is None else f"{m['loss_recovered']:.3f}")
    console().print(t)
