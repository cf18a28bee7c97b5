"""Pictures from the catalogue: faithfulness and completeness curves."""

from __future__ import annotations

from pathlib import Path

from catalog.errors import UserError
from catalog.store import Catalog

CURVES_SQL = """
SELECT e.*, c.task_id, c.method, c.node_threshold,
       (SELECT any_value(d.kind) FROM nodes n JOIN dictionaries d USING (dictionary_id)
        WHERE n.circuit_id = c.circuit_id) AS basis
FROM evaluations e JOIN circuits c USING (circuit_id)
WHERE c.circuit_id IN (SELECT unnest(?::VARCHAR[])) AND e.errors = ?
ORDER BY c.task_id, e.circuit_id, e.n_nodes
"""


def save_figure(fig, out: Path, dpi: int = 110) -> Path:
    """Write a matplotlib figure to out (its folder made if needed), close it, return the path."""
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def faithfulness_plot(cat: Catalog, circuit_ids: list[str], out: Path, errors: str = "node") -> Path:
    """One panel per ablation: faithfulness (solid), completeness (dashed) and random node
    sets of the same size (dotted) against the number of nodes, per circuit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = cat.sql(CURVES_SQL, [circuit_ids, errors])
    if df.empty:
        raise UserError("no evaluations for those circuits (discover them with evaluation on)")
    ablations = sorted(df["ablation"].unique(), key=["mean", "zero", "resample"].index)
    fig, axes = plt.subplots(1, len(ablations), figsize=(5.2 * len(ablations), 4.2), squeeze=False, sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labels = {}
    for ax, ablation in zip(axes[0], ablations, strict=True):
        part = df[df["ablation"] == ablation]
        for i, (cid, g) in enumerate(part.groupby("circuit_id", sort=False)):
            row = g.iloc[0]
            label = f"{row.task_id} · {'neurons' if row.basis == 'identity' else 'features'} · {row.method}"
            labels[cid] = label
            color = colors[i % len(colors)]
            for kind, style in (("faithfulness", "-"), ("completeness", "--"), ("faithfulness_random", ":")):
                k = g[g["kind"] == kind].sort_values("n_nodes")
                ax.plot(k["n_nodes"].clip(lower=0.5), k["value"], style, color=color, marker="." if style == "-" else None,
                        label=label if kind == "faithfulness" else None)
        ax.set_xscale("log")
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.axhline(0.0, color="grey", lw=0.5)
        ax.set_title(f"{ablation} ablation")
        ax.set_xlabel("nodes kept (0 drawn at 0.5)")
    axes[0][0].set_ylabel("faithfulness (—), completeness (--), random (···)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return save_figure(fig, out)


PREDICTIONS_SQL = """
SELECT p.*, c.task_id, c.method, circuit_basis(c.circuit_id) AS basis
FROM predictions p JOIN circuits c USING (circuit_id)
WHERE list_contains(?, p.circuit_id) ORDER BY c.task_id, c.method, p.site, p.n_nodes
"""


def predictions_plot(cat: Catalog, circuit_ids: list[str], out: Path) -> Path:
    """One panel per task and basis: each submodule's nested node sets (top 1, 2, 4, ... in the method's
    ranking, and the whole submodule, ringed), the method's predicted change (the sum of its effects)
    against the change measured by patching the set at once, a colour per method, with the diagonal
    and each method's Pearson r."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    df = cat.sql(PREDICTIONS_SQL, [circuit_ids])
    if df.empty:
        raise UserError("no predictions for those circuits (discover them with evaluation on)")
    panels = list(df.groupby(["task_id", "basis"], sort=True))
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.9 * rows), squeeze=False)
    colors = dict(zip(sorted(df["method"].unique()), plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for ax, ((task, basis), g) in zip(axes.flat, panels, strict=False):
        for method, m in g.groupby("method"):
            r = np.corrcoef(m["predicted"], m["measured"])[0, 1] if len(m) > 1 else float("nan")
            part = m[~m["all_nodes"]]
            ax.scatter(part["predicted"], part["measured"], s=12, color=colors[method], label=f"{method} (r {r:.3f})")
            whole = m[m["all_nodes"]]
            ax.scatter(whole["predicted"], whole["measured"], s=40, facecolors="none", edgecolors=colors[method])
        lo, hi = min(g["predicted"].min(), g["measured"].min()), max(g["predicted"].max(), g["measured"].max())
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.6)
        ax.set_title(f"{task} · {basis}", fontsize=9)
        ax.set_xlabel("predicted (sum of effects)", fontsize=8)
        ax.set_ylabel("measured (set patched at once)", fontsize=8)
        ax.legend(fontsize=7, loc="upper left")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("nested node sets per submodule: predicted vs measured change of the metric (rings: whole "
                 "submodule)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out)


def edit_plot(cat: Catalog, edit_id: str, out: Path) -> Path:
    """Accuracy and mean metric per case before and after an edit, as grouped bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = cat.sql("SELECT * FROM edits WHERE edit_id = ? ORDER BY subset <> 'all', subset", [edit_id])
    if df.empty:
        raise UserError(f"unknown edit {edit_id!r}")
    fig, axes = plt.subplots(1, 2, figsize=(2.4 + 2.4 * len(df), 3.8), layout="constrained")
    x = list(range(len(df)))
    ticks = [f"{s}\n(n={n})" for s, n in zip(df["subset"], df["n_examples"], strict=True)]
    after = f"after (ablating {df['n_features'][0]} features, {df['ablation'][0]})"
    for ax, col, label in ((axes[0], "accuracy", "accuracy"), (axes[1], "metric", "mean metric, clean prompts (lower: more right)")):
        ax.bar([i - 0.2 for i in x], df[f"{col}_before"], 0.4, label="before")
        ax.bar([i + 0.2 for i in x], df[f"{col}_after"], 0.4, label=after)
        ax.set_xticks(x, ticks)
        ax.set_ylabel(label)
        ax.axhline(0, color="grey", lw=0.5)
    axes[0].set_ylim(0, 1.3)
    axes[0].axhline(0.5, color="grey", lw=0.5, ls=":")
    axes[0].legend(fontsize=7, loc="upper center", ncol=2)
    fig.suptitle(f"{df['task_id'][0]}: before and after the edit", fontsize=10)
    return save_figure(fig, out)


SWEEP_PANELS = (("mse", "reconstruction loss (MSE)", "viridis_r"), ("mmcs_truth", "MMCS with the true features", "viridis"),
                ("mmcs_larger", "MMCS with the next larger dictionary", "viridis"),
                ("dead_features", "dead features", "magma_r"))


def sweep_heatmaps(rows, out: Path) -> Path:
    """The toy benchmark's four L1 x dictionary-size matrices, each cell annotated; the PCA
    baseline's MMCS in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    df = pd.DataFrame(rows)
    sae, pca = df[df["method"] == "sae"], df[df["method"] == "pca"]
    fig, axes = plt.subplots(1, len(SWEEP_PANELS), figsize=(4.6 * len(SWEEP_PANELS), 4.2))
    for ax, (col, title, cmap) in zip(axes, SWEEP_PANELS, strict=True):
        grid = sae.pivot(index="l1_coefficient", columns="d_sae", values=col).astype(float)
        im = ax.imshow(grid.values, cmap=cmap, aspect="auto")
        ax.set_xticks(range(len(grid.columns)), [str(c) for c in grid.columns])
        ax.set_yticks(range(len(grid.index)), [f"{v:g}" for v in grid.index])
        ax.set_xlabel("dictionary size")
        ax.set_ylabel("L1 coefficient")
        ax.set_title(title, fontsize=10)
        for (i, j), v in pd.DataFrame(grid.values).stack(future_stack=True).items():
            ax.text(j, i, "-" if v != v else (f"{v:.0f}" if col == "dead_features" else f"{v:.3g}"),
                    ha="center", va="center", fontsize=8, color=_ink(im.cmap(im.norm(v)) if v == v else (1, 1, 1)))
    pca_note = f"; PCA baseline MMCS {pca['mmcs_truth'].iloc[0]:.2f}" if len(pca) else ""
    d, n = int(df["d_in"].iloc[0]), int(df["n_true_features"].iloc[0])
    fig.suptitle(f"toy benchmark: {n} true features in {d} dimensions{pca_note}")
    fig.tight_layout()
    return save_figure(fig, out)


def curvature_heatmaps(rows: list[dict], out: Path) -> Path:
    """One panel per toy of `benchmark parameters`: each input's curvature along each direction, every
    column scaled to its largest (the top input of a direction is its brightest cell)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 + 1.1 * sum(len(r["curvature"][0]) for r in rows), 3.6))
    for ax, r in zip(np.atleast_1d(axes), rows, strict=True):
        c = np.asarray(r["curvature"], dtype=float)
        scaled = c / np.maximum(c.max(0, keepdims=True), 1e-30)
        ax.imshow(scaled, cmap="viridis", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(c.shape[1]), [f"u{k}" for k in range(c.shape[1])])
        ax.set_yticks(range(c.shape[0]), r["inputs"], fontsize=8)
        ax.set_xlabel("direction")
        extra = f", MMCS {r['mmcs']:.3f}" if r.get("mmcs") is not None else ""
        ax.set_title(f"{r['toy']}: {'passed' if r['passed'] else 'FAILED'}{extra}", fontsize=10)
        for (i, j), v in np.ndenumerate(c):
            ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=7, color=_ink(plt.cm.viridis(scaled[i, j])))
    fig.suptitle("curvature of each input along each direction (columns scaled to their maximum)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out)


def _ink(rgb) -> str:
    """Black on light cells, white on dark ones."""
    return "black" if 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 0.5 else "white"
