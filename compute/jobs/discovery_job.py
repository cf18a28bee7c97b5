"""The discovery job: one task, one circuit, one run."""

from __future__ import annotations

from dataclasses import asdict

from catalog.store import Catalog, new_id
from compute.attribution.discovery import Circuit, DiscoveryParams, discover
from compute.dictionaries.kinds import TrainedDictionary
from compute.jobs.lifecycle import now, run, run_row
from compute.jobs.rows import (
    require_usable_examples,
    write_activations,
    write_circuit,
    write_context,
)
from compute.models.handle import ModelHandle
from compute.models.zoo import accuracy
from compute.tasks import Task, encode
from schema.sites import sites


def discovery_job(cat: Catalog, handle: ModelHandle, dicts: dict[str, TrainedDictionary], task: Task,
                  params: DiscoveryParams, progress: bool = True) -> tuple[str, Circuit, float | None]:
    """Discover one circuit and commit it as one run. Returns (circuit_id, circuit, accuracy)."""
    row = run_row("discover", {**asdict(params), "task": task.name})
    # input that cannot be used is refused before a run starts: a name clash, no usable example
    cat.check_task(task.name, task.content_hash)
    model = handle.model
    data = encode(model, task, "train", params.n_examples, one_length=params.aggregation == "none")
    require_usable_examples(task, data)
    with run(cat, row) as writer:
        acc = accuracy(model, task, "test")
        acc = accuracy(model, task, "train") if acc is None else acc
        circuit = discover(model, sites(model.cfg.n_layers), {k: d.sae for k, d in dicts.items()}, data, params,
                           progress)
        circuit_id = new_id("circuit")
        write_context(writer, handle, dicts, task)
        write_activations(cat, writer, task, dicts, circuit)
        write_circuit(writer, circuit_id, row["run_id"], handle.model_id, task, circuit, acc, dicts, now())
        row["params"]["dropped"] = circuit.dropped
    return circuit_id, circuit, acc


def top_features(c: Circuit, k: int = 5) -> list[str]:
    """Short labels of the k strongest feature nodes, e.g. 'resid_0/123 +2.41' ('resid_0/123@4'
    at position 4 under aggregation none)."""
    feats = [n for n in c.nodes if n.site is not None and n.feature is not None]
    feats.sort(key=lambda n: -abs(n.effect))
    return [f"{n.site.name}/{n.feature}{'' if n.position is None else f'@{n.position}'} {n.effect:+.2f}"
            for n in feats[:k]]
