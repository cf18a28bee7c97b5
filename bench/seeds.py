"""How much do the demo's features-vs-neurons numbers depend on the zoo's training seed?

    python -m bench.seeds [--seeds 0 1 2]

For each seed this builds the zoo (same configuration, another `seed`: other weights, other
task examples, other dictionaries) with its SAEs and identity dictionaries, discovers every task's
circuit over features and over neurons with the default settings into a catalogue of its own, and
prints per task: the model's accuracy, the nodes needed for faithfulness >= 0.8 over features and
over neurons for each seed, and their spread (min-max). The table in docs/sql.md is seed 0's row; this is
what varies around it. Zoos are cached like the default's, so a rerun costs only the discovery.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def seed_table(seed: int, work: Path) -> dict[str, dict]:
    """{task: {accuracy, features, neurons}} for the zoo of this seed."""
    import catalog
    from compute.attribution.discovery import DiscoveryParams
    from compute.dictionaries.building import zoo_with_dictionaries
    from compute.jobs.discovery_job import discovery_job
    from compute.models.zoo import ZooConfig

    zoo, dicts, identity = zoo_with_dictionaries(dataclasses.replace(ZooConfig(), seed=seed), identity=True)
    cat = catalog.init(work / f"seed{seed}")
    acc = {}
    for basis in (dicts, identity):
        for task in zoo.tasks.values():
            acc[task.name] = discovery_job(cat, zoo.handle, basis, task, DiscoveryParams(), progress=False)[2]
    df = cat.sql("SELECT * FROM nodes_for_faithfulness(0.8)")
    return {r.task_id: {"accuracy": acc[r.task_id], "features": r.features, "neurons": r.neurons}
            for r in df.itertuples()}


def spread(values: list[float]) -> str:
    got = [v for v in values if v == v]  # NaN: never reached 0.8
    if not got:
        return "never"
    text = f"{min(got):.0f}-{max(got):.0f} (median {statistics.median(got):.0f})"
    return text + (f", never on {len(values) - len(got)}" if len(got) < len(values) else "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="seeds-") as tmp:
        tables = {}
        for s in args.seeds:
            tables[s] = seed_table(s, Path(tmp))
            print(f"seed {s}: done", flush=True)
    tasks = sorted(set().union(*tables.values()))

    def cell(s, task, key):
        v = tables[s].get(task, {}).get(key, float("nan"))
        return "never" if v != v else (f"{v:.0%}" if key == "accuracy" else f"{v:.0f}")

    head = " ".join(f"{'seed ' + str(s):>10}" for s in args.seeds)
    for key in ("accuracy", "features", "neurons"):
        print(f"\n{key}{' (nodes for faithfulness >= 0.8, mean ablation)' if key != 'accuracy' else ' (test split)'}")
        print(f"{'task':18} {head}   spread")
        for task in tasks:
            values = [tables[s].get(task, {}).get(key, float("nan")) for s in args.seeds]
            sp = f"{min(values):.0%}-{max(values):.0%}" if key == "accuracy" else spread(values)
            print(f"{task:18} {' '.join(f'{cell(s, task, key):>10}' for s in args.seeds)}   {sp}")
    def nodes(v):
        return v if v == v else float("inf")  # never reaching 0.8 counts as more than any number

    fewer = sum(nodes(tables[s][t]["features"]) < nodes(tables[s][t]["neurons"]) for s in args.seeds for t in tables[s])
    total = sum(len(tables[s]) for s in args.seeds)
    print(f"\nfeatures need fewer nodes than neurons on {fewer} of {total} (seed, task) pairs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
