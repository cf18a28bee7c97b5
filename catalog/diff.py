"""Circuit diffing: what two circuits do differently, node by node and edge by edge.

    from catalog.diff import diff
    d = diff(cat, "circuit-a", "circuit-b")
    d.nodes[d.nodes.status == "added"]     # in B's circuit, not in A's
    print(d.summary_text())

Nodes are matched by their structural key (component, layer, dictionary, feature or error,
position). When the two circuits read different dictionaries (other SAEs, neurons against
features, another checkpoint of the model), B's features are first matched to A's by the
cosine similarity of their decoder directions, one to one per submodule (Hungarian
assignment, pairs below `min_similarity` stay unmatched); the match and its similarity are
part of the result. The node and edge diffs themselves are the catalogue's SQL macros
(`node_diff_matched`, `edge_diff_matched`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from catalog.errors import UserError
from catalog.graph import check_circuit, node_name, signed
from catalog.store import Catalog

MATCHES = ("auto", "key", "decoder")
STATUSES = ("added", "removed", "changed", "same")


@dataclass
class Diff:
    a: str
    b: str
    match: str  # key or decoder
    nodes: pd.DataFrame  # node_diff rows
    matches: pd.DataFrame  # decoder match: component, layer, dictionary_a, feature_a, dictionary_b, feature_b, similarity
    summary: pd.DataFrame  # diff_summary rows: element, status, n, total_abs_delta
    fetch_edges: Callable[[], pd.DataFrame] = field(repr=False)
    _edges: pd.DataFrame | None = field(default=None, repr=False)

    @property
    def edges(self) -> pd.DataFrame:
        """edge_diff rows, largest |delta| first; fetched on first use (a million of them take
        seconds to become a DataFrame, and the summary does not need them)."""
        if self._edges is None:
            self._edges = self.fetch_edges()
        return self._edges

    def counts(self) -> pd.DataFrame:
        """Added, removed, changed and same, for nodes and edges (zeros included)."""
        every = pd.MultiIndex.from_product([("nodes", "edges"), STATUSES], names=["element", "status"])
        s = self.summary.set_index(["element", "status"]).reindex(every)
        return pd.DataFrame({"element": every.get_level_values(0), "status": every.get_level_values(1),
                             "n": s.n.fillna(0).astype(int).values,
                             "total_abs_delta": s.total_abs_delta.fillna(0.0).astype(float).values})

    def stats(self) -> dict:
        """Node-set Jaccard, Spearman correlation of the effects of nodes in both, edge Jaccard."""
        n = self.nodes
        both = n[n.in_a & n.in_b]
        union = int((n.in_a | n.in_b).sum())
        e = self.counts().query("element == 'edges'").set_index("status").n
        e_both = int(e["changed"] + e["same"])
        spearman = (float(both.effect_a.rank().corr(both.effect_b.rank())) if len(both) > 2 else float("nan"))
        return {"nodes_a": int(n.in_a.sum()), "nodes_b": int(n.in_b.sum()), "nodes_both": len(both),
                "node_jaccard": len(both) / union if union else 1.0, "effect_rank_corr": spearman,
                "edges_a": int(e.removed + e_both), "edges_b": int(e.added + e_both),
                "edges_both": e_both, "edge_jaccard": e_both / int(e.sum()) if e.sum() else 1.0,
                "matched_features": len(self.matches)}

    def summary_text(self, top: int = 5) -> str:
        s = self.stats()
        lines = [f"diff {self.a} -> {self.b} (nodes matched by {self.match})",
                 f"nodes: {s['nodes_a']} in A, {s['nodes_b']} in B, {s['nodes_both']} in both "
                 f"(Jaccard {s['node_jaccard']:.3f}, rank correlation of shared effects {s['effect_rank_corr']:.3f})",
                 f"edges: {s['edges_a']} in A, {s['edges_b']} in B, {s['edges_both']} in both "
                 f"(Jaccard {s['edge_jaccard']:.3f})"]
        if self.match == "decoder":
            sim = self.matches.similarity
            lines.append(f"decoder match: {len(self.matches)} feature pairs, similarity "
                         f"{sim.min() if len(sim) else float('nan'):.3f} .. {sim.max() if len(sim) else float('nan'):.3f}")
        for r in self.counts().itertuples():
            lines.append(f"  {r.element:5} {r.status:8} {r.n:8d}   sum |delta| {r.total_abs_delta:.3f}")
        moved = self.nodes[self.nodes.status != "same"].head(top)
        if len(moved):
            lines.append("largest node changes (B - A):")
            for r in moved.itertuples():
                lines.append(f"  {r.status:8} {node_name(r)}  {signed(r.effect_a)} -> {signed(r.effect_b)}  "
                             f"(delta {r.delta:+.3f})")
        return "\n".join(lines) + "\n"

    def write(self, out: Path) -> list[Path]:
        """nodes.csv, edges.csv, matches.csv and summary.csv in a folder."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        files = []
        for name, df in (("nodes", self.nodes), ("edges", self.edges), ("matches", self.matches),
                         ("summary", self.counts())):
            df.to_csv(out / f"{name}.csv", index=False)
            files.append(out / f"{name}.csv")
        return files


def diff(cat: Catalog, a: str, b: str, match: str = "auto", min_similarity: float = 0.7,
         tol: float = 1e-9) -> Diff:
    """Diff circuit b against circuit a. match: key (same dictionaries), decoder (cosine of decoder
    directions) or auto (key when both circuits read the same dictionaries)."""
    if match not in MATCHES:
        raise UserError(f"match must be one of {', '.join(MATCHES)}")
    check_circuit(cat, a)
    check_circuit(cat, b)
    subs = cat.sql("SELECT DISTINCT circuit_id, component, layer, dictionary_id FROM nodes "
                   "WHERE circuit_id IN (?, ?) AND dictionary_id IS NOT NULL", [a, b])
    same = _submodule_dicts(subs, a) == _submodule_dicts(subs, b)
    if match == "auto":
        match = "key" if same else "decoder"
    features, dicts, matches = ([], [], _empty_matches()) if match == "key" else decoder_match(cat, a, b, min_similarity)
    args = [a, b, features, dicts, tol]
    return Diff(a, b, match,
                nodes=cat.sql("SELECT * FROM node_diff_matched(?, ?, ?, ?, tol := ?)", args),
                matches=matches,
                summary=cat.sql("SELECT * FROM diff_summary_matched(?, ?, ?, ?, tol := ?)", args),
                fetch_edges=lambda: cat.sql("SELECT * FROM edge_diff_matched(?, ?, ?, ?, tol := ?) "
                                            "ORDER BY abs(delta) DESC, src_layer, dst_layer", args))


def _submodule_dicts(subs: pd.DataFrame, circuit: str) -> dict:
    s = subs[subs.circuit_id == circuit]
    return dict(zip(zip(s.component, s.layer, strict=True), s.dictionary_id, strict=True))


def _empty_matches() -> pd.DataFrame:
    return pd.DataFrame(columns=["component", "layer", "dictionary_a", "feature_a", "dictionary_b", "feature_b",
                                 "similarity"])


def decoder_match(cat: Catalog, a: str, b: str, min_similarity: float = 0.7) -> tuple[list, list, pd.DataFrame]:
    """Match B's feature nodes to A's per submodule by decoder cosine similarity (one to one).

    Returns the feature map and dictionary map that the diff macros take, and the match table."""
    from scipy.optimize import linear_sum_assignment

    feats = cat.sql("SELECT DISTINCT n.circuit_id, n.component, n.layer, n.dictionary_id, n.feature_idx, d.path, "
                    "d.d_in FROM nodes n JOIN dictionaries d USING (dictionary_id) "
                    "WHERE n.circuit_id IN (?, ?) AND n.feature_idx IS NOT NULL", [a, b])
    fa, fb = feats[feats.circuit_id == a], feats[feats.circuit_id == b]
    features, dicts, rows = [], [], []
    weights: dict[str, np.ndarray] = {}
    for (component, layer), ga in fa.groupby(["component", "layer"]):
        gb = fb[(fb.component == component) & (fb.layer == layer)]
        if gb.empty:
            continue
        da, db = ga.dictionary_id.iloc[0], gb.dictionary_id.iloc[0]
        dicts.append({"dict_b": db, "dict_a": da})
        if ga.d_in.iloc[0] != gb.d_in.iloc[0]:
            raise UserError(f"{component}_{layer}: the dictionaries read activations of different widths "
                            f"({ga.d_in.iloc[0]} and {gb.d_in.iloc[0]}); their features cannot be matched")
        ia, ib = np.sort(ga.feature_idx.unique()), np.sort(gb.feature_idx.unique())
        wa = unit_rows(decoder(weights, da, ga.path.iloc[0])[ia])
        wb = unit_rows(decoder(weights, db, gb.path.iloc[0])[ib])
        sim = wa @ wb.T
        ra, rb = linear_sum_assignment(-sim)
        for i, j in zip(ra, rb, strict=True):
            if sim[i, j] >= min_similarity:
                features.append({"dict_b": db, "feat_b": int(ib[j]), "dict_a": da, "feat_a": int(ia[i]),
                                 "similarity": float(sim[i, j])})
                rows.append({"component": component, "layer": int(layer), "dictionary_a": da, "feature_a": int(ia[i]),
                             "dictionary_b": db, "feature_b": int(ib[j]), "similarity": float(sim[i, j])})
    matches = pd.DataFrame(rows) if rows else _empty_matches()
    return features, dicts, matches


def decoder(cache: dict, dictionary_id: str, path: str) -> np.ndarray:
    """W_dec [d_sae, d_in] of a dictionary from its SAELens-format files."""
    if dictionary_id not in cache:
        from safetensors.numpy import load_file

        f = Path(path or "") / "sae_weights.safetensors"
        if not f.is_file():
            raise UserError(f"dictionary {dictionary_id}: no weights at {f}; comparing features by decoder "
                            "direction needs them (diff --match key does without)")
        cache[dictionary_id] = load_file(str(f))["W_dec"].astype(np.float64)
    return cache[dictionary_id]


def unit_rows(w: np.ndarray) -> np.ndarray:
    return w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
