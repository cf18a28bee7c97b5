"""Cross-task comparison: which features circuits share, how much they overlap, whether they agree.

    from catalog.compare import compare, select_circuits
    cmp = compare(cat, select_circuits(cat, tasks=["sva_simple", "sva_across_pp"]), k=20)
    cmp.overlap            # per pair: shared features, Jaccard, rank correlation of shared effects
    cmp.matrix()           # feature x circuit effects (0 where a circuit lacks the feature)

A feature's identity across circuits is (dictionary_id, feature_idx); per-position nodes of
one feature are summed. The work is done by the catalogue's SQL macros (`circuit_features`,
`shared_features`, `feature_overlap`); this module picks circuits and shapes the results.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from catalog.errors import UserError
from catalog.plots import save_figure
from catalog.store import Catalog


def select_circuits(cat: Catalog, ids=(), tasks=(), methods=(), models=(), sql: str | None = None) -> list[str]:
    """Circuit ids by id, task, method, model, or a read-only query returning circuit_id (all combined
    with AND; no filter at all means every circuit)."""
    known = cat.sql("SELECT circuit_id, task_id, method, model_id FROM circuits ORDER BY task_id, created_at")
    unknown = sorted(set(ids) - set(known.circuit_id))
    if unknown:
        raise UserError(f"unknown circuit {unknown[0]!r}; see `cli.py circuits`")
    keep = pd.Series(True, index=known.index)
    for column, wanted in (("circuit_id", ids), ("task_id", tasks), ("method", methods), ("model_id", models)):
        if wanted:
            keep &= known[column].isin(list(wanted))
    if sql is not None:
        chosen = cat.sql(sql)
        if "circuit_id" not in chosen.columns:
            raise UserError("the circuits query must return a circuit_id column")
        keep &= known.circuit_id.isin(chosen.circuit_id)
    return known.circuit_id[keep].tolist()


BASES = ("features", "neurons", "parameters", "all")


def split_by_basis(cat: Catalog, ids: list[str], basis: str | None = None) -> tuple[list[str], dict[str, int], str]:
    """The circuits of one basis, so that features and neurons are never mixed unless asked (basis
    'all'). With no basis given: the basis all of them share, else 'features' when any circuit has
    it, else the most common one. Returns (kept ids, {left-out basis: count}, the basis kept)."""
    if basis is not None and basis not in BASES:
        raise UserError(f"basis must be one of {', '.join(BASES)}, not {basis!r}")
    of = cat.sql("SELECT circuit_id, circuit_basis(circuit_id) AS basis FROM circuits "
                 "WHERE list_contains(?, circuit_id)", [list(ids)]).set_index("circuit_id").basis
    bases = [of.get(i) or "features" for i in ids]
    if basis is None:
        counts = pd.Series(bases).value_counts()
        basis = ("all" if counts.empty else counts.index[0] if len(counts) == 1
                 else "features" if "features" in counts else counts.index[0])
    if basis == "all":
        return list(ids), {}, basis
    kept = [i for i, b in zip(ids, bases, strict=True) if b == basis]
    left_out = pd.Series([b for b in bases if b != basis], dtype=object).value_counts().to_dict()
    return kept, {str(k): int(v) for k, v in left_out.items()}, basis


@dataclass
class Comparison:
    circuits: pd.DataFrame  # circuit_id, task_id, method, model_id, basis, label (unique, for columns)
    features: pd.DataFrame  # circuit_features rows: one per (circuit, feature)
    shared: pd.DataFrame  # shared_features rows: one per feature
    overlap: pd.DataFrame  # feature_overlap rows: one per pair of circuits
    k: int | None

    def in_all(self) -> pd.DataFrame:
        """Features every compared circuit holds."""
        return self.shared[self.shared.in_all]

    def unique(self) -> pd.DataFrame:
        """Features only one circuit holds, with that circuit's label."""
        u = self.shared[self.shared.unique_to.notna()]
        labels = self.circuits.set_index("circuit_id").label
        return u.assign(unique_to_label=u.unique_to.map(labels))

    def matrix(self) -> pd.DataFrame:
        """Feature x circuit effects (rows: dictionary_id, feature_idx, component, layer; columns: circuit
        labels), 0 where a circuit lacks the feature; rows ordered by how many circuits share them."""
        labels = self.circuits.set_index("circuit_id").label
        m = self.features.assign(label=self.features.circuit_id.map(labels)).pivot_table(
            index=["dictionary_id", "feature_idx", "component", "layer"], columns="label", values="effect",
            aggfunc="sum", fill_value=0.0)
        m = m.reindex(columns=[c for c in self.circuits.label if c in m.columns])
        order = (m != 0).sum(axis=1) * 1e6 + m.abs().max(axis=1)
        m = m.loc[order.sort_values(ascending=False).index]
        m.columns.name = None
        return m

    def jaccard_matrix(self) -> pd.DataFrame:
        """Circuit x circuit Jaccard overlap (1 on the diagonal)."""
        labels = self.circuits.label.tolist()
        to_label = self.circuits.set_index("circuit_id").label
        m = pd.DataFrame(1.0, index=labels, columns=labels)
        for r in self.overlap.itertuples():
            a, b = to_label[r.circuit_a], to_label[r.circuit_b]
            m.loc[a, b] = m.loc[b, a] = r.jaccard
        return m

    def heatmap(self, out: Path, max_features: int = 60) -> Path:
        """PNG: the feature x circuit matrix (strongest shared features first) beside the Jaccard matrix."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        m = self.matrix().head(max_features)
        j = self.jaccard_matrix()
        rows = [f"{c}_{layer if layer >= 0 else ''}/{f}".replace("_/", "/") for _, f, c, layer in m.index]
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(4 + 0.5 * len(m.columns) + 0.45 * len(j), 2 + 0.16 * len(m)),
                                      gridspec_kw={"width_ratios": [max(len(m.columns), 1), max(len(j), 1)]})
        lim = float(np.abs(m.values).max()) if m.size else 1.0
        im = ax.imshow(m.values, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(len(m.columns)), m.columns, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(rows)), rows, fontsize=6)
        top = f"top {self.k} per circuit" if self.k else "in-circuit features"
        ax.set_title(f"feature effect ({top}; {len(m)} of {len(self.shared)} shown)", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.04, label="effect")
        im2 = ax2.imshow(j.values, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        ax2.set_xticks(range(len(j)), j.columns, rotation=60, ha="right", fontsize=7)
        ax2.set_yticks(range(len(j)), j.index, fontsize=7)
        for (y, x), v in np.ndenumerate(j.values):
            ax2.text(x, y, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w" if v < 0.6 else "k")
        ax2.set_title("Jaccard overlap", fontsize=9)
        fig.colorbar(im2, ax=ax2, fraction=0.04)
        fig.tight_layout()
        return save_figure(fig, out, dpi=130)


CIRCUITS_SQL = """
SELECT circuit_id, task_id, method, model_id,
       circuit_basis(circuit_id) AS basis
FROM circuits WHERE list_contains(?, circuit_id) ORDER BY task_id, created_at
"""


def compare(cat: Catalog, circuit_ids: list[str], k: int | None = None) -> Comparison:
    """Compare circuits by their features: in-circuit features, or each circuit's k strongest."""
    ids = list(dict.fromkeys(circuit_ids))
    if len(ids) < 2:
        raise UserError(f"comparing needs at least two circuits ({len(ids)} chosen)")
    if k is not None and k < 1:
        raise UserError("k must be at least 1")
    circuits = cat.sql(CIRCUITS_SQL, [ids])
    missing = sorted(set(ids) - set(circuits.circuit_id))
    if missing:
        raise UserError(f"unknown circuit {missing[0]!r}; see `cli.py circuits`")
    circuits["label"] = _labels(circuits)
    args = [ids, k]
    return Comparison(
        circuits=circuits,
        features=cat.sql("SELECT * FROM circuit_features(?, k := ?) ORDER BY circuit_id, rank", args),
        shared=cat.sql("SELECT * FROM shared_features(?, k := ?)", args),
        overlap=cat.sql("SELECT * FROM feature_overlap(?, k := ?)", args),
        k=k)


def _labels(circuits: pd.DataFrame) -> list[str]:
    """Short unique names: the task, then basis, method, model and the id's tail where still needed."""
    labels = circuits.task_id.astype(str).copy()
    for extra in (circuits.basis.fillna(""), circuits.method, circuits.model_id, circuits.circuit_id.str[-6:]):
        dup = labels.duplicated(keep=False)
        labels[dup] = labels[dup] + "/" + extra[dup].astype(str)
    return labels.tolist()
