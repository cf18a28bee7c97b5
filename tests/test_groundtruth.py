"""Ground truth: the scoring can fail, the hand-set model is what its truth says, and every method is
scored against the planted circuits by `cli.py benchmark ground-truth`."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

import catalog
from compute.groundtruth.build import build_planted
from compute.groundtruth.planted import DIMS, GAIN
from compute.groundtruth.scoring import Score, auroc, score_circuit
from tests.conftest import run_cli


def test_auroc_tells_a_ranking_from_chance():
    truth = np.zeros(126, dtype=bool)
    truth[:9] = True  # the hand-set model's shape: 9 true nodes among 126
    rng = np.random.default_rng(0)
    draws = [auroc(rng.random(len(truth)), truth) for _ in range(400)]
    assert abs(np.mean(draws) - 0.5) < 0.02 and np.std(draws) > 0.05  # random scores: about 0.5
    perfect = truth.astype(float)
    assert auroc(perfect, truth) == 1.0 and auroc(-perfect, truth) == 0.0
    assert auroc(np.zeros(len(truth)), truth) == 0.5  # scores that cannot tell: ties count one half
    assert auroc(np.ones(3), np.ones(3, dtype=bool)) is None  # no false candidate: undefined
    # by hand: true {a: 3, b: 1}, false {c: 2, d: 0}; pairs (a>c, a>d, b<c, b>d) -> 3/4
    assert auroc(np.array([3, 1, 2, 0]), np.array([True, True, False, False])) == 0.75


def test_scores_of_a_wrong_circuit():
    """A circuit that keeps false nodes and scores them highest gets low precision and AUROC."""
    nodes = pd.DataFrame({"component": ["attn", "attn", "mlp", "metric"], "layer": [0, 0, 0, 2],
                          "feature_idx": [0, 1, 2, None], "is_error": [False, False, False, False],
                          "effect": [0.05, -3.0, 2.0, None], "in_circuit": [False, True, True, False]})
    from compute.groundtruth.planted import Component, Truth

    truth = Truth((Component("a", "attn_0", True, ""), Component("m", "mlp_0", False, "")),
                  nodes=frozenset({("attn_0", 0)}), edges=frozenset())
    scores = {s.level: s for s in score_circuit(nodes.dropna(subset=["effect"]), pd.DataFrame(),
                                                {"attn_0": 3, "mlp_0": 3}, [], truth)}
    node = scores["node"]
    assert (node.n_candidates, node.n_true, node.n_found, node.precision, node.recall) == (6, 1, 2, 0.0, 0.0)
    # the true node (0.05) beats the three zero-effect candidates and loses to the two kept ones
    assert node.auroc == pytest.approx(3 / 5)
    assert scores["component"] == Score("component", 2, 1, 2, 0.5, 1.0, 1.0)


@pytest.fixture(scope="session")
def handset():
    return build_planted(progress=False)["handset"]  # both models: one build process on a clean machine


def test_handset_model_is_what_its_truth_says(handset):
    """Independently of any attribution method: every prompt is answered right, heads 0.0 and 0.2 attend
    from the last token to the subject, head 1.2 to the subject or to BOS by the subject's number, and
    patching one residual dimension from the patch prompt moves the metric exactly when the truth says
    it is a node: by its path's effect (MLP 1's path, or head 1.2's), by both for the embedding."""
    from compute.attribution.spliced import batch_metric
    from compute.tasks import encode
    from schema.sites import site

    pm, _ = handset
    (b,) = encode(pm.model, pm.task, "train").batches
    clean, patch = batch_metric(pm.model(b.clean), b), batch_metric(pm.model(b.patch), b)
    assert (clean < -7.9).all() and torch.allclose(patch, -clean)
    total = (patch - clean).mean().item()
    _, cache = pm.model.run_with_cache(b.clean)
    assert cache["blocks.0.attn.hook_pattern"][:, [0, 2], -1, 2].min() > 0.999
    plural = torch.tensor([e["clean_answer"] == "are" for _, e in pm.task.split("train")])[b.example_idx]
    chosen = cache["blocks.1.attn.hook_pattern"][:, 2, -1, :].argmax(-1)
    assert (chosen == torch.where(plural, 2, 0)).all()  # head 1.2 picks the subject or BOS
    _, patch_cache = pm.model.run_with_cache(b.patch)
    moved = {}
    for s in ("embed", "attn_0", "mlp_0", "resid_0", "attn_1", "mlp_1", "resid_1"):
        component, layer = (s, -1) if s == "embed" else (s.split("_")[0], int(s.split("_")[1]))
        hook = site(component, layer).hook_out
        for i in range(len(DIMS)):
            def put(x, hook, i=i, hook_name=hook):
                x = x.clone()
                x[..., i] = patch_cache[hook_name][..., i]
                return x

            logits = pm.model.run_with_hooks(b.clean, fwd_hooks=[(hook, put)])
            moved[(s, i)] = (batch_metric(logits, b) - clean).mean().item()
    assert {k for k, v in moved.items() if abs(v) > 1e-4} == set(pm.truth.nodes)
    mlp_path = [(s, DIMS[d]) for s, d in (("attn_0", "subject number"), ("resid_0", "subject number"),
                                          ("mlp_1", "answer"), ("resid_1", "answer"))]
    gate_path = [(s, DIMS[d]) for s, d in (("attn_0", "gate number"), ("resid_0", "gate number"),
                                           ("attn_1", "gated"), ("resid_1", "gated"))]
    assert all(moved[k] == pytest.approx(4 * GAIN, abs=1e-5) for k in mlp_path)
    gate_effect = moved[gate_path[-1]]
    assert gate_effect > 0.99 * 4 * GAIN and all(moved[k] == pytest.approx(gate_effect, abs=1e-4) for k in gate_path)
    assert moved[("embed", DIMS["number"])] == pytest.approx(total, abs=1e-4) == 4 * GAIN + gate_effect


def test_ground_truth_benchmark_scores_every_method(tmp_path):
    path = tmp_path / "gt"
    r = run_cli("benchmark", "ground-truth", "--format", "json", catalog=path)
    assert r.returncode == 0, r.stderr
    rows = pd.DataFrame(json.loads(r.stdout))
    assert set(rows.method) == {"ig", "atp", "exact"} and set(rows.model) == {"handset", "siit"}
    handset_rows = rows[rows.model == "handset"].set_index(["method", "level"])
    for method in ("ig", "exact"):  # the check: the planted components recovered
        for level in ("node", "component"):
            assert handset_rows.loc[(method, level), "auroc"] >= 0.95
        assert handset_rows.loc[(method, "node"), "recall"] == 1.0
    # the benchmark tells the methods apart: AtP's gradient at the clean prompt misses head 1.2's saturated
    # path (its query's nodes fall under the threshold), where IG and exact patching keep every true node
    assert handset_rows.loc[("atp", "node"), "recall"] < 1.0
    assert set(rows[rows.model == "siit"].level) == {"component"}  # its nodes are undefined
    cat = catalog.open(path)
    models = cat.sql("SELECT * FROM planted_models ORDER BY name")
    assert (models.faithfulness >= 0.9).all() and (models.completeness <= 0.1).all(), models
    training = json.loads(models[models.name == "siit"].training.iloc[0])
    assert min(v for k, v in training.items() if k != "config") >= 0.95, training  # SIIT did what it trained for
    truth = cat.sql("SELECT level, count(*) AS n FROM planted GROUP BY level").set_index("level").n
    assert dict(truth) == {"component": 12, "node": 9, "edge": 10}
    # the scores are evaluations of the discovered circuits, readable through the named query
    named = cat.sql("SELECT * FROM ground_truth_scores()")
    assert len(named) == len(rows) and set(named.circuit_id) <= set(cat.sql("SELECT circuit_id FROM circuits").circuit_id)
    from tests.docs import blocks, page

    for sql in blocks("sql", page("ground-truth.md")):  # the page's queries run on this catalogue
        assert len(cat.sql(sql)) == len(rows)
    # a second benchmark writes the same truth again: the catalogue keeps one row per key
    r = run_cli("benchmark", "ground-truth", "--model", "handset", "--method", "ig", catalog=path)
    assert r.returncode == 0, r.stderr
    again = cat.sql("SELECT level, count(*) AS n FROM planted GROUP BY level").set_index("level").n
    assert dict(again) == dict(truth)
