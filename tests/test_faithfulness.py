"""Faithfulness and completeness against their definitions and independent forward passes."""

import pytest
import torch

from compute.attribution.discovery import DiscoveryParams, discover
from compute.attribution.faithfulness import (
    ABLATIONS,
    ERROR_MODES,
    NodeSet,
    ablated_metric,
    ablated_states,
    curves,
    everything,
    node_set,
    nodes_for,
    sweep_thresholds,
)
from compute.attribution.spliced import batch_metric, states
from compute.tasks import encode
from schema.sites import ERROR


@pytest.fixture(scope="module")
def evaluated(zoo, subs, saes):
    data = encode(zoo.model, zoo.tasks["sva_simple"], "train", 32)
    c = discover(zoo.model, subs, saes, data, DiscoveryParams(n_examples=32, ablations=ABLATIONS, random_draws=2),
                 progress=False)
    return data, c


def test_full_model_is_one_and_empty_circuit_is_zero(zoo, subs, saes, evaluated):
    data, c = evaluated
    effects = c.effects()
    top = max(abs(e) for e in effects.values())
    for ablation in ("mean", "zero", "resample"):
        (cv,) = curves(zoo.model, subs, saes, data, effects, [top, 0.0], (ablation,), random_draws=1)
        assert cv.n_nodes == [0, len(effects)]
        assert cv.faithfulness[0] == pytest.approx(0.0, abs=1e-6)
        assert cv.completeness[0] == pytest.approx(1.0, abs=1e-6)
        # every node: the spliced model reproduces the plain model
        total = 0.0
        for b in data.batches:
            abl = ablated_states(states(zoo.model, subs, saes, b.clean), ablation, saes)
            total += ablated_metric(zoo.model, subs, saes, b.clean, b, everything(subs, saes), abl).sum().item()
        faith_all = (total / data.n_examples - cv.f_empty) / (cv.f_model - cv.f_empty)
        assert faith_all == pytest.approx(1.0, abs=1e-6)


def test_mean_ablating_everything_is_the_mean_activation(zoo, subs, saes, evaluated):
    """With no node kept, each submodule outputs decode(mean f) + mean err = mean x, so the
    metric is the model's with the last residual stream replaced by its batch mean."""
    data, _ = evaluated
    b = data.batches[0]
    abl = ablated_states(states(zoo.model, subs, saes, b.clean), "mean", saes)
    got = ablated_metric(zoo.model, subs, saes, b.clean, b, node_set(subs, saes, []), abl)
    last = subs[-1].hook_name
    with torch.no_grad():
        logits = zoo.model.run_with_hooks(b.clean, fwd_hooks=[(last, lambda x, hook: x.mean(0, keepdim=True)
                                                                 .expand_as(x))])
    assert torch.allclose(got, batch_metric(logits, b), atol=1e-4)


def test_one_kept_error_term_is_exact_patching_of_the_rest(zoo, subs, saes, evaluated):
    """Keeping only the last resid's error term under zero ablation: the last resid becomes
    b_dec + err, which a direct hook reproduces."""
    data, _ = evaluated
    b = data.batches[0]
    last = subs[-1]
    sae = saes[last.name]
    abl = ablated_states(states(zoo.model, subs, saes, b.clean), "zero", saes)
    keep = node_set(subs, saes, [(last.name, ERROR)])
    got = ablated_metric(zoo.model, subs, saes, b.clean, b, keep, abl)

    def direct(x, hook):
        return x - sae.decode(sae.encode(x)) + sae.b_dec

    with torch.no_grad():
        logits = zoo.model.run_with_hooks(b.clean, fwd_hooks=[(s.hook_name, lambda x, hook, sa=saes[s.name]:
                                                                sa.b_dec.expand_as(x)) for s in subs[:-1]]
                                          + [(last.hook_name, direct)])
    assert torch.allclose(got, batch_metric(logits, b), atol=1e-4)


@pytest.mark.parametrize("per_position", [False, True])
@pytest.mark.parametrize("errors", ERROR_MODES)
def test_every_error_mode_matches_the_plain_splice(zoo, subs, saes, evaluated, errors, per_position):
    """The splice keeps an error term as x + (kept - f) W_dec (one decoder product); a plain
    hook computes decode(kept features) + the mode's error term. Random kept sets, with error
    terms kept in some submodules (or at some positions) and ablated in others."""
    data, _ = evaluated
    b = data.batches[0]
    shape = (b.clean.shape[1],) if per_position else ()
    g = torch.Generator().manual_seed(0)
    keep = NodeSet({s.name: torch.rand(*shape, saes[s.name].d_sae, generator=g) < 0.5 for s in subs},
                   {s.name: torch.rand(shape, generator=g) < 0.5 for s in subs})
    abl = ablated_states(states(zoo.model, subs, saes, b.clean), "mean", saes)

    def plain(x, hook, s):
        sae, a = saes[s.name], abl[s.name]
        f = sae.encode(x)
        err = x - sae.decode(f)
        new_err = {"removed": torch.zeros_like(err), "ablated": a.err, "kept": err,
                   "node": torch.where(keep.errors[s.name].unsqueeze(-1), err, a.err)}[errors]
        return sae.decode(torch.where(keep.features[s.name], f, a.f)) + new_err

    with torch.no_grad():
        logits = zoo.model.run_with_hooks(b.clean, fwd_hooks=[(s.hook_name, lambda x, hook, s=s: plain(x, hook, s))
                                                              for s in subs])
    got = ablated_metric(zoo.model, subs, saes, b.clean, b, keep, abl, errors)
    assert torch.allclose(got, batch_metric(logits, b), rtol=1e-4, atol=1e-4)


def test_circuit_beats_random_nodes_and_curves_are_stored_on_the_circuit(evaluated):
    _, c = evaluated
    assert {cv.ablation for cv in c.curves} == {"mean", "zero", "resample"}
    mean = next(cv for cv in c.curves if cv.ablation == "mean")
    assert mean.n_nodes == sorted(mean.n_nodes) and mean.n_nodes[0] == 0
    faith, comp = c.at_threshold("mean")
    assert faith > 0.8 and comp < 0.3
    j = mean.thresholds.index(c.params.node_threshold)
    assert mean.faithfulness[j] > mean.random[j] + 0.5
    assert nodes_for(mean, 0.8) is not None and nodes_for(mean, 0.8) <= mean.n_nodes[j]


def test_sweep_thresholds_keep_powers_of_two():
    effects = {("a", i): float(v) for i, v in enumerate([5, -4, 3, 2, 1, 0.5])}
    t = sweep_thresholds(effects, 0.1)
    kept = [sum(abs(e) > x for e in effects.values()) for x in t]
    assert kept == [0, 1, 2, 4, 6, 6] and t == sorted(t, reverse=True) and 0.1 in t
    t = sweep_thresholds(effects, 0.1, factor=4)  # the default evaluation's sweep
    assert [sum(abs(e) > x for e in effects.values()) for x in t] == [0, 1, 4, 6, 6]
    assert DiscoveryParams().sweep_factor == 4 and DiscoveryParams().ablations == ("mean",)


def test_per_position_circuit_full_is_one_and_empty_is_zero(zoo, subs, saes):
    """Aggregation none: node sets are (feature, position) masks; keeping every one of them is
    the plain model (1), keeping none is 0, and the circuit itself is faithful."""
    data = encode(zoo.model, zoo.tasks["sva_across_pp"], "train", 16, one_length=True)
    c = discover(zoo.model, subs, saes, data, DiscoveryParams(aggregation="none", ablations=("mean",),
                                                              random_draws=1), progress=False)
    assert all(pos is not None for _, _, pos in c.effects())
    length = data.batches[0].clean.shape[1]
    every = {(s.name, i, t): 1.0 for s in subs for t in range(length)
             for i in [*range(saes[s.name].d_sae), ERROR]}
    for ablation in ("mean", "zero", "resample"):
        (cv,) = curves(zoo.model, subs, saes, data, every, [2.0, 0.0], (ablation,), random_draws=1)
        assert cv.n_nodes == [0, len(every)]
        assert cv.faithfulness[0] == pytest.approx(0.0, abs=1e-6)
        assert cv.faithfulness[1] == pytest.approx(1.0, abs=1e-6)
    faith, comp = c.at_threshold("mean")
    assert faith > 0.8 and comp < 0.3


def test_node_sets_measured_together_equal_one_pass_each(zoo, subs, saes, evaluated, monkeypatch):
    """The sweep measures many node sets per forward pass (the prompts repeated once per set);
    each set's metric is what a pass of its own gives, also when the sets are split over many
    passes, for every error mode and with per-position sets."""
    from compute.attribution import faithfulness
    from compute.attribution.faithfulness import ablated_metrics, random_sets

    data, c = evaluated
    b = data.batches[0]
    effects = c.effects()
    keeps = random_sets(subs, saes, effects, [0, 3, 40, len(effects)], draws=2, seed=1)
    keeps = [k for draws in keeps for k in draws] + [everything(subs, saes)]
    length = b.clean.shape[1]
    per_position = {(name, i, t): e for (name, i, _), e in effects.items() for t in range(length) if (t + i) % 3}
    keeps_pos = [k for draws in random_sets(subs, saes, per_position, [5, 200], 2, length=length) for k in draws]
    abl = ablated_states(states(zoo.model, subs, saes, b.clean), "mean", saes)
    for errors in ERROR_MODES:
        for sets in (keeps, keeps_pos):
            alone = torch.stack([ablated_metric(zoo.model, subs, saes, b.clean, b, k, abl, errors) for k in sets])
            together = ablated_metrics(zoo.model, subs, saes, b.clean, b, sets, abl, errors)
            assert alone.std() > 0.1  # the sets differ, so the comparison can fail
            assert torch.allclose(together, alone, atol=1e-4), errors
            monkeypatch.setattr(faithfulness, "SET_BUDGET", 1)  # one set per pass
            assert torch.allclose(ablated_metrics(zoo.model, subs, saes, b.clean, b, sets, abl, errors), alone, atol=1e-4)
            monkeypatch.undo()
