"""Attribution methods against independent references on the zoo model."""

import numpy as np
import pytest
import torch

from compute.attribution import edges
from compute.attribution.atp import node_effects
from compute.attribution.discovery import DiscoveryParams, discover
from compute.attribution.edges import EdgePair, edge_pairs, edge_weights, edge_weights_looped
from compute.attribution.ig import RULES, ig_grads, quadrature
from compute.attribution.patching import joint_effects, patch_effects, set_effects
from compute.attribution.spliced import batch_metric, output_grads, states
from compute.models import grammar
from compute.tasks import encode
from schema.sites import ERROR


def _exact_effects(zoo, subs, saes, data, keys) -> np.ndarray:
    """Exact activation patching of every node in `keys`, one forward per node (batched)."""
    exact = dict.fromkeys(keys, 0.0)
    for b in data.batches:
        clean, patch = states(zoo.model, subs, saes, b.clean), states(zoo.model, subs, saes, b.patch)
        for s in subs:
            ids = [k[1] for k in keys if k[0] == s.name]
            nodes = [None if i == ERROR else i for i in ids]  # patch_effects names the error term None
            for i, v in zip(ids, patch_effects(zoo.model, s, saes[s.name], b, clean[s.name], patch[s.name], nodes),
                            strict=True):
                exact[(s.name, i, None)] += v.item() / data.n_examples
    return np.array([exact[k] for k in keys])


_AGREEMENT: dict[str, tuple] = {}


def _agreement(zoo, subs, saes, task):
    """Node keys, exact effects and the IG and AtP estimates of every node on a zoo task
    (computed once per session: the fixtures are session-wide)."""
    if task not in _AGREEMENT:
        _AGREEMENT[task] = _measure_agreement(zoo, subs, saes, task)
    return _AGREEMENT[task]


def _measure_agreement(zoo, subs, saes, task):
    data = encode(zoo.model, zoo.tasks[task], "train", 64)
    est = {m: discover(zoo.model, subs, saes, data, DiscoveryParams(method=m, ablations=()),
                       progress=False).effects() for m in ("ig", "atp")}
    keys = sorted(set(est["ig"]) | set(est["atp"]), key=str)
    exact = _exact_effects(zoo, subs, saes, data, keys)
    return keys, exact, {m: np.array([e.get(k, 0.0) for k in keys]) for m, e in est.items()}


def _pearson(keys, est, exact, sub=None):
    at = [sub is None or k[0] == sub for k in keys]
    return np.corrcoef(est[at], exact[at])[0, 1]


# IG must track exact patching (r >= 0.9 over all nodes of a task).
@pytest.mark.parametrize("task", grammar.TASKS)
def test_ig_matches_exact_patching_on_every_zoo_task(zoo, subs, saes, task):
    keys, exact, est = _agreement(zoo, subs, saes, task)
    assert len(keys) > 100
    for m in ("ig", "atp"):
        per_sub = {s.name: round(_pearson(keys, est[m], exact, s.name), 3) for s in subs}
        print(f"{task} {m}: pooled r={_pearson(keys, est[m], exact):.3f}", per_sub)
    assert _pearson(keys, est["ig"], exact) >= 0.9


def test_the_readme_agreement_table_is_measured_on_the_release(zoo, subs, saes):
    """Every cell of the agreement table (docs/discovery.md) (IG / AtP, pooled and per submodule) is what this
    session measures, to its three decimals (half a unit, and as much again for the last bits of
    float32 that another processor's kernels change)."""
    import re

    from tests.docs import page

    table = page("discovery.md").split("## Measured agreement with exact activation patching")[1].split("\n\n")[2]
    rows = [line.strip("|").split("|") for line in table.splitlines()[2:]]
    assert [r[0].strip() for r in rows] == list(grammar.TASKS)
    for task, *cells in rows:
        keys, exact, est = _agreement(zoo, subs, saes, task.strip())
        assert len(cells) == 1 + len(subs)
        for cell, sub in zip(cells, [None, *(s.name for s in subs)], strict=True):
            documented = [float(v.replace("−", "-")) for v in re.findall(r"[−\d.]+", cell)]
            measured = [_pearson(keys, est[m], exact, sub) for m in ("ig", "atp")]
            assert documented == pytest.approx(measured, abs=0.001), (task, sub)


# AtP is a first-order estimate that misjudges saturating attention and embedding features
# (Kramar et al. 2024); its floor is a sanity check.
def test_atp_tracks_exact_patching(zoo, subs, saes):
    keys, exact, est = _agreement(zoo, subs, saes, "sva_simple")
    assert _pearson(keys, est["atp"], exact) >= 0.5


def test_ig_on_sva_within_rc_credits_the_joint_effect(zoo, subs, saes):
    """Single-node patching is not what IG estimates: within each submodule IG ranks nodes as exact
    patching does, but IG's effects add up to the submodule's joint effect (completeness) while
    single-node patches add up to far less, by a factor that differs between submodules (on the
    zoo built before kernels were pinned this pulled the pooled r below 0.9). On the released zoo the
    lowest within-submodule r is 0.935 (resid_0); the floor of 0.9 leaves room for a rebuild, which
    on an Intel machine gave 0.965 (mlp_0)."""
    keys, exact, est = _agreement(zoo, subs, saes, "sva_within_rc")
    ratios = []
    for s in subs:
        assert _pearson(keys, est["ig"], exact, s.name) >= 0.9
        at = [k[0] == s.name for k in keys]
        ratios.append(est["ig"][at].sum() / exact[at].sum())
    assert min(ratios) > 1.2 and max(ratios) / min(ratios) > 2


def test_exact_method_is_exact_patching(zoo, subs, saes):
    """discover(method='exact') measures every node with a nonzero delta, error terms included."""
    keys, exact, _ = _agreement(zoo, subs, saes, "sva_simple")
    data = encode(zoo.model, zoo.tasks["sva_simple"], "train", 64)
    c = discover(zoo.model, subs, saes, data, DiscoveryParams(method="exact", ablations=()), progress=False)
    got = c.effects()
    want = dict(zip(keys, exact, strict=True))
    shared = [k for k in want if k in got]
    assert len(shared) > 0.9 * len(want)
    assert np.allclose([got[k] for k in shared], [want[k] for k in shared], rtol=1e-4, atol=1e-5)
    assert all(abs(want[k]) < 1e-5 for k in set(want) - set(got))


def test_zero_ablation_patch_state_is_exact_for_the_error_term(zoo, subs, saes):
    """Without patch prompts, exact patching of the last resid's error term is the model with
    that error removed, and the patch metric is the model with the last resid at b_dec."""
    from compute.tasks import Task

    task = Task("clean_only", [{"clean_prefix": f"the {n}", "clean_answer": " runs"} for n, _ in grammar.NOUNS])
    data = encode(zoo.model, task)
    b = data.batches[0]
    assert b.patch is None and data.n_examples == len(grammar.NOUNS)
    c = discover(zoo.model, subs, saes, data, DiscoveryParams(method="exact", ablations=()), progress=False)
    last, sae = subs[-1], saes[subs[-1].name]
    with torch.no_grad():
        clean = -zoo.model(b.clean)[:, -1].gather(1, b.clean_answer[:, None])[:, 0]
        no_err = zoo.model.run_with_hooks(b.clean, fwd_hooks=[(last.hook_name, lambda x, hook: sae(x))])
        at_bias = zoo.model.run_with_hooks(b.clean, fwd_hooks=[(last.hook_name,
                                                                lambda x, hook: sae.b_dec.expand_as(x))])
    want_err = (-no_err[:, -1].gather(1, b.clean_answer[:, None])[:, 0] - clean).mean().item()
    assert c.effects()[(last.name, ERROR, None)] == pytest.approx(want_err, rel=1e-4, abs=1e-5)
    assert c.metric_clean == pytest.approx(clean.mean().item(), rel=1e-5)
    want_patch = -at_bias[:, -1].gather(1, b.clean_answer[:, None])[:, 0].mean().item()
    assert c.metric_patch == pytest.approx(want_patch, rel=1e-5)


def test_splicing_is_exact(zoo, subs, saes):
    """clean x + (patch - clean) of every feature and of the error term is the patch activation."""
    b = encode(zoo.model, zoo.tasks["sva_simple"], "train", 8).batches[0]
    clean, patch = states(zoo.model, subs, saes, b.clean), states(zoo.model, subs, saes, b.patch)
    for s in subs:
        c, p, sae = clean[s.name], patch[s.name], saes[s.name]
        assert torch.allclose(sae.decode(c.f) + c.err, c.x)
        x = c.x + (p.err - c.err) + (p.f - c.f) @ sae.W_dec
        assert torch.allclose(x, p.x, atol=1e-4)


def _batch_inputs(zoo, subs, saes, task):
    """A batch of 16 examples of a zoo task, every submodule's clean and patch states, and the
    metric's gradient at every submodule's output."""
    b = encode(zoo.model, zoo.tasks[task], "train", 16).batches[0]
    clean, patch = states(zoo.model, subs, saes, b.clean), states(zoo.model, subs, saes, b.patch)
    return b, clean, patch, output_grads(zoo.model, subs, b)[1]


def _active_nodes(state, limit=None) -> torch.Tensor:
    """The first `limit` features active anywhere in the batch, and the error term."""
    return torch.tensor(state.f.abs().sum((0, 1)).nonzero().flatten()[:limit].tolist() + [ERROR])


def _pair_inputs(zoo, subs, saes, layer=1):
    by = {s.name: s for s in subs}
    return EdgePair(by[f"mlp_{layer}"], by[f"resid_{layer}"]), *_batch_inputs(zoo, subs, saes, "sva_across_pp")


def test_edges_out_of_a_node_sum_to_its_effect(zoo, subs, saes):
    """mlp_L feeds the metric only through resid_L, so its edges into all of resid_L's
    nodes (features and error) add up to its AtP effect."""
    pair, b, clean, patch, grads = _pair_inputs(zoo, subs, saes)
    up = _active_nodes(clean[pair.up.name], 20)
    down = torch.tensor(list(range(saes[pair.down.name].d_sae)) + [ERROR])
    total = torch.zeros(len(up))
    for _, w in edge_weights(zoo.model, pair, saes, b, clean, patch,
                             grads[pair.down.name], up, down, chunk=128):
        total += w.sum(0)
    fe, ee = node_effects(saes[pair.up.name], clean[pair.up.name], patch[pair.up.name], grads[pair.up.name])
    expected = torch.cat([fe.sum((0, 1))[up[:-1]], ee.sum()[None]])
    assert torch.allclose(total, expected, rtol=1e-4, atol=1e-4 * expected.abs().max())


def test_edge_weights_match_the_closed_form(zoo, subs, saes):
    """mlp_L -> resid_L is linear up to the resid SAE's ReLU: w(j -> i) =
    sum_bt left_i * 1[f_i > 0] * (W_dec_mlp[j] . W_enc_resid[:, i]) * delta_j."""
    pair, b, clean, patch, grads = _pair_inputs(zoo, subs, saes)
    up_sae, down_sae = saes[pair.up.name], saes[pair.down.name]
    f_down = clean[pair.down.name].f
    down = f_down.abs().sum((0, 1)).nonzero().flatten()[:10]
    up = clean[pair.up.name].f.abs().sum((0, 1)).nonzero().flatten()[:10]
    got = torch.cat([w for _, w in edge_weights(zoo.model, pair, saes, b, clean, patch,
                                                 grads[pair.down.name], up, down, chunk=4)])
    left = (grads[pair.down.name] @ down_sae.W_dec.T)[..., down] * (f_down[..., down] > 0)  # [B,T,Kd]
    delta = (patch[pair.up.name].f - clean[pair.up.name].f)[..., up]  # [B,T,Ku]
    coupling = up_sae.W_dec[up] @ down_sae.W_enc[:, down]  # [Ku, Kd]
    want = torch.einsum("btd,btu,ud->du", left, delta, coupling)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("per_position", [False, True])
@pytest.mark.parametrize("layer", [0, 1])
def test_batched_edges_equal_one_backward_per_node(zoo, subs, saes, layer, per_position):
    """Batched edges pull back only the nonzero pieces of the nodes' cotangents (single positions
    through the MLP, whole examples through attention, no pass on the skip path); for every edge
    type the weights are those of one backward pass per node over the whole batch."""
    b, clean, patch, grads = _batch_inputs(zoo, subs, saes, "sva_within_rc")
    n_pos = b.clean.shape[1]
    for pair in [p for p in edge_pairs(subs) if p.down.layer == layer]:
        up, down = _active_nodes(clean[pair.up.name], 15), _active_nodes(clean[pair.down.name], 12)
        where = {}
        if per_position:  # every node at every position
            up, down = up.repeat_interleave(n_pos), down.repeat_interleave(n_pos)
            where = {"up_pos": torch.arange(n_pos).repeat(len(up) // n_pos),
                     "down_pos": torch.arange(n_pos).repeat(len(down) // n_pos)}
        args = (zoo.model, pair, saes, b, clean, patch, grads[pair.down.name], up, down)
        batched = torch.cat([w for _, w in edge_weights(*args, chunk=5, **where)])
        single = edge_weights_looped(*args, **where)
        assert batched.abs().max() > 0, pair
        assert torch.allclose(batched, single, rtol=1e-5, atol=1e-7 * single.abs().max()), pair


def test_edges_in_many_small_passes_are_the_same(zoo, subs, saes, monkeypatch):
    """A chunk's pieces run in passes of at most PIECE_BUDGET cotangent values (to bound
    memory); with a tiny budget, many passes give the same weights as one."""
    b, clean, patch, grads = _batch_inputs(zoo, subs, saes, "sva_within_rc")
    for pair in [p for p in edge_pairs(subs) if p.down.layer == 1 and p.down.component != "resid"]:
        up, down = _active_nodes(clean[pair.up.name]), _active_nodes(clean[pair.down.name])
        args = (zoo.model, pair, saes, b, clean, patch, grads[pair.down.name], up, down)
        whole = torch.cat([w for _, w in edge_weights(*args)])
        monkeypatch.setattr(edges, "PIECE_BUDGET", 1000)
        passes = torch.cat([w for _, w in edge_weights(*args)])
        monkeypatch.undo()
        assert whole.abs().max() > 0
        assert torch.allclose(passes, whole, rtol=1e-5, atol=1e-7 * whole.abs().max()), pair


def test_circuit_keeps_edges_only_between_kept_nodes(zoo, subs, saes):
    data = encode(zoo.model, zoo.tasks["sva_simple"], "train", 32)
    c = discover(zoo.model, subs, saes, data, DiscoveryParams(ablations=()), progress=False)
    kept = {i for i, n in enumerate(c.nodes) if n.in_circuit}
    assert c.edges and all(s in kept and d in kept for s, d, _ in c.edges)
    assert all(abs(w) > c.params.edge_threshold for *_, w in c.edges)
    metric = len(c.nodes) - 1
    assert c.nodes[metric].site is None and c.nodes[metric].effect == pytest.approx(c.total_effect)
    into_metric = [s for s, d, _ in c.edges if d == metric]
    assert into_metric and all(c.nodes[s].site.name == subs[-1].name for s in into_metric)


def test_per_position_exact_patching_matches_a_direct_hook(zoo, subs, saes):
    """Aggregation none with exact patching: a node patched at its own position only, checked
    against a hand-written hook; IG's per-position effects add up to its aggregated ones."""
    data = encode(zoo.model, zoo.tasks["sva_across_pp"], "train", 16, one_length=True)
    b = data.batches[0]
    c = discover(zoo.model, subs, saes, data, DiscoveryParams(method="exact", aggregation="none", ablations=()),
                 progress=False)
    by = {s.name: s for s in subs}
    clean, patch = states(zoo.model, subs, saes, b.clean), states(zoo.model, subs, saes, b.patch)
    feats = sorted((n for n in c.nodes if n.site is not None and n.feature is not None), key=lambda n: -abs(n.effect))
    with torch.no_grad():
        base = batch_metric(zoo.model(b.clean), b)
        for n in feats[:6]:
            s, i, t = by[n.site.name], n.feature, n.position
            delta = (patch[s.name].f[:, t, i] - clean[s.name].f[:, t, i])[:, None] * saes[s.name].W_dec[i]

            def hook(x, hook, t=t, delta=delta):
                x = x.clone()
                x[:, t] += delta
                return x

            want = (batch_metric(zoo.model.run_with_hooks(b.clean, fwd_hooks=[(s.hook_name, hook)]), b) - base).mean()
            assert n.effect == pytest.approx(want.item(), rel=1e-4, abs=1e-6)
    ig = discover(zoo.model, subs, saes, data, DiscoveryParams(aggregation="none", ablations=()), progress=False)
    ig_sum = discover(zoo.model, subs, saes, data, DiscoveryParams(ablations=()), progress=False).effects()
    added: dict = {}
    for (name, i, _), e in ig.effects().items():
        added[(name, i, None)] = added.get((name, i, None), 0.0) + e
    assert all(added.get(k, 0.0) == pytest.approx(e, rel=1e-5, abs=1e-7) for k, e in ig_sum.items())


@pytest.mark.parametrize("rule", RULES)
def test_quadrature_rules_integrate_what_they_should(rule):
    """Weights sum to 1 on [0, 1]; Gauss-Legendre with n points is exact up to degree 2n - 1,
    the midpoint rule for lines, the left Riemann sum only for constants."""
    alphas, weights = quadrature(rule, 5)
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-6) and ((alphas >= 0) & (alphas <= 1)).all()
    exact_up_to = {"gauss": 9, "midpoint": 1, "left": 0}[rule]
    for degree in range(11):
        got = float((weights.double() * alphas.double() ** degree).sum())
        if degree <= exact_up_to:
            assert got == pytest.approx(1 / (degree + 1), abs=1e-6), degree
        else:
            assert abs(got - 1 / (degree + 1)) > 1e-6, degree
    assert float((weights * alphas).sum()) == pytest.approx({"gauss": 0.5, "midpoint": 0.5, "left": 0.4}[rule], abs=1e-6)


_COMPLETENESS: dict[tuple, dict] = {}


def _completeness_errors(zoo, subs, saes, task, steps, rule) -> dict[str, float]:
    """Per submodule, |sum of IG effects - effect of patching it whole| / |that effect| on 64 train
    examples of a zoo task; the joint effect comes from patching, not from IG."""
    key = (task, steps, rule)
    if key not in _COMPLETENESS:
        data = encode(zoo.model, zoo.tasks[task], "train", 64)
        sums, joint = dict.fromkeys([s.name for s in subs], 0.0), dict.fromkeys([s.name for s in subs], 0.0)
        for b in data.batches:
            clean, patch = states(zoo.model, subs, saes, b.clean), states(zoo.model, subs, saes, b.patch)
            g = ig_grads(zoo.model, subs, saes, b, clean, patch, steps, rule)
            for s in subs:
                fe, ee = node_effects(saes[s.name], clean[s.name], patch[s.name], g[s.name])
                sums[s.name] += (fe.sum() + ee.sum()).item()
            for name, v in joint_effects(zoo.model, subs, b, clean, patch).items():
                joint[name] += v
        _COMPLETENESS[key] = {k: abs(sums[k] - joint[k]) / abs(joint[k]) for k in joint}
    return _COMPLETENESS[key]


@pytest.mark.parametrize("task", grammar.TASKS)
def test_default_ig_adds_up_to_the_joint_effect_of_every_submodule(zoo, subs, saes, task):
    """IG at the default steps and rule is complete to 1% on every submodule: its effects over a
    submodule's nodes (error term included) add up to the effect of patching the submodule whole."""
    p = DiscoveryParams()
    errors = _completeness_errors(zoo, subs, saes, task, p.ig_steps, p.ig_rule)
    assert max(errors.values()) <= 0.01, errors


def test_the_left_riemann_sum_of_the_same_cost_is_not_complete(zoo, subs, saes):
    """The check can fail: Sparse Feature Circuits' left Riemann sum, at the same 10 steps, misses
    the joint effect by more than 1% on some submodule of the zoo's tasks."""
    worst = max(max(_completeness_errors(zoo, subs, saes, t, 10, "left").values()) for t in grammar.TASKS)
    assert worst > 0.02, worst


def test_a_circuit_stores_its_completeness_check(zoo, subs, saes):
    """Evaluated circuits carry, per submodule, the sum of their effects and the measured joint effect."""
    data = encode(zoo.model, zoo.tasks["sva_simple"], "train", 16)
    c = discover(zoo.model, subs, saes, data, DiscoveryParams(ablations=("mean",), random_draws=0), progress=False)
    checks = {site: (n, predicted, measured) for site, n, predicted, measured in c.completeness_checks()}
    assert set(checks) == {s.name for s in subs}
    for s in subs:
        n, predicted, measured = checks[s.name]
        effects = [e for k, e in c.effects().items() if k[0] == s.name]
        assert n == len(effects) and predicted == pytest.approx(sum(effects))
        assert predicted == pytest.approx(measured, rel=0.01)
    assert checks[subs[-1].name][2] == pytest.approx(c.total_effect, rel=1e-4)  # the last one carries everything


def test_a_set_patched_at_once_is_exact_patching(zoo, subs, saes):
    """set_effects of one node is patch_effects of it; of every feature and the error term, the joint effect
    of patching the submodule whole."""
    b, clean, patch, _ = _batch_inputs(zoo, subs, saes, "sva_simple")
    joint = joint_effects(zoo.model, subs, b, clean, patch)
    for s in (subs[0], subs[2]):
        nodes = _active_nodes(clean[s.name], limit=6).tolist()
        features = [n for n in nodes if n != ERROR]
        single = patch_effects(zoo.model, s, saes[s.name], b, clean[s.name], patch[s.name],
                               [None if n == ERROR else n for n in nodes])
        sets = [([n], False) for n in features] + [([], True), (list(range(saes[s.name].d_sae)), True)]
        got = set_effects(zoo.model, s, saes[s.name], b, clean[s.name], patch[s.name], sets, chunk=3)
        assert torch.allclose(got[: len(nodes)], single, rtol=1e-4, atol=1e-4)
        assert got[-1].item() == pytest.approx(joint[s.name], rel=1e-4, abs=1e-4)


def test_a_circuit_measures_its_nested_sets(zoo, subs, saes):
    """Evaluated circuits carry, per submodule, the top 1, 2, 4, ... nodes in their own ranking: the sum of
    their effects and the measured effect of patching them at once."""
    data = encode(zoo.model, zoo.tasks["sva_simple"], "train", 16)
    c = discover(zoo.model, subs, saes, data, DiscoveryParams(ablations=("mean",), random_draws=0), progress=False)
    for s in subs:
        sizes = [k for site, k in c.nested if site == s.name]
        count = sum(1 for n in c.nodes if n.site is not None and n.site.name == s.name)
        assert sizes == [2**i for i in range(len(sizes))] and sizes[-1] < count <= 2 * sizes[-1]
        top = sorted((n.effect for n in c.nodes if n.site is not None and n.site.name == s.name), key=abs,
                     reverse=True)
        assert c.nested[(s.name, 2)][0] == pytest.approx(sum(top[:2]))
