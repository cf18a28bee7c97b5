"""Attribution graphs made elsewhere into the catalogue: the graph JSON that circuit-tracer writes
(`create_graph_files`) and Neuronpedia serves, circuit-tracer's `Graph.to_pt` files (read safely and
pruned as `create_graph_files` prunes: compute.jobs.circuit_tracer_pt), and this catalogue's own
`export --to circuit-tracer`.

Each graph becomes a circuit (method `circuit-tracer`) of a one-example task holding its prompt and
tokens, so `compare`, `diff`, `paths`, `render`, `serve` and SQL read it like any other. Nodes keep
circuit-tracer's meaning: a token's embedding (layer "E") is `embed` at layer -1 with the token id
as its feature; a transcoder feature or its error term (layer L) is `mlp` at layer L, in the
dictionary that names the file's transcoder set at that layer; a logit (layer n_layers + 1) is a
`metric` node with the token id as its feature. A node's influence is its effect; links are
`attribution` edges; a node's `qk_tracing_results` become `qk`, `qk_query` and `qk_key` edges; the
viewer's supernodes are kept in the run's params. A node this catalogue exported carries its own
key (`catalog`), so an exported circuit comes back with the same nodes and edges.

Every file is read and checked whole before anything is written, and all are committed as one run:
a malformed or hostile file is one line naming it and what is wrong, and nothing is committed.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from catalog.errors import UserError
from catalog.store import Catalog, new_id
from compute.inputs import read_bounded
from compute.jobs.lifecycle import run, run_row
from compute.jobs.rows import EDGE_ROWS, circuit_row, write_task
from compute.tasks import Task
from schema.sites import COMPONENTS, METRIC, block_input, transcoder_site

METHOD = "circuit-tracer"
MAX_BYTES = 512 * 2**20  # a graph file larger than this is refused before it is read (Neuronpedia's are < 100 MB)
QK_SIDES = (("top_q_marginal_contributors", "qk_query"), ("top_k_marginal_contributors", "qk_key"))
FEATURE_TYPES = ("cross layer transcoder", "transcoder", "per layer transcoder", "sparse autoencoder feature")
KEY = ("component", "layer", "dictionary_id", "feature_idx", "is_error", "position")


@dataclass
class ImportedGraph:
    """One file's graph as rows (node_idx = its place in `nodes`), checked and ready to write."""

    path: Path
    model_id: str
    prompt: str
    tokens: list[str]
    answer: str
    node_threshold: float | None
    nodes: list[dict]
    edges: list[dict]
    dictionaries: dict[str, dict] = field(default_factory=dict)  # dictionary_id -> its row
    supernodes: list = field(default_factory=list)


def read_graph(path: Path) -> ImportedGraph:
    """Read and check one graph JSON file; anything that cannot be used is a UserError naming the file."""
    where = str(path)
    data = read_bounded(path, MAX_BYTES, "graph file")
    if path.suffix == ".pt" or data.startswith(b"PK\x03\x04"):  # circuit-tracer's Graph.to_pt (a zip)
        from compute.jobs.circuit_tracer_pt import graph_document

        doc = graph_document(path, data)
    else:
        doc = _json_document(data, where)
    if not isinstance(doc, dict) or not isinstance(doc.get("nodes"), list) or not isinstance(doc.get("links"), list):
        raise UserError(f"{where}: not graph JSON (an object with 'nodes' and 'links' lists)")
    meta = _object(doc.get("metadata", {}), where, "metadata")
    scan = _text(meta.get("scan") or "unknown", where, "metadata.scan")
    transcoders = meta.get("transcoder_list") or []
    if not isinstance(transcoders, list) or not all(isinstance(t, str) for t in transcoders):
        raise UserError(f"{where}: metadata.transcoder_list is not a list of names")
    tokens = meta.get("prompt_tokens") or []
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise UserError(f"{where}: metadata.prompt_tokens is not a list of strings")
    threshold = meta.get("node_threshold")
    if threshold is not None and not _finite(threshold):
        raise UserError(f"{where}: metadata.node_threshold is not a finite number")
    g = ImportedGraph(path, scan, _text(meta.get("prompt") or "".join(tokens), where, "metadata.prompt"), tokens,
                      "", threshold, [], [])
    set_id = "imported-" + hashlib.sha256(json.dumps([scan, transcoders]).encode()).hexdigest()[:12]
    index: dict[str, int] = {}
    for i, node in enumerate(doc["nodes"]):
        row = _node(_object(node, where, f"node {i + 1}"), where, i, set_id, g)
        if row["node_id"] in index:
            raise UserError(f"{where}: node id {row['node_id']!r} appears twice")
        index[row.pop("node_id")] = len(g.nodes)
        g.nodes.append(row)
    keys = {tuple(n[k] for k in KEY) for n in g.nodes}
    if len(keys) < len(g.nodes):  # a node twice under two ids would count twice in every comparison
        raise UserError(f"{where}: two nodes are the same node (same site, feature and position)")
    if not any(n["component"] == METRIC for n in g.nodes):
        raise UserError(f"{where}: no logit node (feature_type 'logit'): a graph explains a logit")
    seen = set()
    for i, link in enumerate(doc["links"]):
        link = _object(link, where, f"link {i + 1}")
        s, d = (_known(link.get(k), index, where, f"link {i + 1}'s {k}") for k in ("source", "target"))
        if (s, d) in seen:
            raise UserError(f"{where}: link {i + 1} repeats the link from {link['source']} to {link['target']}")
        seen.add((s, d))
        g.edges.append({"src_idx": s, "dst_idx": d, "kind": "attribution",
                        "weight": _number(link.get("weight"), where, f"link {i + 1}'s weight")})
    for i, node in enumerate(doc["nodes"]):
        if node.get("qk_tracing_results") is not None:
            g.edges += _qk_edges(node["qk_tracing_results"], index, i, g.nodes[i]["layer"], where, node["node_id"])
    supernodes = _object(doc.get("qParams", {}), where, "qParams").get("supernodes") or []
    if not isinstance(supernodes, list) or not all(isinstance(s, list) and all(isinstance(x, str) for x in s)
                                                   for s in supernodes):
        raise UserError(f"{where}: qParams.supernodes is not a list of [label, node id, ...] lists")
    g.supernodes = supernodes
    return g


def _json_document(data: bytes, where: str) -> dict:
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError as e:
        raise UserError(f"{where}: not UTF-8 text (byte {e.start + 1})") from None
    except (json.JSONDecodeError, ValueError) as e:
        raise UserError(f"{where}: not graph JSON ({e})") from None
    except RecursionError:
        raise UserError(f"{where}: nested too deeply to be graph JSON") from None


def _node(node: dict, where: str, i: int, set_id: str, g: ImportedGraph) -> dict:
    """One node as a `nodes` row (with its node_id, taken out by the caller)."""
    what = f"node {i + 1}"
    node_id = _text(node.get("node_id"), where, f"{what}'s node_id")
    ctx = node.get("ctx_idx")
    if not isinstance(ctx, int) or isinstance(ctx, bool) or ctx < 0:
        raise UserError(f"{where}: {what} ({node_id}) has no ctx_idx (a token position >= 0)")
    effect = node.get("influence")
    effect = 0.0 if effect is None else _number(effect, where, f"{what}'s influence")
    row = {"node_id": node_id, "position": ctx, "effect": effect, "in_circuit": not node.get("is_from_qk_tracing", False),
           "dictionary_id": None, "feature_idx": None, "is_error": False, "hook_name": None}
    own = node.get("catalog")
    if own is not None:  # exported by this catalogue: its own key, as it was
        own = _object(own, where, f"{what}'s catalog key")
        for k in KEY:
            if k not in own:
                raise UserError(f"{where}: {what}'s catalog key has no {k}")
        row.update({k: own[k] for k in KEY}, effect=_number(own.get("effect", effect), where, f"{what}'s effect"),
                   hook_name=own.get("hook_name") if isinstance(own.get("hook_name"), str) else None)
        if row["component"] == METRIC and not g.answer:
            g.answer = str(own.get("answer") or "")
        return _checked(row, where, what)
    kind = _text(node.get("feature_type"), where, f"{what}'s feature_type")
    layer = _text(node.get("layer"), where, f"{what}'s layer")
    parts = node_id.split("_")
    if kind == "embedding":
        row.update(component="embed", layer=-1, feature_idx=_index(parts[1] if len(parts) == 3 else None, where, what),
                   hook_name=block_input(0))
    elif kind == "logit":
        row.update(component=METRIC, layer=_index(layer, where, what) - 1, feature_idx=_index(node.get("feature"), where, what))
        if node.get("is_target_logit") or not g.answer:
            g.answer = str(node.get("clerp") or "")
    elif kind in FEATURE_TYPES or kind.endswith("reconstruction error"):
        n = _index(layer, where, what)
        dictionary_id = f"{set_id}-{n}"
        g.dictionaries.setdefault(dictionary_id, _dictionary_row(dictionary_id, g.model_id, n, set_id))
        error = kind.endswith("reconstruction error")
        row.update(component="mlp", layer=n, dictionary_id=dictionary_id, is_error=error,
                   feature_idx=None if error else _index(parts[1] if len(parts) == 3 else None, where, what),
                   hook_name=transcoder_site(n).hook_out)
    else:
        raise UserError(f"{where}: {what} ({node_id}) has feature_type {kind!r}; known: embedding, logit, "
                        f"{', '.join(FEATURE_TYPES)}, ... reconstruction error")
    return row


def _checked(row: dict, where: str, what: str) -> dict:
    """A node key read from a file: the types the `nodes` table holds."""
    if row["component"] not in (*COMPONENTS, METRIC) or not isinstance(row["layer"], int) \
            or not isinstance(row["is_error"], bool):
        raise UserError(f"{where}: {what}'s catalog key is malformed (component, layer or is_error)")
    for k in ("feature_idx", "position"):
        if row[k] is not None and (not isinstance(row[k], int) or isinstance(row[k], bool)):
            raise UserError(f"{where}: {what}'s catalog key has a {k} that is not an integer")
    if row["dictionary_id"] is not None and not isinstance(row["dictionary_id"], str):
        raise UserError(f"{where}: {what}'s catalog key has a dictionary_id that is not text")
    return row


def _dictionary_row(dictionary_id: str, model_id: str, layer: int, set_id: str) -> dict:
    s = transcoder_site(layer)
    return {"dictionary_id": dictionary_id, "model_id": model_id, "hook_name": s.hook_in, "hook_name_out": s.hook_out,
            "component": "mlp", "layer": layer, "kind": "transcoder", "architecture": "imported", "path": set_id}


def _qk_edges(results, index: dict, node: int, layer: int, where: str, node_id: str) -> list[dict]:
    """A node's qk_tracing_results as edges: query x key pairs (key node -> query node) and each side's
    marginal contributions (contributor -> this node)."""
    results = _object(results, where, f"{node_id}'s qk_tracing_results")
    what = f"{node_id}'s qk_tracing_results"
    rows = []
    for i, pair in enumerate(results.get("pair_wise_contributors") or []):
        if not isinstance(pair, list) or len(pair) != 3:
            raise UserError(f"{where}: {what}: pair {i + 1} is not [query node, key node, weight]")
        q, k = (_known(x, index, where, f"{what}: pair {i + 1}") for x in pair[:2])
        rows.append({"src_idx": k, "dst_idx": q, "kind": "qk", "weight": _number(pair[2], where, what),
                     "head_layer": layer})
    for name, kind in QK_SIDES:
        for i, part in enumerate(results.get(name) or []):
            if not isinstance(part, list) or len(part) != 2:
                raise UserError(f"{where}: {what}: {name} {i + 1} is not [node, weight]")
            rows.append({"src_idx": _known(part[0], index, where, f"{what}: {name} {i + 1}"), "dst_idx": node,
                         "kind": kind, "weight": _number(part[1], where, what), "head_layer": layer})
    return rows


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _object(x, where: str, what: str) -> dict:
    if not isinstance(x, dict):
        raise UserError(f"{where}: {what} is not an object")
    return x


def _text(x, where: str, what: str) -> str:
    if not isinstance(x, str) or not x:
        raise UserError(f"{where}: {what} is missing or not text")
    return x


def _finite(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _number(x, where: str, what: str) -> float:
    if not _finite(x):
        raise UserError(f"{where}: {what} is not a finite number")
    return float(x)


def _index(x, where: str, what: str) -> int:
    """A layer, token id or feature index: a whole number >= 0 (as a number or its digits)."""
    if isinstance(x, str) and x.isdigit() and x.isascii():
        return int(x)
    if isinstance(x, int) and not isinstance(x, bool) and x >= 0:
        return x
    raise UserError(f"{where}: {what} has {x!r} where a layer, token id or feature index (a number >= 0) belongs")


def _known(node_id, index: dict, where: str, what: str) -> int:
    if not isinstance(node_id, str) or node_id not in index:
        raise UserError(f"{where}: {what} names {node_id!r}, which is not one of its nodes")
    return index[node_id]


def import_job(cat: Catalog, paths: list[Path]) -> tuple[str, list[tuple[str, ImportedGraph]]]:
    """Read and check every file, then commit their graphs as circuits of one run:
    (run_id, [(circuit_id, graph)])."""
    graphs = [read_graph(p) for p in paths]
    known_models = set(cat.sql("SELECT model_id FROM models").model_id)
    known_dicts = set(cat.sql("SELECT dictionary_id FROM dictionaries").dictionary_id)
    tasks = []
    for g in graphs:
        content = json.dumps([g.prompt, g.tokens, g.answer])  # one task per prompt and answer
        task = Task("graph-" + hashlib.sha256(content.encode()).hexdigest()[:12],
                    [{"clean_prefix": g.prompt, "clean_answer": g.answer}], "imported graph", g.prompt)
        cat.check_task(task.name, task.content_hash)
        tasks.append(task)
    row = run_row("import-graph", {"files": [str(g.path) for g in graphs],
                                   "supernodes": {str(g.path): g.supernodes for g in graphs if g.supernodes}})
    done, written = [], set()
    with run(cat, row) as w:
        for g, task in zip(graphs, tasks, strict=True):
            circuit_id = new_id("circuit")
            if g.model_id not in known_models:  # a model the catalogue holds keeps its own row
                w.write("models", [{"model_id": g.model_id, "name": g.model_id, "source": f"imported graph {g.path.name}"}])
                known_models.add(g.model_id)
            new = [d for k, d in g.dictionaries.items() if k not in known_dicts]
            if new:
                w.write("dictionaries", new)
                known_dicts |= {d["dictionary_id"] for d in new}
            if task.name not in written:  # graphs of one prompt and answer share their task
                write_task(w, None, task, tokens=lambda _text, t=g.tokens: t)
                written.add(task.name)
            n_layers = max((n["layer"] for n in g.nodes if n["component"] == METRIC), default=0)
            w.write("nodes", [{"circuit_id": circuit_id, "node_idx": i, **n} for i, n in enumerate(g.nodes)])
            edges = w.table("edges")
            for i in range(0, len(g.edges), EDGE_ROWS):
                edges.write([{"circuit_id": circuit_id, **e} for e in g.edges[i:i + EDGE_ROWS]])
            w.write("circuits", [circuit_row(
                circuit_id, row["run_id"], g.model_id, task.name, METHOD, aggregation="none", metric="logit",
                node_threshold=g.node_threshold, n_examples=1, n_dropped=0,
                n_nodes=sum(n["in_circuit"] for n in g.nodes), n_edges=sum(e["kind"] == "attribution" for e in g.edges),
                evaluation_note=f"imported from {g.path.name} ({n_layers} layers): a graph made elsewhere is not "
                                "evaluated here")])
            done.append((circuit_id, g))
    return row["run_id"], done
