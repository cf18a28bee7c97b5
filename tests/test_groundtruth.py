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
    truth = np.zeros(112, dtype=bool)
    truth[:5] = True  # the hand-set model's shape: 5 true nodes among 112
    rng = np.random.default_rng(0)
    draws = [auroc(rng.random(112), truth) for _ in range(400)]
    assert abs(np.mean(draws) - 0.5) < 0.02 and np.std(draws) > 0.05  # random scores: about 0.5
    perfect = truth.astype(float)
    assert auroc(perfect, truth) == 1.0 and auroc(-perfect, truth) == 0.0
    assert auroc(np.zeros(112), truth) == 0.5  # scores that cannot tell: ties count one half
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
    """Independently of any attribution method: every prompt is answered right by the planted margin,
    head 0.0 attends from the last token to the subject, and patching one residual dimension from the
    patch prompt moves the metric by the whole effect exactly when the truth says it is a node."""
    from compute.attribution.spliced import batch_metric
    from compute.tasks import encode
    from schema.sites import site

    pm, _ = handset
    (b,) = encode(pm.model, pm.task, "train").batches
    clean, patch = batch_metric(pm.model(b.clean), b), batch_metric(pm.model(b.patch), b)
    assert torch.allclose(clean, torch.full_like(clean, -2 * GAIN)) and torch.allclose(patch, -clean)
    _, cache = pm.model.run_with_cache(b.clean)
    assert cache["blocks.0.attn.hook_pattern"][:, 0, -1, 2].min() > 0.999
    _, patch_cache = pm.model.run_with_cache(b.patch)
    for (s, i) in sorted({(s, i) for s in ("embed", "attn_0", "mlp_0", "resid_0", "attn_1", "mlp_1", "resid_1")
                          for i in range(len(DIMS))}):
        component, layer = (s, -1) if s == "embed" else (s.split("_")[0], int(s.split("_")[1]))
        hook = site(component, layer).hook_out

        def put(x, hook, i=i, hook_name=hook):
            x = x.clone()
            x[..., i] = patch_cache[hook_name][..., i]
            return x

        moved = (batch_metric(pm.model.run_with_hooks(b.clean, fwd_hooks=[(hook, put)]), b) - clean).mean().item()
        expected = 4 * GAIN if (s, i) in pm.truth.nodes else 0.0  # the whole effect (patch - clean), or none
        assert moved == pytest.approx(expected, abs=1e-5), (s, i)


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
    assert set(rows[rows.model == "siit"].level) == {"component"}  # its nodes are undefined
    cat = catalog.open(path)
    models = cat.sql("SELECT * FROM planted_models ORDER BY name")
    assert (models.faithfulness >= 0.9).all() and (models.completeness <= 0.1).all(), models
    training = json.loads(models[models.name == "siit"].training.iloc[0])
    assert min(v for k, v in training.items() if k != "config") >= 0.95, training  # SIIT did what it trained for
    truth = cat.sql("SELECT level, count(*) AS n FROM planted GROUP BY level").set_index("level").n
    assert dict(truth) == {"component": 10, "node": 5, "edge": 5}
    # the scores are evaluations of the discovered circuits, readable through the named query
    named = cat.sql("SELECT * FROM ground_truth_scores()")
    assert len(named) == len(rows) and set(named.circuit_id) <= set(cat.sql("SELECT circuit_id FROM circuits").circuit_id)
    from tests.test_readme import GROUND_TRUTH_SECTION, _blocks

    for sql in _blocks("sql", GROUND_TRUTH_SECTION):  # the README's queries run on this catalogue
        assert len(cat.sql(sql)) == len(rows)
