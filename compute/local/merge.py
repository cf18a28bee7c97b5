"""One node and edge set from the graphs of one or many prompts (what a local circuit stores).

Nodes are keyed across prompts by (site, feature, position): a prompt's embedding by its token,
across prompts of one length by its position alone. Node effects are the mean influence on the
root over the prompts; edges are the mean flows (direct contribution x the root's gradient at the
destination: what reaches the root along the edge), with their OV split per head. The
`node_budget` strongest nodes are in the circuit and the `edge_budget` strongest attribution
edges between them are kept; a single prompt's QK decompositions come along (their nodes added
outside the circuit when new).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from statistics import mean

import torch

from compute.local.prompt_graph import ROOT, GraphParams, PromptGraph
from compute.local.qk import BIAS
from compute.local.replacement import EMBED, Replacement
from schema.sites import parse_site_name

ROOT_KEY = ("root", 0, None)  # the key of a logit or logit-difference root (a feature root keeps its own)


@dataclass
class MergedGraph:
    keys: list[tuple]  # node keys (site, feature, position), the root first; index = node_idx
    effect: dict[tuple, float]  # key -> mean influence (the root: its mean value)
    in_circuit: set[tuple]  # keys within the node budget, and the root
    edges: list[dict]  # edge rows: src_idx, dst_idx, kind, weight, head, head_layer (and QK's key_position)
    n_edges: int  # attribution edges kept (node pairs)
    positions: bool  # nodes keep their positions (every prompt has the same length)
    n_prompts: int

    @property
    def root_key(self) -> tuple:
        return self.keys[0]


def node_key(rep: Replacement, i: int, positions: bool, one_prompt: bool = True) -> tuple:
    """A node's key across prompts: (site, feature, position). A prompt's embedding is keyed by its
    token; across prompts, by its position alone (feature None)."""
    n = rep.nodes[i]
    feature = (int(rep.tokens[0, n.position]) if one_prompt else None) if n.site == EMBED else n.feature
    return n.site, feature, n.position if positions else None


def merge_graphs(graphs: list[PromptGraph], params: GraphParams) -> MergedGraph:
    """The union of the graphs' kept nodes with their mean influence, and the mean edges between the
    node_budget strongest, cut to edge_budget."""
    positions = len({g.rep.n_pos for g in graphs}) == 1
    key = partial(node_key, positions=positions, one_prompt=len(graphs) == 1)

    g0 = graphs[0]
    root_key = ROOT_KEY if g0.root_node == ROOT else key(g0.rep, g0.root_node)
    effect: dict[tuple, float] = {root_key: mean(g.root_value for g in graphs)}
    keys_of = []  # per graph: node index -> key, for its kept nodes and edge ends (computed once)
    for g in graphs:
        ends_ = {i for e in g.edges for i in e[:2]} | set(g.kept)
        ends_.discard(ROOT)
        keys_of.append({i: key(g.rep, i) for i in ends_})
        for i, v in zip(g.kept, g.influence[g.kept].tolist(), strict=True):
            k = keys_of[-1][i]
            effect[k] = effect.get(k, 0.0) + v / len(graphs)
    ranked = sorted((k for k in effect if k != root_key), key=lambda k: -abs(effect[k]))
    in_circuit = set(ranked[:params.node_budget]) | {root_key}
    keys = [root_key, *ranked]
    index = {k: i for i, k in enumerate(keys)}

    def ends(g: PromptGraph, cache: dict, src: int, dst: int) -> tuple[int, int] | None:
        s = index.get(cache[src])
        d = index[root_key] if dst in (ROOT, g.root_node) else index.get(cache[dst])
        return None if s is None or d is None else (s, d)

    flows: dict[tuple, float] = {}  # stored as flows: what reaches the root along the edge (mean over prompts)
    for g, cache in zip(graphs, keys_of, strict=True):
        for src, dst, wt in g.edges:
            if (e := ends(g, cache, src, dst)) is not None:
                k = (*e, "attribution", None)
                flows[k] = flows.get(k, 0.0) + wt * g.per_unit[dst] / len(graphs)
        for src, dst, head, wt in g.ov:
            if (e := ends(g, cache, src, dst)) is not None:
                flows[(*e, "ov", head)] = flows.get((*e, "ov", head), 0.0) + wt * g.per_unit[dst] / len(graphs)
    attribution = sorted((k for k in flows if k[2] == "attribution" and keys[k[0]] in in_circuit and
                          keys[k[1]] in in_circuit), key=lambda k: -abs(flows[k]))
    kept_pairs = {k[:2] for k in attribution[:params.edge_budget]}
    layer_of = {d: parse_site_name(keys[d][0])[1] for d in {k[1] for k in flows if k[2] == "ov"}}
    rows = [{"src_idx": s, "dst_idx": d, "kind": kind, "weight": wt, "head": h,
             "head_layer": None if h is None else layer_of[d]}
            for (s, d, kind, h), wt in flows.items() if (s, d) in kept_pairs]
    if len(graphs) == 1:
        rows += _qk_rows(g0, keys, index, positions, params.qk_pairs)
    return MergedGraph(keys, effect, in_circuit, rows, len(kept_pairs), positions, len(graphs))


def _qk_rows(g: PromptGraph, keys: list, index: dict, positions: bool, n_pairs: int) -> list[dict]:
    """A prompt's decomposed attention scores: the strongest query x key pairs, and every node's
    part on each side, as edges. Nodes not yet in the graph are added as nodes outside the circuit."""
    rows = []

    known: dict = {}

    def idx(node) -> int | None:
        """A QK node's index among the circuit's nodes (added outside the circuit when new); None for BIAS."""
        if node == BIAS:
            return None
        if node not in known:
            k = node_key(g.rep, g.rep.index[node], positions)
            if k not in index:
                index[k] = len(keys)
                keys.append(k)
            known[node] = index[k]
        return known[node]

    for dst, q in g.qk:
        t = index.get(node_key(g.rep, dst, positions))
        if t is None:
            continue
        head = {"head_layer": q.layer, "head": q.head, "key_position": q.key}
        for side, nodes, marginals in (("qk_query", q.query_nodes, q.query_marginals),
                                       ("qk_key", q.key_nodes, q.key_marginals)):
            rows += [{"src_idx": i, "dst_idx": t, "kind": side, "weight": m, **head}
                     for n, m in zip(nodes, marginals.tolist(), strict=True) if (i := idx(n)) is not None]
        inner = q.pairs[:-1, :-1].flatten()
        flat = torch.argsort(inner.abs(), descending=True)[:n_pairs]
        width = q.pairs.shape[1] - 1
        for k, w in zip(flat.tolist(), inner[flat].tolist(), strict=True):
            qi, ki = divmod(k, width)
            rows.append({"src_idx": idx(q.key_nodes[ki]), "dst_idx": idx(q.query_nodes[qi]), "kind": "qk",
                         "weight": w, **head})
    return rows
