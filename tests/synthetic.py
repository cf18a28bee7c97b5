"""Circuits written straight into a catalogue, with structure known by construction (a test and
bench fixture, not part of the package).

The query layer's tests build circuits whose diff, overlap and paths are known exactly, and
`bench/queries.py` builds circuits of millions of edges; neither needs a model. Columns are
numpy arrays and go to Parquet as Arrow tables, so a 10M-edge circuit writes in seconds.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from catalog.store import Catalog, new_id
from schema.derive import columns_to_arrow
from schema.sites import METRIC, sites


def write_circuit(cat: Catalog, nodes: dict, edges: dict, task_id: str = "synthetic", method: str = "ig",
                  model_id: str = "synthetic", circuit_id: str | None = None, dictionaries: list[dict] = (),
                  extra_circuits: list[dict] = ()) -> str:
    """Commit one circuit as one run. nodes: column -> array (node_idx, component, layer, dictionary_id,
    feature_idx, is_error, position, effect, in_circuit); edges: src_idx, dst_idx, weight (kind defaults
    to attribution). extra_circuits: more circuits (dicts with circuit_id, nodes, edges) in the same run."""
    run_id = new_id("run")
    w = cat.new_run(run_id)
    circuits = [{"circuit_id": circuit_id or new_id("circuit"), "nodes": nodes, "edges": edges, "task_id": task_id,
                 "method": method}, *extra_circuits]
    rows = []
    for c in circuits:
        n, e = c["nodes"], c["edges"]
        nn, ne = len(n["node_idx"]), len(e["src_idx"])
        w.write("nodes", columns_to_arrow("nodes", {"circuit_id": c["circuit_id"], **n}, nn))
        w.write("edges", columns_to_arrow("edges", {"circuit_id": c["circuit_id"], "kind": "attribution", **e}, ne))
        rows.append({"circuit_id": c["circuit_id"], "run_id": run_id, "model_id": model_id,
                     "task_id": c.get("task_id", task_id), "method": c.get("method", method), "aggregation": "sum",
                     "metric": "logit_diff", "node_threshold": 0.0, "edge_threshold": 0.0,
                     "n_nodes": int(np.sum(n["in_circuit"])), "n_edges": ne, "created_at": datetime.now(UTC)})
    w.write("circuits", rows)
    if dictionaries:
        w.write("dictionaries", list(dictionaries))
    w.write("runs", [{"run_id": run_id, "kind": "synthetic", "status": "ok"}])
    w.finish()
    cat.commit(run_id)
    return circuits[0]["circuit_id"]


def save_decoder(path: Path, w_dec: np.ndarray) -> Path:
    """A dictionary's decoder in the SAELens weights file (what decoder matching reads)."""
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file({"W_dec": np.ascontiguousarray(w_dec, dtype=np.float32)}, str(path / "sae_weights.safetensors"))
    return path


def layered_circuit(rng: np.random.Generator, n_layers: int, width: int, n_edges: int, dictionary_ids: dict,
                    feature_pool: int, in_circuit: float = 1.0) -> tuple[dict, dict]:
    """A random circuit in the zoo's shape: rows embed, (attn, mlp, resid) per layer, metric; `width`
    nodes per row drawn from `feature_pool` features (one error node each), about n_edges edges
    between consecutive rows and into the metric. Returns (nodes, edges) column dicts."""
    rows = [(s.component, s.layer) for s in sites(n_layers)]
    comp, layer, dict_id, feat, err, row_of = [], [], [], [], [], []
    for r, (c, lyr) in enumerate(rows):
        f = rng.choice(feature_pool, size=width - 1, replace=False)
        comp += [c] * width
        layer += [lyr] * width
        dict_id += [dictionary_ids[(c, lyr)]] * width
        feat += [*f.tolist(), None]
        err += [False] * (width - 1) + [True]
        row_of += [r] * width
    comp.append(METRIC)
    layer.append(n_layers)
    dict_id.append(None)
    feat.append(None)
    err.append(False)
    row_of.append(len(rows))
    n = len(comp)
    row_of = np.array(row_of)
    nodes = {"node_idx": np.arange(n), "component": np.array(comp, dtype=object), "layer": np.array(layer),
             "dictionary_id": np.array(dict_id, dtype=object), "feature_idx": np.array(feat, dtype=object),
             "is_error": np.array(err), "position": np.array([None] * n, dtype=object),
             "effect": rng.normal(size=n), "in_circuit": rng.random(n) < in_circuit}
    # edges from row r to row r + 1 (the last row into the metric), drawn without repeats
    per_gap = max(n_edges // len(rows), 1)
    src, dst = [], []
    for r in range(len(rows)):
        lo, hi = np.flatnonzero(row_of == r), np.flatnonzero(row_of == r + 1)
        pairs = rng.choice(len(lo) * len(hi), size=min(per_gap, len(lo) * len(hi)), replace=False)
        src.append(lo[pairs // len(hi)])
        dst.append(hi[pairs % len(hi)])
    src, dst = np.concatenate(src), np.concatenate(dst)
    edges = {"src_idx": src, "dst_idx": dst, "weight": rng.normal(size=len(src))}
    return nodes, edges


# Two small hand-written circuits A and B (node rows, edge rows) that the query and picture tests share.
def node_columns(rows):
    """(component, layer, dictionary, feature or None, is_error, effect, in_circuit[, position]) -> columns."""
    cols = {k: [] for k in ("node_idx", "component", "layer", "dictionary_id", "feature_idx", "is_error",
                            "position", "effect", "in_circuit")}
    for i, r in enumerate(rows):
        comp, layer, d, f, err, eff, inc, *pos = r
        for k, v in zip(cols, (i, comp, layer, d, f, err, pos[0] if pos else None, eff, inc), strict=True):
            cols[k].append(v)
    return {k: np.array(v, dtype=object if k in ("dictionary_id", "feature_idx", "position", "component") else None)
            for k, v in cols.items()}


def edge_columns(rows):
    s, d, w = zip(*rows, strict=True) if rows else ((), (), ())
    return {"src_idx": np.array(s, dtype=np.int64), "dst_idx": np.array(d, dtype=np.int64),
            "weight": np.array(w, dtype=float)}


# A and B share some nodes; B's node_idx order differs on purpose (nodes match by key, not index).
A_NODES = [("embed", -1, "dE", 1, False, 2.0, True), ("embed", -1, "dE", 2, False, 1.0, True),
           ("attn", 0, "dA", 5, False, 0.5, True), ("attn", 0, "dA", None, True, 0.3, True),
           ("resid", 0, "dR", 7, False, 0.05, False), ("metric", 1, None, None, False, 3.0, True)]
A_EDGES = [(0, 2, 1.0), (1, 2, 0.5), (2, 5, 2.0), (3, 5, 0.1)]
B_NODES = [("metric", 1, None, None, False, 3.5, True), ("attn", 0, "dA", 5, False, 0.8, True),
           ("embed", -1, "dE", 1, False, 2.0, True), ("resid", 0, "dR", 7, False, 0.6, True),
           ("attn", 0, "dA", None, True, 0.3, True), ("embed", -1, "dE", 3, False, 0.4, True)]
B_EDGES = [(2, 1, 1.0), (1, 0, 2.5), (4, 0, 0.1), (3, 0, 0.7), (5, 1, 0.2)]
