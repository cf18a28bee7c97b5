"""The rows jobs write: a model and its dictionaries, a task and its examples, activations, a circuit.

Each kind of row has one helper here, used by every job: `circuit_row`, `write_activation_values`,
`require_usable_examples` (a task with nothing usable is refused before a run starts)."""

from __future__ import annotations

import numpy as np

from catalog.errors import UserError
from catalog.shards import RunWriter
from catalog.store import Catalog
from compute.attribution.discovery import Circuit
from compute.dictionaries.kinds import TrainedDictionary
from compute.dictionaries.metrics import METRIC_KEYS
from compute.jobs.lifecycle import now
from compute.models.handle import ModelHandle
from compute.tasks import Encoded, Task, str_tokens
from schema.derive import columns_to_arrow
from schema.sites import METRIC
from schema.tables import TABLES

EDGE_ROWS = 50_000  # edges per batch written (a circuit's edges are streamed, never one big list of rows)


def circuit_row(circuit_id: str, run_id: str, model_id: str, task_id: str, method: str, **columns) -> dict:
    """A `circuits` row: its ids and method, and the other columns given (created now unless given).
    A column the table does not have is a bug, refused here rather than dropped by the writer."""
    row = {"circuit_id": circuit_id, "run_id": run_id, "model_id": model_id, "task_id": task_id, "method": method,
           "created_at": now(), **columns}
    unknown = set(row) - set(TABLES["circuits"].columns.keys())
    if unknown:
        raise ValueError(f"circuits has no column {', '.join(sorted(unknown))}")
    return row


def write_activation_values(table, task_id: str, dictionary_id: str, example_idx, feature_idx, position,
                            value) -> int:
    """Feature values as `activations` rows, one per (example, feature, position): arrays or tensors of
    one length (example_idx may be one number for all). Returns how many rows were written."""
    def array(x):
        return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)

    if hasattr(value, "detach"):  # float64 (on the CPU: MPS has none) before numpy, which has no bfloat16
        value = value.detach().cpu().double()
    n = len(feature_idx)
    table.write(columns_to_arrow("activations", {
        "task_id": task_id, "example_idx": example_idx if isinstance(example_idx, int) else array(example_idx),
        "dictionary_id": dictionary_id, "feature_idx": array(feature_idx), "position": array(position),
        "value": array(value).astype("float64")}, n))
    return n


def require_usable_examples(task: Task, data: Encoded) -> None:
    """Refuse a task none of whose examples can be used, saying how many were dropped for what."""
    if data.n_examples == 0:
        reasons = ", ".join(f"{n} {r}" for r, n in data.dropped.items()) or "no train examples"
        raise UserError(f"task {task.name}: no usable examples ({reasons})")


def write_context(w: RunWriter, handle: ModelHandle, dicts: dict[str, TrainedDictionary], task: Task) -> None:
    """The model, its dictionaries and the task a run worked on."""
    write_model_and_dictionaries(w, handle, dicts)
    write_task(w, handle, task)


def write_model_and_dictionaries(w: RunWriter, handle: ModelHandle, dicts: dict[str, TrainedDictionary]) -> None:
    w.write("models", [handle.row()])
    w.write("dictionaries", [{
        "dictionary_id": d.dictionary_id, "model_id": handle.model_id, "hook_name": d.hook_in,
        "hook_name_out": getattr(d.sae, "hook_name_out", "") or d.site.hook_out,
        "component": d.site.component, "layer": d.site.layer, "kind": d.sae.kind, "architecture": d.sae.architecture,
        "d_in": d.sae.d_in, "d_sae": d.sae.d_sae, "path": str(d.path),
        "metrics": {k: d.metrics[k] for k in METRIC_KEYS if k in d.metrics}} for d in dicts.values()])
    for d in dicts.values():
        w.write("features", [{"dictionary_id": d.dictionary_id, "feature_idx": i, "density": dens,
                              "max_activation": mx}
                             for i, (dens, mx) in enumerate(zip(d.metrics["density"], d.metrics["max_activation"],
                                                                strict=True))])


def write_task(w: RunWriter, handle: ModelHandle | None, task: Task, tokens=None) -> None:
    """A task's row and its examples, each with its clean prompt's tokens: the model's tokenizer's, or
    `tokens(prompt)` for a model without one (a toy's input is one token)."""
    tokens = tokens or (lambda text: str_tokens(handle.model, text))
    w.write("tasks", [task_row(task)])
    w.write("examples", [example_row(task.name, i, e, tokens(e["clean_prefix"])) for i, e in enumerate(task.examples)])


def task_row(task: Task) -> dict:
    """A task's `tasks` row."""
    return {"task_id": task.name, "name": task.name, "source": task.source, "description": task.description,
            "content_hash": task.content_hash, "n_examples": len(task.examples)}


def example_row(task_id: str, idx: int, e: dict, clean_tokens: list[str]) -> dict:
    """An `examples` row: example idx of a task, with its clean prompt's tokens."""
    return {"task_id": task_id, "example_idx": idx, "split": e.get("split", "train"), "case": e.get("case"),
            "clean_prefix": e["clean_prefix"], "patch_prefix": e.get("patch_prefix"),
            "clean_answer": e.get("clean_answer"), "patch_answer": e.get("patch_answer"), "clean_tokens": clean_tokens}


def dictionaries_with_activations(cat: Catalog, task_id: str) -> set[str]:
    """Dictionaries whose activations on this task the catalogue already holds (not written again;
    concurrent runs may both write them, and the view keeps one row per key)."""
    return set(cat.sql("SELECT DISTINCT dictionary_id FROM activations WHERE task_id = ?", [task_id])["dictionary_id"])


def write_activations(cat: Catalog, w: RunWriter, task: Task, dicts: dict[str, TrainedDictionary],
                      circuit: Circuit) -> None:
    """Nonzero clean feature values of the examples used, unless the catalogue already has them."""
    have = dictionaries_with_activations(cat, task.name)
    table = w.table("activations")
    for example_idx, site_name, f in circuit.clean_features:
        d = dicts[site_name]
        if d.dictionary_id in have:
            continue
        if f.is_sparse:  # kept sparse by discovery under a memory budget
            f = f.coalesce()
            (b, t, i), values = f.indices(), f.values()
        else:
            b, t, i = (f != 0).nonzero(as_tuple=True)
            values = f[b, t, i]
        write_activation_values(table, task.name, d.dictionary_id, example_idx[b], i, t, values)


def write_circuit(w: RunWriter, circuit_id: str, run_id: str, model_id: str, task: Task, c: Circuit,
                  acc: float | None, dicts: dict[str, TrainedDictionary], created_at) -> None:
    """A circuit's row, its nodes, its edges (streamed) and its evaluation curves."""
    p = c.params
    chosen = (c.at_threshold(p.ablations[0]) if p.ablations else None) or (None, None)
    n_layers = max(n.site.layer for n in c.nodes if n.site is not None) + 1
    rows = []
    for idx, n in enumerate(c.nodes):
        if n.site is None:
            rows.append({"component": METRIC, "layer": n_layers, "is_error": False})
        else:
            rows.append({"component": n.site.component, "layer": n.site.layer, "hook_name": n.site.hook_out,
                         "dictionary_id": dicts[n.site.name].dictionary_id, "feature_idx": n.feature,
                         "is_error": n.feature is None})
        rows[-1].update(circuit_id=circuit_id, node_idx=idx, position=n.position, effect=n.effect, in_circuit=n.in_circuit)
    w.write("nodes", rows)
    edges = w.table("edges")
    for i in range(0, len(c.edges), EDGE_ROWS):
        edges.write([{"circuit_id": circuit_id, "src_idx": s, "dst_idx": d, "kind": "attribution", "weight": wt}
                     for s, d, wt in c.edges[i : i + EDGE_ROWS]])
    w.write("circuits", [circuit_row(
        circuit_id, run_id, model_id, task.name, p.method, ig_steps=p.ig_steps if p.method == "ig" else None,
        ig_rule=p.ig_rule if p.method == "ig" else None, aggregation=p.aggregation,
        metric="logit_diff" if task.has_patch else "neg_logit", node_threshold=p.node_threshold,
        edge_threshold=p.edge_threshold, n_examples=c.n_examples, n_dropped=sum(c.dropped.values()),
        metric_clean=c.metric_clean, metric_patch=c.metric_patch, accuracy=acc,
        n_nodes=sum(n.in_circuit for n in c.nodes), n_edges=len(c.edges), faithfulness=chosen[0],
        completeness=chosen[1], evaluation_note=c.evaluation_note, created_at=created_at)])
    w.write("evaluations", [
        {"circuit_id": circuit_id, "kind": kind, "ablation": cv.ablation, "errors": cv.errors,
         "threshold": t, "n_nodes": n, "value": v}
        for cv in c.curves if cv.computed
        for kind, values in (("faithfulness", cv.faithfulness), ("completeness", cv.completeness),
                             ("faithfulness_random", cv.random)) if values
        for t, n, v in zip(cv.thresholds, cv.n_nodes, values, strict=True)])
    w.write("predictions", [{"circuit_id": circuit_id, "site": site, "n_nodes": n, "all_nodes": True,
                             "predicted": predicted, "measured": measured}
                            for site, n, predicted, measured in c.completeness_checks()]
            + [{"circuit_id": circuit_id, "site": site, "n_nodes": n, "all_nodes": False, "predicted": predicted,
                "measured": measured} for (site, n), (predicted, measured) in c.nested.items()])
