"""Jobs: one discovery job -> one run, written as shards and committed all or nothing.

A failure inside the job is recorded as a run with status 'failed' and its
error (and nothing else); an interrupt leaves nothing visible.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import torch
from tqdm.auto import tqdm

from catalog.errors import UserError
from catalog.shards import RunWriter
from catalog.store import Catalog, new_id
from compute.attribution.discovery import Circuit, DiscoveryParams, discover
from compute.dictionaries.kinds import TrainedDictionary, submodules
from compute.dictionaries.metrics import METRIC_KEYS
from compute.models.zoo import Zoo, accuracy
from compute.tasks import Task, encode


def code_version() -> str:
    here = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"0.1.0+{sha}" if sha else "0.1.0"


def discovery_job(cat: Catalog, zoo: Zoo, dicts: dict[str, TrainedDictionary], task: Task,
                  params: DiscoveryParams, progress: bool = True) -> tuple[str, Circuit, float]:
    """Discover one circuit and commit it as one run. Returns (circuit_id, circuit, accuracy)."""
    run_id = new_id("run")
    started = datetime.now(UTC).replace(tzinfo=None)
    run_row = {"run_id": run_id, "kind": "discover", "params": {**asdict(params), "task": task.name},
               "code_version": code_version(), "started_at": started}
    # input that cannot be used is refused before a run starts: a name clash, no usable example
    cat.check_task(task.name, task.content_hash)
    model = zoo.model
    data = encode(model, task, "train", params.n_examples, one_length=params.aggregation == "none")
    if data.n_examples == 0:
        reasons = ", ".join(f"{n} {r}" for r, n in data.dropped.items()) or "no train examples"
        raise UserError(f"task {task.name}: no usable examples ({reasons})")
    with _run(cat, run_row) as writer:
        subs = submodules(model)
        acc = accuracy(model, task, "test")
        acc = accuracy(model, task, "train") if acc is None else acc
        circuit = discover(model, subs, {k: d.sae for k, d in dicts.items()}, data, params, progress)
        circuit_id = new_id("circuit")
        _write_context(cat, writer, zoo, dicts, task)
        _write_activations(cat, writer, task, dicts, circuit)
        _write_circuit(writer, circuit_id, run_id, zoo.model_id, task, circuit, acc, dicts)
        run_row["params"]["dropped"] = circuit.dropped
    return circuit_id, circuit, acc


@contextmanager
def _run(cat: Catalog, run_row: dict, record_failure: bool = True) -> Iterator[RunWriter]:
    """A writer for one run, committed all or nothing: on success the run's row (status ok) is
    written last and the run committed; on an error or interrupt its shards are removed, and an
    error is recorded as a failed run unless record_failure is False."""
    writer = cat.new_run(run_row["run_id"])
    try:
        yield writer
        writer.write("runs", [{**run_row, "status": "ok", "finished_at": _now()}])
        writer.finish()
        cat.commit(run_row["run_id"])
    except BaseException as e:  # an error, Ctrl-C or SIGTERM (see catalog.staging.Terminated)
        writer.abort()
        if record_failure and isinstance(e, Exception):
            _record_failure(cat, run_row, e)
        raise
    finally:
        writer.release()


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _record_failure(cat: Catalog, run_row: dict, error: Exception) -> None:
    """Commit a run of status 'failed' with the error. Should that fail too, nothing of it stays
    staged, and the original error is the one the caller raises."""
    failed = cat.new_run(new_id("run"))
    try:
        failed.write("runs", [{**run_row, "run_id": failed.run_id, "status": "failed",
                               "finished_at": _now(), "error": f"{type(error).__name__}: {error}"}])
        failed.finish()
        cat.commit(failed.run_id)
    except Exception:
        failed.abort()


def _write_context(cat: Catalog, w, zoo: Zoo, dicts: dict[str, TrainedDictionary], task: Task) -> None:
    _write_model_and_dictionaries(w, zoo, dicts)
    _write_task(w, zoo, task)


def _write_model_and_dictionaries(w, zoo: Zoo, dicts: dict[str, TrainedDictionary]) -> None:
    cfg = zoo.model.cfg
    w.write("models", [{"model_id": zoo.model_id, "name": zoo.name, "source": str(zoo.path),
                        "n_layers": cfg.n_layers, "d_model": cfg.d_model, "d_vocab": cfg.d_vocab,
                        "config": json.loads((zoo.path / "config.json").read_text()),
                        "weights_hash": zoo.weights_hash}])
    w.write("dictionaries", [{
        "dictionary_id": d.dictionary_id, "model_id": zoo.model_id, "hook_name": d.hook_in,
        "hook_name_out": getattr(d.sae, "hook_name_out", "") or d.sub.hook_name,
        "component": d.sub.component, "layer": d.sub.layer, "kind": d.sae.kind, "architecture": d.sae.architecture,
        "d_in": d.sae.d_in, "d_sae": d.sae.d_sae, "path": str(d.path),
        "metrics": {k: d.metrics[k] for k in METRIC_KEYS if k in d.metrics}} for d in dicts.values()])
    for d in dicts.values():
        w.write("features", [{"dictionary_id": d.dictionary_id, "feature_idx": i, "density": dens,
                              "max_activation": mx}
                             for i, (dens, mx) in enumerate(zip(d.metrics["density"], d.metrics["max_activation"],
                                                                strict=True))])


def _write_task(w, zoo: Zoo, task: Task) -> None:
    w.write("tasks", [{"task_id": task.name, "name": task.name, "source": task.source,
                       "description": task.description, "content_hash": task.content_hash,
                       "n_examples": len(task.examples)}])
    w.write("examples", [{"task_id": task.name, "example_idx": i, "split": e.get("split", "train"),
                          "case": e.get("case"), "clean_prefix": e["clean_prefix"],
                          "patch_prefix": e.get("patch_prefix"), "clean_answer": e["clean_answer"],
                          "patch_answer": e.get("patch_answer"),
                          "clean_tokens": zoo.model.to_str_tokens(e["clean_prefix"])}
                         for i, e in enumerate(task.examples)])


def dictionary_job(cat: Catalog, zoo: Zoo, dicts: dict[str, TrainedDictionary], n_top: int = 10,
                   progress: bool = True, params: dict | None = None) -> tuple[str, int]:
    """Register dictionaries with their metrics and feature dashboards (each feature's top corpus
    examples as rows of `activations`) as one run. Dictionaries whose dashboards the catalogue
    already holds are registered again but not recomputed. Returns (run_id, activation rows)."""
    from compute.dictionaries.dashboards import corpus_task, top_activations

    run_id = new_id("run")
    run_row = {"run_id": run_id, "kind": "dictionaries", "started_at": _now(), "code_version": code_version(),
               "params": {**(params or {}), "dictionaries": sorted(d.dictionary_id for d in dicts.values()),
                          "n_top": n_top}}
    n_rows = 0
    with _run(cat, run_row) as writer:
        corpus = corpus_task()
        have = _dictionaries_with_activations(cat, corpus.name)
        _write_model_and_dictionaries(writer, zoo, dicts)
        _write_task(writer, zoo, corpus)
        prompts = [e["clean_prefix"] for e in corpus.examples]
        table = writer.table("activations")
        todo = [d for d in dicts.values() if d.dictionary_id not in have]
        for d in tqdm(todo, desc="feature dashboards", disable=not progress, unit="dict"):
            rows = top_activations(zoo.model, d.sae, d.hook_in, prompts, n_top)
            table.write([{"task_id": corpus.name, "example_idx": ex, "dictionary_id": d.dictionary_id,
                          "feature_idx": f, "position": p, "value": v} for ex, f, p, v in rows])
            n_rows += len(rows)
    return run_id, n_rows


def _dictionaries_with_activations(cat: Catalog, task_id: str) -> set[str]:
    """Dictionaries whose activations on this task the catalogue already holds (never written twice)."""
    return set(cat.sql("SELECT DISTINCT dictionary_id FROM activations WHERE task_id = ?", [task_id])["dictionary_id"])


def _write_activations(cat: Catalog, w, task: Task, dicts: dict[str, TrainedDictionary], circuit: Circuit) -> None:
    """Nonzero clean feature values of the examples used, unless the catalogue already has them."""
    have = _dictionaries_with_activations(cat, task.name)
    table = w.table("activations")
    for example_idx, sub_name, f in circuit.clean_features:
        d = dicts[sub_name]
        if d.dictionary_id in have:
            continue
        b, t, i = (f != 0).nonzero(as_tuple=True)
        table.write([{"task_id": task.name, "example_idx": int(example_idx[bb]), "dictionary_id": d.dictionary_id,
                      "feature_idx": int(ii), "position": int(tt), "value": float(v)}
                     for bb, tt, ii, v in zip(b.tolist(), t.tolist(), i.tolist(), f[b, t, i].tolist(), strict=True)])


def _write_circuit(w, circuit_id: str, run_id: str, model_id: str, task: Task, c: Circuit, acc: float,
                   dicts: dict[str, TrainedDictionary]) -> None:
    p = c.params
    chosen = (c.at_threshold(p.ablations[0]) if p.ablations else None) or (None, None)
    n_layers = max(n.sub.layer for n in c.nodes if n.sub is not None) + 1
    rows = []
    for idx, n in enumerate(c.nodes):
        if n.sub is None:
            rows.append({"component": "metric", "layer": n_layers, "is_error": False})
        else:
            rows.append({"component": n.sub.component, "layer": n.sub.layer, "hook_name": n.sub.hook_name,
                         "dictionary_id": dicts[n.sub.name].dictionary_id, "feature_idx": n.feature,
                         "is_error": n.feature is None})
        rows[-1].update(circuit_id=circuit_id, node_idx=idx, position=n.position, effect=n.effect, in_circuit=n.in_circuit)
    w.write("nodes", rows)
    edges = w.table("edges")
    for i in range(0, len(c.edges), 50_000):
        edges.write([{"circuit_id": circuit_id, "src_idx": s, "dst_idx": d, "kind": "attribution", "weight": wt}
                     for s, d, wt in c.edges[i : i + 50_000]])
    w.write("circuits", [{
        "circuit_id": circuit_id, "run_id": run_id, "model_id": model_id, "task_id": task.name,
        "method": p.method, "ig_steps": p.ig_steps if p.method == "ig" else None, "aggregation": p.aggregation,
        "metric": "logit_diff" if task.has_patch else "neg_logit", "node_threshold": p.node_threshold, "edge_threshold": p.edge_threshold,
        "n_examples": c.n_examples, "n_dropped": sum(c.dropped.values()), "metric_clean": c.metric_clean,
        "metric_patch": c.metric_patch, "accuracy": acc, "n_nodes": sum(n.in_circuit for n in c.nodes),
        "n_edges": len(c.edges), "faithfulness": chosen[0], "completeness": chosen[1],
        "evaluation_note": c.evaluation_note, "created_at": _now()}])
    w.write("evaluations", [
        {"circuit_id": circuit_id, "kind": kind, "ablation": cv.ablation, "errors": cv.errors,
         "threshold": t, "n_nodes": n, "value": v}
        for cv in c.curves if cv.computed
        for kind, values in (("faithfulness", cv.faithfulness), ("completeness", cv.completeness),
                             ("faithfulness_random", cv.random))
        for t, n, v in zip(cv.thresholds, cv.n_nodes, values, strict=True)])


@torch.no_grad()
def top_features(c: Circuit, k: int = 5) -> list[str]:
    """Short labels of the k strongest feature nodes, e.g. 'resid_0/123 +2.41' ('resid_0/123@4'
    at position 4 under aggregation none)."""
    feats = [n for n in c.nodes if n.sub is not None and n.feature is not None]
    feats.sort(key=lambda n: -abs(n.effect))
    return [f"{n.sub.name}/{n.feature}{'' if n.position is None else f'@{n.position}'} {n.effect:+.2f}"
            for n in feats[:k]]


def edit_job(cat: Catalog, zoo: Zoo, dicts: dict[str, TrainedDictionary], task: Task, features_sql: str,
             ablation: str = "mean", split: str = "test") -> tuple[str, list]:
    """Ablate the features a read-only query chose and measure the task again, as one run.

    The query must return dictionary_id and feature_idx columns naming features of the
    given dictionaries. Returns (edit_id, measures).
    """
    from compute.attribution.editing import edit_and_measure

    chosen = cat.sql(features_sql)
    missing = {"dictionary_id", "feature_idx"} - set(chosen.columns)
    if missing:
        raise UserError(f"the features query must return dictionary_id and feature_idx (missing: "
                        f"{', '.join(sorted(missing))})")
    chosen = chosen[["dictionary_id", "feature_idx"]].drop_duplicates()
    if chosen.empty:
        raise UserError("the features query chose no features; nothing was edited")
    by_id = {d.dictionary_id: (name, d) for name, d in dicts.items()}
    unknown = sorted(set(chosen["dictionary_id"]) - set(by_id))
    if unknown:
        raise UserError(f"the features query names dictionaries this model does not have: {', '.join(unknown[:3])}")
    features: dict[str, list[int]] = {}
    for dict_id, idx in chosen.itertuples(index=False):
        name, d = by_id[dict_id]
        if not 0 <= int(idx) < d.sae.d_sae:
            raise UserError(f"feature {idx} is out of range for {dict_id} ({d.sae.d_sae} features)")
        features.setdefault(name, []).append(int(idx))
    run_id, edit_id = new_id("run"), new_id("edit")
    run_row = {"run_id": run_id, "kind": "edit", "code_version": code_version(), "started_at": _now(),
               "params": {"task": task.name, "features_sql": features_sql, "ablation": ablation, "split": split}}
    with _run(cat, run_row, record_failure=False) as writer:
        measures = edit_and_measure(zoo.model, submodules(zoo.model), {k: d.sae for k, d in dicts.items()}, task,
                                    features, ablation, split)
        _write_context(cat, writer, zoo, dicts, task)
        common = {"edit_id": edit_id, "run_id": run_id, "model_id": zoo.model_id, "task_id": task.name,
                  "split": split, "ablation": ablation, "features_sql": features_sql, "n_features": len(chosen),
                  "created_at": _now()}
        writer.write("edits", [{**common, "subset": m.subset, "n_examples": m.n_examples,
                                "metric_before": m.metric_before, "metric_after": m.metric_after,
                                "accuracy_before": m.accuracy_before, "accuracy_after": m.accuracy_after}
                               for m in measures])
        writer.write("edit_features", [{"edit_id": edit_id, "dictionary_id": d, "feature_idx": int(i)}
                                       for d, i in chosen.itertuples(index=False)])
    return edit_id, measures


def toy_benchmark_job(cat: Catalog, data, sweep, progress: bool = True) -> tuple[str, list[dict]]:
    """Run the ground-truth dictionary benchmark and commit its rows (dictionary_sweeps) as one run.
    The sweep trains on the pinned kernels that cached builds use, so its numbers are the same on
    every machine of one kernel path (`compute.cache`)."""
    from compute.cache import pinned
    from compute.dictionaries.toy_benchmark import run_sweep

    run_id = new_id("run")
    run_row = {"run_id": run_id, "kind": "benchmark", "started_at": _now(), "code_version": code_version(),
               "params": {"benchmark": "toy", "data": asdict(data), "sweep": asdict(sweep)}}
    with _run(cat, run_row) as writer:
        rows = pinned(run_sweep, data, sweep, progress)
        writer.write("dictionary_sweeps", [{**r, "run_id": run_id, "benchmark": "toy"} for r in rows])
    return run_id, rows
