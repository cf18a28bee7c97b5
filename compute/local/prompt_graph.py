"""Per-prompt attribution graphs: every node of the replacement model, pruned by influence.

A graph explains one root (a logit, a logit difference, or a feature at a position: a local
circuit). Each node's influence is its hierarchical attribution to the root (threshold 0: every
path). The `node_budget` most influential nodes are kept; the edges are the direct contributions
between kept nodes (and into the root), ranked by how much of the root flows along them
(the contribution x the root's gradient at the edge's destination: its flow) and cut to
`edge_budget`.
Edges into attention features are also split per head (OV), and the strongest head moves
(head, destination position, source position) get their attention score decomposed (QK).

Direct contributions are computed for a batch of destination nodes at a time and only their
kept columns are held, so memory grows with the graph kept, never with nodes x nodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from catalog.progress import hidden
from compute.local.contributions import Target, attribute, feature_target
from compute.local.qk import QK, qk
from compute.local.replacement import EMBED, Node, Replacement
from schema.sites import parse_site_name

ROOT = -1  # the root's index among a graph's edge ends when it is not a node (a logit or logit difference)


@dataclass
class GraphParams:
    node_budget: int = 48  # nodes kept besides the root (features, error terms, embeddings)
    edge_budget: int = 256  # edges kept
    threshold: float = 0.0  # hierarchical attribution's threshold for the influences (0: every path)
    qk_scores: int = 4  # head moves whose attention score is decomposed
    qk_pairs: int = 16  # (query node, key node) pairs kept per decomposed score
    batch_size: int = 32  # targets per backward pass


@dataclass
class PromptGraph:
    """A pruned attribution graph of one prompt: `kept` node indices (into `rep.nodes`) with their
    `influence` on the root; edges (src, dst, weight) with dst ROOT for the root; OV edges
    (src, dst, head, weight); QK decompositions (dst attention-feature node, QK)."""

    rep: Replacement
    root: Target
    root_value: float
    root_node: int  # the root's node index, or ROOT when it is not a node
    influence: torch.Tensor
    kept: list[int]
    edges: list[tuple[int, int, float]] = field(default_factory=list)
    per_unit: dict[int, float] = field(default_factory=dict)  # d(root)/d(pre-activation) of each edge destination
    ov: list[tuple[int, int, int, float]] = field(default_factory=list)
    qk: list[tuple[int, QK]] = field(default_factory=list)


def prompt_graph(rep: Replacement, root: Target, params: GraphParams | None = None,
                 progress: bool = False) -> PromptGraph:
    """Attribute the root, keep the most influential nodes, and their strongest edges."""
    p = params or GraphParams()
    a = attribute(rep, [root], threshold=p.threshold)
    influence = a.scores[0]
    root_node = rep.index.get(Node(root.site, root.feature, root.position), ROOT) if root.site != "logit" else ROOT
    order = torch.argsort(influence.abs(), descending=True)
    kept = [i for i in order[:p.node_budget].tolist() if influence[i] != 0 and i != root_node]
    g = PromptGraph(rep, root, float(a.values[0]), root_node, influence, kept)
    _edges(g, p, progress)
    _qk(g, p)
    return g


def _edges(g: PromptGraph, p: GraphParams, progress: bool) -> None:
    """Direct contributions into every kept feature and the root, cut to the edge budget by flow."""
    rep = g.rep
    dsts = [i for i in g.kept if rep.nodes[i].site != EMBED and not rep.nodes[i].is_error]
    targets = [feature_target(rep, rep.nodes[i].site, rep.nodes[i].feature, rep.nodes[i].position) for i in dsts]
    dsts, targets = dsts + [g.root_node], targets + [g.root]
    sources = torch.tensor(g.kept)
    weights, heads = [], []
    chunks = range(0, len(targets), p.batch_size)
    for start in tqdm(chunks, desc="edges", unit="batch", disable=hidden(progress and len(chunks) > 1)):
        a = attribute(rep, targets[start:start + p.batch_size], ov=True, batch_size=p.batch_size, values=False)
        weights.append(a.scores[:, sources])
        heads.append(a.ov[:, sources])
    weights, heads = torch.cat(weights), torch.cat(heads)  # [dsts, kept], [dsts, kept, heads]
    # how much of the root flows along an edge: its contribution x d(root)/d(destination's pre-activation)
    per_unit = torch.tensor([1.0 if d == g.root_node else float(g.influence[d] / _value(rep, d)) for d in dsts])
    g.per_unit = dict(zip(dsts, per_unit.tolist(), strict=True))
    flow = (weights * per_unit[:, None]).abs()
    top = torch.argsort(flow.flatten(), descending=True)[:p.edge_budget]
    top = top[flow.flatten()[top] > 0]
    rows, cols = top // len(g.kept), top % len(g.kept)
    g.edges = [(g.kept[c], dsts[r], w) for r, c, w in zip(rows.tolist(), cols.tolist(), weights[rows, cols].tolist(),
                                                          strict=True)]
    split = heads[rows, cols]  # [edges, heads]: each kept edge's part through each head (0 unless into attention)
    for e, h in split.nonzero().tolist():
        src, dst, _ = g.edges[e]
        g.ov.append((src, dst, h, float(split[e, h])))


def _value(rep: Replacement, i: int) -> float:
    n = rep.nodes[i]
    return float(rep.values[n.site][n.position, n.feature])


def _qk(g: PromptGraph, p: GraphParams) -> None:
    """Decompose the attention scores of the head moves (layer, head, query position, key position)
    that carry the most of the root along the kept OV edges."""
    rep, moves, into = g.rep, {}, {}
    for src, dst, head, w in g.ov:
        d = rep.nodes[dst]  # OV edges end at attention features, never at a logit root
        move = (parse_site_name(d.site)[1], head, d.position, rep.nodes[src].position)
        flow = abs(w * g.per_unit[dst])  # what of the root the head carries along this edge
        moves[move] = moves.get(move, 0.0) + flow
        into.setdefault(move, {})[dst] = into.get(move, {}).get(dst, 0.0) + flow
    for move in sorted(moves, key=lambda m: -moves[m])[:p.qk_scores]:  # each score once, for the feature it feeds most
        g.qk.append((max(into[move], key=into[move].get), qk(rep, *move)))
