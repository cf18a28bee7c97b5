"""Benchmarks whose numbers go into the catalogue: toy dictionaries, parameter features, planted circuits."""

from __future__ import annotations

from pathlib import Path

import click

from catalog.errors import UserError
from commands.base import main, output
from commands.options import FORMAT, POSITIVE, THRESHOLD, Choices, OutPath, check_release


@main.group()
def benchmark():
    """Benchmarks whose numbers go into the catalogue."""


@benchmark.command()
@click.option("--l1", "l1s", multiple=True, type=THRESHOLD, help="L1 coefficients (repeatable; default 0.1 0.3 1 3)")
@click.option("--size", "sizes", multiple=True, type=POSITIVE,
              help="dictionary sizes (repeatable; default 32 64 128 256)")
@click.option("--d", "d", default=32, show_default=True, type=click.IntRange(min=2), help="activation dimension")
@click.option("--features", "n_features", default=64, show_default=True, type=POSITIVE, help="ground-truth features")
@click.option("--steps", default=3000, show_default=True, type=POSITIVE, help="training steps per SAE")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--out", type=OutPath(), default=Path("toy_benchmark.png"), show_default=True,
              help="heat-map grid (PNG)")
@FORMAT
@click.pass_obj
def toy(path: Path, l1s, sizes, d: int, n_features: int, steps: int, seed: int, out: Path, fmt: str):
    """Dictionaries on synthetic data of known features: L1 x size sweep, MMCS, dead features, PCA."""
    import pandas as pd

    import catalog
    from catalog.plots import sweep_heatmaps
    from compute.dictionaries.toy_benchmark import ToyData, ToySweep
    from compute.jobs.benchmark import toy_benchmark_job

    sweep = ToySweep(steps=steps, **({"l1_coefficients": tuple(sorted(l1s))} if l1s else {}),
                     **({"sizes": tuple(sorted(sizes))} if sizes else {}))
    run_id, rows = toy_benchmark_job(catalog.init(path), ToyData(d=d, n_features=n_features, seed=seed), sweep)
    output(pd.DataFrame(rows)[["method", "l1_coefficient", "d_sae", "mse", "l0", "mmcs_truth", "mmcs_larger",
                                "dead_features"]].round(4), fmt)
    click.echo(f"run {run_id}: rows in dictionary_sweeps; heat maps in {sweep_heatmaps(rows, out)}", err=True)


@benchmark.command()
@click.option("--out", type=OutPath(), default=Path("parameters.png"), show_default=True,
              help="each toy input's curvature along each direction (PNG)")
@FORMAT
@click.pass_obj
def parameters(path: Path, out: Path, fmt: str):
    """Parameter-space features on the toys of seed 002: XOR's three directions and TMS's five, checked
    (top inputs) and scored against TMS's true components (MMCS, ML2R) beside APD's and SPD's."""
    import pandas as pd

    import catalog
    from catalog.plots import curvature_heatmaps
    from compute.jobs.decompose import PUBLISHED, parameter_benchmark_job

    check_release()

    run_id, rows = parameter_benchmark_job(catalog.init(path))
    table = pd.DataFrame(rows)[["toy", "passed", "top_inputs", "mmcs", "ml2r", "dictionary_id"]]
    output(table.assign(top_inputs=table.top_inputs.map("; ".join)), fmt)
    published = "; ".join(f"{k} MMCS {m:.3f}, ML2R {r:.3f}" for k, (m, r) in PUBLISHED.items())
    click.echo(f"run {run_id}: rows in parameter_benchmarks (published on TMS 5-2: {published}); "
               f"curvatures drawn in {curvature_heatmaps(rows, out)}", err=True)
    if not all(r["passed"] for r in rows):
        raise UserError("a check did not hold: " + "; ".join(r["check"] for r in rows if not r["passed"]))


@benchmark.command("ground-truth")
@click.option("--model", "names", multiple=True, type=Choices("compute.groundtruth.planted:MODELS"),
              help="planted models (repeatable; default all)")
@click.option("--method", "methods", multiple=True, type=Choices("compute.jobs.ground_truth:METHODS"),
              help="discovery methods (repeatable; default all)")
@FORMAT
@click.pass_obj
def ground_truth(path: Path, names, methods, fmt: str):
    """Every discovery method on the planted-circuit models (hand-set weights; strict interchange
    intervention training): node, edge and component precision, recall and AUROC against the planted
    circuit, and the planted circuits' own faithfulness."""
    import catalog
    from compute.groundtruth.planted import MODELS
    from compute.jobs.ground_truth import METHODS, failed_checks, ground_truth_job

    check_release()

    cat = catalog.init(path)
    run_id, scored, models = ground_truth_job(cat, tuple(names) or MODELS, tuple(methods) or METHODS)
    output(cat.sql("SELECT model, task_id, method, level, n_true, round(precision, 3) AS precision, "
                    "round(recall, 3) AS recall, round(auroc, 3) AS auroc, circuit_id FROM ground_truth_scores() "
                    "WHERE list_contains(?, circuit_id)", [[r["circuit_id"] for r in scored]]), fmt)
    for m in models:
        click.echo(f"{m['name']}: accuracy {m['accuracy']:.0%}; planted circuit faithfulness {m['faithfulness']:.3f}, "
                   f"its complement's {m['completeness']:.3f}", err=True)
    click.echo(f"run {run_id}: the truth in planted, the models in planted_models, the scores in evaluations "
               "(named query ground_truth_scores)", err=True)
    failed = failed_checks(scored, models)
    if failed:
        raise UserError("a check did not hold: " + "; ".join(failed))
