"""The ground-truth benchmark: every discovery method on the planted-circuit models, scored.

For each planted model (`compute.groundtruth.planted`) this measures the planted circuit's own
faithfulness (mean ablation of every other node, and of the planted nodes for its complement),
discovers the task's circuit over neurons with each method (each an ordinary discovery run), and
scores it against the truth (`compute.groundtruth.scoring`). One benchmark run then commits the
truth (`planted`), the models' rows (`planted_models`) and the scores (`evaluations` of kinds
node_/edge_/component_ precision, recall and auroc). `CHECKS` says what must hold.
"""

from __future__ import annotations

from dataclasses import asdict

from catalog.store import Catalog
from compute.attribution.discovery import DiscoveryParams
from compute.attribution.edges import edge_pairs
from compute.attribution.faithfulness import node_set, set_faithfulness
from compute.groundtruth.build import PlantedModel, build_planted
from compute.groundtruth.planted import MODELS, Truth
from compute.groundtruth.scoring import Score, score_circuit
from compute.jobs.discovery_job import discovery_job
from compute.jobs.lifecycle import run, run_row
from compute.models.zoo import accuracy
from compute.tasks import encode
from schema.sites import METRIC, site_name, sites

METHODS = ("ig", "atp", "exact")
# (model, methods, level, lowest AUROC): what the issue asks of the hand-set model
AUROC_CHECKS = [("handset", ("ig", "exact"), level, 0.95) for level in ("node", "component")]
FAITHFUL, COMPLEMENT = 0.9, 0.1  # a planted circuit's faithfulness at least, its complement's at most


def edge_sites(n_layers: int) -> list[tuple[str, str]]:
    """The (upstream, downstream) submodule pairs a circuit's edges join, the metric's last."""
    return [(p.up.name, p.down.name) for p in edge_pairs(sites(n_layers))] + [(site_name("resid", n_layers - 1),
                                                                                METRIC)]


def circuit_rows(cat: Catalog, circuit_id: str):
    """(nodes, edges) of a stored circuit, each edge with its ends' sites and neurons (error terms left out)."""
    nodes = cat.sql("SELECT component, layer, feature_idx, is_error, effect, in_circuit FROM nodes "
                    "WHERE circuit_id = ?", [circuit_id])
    edges = cat.sql("""
        SELECT s.component AS src_component, s.layer AS src_layer, s.feature_idx AS src_feature,
               d.component AS dst_component, d.layer AS dst_layer, d.feature_idx AS dst_feature, e.weight
        FROM edges e JOIN nodes s ON s.circuit_id = e.circuit_id AND s.node_idx = e.src_idx
                     JOIN nodes d ON d.circuit_id = e.circuit_id AND d.node_idx = e.dst_idx
        WHERE e.circuit_id = ? AND NOT s.is_error AND NOT coalesce(d.is_error, false)""", [circuit_id])
    edges["src_site"] = [site_name(c, lay) for c, lay in zip(edges.src_component, edges.src_layer, strict=True)]
    edges["dst_site"] = [site_name(c, lay) for c, lay in zip(edges.dst_component, edges.dst_layer, strict=True)]
    return nodes, edges


def truth_rows(pm: PlantedModel) -> list[dict]:
    """The `planted` rows of a model's truth: components, and nodes and edges where defined."""
    t: Truth = pm.truth
    base = {"model_id": pm.model_id, "task_id": pm.task.name}
    rows = [{**base, "level": "component", "name": c.name, "site": c.site,
             "features": None if c.features is None else list(c.features), "in_circuit": c.in_circuit, "role": c.role}
            for c in t.components]
    for s, i in sorted(t.nodes or ()):
        rows.append({**base, "level": "node", "name": f"{s}/{i}", "site": s, "features": [i], "in_circuit": True,
                     "role": t.neuron_names.get(i, "")})
    for (s, i), (d, j) in sorted(t.edges or ()):
        rows.append({**base, "level": "edge", "name": f"{s}/{i} -> {d}" + ("" if d == METRIC else f"/{j}"),
                     "site": d, "features": None if d == METRIC else [j], "src_site": s, "src_feature": i,
                     "in_circuit": True, "role": ""})
    return rows


def evaluation_rows(circuit_id: str, params: DiscoveryParams, s: Score) -> list[dict]:
    threshold = params.edge_threshold if s.level == "edge" else params.node_threshold
    return [{"circuit_id": circuit_id, "kind": f"{s.level}_{measure}", "ablation": "none", "errors": "none",
             "threshold": threshold, "n_nodes": s.n_true, "value": value}
            for measure, value in (("precision", s.precision), ("recall", s.recall), ("auroc", s.auroc))
            if value is not None]


def ground_truth_job(cat: Catalog, names: tuple[str, ...] = MODELS, methods: tuple[str, ...] = METHODS,
                     progress: bool = True) -> tuple[str, list[dict], list[dict]]:
    """Measure the planted circuits, discover and score a circuit per model and method, commit the
    truth, the models and the scores as one run. Returns (run_id, one row per circuit and level, one row
    per planted model)."""
    built = build_planted(tuple(names), progress)
    scored, models, truth, evaluations = [], [], [], []
    for name, (pm, dicts) in built.items():
        subs = sites(pm.model.cfg.n_layers)
        saes = {k: d.sae for k, d in dicts.items()}
        widths = {s.name: saes[s.name].d_sae for s in subs}
        data = encode(pm.model, pm.task, "train")
        keep = node_set(subs, saes, [(s, i) for s, i in pm.truth.circuit_nodes(widths)])
        faithfulness, completeness = set_faithfulness(pm.model, subs, saes, data, keep)
        models.append({"model_id": pm.model_id, "task_id": pm.task.name, "name": name,
                       "accuracy": accuracy(pm.model, pm.task, "train"), "faithfulness": faithfulness,
                       "completeness": completeness, "training": pm.trained or None})
        truth += truth_rows(pm)
        for method in methods:
            params = DiscoveryParams(method=method)
            circuit_id, _, _ = discovery_job(cat, pm.handle, dicts, pm.task, params, progress)
            for s in score_circuit(*circuit_rows(cat, circuit_id), widths, edge_sites(pm.model.cfg.n_layers),
                                   pm.truth):
                evaluations += evaluation_rows(circuit_id, params, s)
                scored.append({"model": name, "method": method, "circuit_id": circuit_id, **asdict(s)})
    row = run_row("benchmark", {"benchmark": "ground-truth", "models": list(names), "methods": list(methods)})
    with run(cat, row) as w:
        w.write("models", [pm.handle.row() for pm, _ in built.values()])
        w.write("planted", truth)
        w.write("planted_models", [{**m, "run_id": row["run_id"]} for m in models])
        w.write("evaluations", evaluations)
    return row["run_id"], scored, models


def failed_checks(scored: list[dict], models: list[dict]) -> list[str]:
    """What did not hold: the planted circuits' faithfulness, and the hand-set model's AUROCs."""
    failed = [f"{m['name']}: planted circuit's faithfulness {m['faithfulness']:.3f} < {FAITHFUL}"
              for m in models if m["faithfulness"] < FAITHFUL]
    failed += [f"{m['name']}: its complement's faithfulness {m['completeness']:.3f} > {COMPLEMENT}"
               for m in models if m["completeness"] > COMPLEMENT]
    for model, methods, level, lowest in AUROC_CHECKS:
        for r in scored:
            if r["model"] == model and r["method"] in methods and r["level"] == level and \
                    (r["auroc"] is None or r["auroc"] < lowest):
                failed.append(f"{model}: {r['method']} {level} AUROC {r['auroc']} < {lowest}")
    return failed
