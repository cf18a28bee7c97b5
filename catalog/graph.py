"""A circuit as a graph: strongest paths, neighbourhoods, networkx, GraphML and viewer JSON.

Paths and neighbourhoods are computed in SQL by the catalogue's recursive macros
(`circuit_paths`, `ancestors`, `descendants`); networkx is the export (and the tests'
independent reference), never the engine.
"""

from __future__ import annotations

import json
from pathlib import Path

import networkx as nx
import numpy as np
import pandas as pd

from catalog.errors import UserError
from catalog.store import Catalog
from schema.sites import METRIC, site_name, stream_index

DIRECTIONS = ("ancestors", "descendants")
QK_KINDS = ("qk", "qk_query", "qk_key")  # a local circuit's attention-score decompositions
EXPORTS = ("circuit-tracer", "graphml")

NODES_SQL = """
SELECT n.*, f.label, f.density, f.max_activation, d.kind AS dictionary_kind
FROM nodes n LEFT JOIN features f USING (dictionary_id, feature_idx)
LEFT JOIN dictionaries d USING (dictionary_id)
WHERE n.circuit_id = ? {cond} ORDER BY n.node_idx
"""


def check_circuit(cat: Catalog, circuit_id: str) -> pd.Series:
    """The circuit's row, or a clear error naming the command that lists circuits."""
    row = cat.sql("SELECT * FROM circuits WHERE circuit_id = ?", [circuit_id])
    if row.empty:
        raise UserError(f"unknown circuit {circuit_id!r}; see `cli.py circuits`")
    return row.iloc[0]


def circuit_nodes(cat: Catalog, circuit_id: str, in_circuit_only: bool = True) -> pd.DataFrame:
    """Nodes with their feature's label, density and maximum activation."""
    return cat.sql(NODES_SQL.format(cond="AND n.in_circuit" if in_circuit_only else ""), [circuit_id])


def node_name(r) -> str:
    """attn_0/123, resid_1/err, embed/7@3, metric: a node as a reader sees it (any row with
    component, layer, is_error, feature_idx and position)."""
    if r.component == METRIC:
        return METRIC
    where = site_name(r.component, r.layer)
    pos = "" if pd.isna(r.position) else f"@{int(r.position)}"
    if not r.is_error and pd.isna(r.feature_idx):  # a local circuit's embedding of a position, over prompts
        return f"{where}{pos}"
    what = "err" if r.is_error else str(int(r.feature_idx))
    return f"{where}/{what}{pos}"


def signed(x) -> str:
    """A number as +0.123, or '-' when missing."""
    return "-" if x is None or pd.isna(x) else f"{x:+.3f}"


def circuit_example(cat: Catalog, circuit_id: str) -> tuple[list[str], str]:
    """(clean tokens, clean prompt) of the example a circuit's positions refer to (an atlas graph's own
    prompt, else its task's first example, train split first); empty if none."""
    ex = cat.sql("SELECT clean_tokens, clean_prefix FROM examples WHERE task_id = (SELECT task_id FROM circuits "
                 "WHERE circuit_id = ?) AND example_idx = circuit_example(?)", [circuit_id, circuit_id])
    return (list(ex.clean_tokens.iloc[0]), ex.clean_prefix.iloc[0]) if len(ex) else ([], "")


def metric_node(cat: Catalog, circuit_id: str) -> int:
    df = cat.sql("SELECT node_idx FROM nodes WHERE circuit_id = ? AND component = 'metric'", [circuit_id])
    if df.empty:
        raise UserError(f"circuit {circuit_id} has no metric node")
    return int(df.node_idx.iloc[0])


def paths(cat: Catalog, circuit_id: str, k: int = 5, to: int | None = None) -> pd.DataFrame:
    """The k strongest paths from the embedding to a node (default: the metric), strength = the
    product of edge weights along the path, ranked by its absolute value."""
    check_circuit(cat, circuit_id)
    if k < 1:
        raise UserError("k must be at least 1")
    target = metric_node(cat, circuit_id) if to is None else _check_node(cat, circuit_id, to)
    df = cat.sql("SELECT * FROM circuit_paths(?, k := ?) WHERE node_idx = ? ORDER BY rank", [circuit_id, k, target])
    names = _names(cat, circuit_id)
    df["route"] = [" -> ".join(names[i] for i in p) for p in df.path]
    return df


def neighbours(cat: Catalog, circuit_id: str, node: int, hops: int = 2, direction: str = "ancestors") -> pd.DataFrame:
    """Ancestors (nodes with a path into node) or descendants within `hops` edges, with the distance."""
    check_circuit(cat, circuit_id)
    if direction not in DIRECTIONS:
        raise UserError(f"direction must be one of {', '.join(DIRECTIONS)}")
    _check_node(cat, circuit_id, node)
    df = cat.sql(f"SELECT * FROM {direction}(?, ?, hops := ?)", [circuit_id, node, hops])
    df.insert(1, "name", [node_name(r) for r in df.itertuples()])
    return df


def _check_node(cat: Catalog, circuit_id: str, node: int) -> int:
    ok = cat.sql("SELECT 1 FROM nodes WHERE circuit_id = ? AND node_idx = ?", [circuit_id, node])
    if ok.empty:
        raise UserError(f"circuit {circuit_id} has no node {node}")
    return int(node)


def _names(cat: Catalog, circuit_id: str) -> dict[int, str]:
    nodes = circuit_nodes(cat, circuit_id, in_circuit_only=False)
    return {int(r.node_idx): node_name(r) for r in nodes.itertuples()}


def to_networkx(cat: Catalog, circuit_id: str, nodes: list[int] | None = None,
                in_circuit_only: bool = True) -> nx.DiGraph:
    """The circuit (or the subgraph on `nodes`) as a DiGraph: node attributes from `nodes` and
    `features` (None left out), edge attributes weight and kind."""
    row = check_circuit(cat, circuit_id)
    df = circuit_nodes(cat, circuit_id, in_circuit_only)
    if nodes is not None:
        df = df[df.node_idx.isin(list(nodes))]
    g = nx.DiGraph(circuit_id=circuit_id, task_id=row.task_id, method=row.method, model_id=row.model_id)
    for r in df.to_dict("records"):
        attrs = {k: _plain(v) for k, v in r.items() if k not in ("circuit_id", "node_idx") and not _missing(v)}
        g.add_node(int(r["node_idx"]), name=node_name(pd.Series(r)), **attrs)
    edges = cat.sql("SELECT src_idx, dst_idx, kind, weight FROM edges WHERE circuit_id = ? AND kind = 'attribution'",
                    [circuit_id])  # the graph's edges (a local circuit's ov and qk rows annotate them)
    keep = set(g.nodes)
    for s, d, kind, w in edges.itertuples(index=False):
        if s in keep and d in keep:
            g.add_edge(int(s), int(d), weight=float(w), kind=kind)
    return g


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and v != v) or v is pd.NA


def _plain(v):
    """numpy scalars to Python ones (GraphML and JSON need them)."""
    return v.item() if hasattr(v, "item") else v


def write_graphml(cat: Catalog, circuit_id: str, out: Path) -> Path:
    nx.write_graphml(to_networkx(cat, circuit_id), str(out))
    return Path(out)


def circuit_tracer_json(cat: Catalog, circuit_id: str) -> dict:
    """The graph JSON that circuit-tracer's and Neuronpedia's attribution-graph viewers read:
    metadata, qParams, nodes and links. Submodules are numbered in stream order (embedding 0,
    then attn, mlp, resid of each block), the metric is the target logit node, and an
    aggregated node sits at the last prompt position."""
    row = check_circuit(cat, circuit_id)
    edges = cat.sql("SELECT * FROM edges WHERE circuit_id = ?", [circuit_id])
    qk = edges[edges.kind.isin(QK_KINDS)]
    nodes = circuit_nodes(cat, circuit_id, in_circuit_only=False)
    wanted = set(qk.src_idx) | set(qk.dst_idx)
    nodes = nodes[nodes.in_circuit | nodes.node_idx.isin(wanted)]
    tokens, prompt = circuit_example(cat, circuit_id)
    last = max(len(tokens) - 1, 0)
    n_layers = int(nodes.layer.max()) if len(nodes) else 0
    ids, out_nodes = {}, []
    for r in nodes.itertuples():
        pos = last if pd.isna(r.position) else int(r.position)
        layer = str(stream_index(r.component, r.layer, n_layers))
        if r.component == METRIC:
            feature, ftype = -1, "logit"
        elif r.component == "embed" and pd.isna(r.dictionary_id):  # a local circuit's token embedding
            feature, ftype = -1 if pd.isna(r.feature_idx) else int(r.feature_idx), "embedding"
        else:
            feature = -1 if r.is_error else int(r.feature_idx)
            ftype = f"{r.component} reconstruction error" if r.is_error else "sparse autoencoder feature"
        node_id = f"{layer}_{feature}_{pos}"
        ids[int(r.node_idx)] = node_id
        out_nodes.append({
            "node_id": node_id, "feature": feature, "layer": layer, "ctx_idx": pos, "feature_type": ftype,
            "token_prob": 0.0, "is_target_logit": r.component == METRIC, "run_idx": 0,
            "reverse_ctx_idx": last - pos, "jsNodeId": f"{layer}_{feature}-{pos}",
            "clerp": (r.label if isinstance(r.label, str) and r.label else node_name(r)),
            "influence": float(abs(r.effect)), "activation": None, "is_from_qk_tracing": not r.in_circuit,
            "catalog": _own_key(r)})  # read back by `import-graph`: the node as it was (viewers ignore it)
    for idx, node in zip(ids, out_nodes, strict=True):  # Neuronpedia's fields for an attention feature whose
        results = _qk_results(qk, ids, idx)  # score was decomposed
        if results:
            node["qk_tracing_results"] = results
    attribution = edges[edges.kind == "attribution"]
    links = [{"source": ids[s], "target": ids[d], "weight": float(w)}
             for s, d, w in attribution[["src_idx", "dst_idx", "weight"]].itertuples(index=False)
             if s in ids and d in ids]
    dicts = sorted(nodes.dictionary_id.dropna().unique().tolist())
    return {
        "metadata": {"slug": f"{row.task_id}-{circuit_id}", "scan": row.model_id, "transcoder_list": dicts,
                     "prompt_tokens": tokens, "prompt": prompt,
                     "node_threshold": float(row.node_threshold), "schema_version": 1,
                     "info": {"circuit_id": circuit_id, "task_id": row.task_id, "method": row.method,
                              "aggregation": row.aggregation, "metric": row.metric}},
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": out_nodes,
        "links": links,
    }


def _own_key(r) -> dict:
    """A node's key and effect as this catalogue stores them (NULLs as None)."""
    def value(x, kind):
        return None if pd.isna(x) else kind(x)

    return {"component": r.component, "layer": int(r.layer), "dictionary_id": value(r.dictionary_id, str),
            "feature_idx": value(r.feature_idx, int), "is_error": bool(r.is_error), "position": value(r.position, int),
            "hook_name": value(r.hook_name, str), "effect": float(r.effect)}


def _qk_results(qk: pd.DataFrame, ids: dict[int, str], node: int) -> dict | None:
    """Neuronpedia's qk_tracing_results of an attention feature: the query x key pairs and each
    side's marginal contributors of the scores decomposed for it, strongest first."""
    mine = qk[(qk.dst_idx == node) & qk.kind.isin(("qk_query", "qk_key"))]  # pairs end at query-side nodes
    if mine.empty:
        return None
    query = mine[mine.kind == "qk_query"].sort_values("weight", key=abs, ascending=False)
    key = mine[mine.kind == "qk_key"].sort_values("weight", key=abs, ascending=False)
    scores = set(zip(query.head_layer, query["head"], query.key_position, strict=True))
    in_scores = [s in scores for s in zip(qk.head_layer, qk["head"], qk.key_position, strict=True)]
    pairs = qk[(qk.kind == "qk").to_numpy() & np.array(in_scores, dtype=bool)]
    pairs = pairs[pairs.dst_idx.isin(set(query.src_idx))].sort_values("weight", key=abs, ascending=False)
    return {"pair_wise_contributors": [[ids[q], ids[k], float(w)] for k, q, w in
                                       pairs[["src_idx", "dst_idx", "weight"]].itertuples(index=False)
                                       if q in ids and k in ids],
            "top_q_marginal_contributors": [[ids[i], float(w)] for i, w in query[["src_idx", "weight"]].itertuples(
                index=False) if i in ids],
            "top_k_marginal_contributors": [[ids[i], float(w)] for i, w in key[["src_idx", "weight"]].itertuples(
                index=False) if i in ids]}


def write_circuit_tracer_json(cat: Catalog, circuit_id: str, out: Path) -> Path:
    Path(out).write_text(json.dumps(circuit_tracer_json(cat, circuit_id)))
    return Path(out)
