"""Scores of a discovered circuit against a planted one: precision and recall of what it keeps, and
AUROC of its scores over every candidate (nodes, edges, components).

Every candidate counts, including those the catalogue holds no row for (a node with zero effect, an
edge between nodes that were not kept): they score 0. AUROC is the probability that a true candidate
scores above a false one, ties counting one half (the Mann-Whitney statistic), so scores that
cannot tell true from false get 0.5 and a perfect ranking 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

from compute.groundtruth.planted import Truth
from schema.sites import METRIC, site_name

LEVELS = ("node", "edge", "component")


def auroc(scores: np.ndarray, truth: np.ndarray) -> float | None:
    """Area under the ROC curve of `scores` for the boolean labels `truth`; None without both classes."""
    scores, truth = np.asarray(scores, dtype=float), np.asarray(truth, dtype=bool)
    n_true, n_false = int(truth.sum()), int((~truth).sum())
    if n_true == 0 or n_false == 0:
        return None
    ranks = rankdata(scores)  # ties get their mean rank
    return float((ranks[truth].sum() - n_true * (n_true + 1) / 2) / (n_true * n_false))


@dataclass(frozen=True)
class Score:
    level: str  # node, edge or component
    n_candidates: int
    n_true: int
    n_found: int  # candidates the circuit keeps
    precision: float | None  # None when it keeps none
    recall: float
    auroc: float | None

    @staticmethod
    def of(scores: dict, found: set, true: set, level: str) -> Score:
        keys = list(scores)
        labels = np.array([k in true for k in keys])
        hits = len(found & true)
        return Score(level, len(keys), len(true), len(found), hits / len(found) if found else None,
                     hits / len(true) if true else 0.0, auroc(np.array([scores[k] for k in keys]), labels))


def node_scores(nodes) -> tuple[dict, set]:
    """({(site, neuron): |effect| summed over positions}, the kept ones) from a circuit's `nodes` rows
    (features only; the metric and error terms are no candidates)."""
    scores, kept = {}, set()
    for r in nodes.itertuples():
        if r.component == METRIC or r.is_error:
            continue
        key = (site_name(r.component, r.layer), int(r.feature_idx))
        scores[key] = scores.get(key, 0.0) + abs(float(r.effect))
        if r.in_circuit:
            kept.add(key)
    return scores, kept


def score_circuit(nodes, edges, widths: dict[str, int], edge_sites: list[tuple[str, str]], truth: Truth) -> list[Score]:
    """Node, edge and component scores of one circuit (its `nodes` rows, and its `edges` rows with each
    end's site and neuron as src_site, src_feature, dst_site, dst_feature) against the truth. `widths`:
    neurons per site; `edge_sites`: the (upstream, downstream) site pairs edges can join, the metric's
    included as (last resid, 'metric')."""
    found_scores, kept = node_scores(nodes)
    every_node = {(s, i): found_scores.get((s, i), 0.0) for s, w in widths.items() for i in range(w)}
    out = []
    if truth.nodes is not None:
        out.append(Score.of(every_node, kept, set(truth.nodes), "node"))
    if truth.edges is not None:
        weights = {((r.src_site, int(r.src_feature)), (r.dst_site, 0 if r.dst_site == METRIC else int(r.dst_feature))):
                   abs(float(r.weight)) for r in edges.itertuples()}
        every_edge = {}
        for up, down in edge_sites:
            for i in range(widths[up]):
                for j in range(1 if down == METRIC else widths[down]):
                    key = ((up, i), (down, j))
                    every_edge[key] = weights.get(key, 0.0)
        out.append(Score.of(every_edge, set(weights) & set(every_edge), set(truth.edges), "edge"))
    comp = {}
    comp_found = set()
    for c in truth.components:
        members = c.features if c.features is not None else range(widths[c.site])
        comp[c.name] = sum(every_node[(c.site, i)] for i in members)
        if any((c.site, i) in kept for i in members):
            comp_found.add(c.name)
    out.append(Score.of(comp, comp_found, {c.name for c in truth.components if c.in_circuit}, "component"))
    return out
