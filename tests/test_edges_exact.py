"""Edges on a hand-built tiny model whose dictionaries reconstruct exactly.

Each dictionary is the pair basis [Q; -Q] of a random orthogonal Q (2d features,
f = relu(Qx) and relu(-Qx)), so decode(encode(x)) = x to rounding and every error
term is zero. Then a node's effect must split exactly over its edges into the
next submodules' features: the edges out of a node sum to its effect.
"""

import pytest
import torch

from compute.attribution.atp import node_effects
from compute.attribution.discovery import DiscoveryParams, discover
from compute.attribution.edges import edge_pairs, edge_weights
from compute.attribution.spliced import output_grads, states
from compute.dictionaries.kinds import SAE
from compute.tasks import Batch, Encoded
from schema.sites import ERROR, sites

D_MODEL, VOCAB, LENGTH, N = 8, 11, 6, 5


@pytest.fixture(scope="module", params=["standard", "shortformer", "parallel"])
def tiny(request):
    """Standard positional embeddings; shortformer's (added to every attention input: edges
    then run from the tokens, not from the block's input); and parallel attention and MLP
    (GPT-J style: the MLP reads the block's input, so attn -> mlp edges are zero)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(0)
    cfg = HookedTransformerConfig(n_layers=2, d_model=D_MODEL, n_heads=2, d_head=4, d_mlp=16, n_ctx=LENGTH,
                                  d_vocab=VOCAB, act_fn="gelu", normalization_type="LN", seed=0,
                                  dtype=torch.float64, parallel_attn_mlp=request.param == "parallel",
                                  positional_embedding_type="shortformer" if request.param == "shortformer" else "standard")
    model = HookedTransformer(cfg)
    with torch.no_grad():  # default init is tiny; scale weights up so the model is far from linear
        for name, p in model.named_parameters():
            if name.endswith(("W_Q", "W_K", "W_V", "W_O", "W_in", "W_out", "W_E", "W_pos", "W_U")):
                p.normal_(0, 0.6)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    subs = sites(model.cfg.n_layers)
    dicts = {}
    for s in subs:
        q, _ = torch.linalg.qr(torch.randn(D_MODEL, D_MODEL, dtype=torch.float64))
        sae = SAE(D_MODEL, 2 * D_MODEL, s.hook_name).double()
        with torch.no_grad():
            sae.W_dec.copy_(torch.cat([q, -q]))
            sae.W_enc.copy_(sae.W_dec.T)
            sae.b_enc.zero_()
            sae.b_dec.zero_()
        sae.requires_grad_(False)
        dicts[s.name] = sae
    clean = torch.randint(0, VOCAB, (N, LENGTH))
    patch = clean.clone()
    patch[:, 2] = (clean[:, 2] + 1 + torch.arange(N)) % VOCAB  # one token changes, mid-prompt
    batch = Batch(torch.arange(N), clean, patch, torch.randint(0, VOCAB, (N,)), torch.randint(0, VOCAB, (N,)))
    return model, subs, dicts, batch


def test_pair_basis_dictionaries_reconstruct_exactly(tiny):
    model, subs, dicts, batch = tiny
    for state in (states(model, subs, dicts, batch.clean), states(model, subs, dicts, batch.patch)):
        for s in subs:
            assert state[s.name].err.abs().max() < 1e-12
            assert state[s.name].f.gt(0).any()


def test_edges_out_of_every_node_sum_to_its_effect(tiny):
    """Over every edge type, the weights out of each feature into all downstream features
    add up to the feature's (AtP) effect; edges into and out of error terms are zero."""
    model, subs, dicts, batch = tiny
    clean, patch = states(model, subs, dicts, batch.clean), states(model, subs, dicts, batch.patch)
    grads = output_grads(model, subs, batch)[1]
    every = {s.name: torch.tensor(list(range(2 * D_MODEL)) + [ERROR]) for s in subs}
    out = {s.name: torch.zeros(2 * D_MODEL + 1, dtype=torch.float64) for s in subs}
    into_errors = 0.0
    for pair in edge_pairs(subs, model.cfg.parallel_attn_mlp):
        u, d = pair.up.name, pair.down.name
        for ids, w in edge_weights(model, pair, dicts, batch, clean, patch, grads[d], every[u], every[d]):
            out[u] += w.sum(0)
            into_errors = max(into_errors, w[ids == ERROR].abs().max().item())
    assert into_errors < 1e-10
    checked = 0
    for s in subs[:-1]:  # the last resid feeds the metric directly
        fe, ee = node_effects(dicts[s.name], clean[s.name], patch[s.name], grads[s.name])
        effect = torch.cat([fe.sum((0, 1)), ee.sum()[None]])
        assert abs(effect[-1]) < 1e-10 and abs(out[s.name][-1]) < 1e-10  # error terms carry nothing
        big = effect.abs() > 1e-6 * effect.abs().max()
        rel = ((out[s.name] - effect).abs()[big] / effect.abs()[big]).max().item()
        assert rel <= 1e-4, (s.name, rel)
        checked += int(big.sum())
    assert checked > 20


def test_discovered_circuit_edges_sum_to_node_effects(tiny):
    """The same through `discover`: with every node kept, each node's outgoing edges sum to its
    effect (the last resid's single edge into the metric node is its effect by construction)."""
    model, subs, dicts, batch = tiny
    params = DiscoveryParams(method="atp", node_threshold=1e-9, edge_threshold=0.0, ablations=())
    c = discover(model, subs, dicts, Encoded([batch]), params, progress=False)
    out = [0.0] * len(c.nodes)
    for src, _, w in c.edges:
        out[src] += w
    checked = 0
    for i, node in enumerate(c.nodes):
        if node.site is None or abs(node.effect) < 1e-6 * max(abs(n.effect) for n in c.nodes):
            continue
        assert out[i] == pytest.approx(node.effect, rel=1e-4), (node.site.name, node.feature)
        checked += 1
    assert checked > 20


def test_per_position_edges_sum_to_node_effects(tiny):
    """Aggregation none: a node is a feature at a position; its edges (to nodes at the same or
    later positions) still sum to its effect, and its effects over positions add up to the
    aggregated effect."""
    model, subs, dicts, batch = tiny
    params = DiscoveryParams(method="atp", node_threshold=1e-9, edge_threshold=0.0, ablations=(), aggregation="none")
    c = discover(model, subs, dicts, Encoded([batch]), params, progress=False)
    summed = discover(model, subs, dicts, Encoded([batch]), DiscoveryParams(method="atp", ablations=()),
                      progress=False).effects()
    assert {n.position for n in c.nodes if n.site is not None} == set(range(2, LENGTH))  # from the patch on
    out = [0.0] * len(c.nodes)
    for src, dst, w in c.edges:
        out[src] += w
        if c.nodes[dst].site is not None:
            assert c.nodes[dst].position >= c.nodes[src].position  # causal attention
    top = max(abs(n.effect) for n in c.nodes)
    checked = 0
    for i, node in enumerate(c.nodes):
        if node.site is not None and abs(node.effect) > 1e-6 * top:
            assert out[i] == pytest.approx(node.effect, rel=1e-4), (node.site.name, node.feature, node.position)
            checked += 1
    assert checked > 40
    over_positions: dict = {}
    for (name, i, _), e in c.effects().items():
        over_positions[(name, i, None)] = over_positions.get((name, i, None), 0.0) + e
    for key, e in summed.items():
        assert over_positions.get(key, 0.0) == pytest.approx(e, rel=1e-6, abs=1e-9)
