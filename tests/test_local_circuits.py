"""Local circuits: the frozen replacement model, direct and hierarchical attribution, OV and QK edges.

Every check compares with an independent reference: the model's own logits and attention scores,
the target evaluated with every node at 0 (the bias), a recursion over the direct-contribution
matrix for hierarchical attribution, per-target backward passes, and a two-layer model whose
weights and expected values are written here by hand.
"""

from __future__ import annotations

import math

import pytest
import torch
from checkpoints import random_local_dictionaries, some_targets
from conftest import run_cli

from catalog.errors import UserError
from compute.local.contributions import DIRECT, attribute, feature_target, logit_target
from compute.local.qk import BIAS, qk
from compute.local.replacement import EMBED, Node, Replacement
from schema.sites import ERROR, attention_hook

PROMPT = "the dogs near the cat run"


@pytest.fixture(scope="module")
def rep(zoo):
    transcoders, attention = random_local_dictionaries(zoo.model, d_sae=96, seed=0)
    return Replacement(zoo.model, transcoders, attention, zoo.model.to_tokens(PROMPT))


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_the_replacement_model_reproduces_the_model(rep):
    t = rep.trace(2)
    assert _rel(t.logits[1:], rep.logits) <= 1e-4
    assert len(rep.nodes) == rep.n_pos + sum(len(a) + rep.n_pos for a in rep.active.values())
    assert all(len(rep.active[n]) > rep.n_pos for n in rep.order)  # the random dictionaries are not idle


def test_direct_contributions_sum_to_the_target(rep):
    targets = some_targets(rep)
    a = attribute(rep, targets)
    recon = a.scores.sum(1) + a.bias
    assert ((recon - a.values).abs() / a.values.abs().clamp_min(1e-3)).max() <= 1e-4
    # the bias is not a leftover: it is what the target is with every node at 0, and it is not 0
    assert a.bias.abs().min() > 1e-3
    # nothing downstream of a target, and nothing at another position for an MLP feature, contributes
    for row, tg in enumerate(targets):
        downstream = [i for i, n in enumerate(rep.nodes) if n.site != EMBED and
                      rep.order.index(n.site) >= rep.order.index(tg.site if tg.site != "logit" else rep.order[-1]) + 1]
        assert a.scores[row, downstream].abs().max() == 0 if downstream else True
        if tg.site.startswith("mlp"):
            elsewhere = [i for i, n in enumerate(rep.nodes) if n.position != tg.position]
            assert a.scores[row, elsewhere].abs().max() == 0


def test_reading_vectors_equal_the_replacement_models_backward_pass(rep):
    """Direct contributions from reading vectors (no backward pass) against the frozen model's own
    vectorised backward pass, for every kind of target, a logit with and without a difference among them."""
    targets = some_targets(rep) + [logit_target(rep, 5), logit_target(rep, 9, minus=5, position=3)]
    readers = attribute(rep, targets, ov=True)
    autograd = attribute(rep, targets, ov=True, engine="autograd")
    assert _rel(readers.scores, autograd.scores) <= 1e-5 and _rel(readers.ov, autograd.ov) <= 1e-5
    assert _rel(readers.values, autograd.values) <= 1e-6 and _rel(readers.bias, autograd.bias) <= 1e-6


def test_ov_edges_split_attention_contributions_per_head(rep):
    targets = [t for t in some_targets(rep) if t.site.startswith("attn")]
    a = attribute(rep, targets, ov=True)
    # per node, the heads add up to its direct contribution; over nodes and heads, to the target less its bias
    assert _rel(a.ov.sum(-1), a.scores) <= 1e-4
    assert ((a.ov.sum((1, 2)) + a.bias - a.values).abs() / a.values.abs()).max() <= 1e-4
    # a node sends into the target through each head by that head's attention to the node's position
    tg = next(t for t in targets if t.site == "attn_1" and t.position > 2)
    row = targets.index(tg)
    pattern = rep.frozen[attention_hook(1, "pattern")][0]
    for h in range(rep.model.cfg.n_heads):
        for s in range(tg.position + 1, rep.n_pos):  # positions the target cannot see
            cols = [i for i, n in enumerate(rep.nodes) if n.position == s]
            assert a.ov[row, cols, h].abs().max() == 0 and pattern[h, tg.position, s] == 0
    assert (a.ov[row].abs().sum(0) > 0).sum() >= 2  # more than one head carries something


@pytest.mark.parametrize("layer,head,query,key", [(0, 0, 5, 2), (1, 2, -1, 3), (1, 3, 4, 4), (1, 1, 6, 0)])
def test_qk_pairs_sum_to_the_attention_score(rep, layer, head, query, key):
    q = qk(rep, layer, head, query, key)
    assert abs(q.pairs.sum().item() - q.score) <= 1e-4 * max(1.0, abs(q.score))
    assert q.query_nodes[-1] == BIAS and q.key_nodes[-1] == BIAS
    assert {n.position for n in q.query_nodes[:-1]} == {q.query} and {n.position for n in q.key_nodes[:-1]} == {q.key}
    assert torch.allclose(q.query_marginals.sum(), q.pairs.sum())
    assert len(q.query_nodes) > 5 if layer else len(q.query_nodes) == 2  # layer 0 reads only the embedding


def _hierarchical_reference(rep, tg, threshold):
    """Hierarchical attribution from direct contributions alone: a feature v's attribution divides
    into what reaches it (direct[v, u] / a_v per unit of v) and flows on only if |attribution(v)|
    reaches the threshold; nodes are visited from the top of the stream down."""
    rows = [i for i, n in enumerate(rep.nodes) if n.site != EMBED and not n.is_error]
    feature_targets = [feature_target(rep, rep.nodes[i].site, rep.nodes[i].feature, rep.nodes[i].position)
                       for i in rows]
    direct = attribute(rep, feature_targets + [tg], batch_size=64).scores  # [features + 1, nodes]
    total = direct[-1].clone()
    for r in reversed(range(len(rows))):  # nodes are in stream order: every v's upstream comes before it
        v = rows[r]
        if abs(total[v]) >= threshold and total[v] != 0:
            value = rep.values[rep.nodes[v].site][rep.nodes[v].position, rep.nodes[v].feature]
            total += total[v] / value * direct[r] * (torch.arange(len(rep.nodes)) < v)
    return total


@pytest.mark.parametrize("threshold", [0.0, 0.05, DIRECT])
def test_hierarchical_attribution_matches_the_recursion_over_direct_contributions(rep, threshold):
    tg = next(t for t in some_targets(rep) if t.site == "mlp_1")
    got = attribute(rep, [tg], threshold=threshold).scores[0]
    want = _hierarchical_reference(rep, tg, threshold)
    assert _rel(got, want) <= 1e-4


def test_threshold_zero_and_infinity_bracket_the_pruned_attribution(rep):
    tg = next(t for t in some_targets(rep) if t.site == "attn_1")
    direct = attribute(rep, [tg]).scores[0]
    total = attribute(rep, [tg], threshold=0.0).scores[0]
    threshold = total[total != 0].abs().quantile(0.9).item()  # keeps a tenth of the nodes
    pruned = attribute(rep, [tg], threshold=threshold).scores[0]
    assert not torch.allclose(direct, total)  # paths through upstream features matter on this prompt
    assert torch.allclose(attribute(rep, [tg], threshold=1e9).scores[0], direct)
    assert 0 < (pruned != total).sum() and 0 < (pruned != direct).sum()


def test_batched_targets_give_the_same_attributions_as_one_backward_each(rep):
    """Direct contributions of a batch (reading vectors, and the vectorised backward pass) against one
    backward pass of the replacement model per target; hierarchical attribution of 8 copies at once
    against one copy per target."""
    targets = some_targets(rep, per_site=6)
    one = torch.cat([attribute(rep, [t], engine="autograd").scores for t in targets])
    for engine in ("readers", "autograd"):
        assert _rel(attribute(rep, targets, batch_size=8, engine=engine).scores, one) <= 1e-5
    one = torch.cat([attribute(rep, [t], threshold=0.05).scores for t in targets])
    assert _rel(attribute(rep, targets, threshold=0.05, batch_size=8).scores, one) <= 1e-5


def hand_model(attention_saes: bool = True):
    """Two layers, d_model 2, one head, no LayerNorm, tokens e0 and e1. Layer 0's head attends
    uniformly (W_Q = W_K = 0) and copies (W_V = W_O = I); layer 0's MLP is relu(x) @ [[2, 0], [0, 0]];
    layer 1's attention writes nothing. Its dictionaries are exact: the attention SAE is the identity
    with ReLU (left out without `attention_saes`), the transcoder is the MLP itself; layer 1's
    transcoder has feature 0 reading (1, 2) with b_enc 0.1."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from compute.dictionaries.kinds import SAE, TrainedDictionary, Transcoder
    from schema.sites import Site, site

    cfg = HookedTransformerConfig(n_layers=2, d_model=2, n_heads=1, d_head=2, d_mlp=2, n_ctx=4, d_vocab=2,
                                  act_fn="relu", normalization_type=None, positional_embedding_type="standard")
    model = HookedTransformer(cfg)
    eye, dec = torch.eye(2), torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.W_E.copy_(eye)
        model.W_U.copy_(eye)
        model.blocks[0].attn.W_V.copy_(eye[None])
        model.blocks[0].attn.W_O.copy_(eye[None])
        model.blocks[0].mlp.W_in.copy_(eye)
        model.blocks[0].mlp.W_out.copy_(dec)

    def dictionary(cls, layer, w_enc, w_dec, b_enc, hook_in, hook_out):
        kw = {"d_out": 2, "hook_name_out": hook_out} if cls is Transcoder else {}
        d = cls(2, 2, hook_in, "hand", **kw)
        with torch.no_grad():
            d.W_enc.copy_(w_enc), d.W_dec.copy_(w_dec), d.b_enc.copy_(b_enc), d.b_dec.zero_()
        component = "mlp" if cls is Transcoder else "attn"
        at = Site(component, layer, hook_out, hook_in if hook_in != hook_out else "")
        return TrainedDictionary(at if cls is Transcoder else site("attn", layer), d, None, {})

    attention = {i: dictionary(SAE, i, eye, eye, torch.zeros(2), f"blocks.{i}.hook_attn_out",
                               f"blocks.{i}.hook_attn_out") for i in (0, 1)} if attention_saes else {}
    transcoders = {0: dictionary(Transcoder, 0, eye, dec, torch.zeros(2), "blocks.0.hook_resid_mid",
                                 "blocks.0.hook_mlp_out"),
                   1: dictionary(Transcoder, 1, torch.tensor([[1.0, 0.0], [2.0, 0.0]]), torch.zeros(2, 2),
                                 torch.tensor([0.1, 0.0]), "blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out")}
    return Replacement(model, transcoders, attention, torch.tensor([[0, 1]]))


def test_a_hand_computed_two_layer_example():
    rep = hand_model()
    target = feature_target(rep, "mlp_1", 0, 1)  # stream at position 1: (1.5, 1.5), so pre = 1.5 + 3 + 0.1
    by_name = lambda a: {n: round(float(a[0, rep.index[n]]), 5) for n in wanted}  # noqa: E731
    wanted = [Node(EMBED, 0, 0), Node(EMBED, 0, 1), Node("attn_0", 0, 1), Node("attn_0", 1, 1), Node("mlp_0", 0, 1),
              Node("mlp_0", 1, 1)]
    for engine in ("readers", "autograd"):
        direct = attribute(rep, [target], engine=engine)
        assert direct.values.tolist() == pytest.approx([4.6]) and direct.bias.tolist() == pytest.approx([0.1])
        assert list(by_name(direct.scores).values()) == [0.0, 2.0, 0.5, 1.0, 1.0, 0.0]
    # every path: attn_0/0 also reaches the target through mlp_0/0 (x2 per unit, 0.5 of it): 0.5 + 1.0;
    # the embeddings through attention (pattern 0.5 each) and the attention features
    total = attribute(rep, [target], threshold=0.0)
    assert list(by_name(total.scores).values()) == [1.5, 3.0, 1.5, 1.0, 1.0, 0.0]
    # threshold 1.1 detaches mlp_0/0 (1.0), then attn_0/0 (0.5 without it) and attn_0/1 (1.0)
    pruned = attribute(rep, [target], threshold=1.1)
    assert list(by_name(pruned.scores).values()) == [0.0, 2.0, 0.5, 1.0, 1.0, 0.0]
    # attn_0/0 at position 1 reads half of e0 through the one head: an OV edge from embed@0 of 0.5
    ov = attribute(rep, [feature_target(rep, "attn_0", 0, 1)], ov=True)
    assert ov.ov[0, rep.index[Node(EMBED, 0, 0)], 0].item() == pytest.approx(0.5)
    assert ov.values.item() == pytest.approx(0.5)


def test_a_hand_computed_example_with_attention_as_a_frozen_path():
    """Without attention SAEs the head is a path, not a node: embed@0 reaches mlp_1/0@1 through it
    (0.5 x e0 . (1, 2) = 0.5), embed@1 directly and through it (2 + 0.5 x 2 = 3), mlp_0/0@1 writes
    (1, 0) (1.0): 4.5 plus b_enc 0.1 is the pre-activation 4.6. mlp_0/0@1 reads 0.5 of e0 through the
    head, so every path gives embed@0 another 2 x 0.5."""
    rep = hand_model(attention_saes=False)
    assert rep.order == ["mlp_0", "mlp_1"] and rep.frozen_attention
    target = feature_target(rep, "mlp_1", 0, 1)
    wanted = [Node(EMBED, 0, 0), Node(EMBED, 0, 1), Node("mlp_0", 0, 1), Node("mlp_0", 1, 1), Node("mlp_0", 0, 0)]
    direct = attribute(rep, [target])
    assert direct.values.tolist() == pytest.approx([4.6]) and direct.bias.tolist() == pytest.approx([0.1])
    assert [round(float(direct.scores[0, rep.index[n]]), 5) for n in wanted] == [0.5, 3.0, 1.0, 0.0, 0.0]
    total = attribute(rep, [target], threshold=0.0)
    assert [round(float(total.scores[0, rep.index[n]]), 5) for n in wanted] == [1.5, 3.0, 1.0, 0.0, 0.0]
    with pytest.raises(UserError, match="no dictionary at 'attn_0'"):
        feature_target(rep, "attn_0", 0, 1)
    with pytest.raises(UserError, match="only with attention SAEs"):
        qk(rep, 0, 0, 1, 0)


def test_a_hand_computed_example_with_a_skip_transcoder():
    """mlp_0's transcoder gets a skip connection W_skip = [[0, 0], [0, 1]] (it now adds the input's second
    coordinate): the input at position 1 is (0.5, 1.5), so the skip adds (0, 1.5) and the error term
    becomes (0, -1.5). embed@1 reaches the target through the skip as well: 2 + 1 + 1.5 x 2 = 6; the
    error term gives -3; the pre-activation stays 4.6 = 0.5 + 6 + 1 - 3 + 0.1."""
    from compute.dictionaries.kinds import SkipTranscoder, TrainedDictionary

    hand = hand_model(attention_saes=False)
    plain = hand.dicts["mlp_0"]
    sae = SkipTranscoder(2, 2, plain.sae.hook_name, "hand", d_out=2, hook_name_out=plain.sae.hook_name_out)
    with torch.no_grad():
        sae.load_state_dict(plain.sae.state_dict() | {"W_skip": torch.tensor([[0.0, 0.0], [0.0, 1.0]])})
    transcoders = {0: TrainedDictionary(plain.site, sae, None, {}), 1: hand.dicts["mlp_1"]}
    rep = Replacement(hand.model, transcoders, {}, hand.tokens)
    target = feature_target(rep, "mlp_1", 0, 1)
    wanted = [Node(EMBED, 0, 0), Node(EMBED, 0, 1), Node("mlp_0", 0, 1), Node("mlp_0", ERROR, 1)]
    direct = attribute(rep, [target])
    assert direct.values.tolist() == pytest.approx([4.6]) and direct.bias.tolist() == pytest.approx([0.1])
    assert [round(float(direct.scores[0, rep.index[n]]), 5) for n in wanted] == [0.5, 6.0, 1.0, -3.0]
    saes = hand_model().dicts
    with pytest.raises(UserError, match="go with attention as a frozen path"):
        Replacement(hand.model, transcoders, {i: saes[f"attn_{i}"] for i in (0, 1)}, hand.tokens)


def hand_clt(hand):
    """A cross-layer transcoder for `hand_model`: layer 0's reconstructs its MLP (W_enc I, W_dec [[2, 0], [0, 0]])
    and its feature 0 also writes (0, 1) into layer 1's MLP output; layer 1's feature 0 reads (1, 2) with
    b_enc 0.1 and writes nothing."""
    from compute.dictionaries.kinds import CrossLayerTranscoder, TrainedDictionary

    def layer(i, w_enc, w_dec, b_enc, later):
        plain = hand.dicts[f"mlp_{i}"]
        d = CrossLayerTranscoder(2, 2, plain.sae.hook_name, "hand", 2, plain.sae.hook_name_out, n_later=len(later[0]))
        with torch.no_grad():
            d.W_enc.copy_(w_enc), d.W_dec.copy_(w_dec), d.b_enc.copy_(b_enc), d.W_dec_later.copy_(later)
        return TrainedDictionary(plain.site, d, None, {})

    return {0: layer(0, torch.eye(2), torch.tensor([[2.0, 0.0], [0.0, 0.0]]), torch.zeros(2),
                     torch.tensor([[[0.0, 1.0]], [[0.0, 0.0]]])),
            1: layer(1, torch.tensor([[1.0, 0.0], [2.0, 0.0]]), torch.zeros(2, 2), torch.tensor([0.1, 0.0]),
                     torch.zeros(2, 0, 2))}


def test_a_hand_set_two_layer_cross_layer_transcoder():
    """Layer 0's feature 0 (value 0.5 at position 1) writes (1, 0) into mlp_0's output and (0, 0.5) into
    mlp_1's, whose real output is 0: mlp_1's error term there is (0, -0.5). Into logit(e1) at position 1
    (1.5): embed@1 1 + 0.5 through the head, mlp_0/0@1 0.5 (its later write), mlp_1/err@1 -0.5. Into
    mlp_1/0@1 (4.6) the later write does not count (it lands after mlp_1 reads). Zeroing mlp_0/0@1 in
    the real model moves the logit by -0.5, as the graph predicts. With attention SAEs, reading vectors
    see the later write too."""
    from compute.local.steering import parse_intervention, steer

    hand = hand_model(attention_saes=False)
    rep = Replacement(hand.model, hand_clt(hand), {}, hand.tokens)
    assert rep.cross and [o for o, _ in rep.writes["mlp_0"]] == ["mlp_0", "mlp_1"]
    wanted = [Node(EMBED, 0, 0), Node(EMBED, 0, 1), Node("mlp_0", 0, 1), Node("mlp_0", ERROR, 1),
              Node("mlp_1", ERROR, 1), Node("mlp_1", 0, 1)]
    logit = logit_target(rep, 1, position=1)
    a = attribute(rep, [logit, feature_target(rep, "mlp_1", 0, 1)])
    assert a.values.tolist() == pytest.approx([1.5, 4.6]) and a.bias.tolist() == pytest.approx([0.0, 0.1])
    assert [round(float(a.scores[0, rep.index[n]]), 5) for n in wanted] == [0.0, 1.5, 0.5, 0.0, -0.5, 0.0]
    assert [round(float(a.scores[1, rep.index[n]]), 5) for n in wanted] == [0.5, 3.0, 1.0, 0.0, 0.0, 0.0]
    total = attribute(rep, [logit], threshold=0.0)  # the same paths: no feature in between carries anything
    assert total.scores[0, rep.index[Node("mlp_0", 0, 1)]].item() == pytest.approx(0.5)
    result = steer(rep, logit, [parse_intervention(rep, "zero", "mlp_0/0@1")])
    assert result.rows[0]["measured"] == pytest.approx(-0.5) and result.rows[0]["predicted"] == pytest.approx(-0.5)
    # with the attention SAEs, the head's move is two attention features instead (attn_0/1@1 writes (0, 0.5))
    saes = hand_model().dicts
    rep = Replacement(hand.model, hand_clt(hand), {i: saes[f"attn_{i}"] for i in (0, 1)}, hand.tokens)
    wanted = [Node(EMBED, 0, 1), Node("attn_0", 1, 1), Node("mlp_0", 0, 1), Node("mlp_1", ERROR, 1)]
    for engine in ("readers", "autograd"):
        a = attribute(rep, [logit], engine=engine)
        assert a.values.tolist() == pytest.approx([1.5])
        assert [round(float(a.scores[0, rep.index[n]]), 5) for n in wanted] == [1.0, 0.5, 0.5, -0.5]


def test_a_decoder_held_at_some_rows_reads_the_others_when_asked():
    from compute.local.replacement import Rows

    full = torch.randn(10, 3)
    held = Rows(full[[2, 7]], torch.tensor([2, 7]), fetch=lambda idx: full[idx], d_sae=10)
    f = torch.zeros(4, 10)
    f[:, 2], f[:, 7] = 1.0, -2.0
    assert torch.allclose(held.apply(f), f @ full) and torch.equal(held.rows(torch.tensor([7, 2])), full[[7, 2]])
    assert torch.equal(held.rows(torch.tensor([2, 5])), full[[2, 5]])  # 5 is not held: fetched


@pytest.mark.parametrize("family", ["neox", "llama"])
def test_exact_on_rotary_checkpoints(tmp_path, family):
    """Parallel attention with partial rotary (GPT-NeoX); RMSNorm, gated MLP and grouped-query
    attention (Llama): direct contributions, OV edges and QK pairs are exact there too."""
    from checkpoints import write_checkpoint

    from compute.models.checkpoints import load_checkpoint

    model = load_checkpoint(str(write_checkpoint(tmp_path / family, family)), progress=False).model
    transcoders, attention = random_local_dictionaries(model, d_sae=64, seed=1)
    r = Replacement(model, transcoders, attention, model.to_tokens("the cat near the dogs runs"))
    targets = some_targets(r, per_site=2)
    a = attribute(r, targets, ov=True)
    assert ((a.scores.sum(1) + a.bias - a.values).abs() / a.values.abs().clamp_min(1e-3)).max() <= 1e-4
    assert _rel(a.scores, attribute(r, targets, engine="autograd").scores) <= 1e-5
    attn = [i for i, t in enumerate(targets) if t.site.startswith("attn")]
    assert _rel(a.ov[attn].sum(-1), a.scores[attn]) <= 1e-4
    for head in range(model.cfg.n_heads):
        q = qk(r, 1, head, -1, 2)
        assert abs(q.pairs.sum().item() - q.score) <= 1e-4 * max(1.0, abs(q.score))
    # transcoders only: attention a frozen path (GPT-NeoX's MLP reads what its block's attention reads)
    frozen = Replacement(model, transcoders, {}, r.tokens)
    targets = some_targets(frozen, per_site=3) + [logit_target(frozen, 7)]
    a = attribute(frozen, targets)
    assert ((a.scores.sum(1) + a.bias - a.values).abs() / a.values.abs().clamp_min(1e-3)).max() <= 1e-4
    assert _rel(a.values, attribute(r, targets).values) <= 1e-5  # the same model, whatever is a node
    tg = next(t for t in targets if t.site == "mlp_1")
    assert _rel(attribute(frozen, [tg], threshold=0.05).scores[0], _hierarchical_reference(frozen, tg, 0.05)) <= 1e-4


def test_refuses_what_it_cannot_make_linear(zoo):
    transcoders, attention = random_local_dictionaries(zoo.model, d_sae=32, seed=0)
    tokens = zoo.model.to_tokens(PROMPT)
    with pytest.raises(UserError, match="missing: mlp_1"):
        Replacement(zoo.model, {0: transcoders[0]}, attention, tokens)
    with pytest.raises(UserError, match="not an MLP transcoder"):
        Replacement(zoo.model, {0: transcoders[0], 1: attention[1]}, attention, tokens)
    with pytest.raises(UserError, match="at every attention output or at none .*missing: attn_1"):
        Replacement(zoo.model, transcoders, {0: attention[0]}, tokens)
    r = Replacement(zoo.model, transcoders, attention, tokens)
    with pytest.raises(UserError, match="features 0..31"):
        feature_target(r, "mlp_0", 32, 1)
    with pytest.raises(UserError, match="outside the prompt"):
        logit_target(r, 3, position=40)
    with pytest.raises(UserError, match="attends to keys"):
        qk(r, 1, 0, 2, 4)
    assert math.isinf(DIRECT)


# ---- the command line and the catalogue ------------------------------------------------------------

def _sql(cat, sql, *params):
    import catalog

    return catalog.open(cat).sql(sql, list(params))


def _circuit(cat, metric):
    """The first circuit of this metric (the page's frozen-attention graph of the same prompt comes later)."""
    return _sql(cat, "SELECT * FROM circuits WHERE metric = ? ORDER BY created_at LIMIT 1", metric).iloc[0]


def test_attribute_commits_a_prompt_graph(local):
    cat, (out, *_) = local
    c = _circuit(cat, "logit")
    assert (c.method, c.aggregation, c.n_examples) == ("local", "none", 1)
    nodes = _sql(cat, "SELECT * FROM nodes WHERE circuit_id = ?", c.circuit_id)
    assert nodes.in_circuit.sum() == 48 + 1 and (nodes.component == "metric").sum() == 1
    assert nodes[nodes.component == "metric"].effect.iloc[0] == pytest.approx(c.metric_clean)
    kinds = _sql(cat, "SELECT kind, count(*) AS n FROM edges WHERE circuit_id = ? GROUP BY kind", c.circuit_id)
    assert dict(zip(kinds.kind, kinds.n, strict=True))["attribution"] == c.n_edges == 256
    assert {"ov", "qk", "qk_query", "qk_key"} <= set(kinds.kind)
    # an edge into an attention feature is the sum of its per-head parts, each through a head of dst's layer
    check = _sql(cat, """
        SELECT a.weight, sum(o.weight) AS heads, bool_and(o.head_layer = d.layer) AS same_layer
        FROM edges a JOIN edges o ON o.circuit_id = a.circuit_id AND o.src_idx = a.src_idx AND o.dst_idx = a.dst_idx
        JOIN nodes d ON d.circuit_id = a.circuit_id AND d.node_idx = a.dst_idx
        WHERE a.circuit_id = ? AND a.kind = 'attribution' AND o.kind = 'ov' GROUP BY a.src_idx, a.dst_idx, a.weight""",
                 c.circuit_id)
    assert len(check) > 20 and check.same_layer.all()
    assert ((check.weight - check.heads).abs() <= 1e-4 * check.weight.abs().max()).all()
    # the printed table is the circuit's nodes, strongest first, with their tokens
    assert "mary" in out.stdout and "embed/" in out.stdout.splitlines()[1]


def test_explain_keeps_the_feature_as_root_and_its_qk_story(local, zoo):
    cat, (_, out, *_) = local
    c = _circuit(cat, "feature")
    root = _sql(cat, "SELECT * FROM nodes WHERE circuit_id = ? AND node_idx = 0", c.circuit_id).iloc[0]
    from compute.jobs.local import zoo_local_set
    from compute.local.replacement import Replacement

    transcoders, attention = zoo_local_set(zoo, progress=False)
    prompt = _sql(cat, "SELECT clean_prefix FROM examples JOIN circuits USING (task_id) WHERE circuit_id = ?",
                  c.circuit_id).clean_prefix[0]
    rep = Replacement(zoo.model, transcoders, attention, zoo.model.to_tokens(prompt))
    # `explain attn_1 top --position 14` explains attn_1's strongest feature there, and says which
    strongest = int(rep.values["attn_1"][14].argmax())
    assert (root.component, root.layer, root.feature_idx, root.position) == ("attn", 1, strongest, 14)
    assert f"attn_1/{strongest}@14 has pre-activation" in out.stderr
    assert root.effect == pytest.approx(c.metric_clean)
    # each decomposed head move is printed, and its stored key-side marginals are those the decomposition
    # gives on the prompt
    moves = _sql(cat, "SELECT DISTINCT head, key_position FROM circuit_edges(?) WHERE kind = 'qk_key' AND dst_idx = 0",
                 c.circuit_id)
    assert len(moves) >= 1
    for head, key in zip(moves["head"], moves.key_position, strict=True):
        layer, h = (int(x) for x in head.split("."))
        assert f"head {head} attends from 14 to {key}" in out.stdout
        q = qk(rep, layer, h, 14, int(key))
        stored = _sql(cat, "SELECT src, weight FROM circuit_edges(?) WHERE kind = 'qk_key' AND head = ? "
                      "AND key_position = ? AND dst_idx = 0", c.circuit_id, head, int(key))
        want = {f"{n.site}/{'err' if n.is_error else n.feature}@{n.position}" if n.site != EMBED else
                f"embed/{int(rep.tokens[0, n.position])}@{n.position}": float(m)
                for n, m in zip(q.key_nodes[:-1], q.key_marginals[:-1], strict=True)}
        assert len(stored) == len(want) and all(abs(want[s] - w) <= 1e-5 for s, w in zip(stored.src, stored.weight,
                                                                                          strict=True))
        assert abs(q.pairs.sum().item() - q.score) <= 1e-4 * abs(q.score)


def test_a_task_circuit_is_the_mean_of_its_prompts_and_reads_like_any_circuit(local, tmp_path):
    import json

    cat, _ = local
    c = _circuit(cat, "answer_logit_diff")
    assert (c.task_id, c.n_examples, c.aggregation) == ("ioi", 8, "none")
    nodes = _sql(cat, "SELECT * FROM nodes WHERE circuit_id = ? AND component = 'embed'", c.circuit_id)
    assert nodes.feature_idx.isna().all()  # a position's embedding across prompts, not one token's
    prompt = _circuit(cat, "logit").circuit_id
    for args in (["diff", prompt, c.circuit_id], ["paths", c.circuit_id, "-k", "2"], ["compare", prompt, c.circuit_id],
                 ["render", c.circuit_id, "--out", str(tmp_path / "c.html")],
                 ["export", _circuit(cat, "feature").circuit_id, "--to", "circuit-tracer", "--out",
                  str(tmp_path / "g.json")]):
        r = run_cli(*args, catalog=cat)
        assert r.returncode == 0, (args, r.stderr[-500:])
    graph = json.loads((tmp_path / "g.json").read_text())
    traced = [n for n in graph["nodes"] if "qk_tracing_results" in n]
    assert traced and all(n["qk_tracing_results"]["top_k_marginal_contributors"] for n in traced)
    ids = {n["node_id"] for n in graph["nodes"]}
    assert all(q in ids and k in ids for n in traced for q, k, _ in n["qk_tracing_results"]["pair_wise_contributors"])


def test_the_readme_walkthrough_is_what_its_commands_print(local):
    """Every node (SITE/FEATURE@POSITION), head and number the walk-through (docs/local-circuits.md) names is in what
    the commands beside it print: a number to the decimals written."""
    import re

    from tests.docs import page

    _, outputs = local
    printed = "\n".join(r.stdout + r.stderr for r in outputs)
    paragraph = "The first explains" + page("local-circuits.md").split("The first explains", 1)[1].split("instead\nof naming")[0]
    nodes = re.findall(r"`((?:embed|attn_\d|mlp_\d|resid_\d)/(?:\d+|err)@\d+)`", paragraph)
    assert len(nodes) >= 8 and all(n in printed for n in nodes), [n for n in nodes if n not in printed]
    values = [float(v) for v in re.findall(r"[-+]?\d+\.\d+", printed)]
    claims = re.findall(r"(?<![\w/@.])([-+]?\d+\.(\d+))(?![\w@])", paragraph)
    assert len(claims) >= 10
    for text, decimals in claims:
        assert any(abs(v - float(text)) <= 0.5 * 10 ** -len(decimals) + 1e-9 for v in values), text


def test_the_pages_frozen_attention_graph_has_no_attention_nodes_or_head_edges(local):
    """The page's `attribute --attention frozen` (run by the fixture): a graph of transcoder features, error
    terms and embeddings only, whose run says so."""
    cat, outputs = local
    assert all(r.returncode == 0 for r in outputs)
    frozen = _sql(cat, "SELECT c.circuit_id, c.n_edges FROM circuits c JOIN runs r USING (run_id) "
                  "WHERE r.params->>'attention' = 'frozen'")
    assert len(frozen) == 1 and frozen.n_edges[0] > 10
    kinds = _sql(cat, "SELECT DISTINCT n.component, e.kind FROM nodes n JOIN edges e ON e.circuit_id = n.circuit_id "
                 "WHERE n.circuit_id = ? AND n.in_circuit", frozen.circuit_id[0])
    assert set(kinds.kind) == {"attribution"} and "attn" not in set(kinds.component)


def test_the_readme_queries_of_the_local_section_return_rows(local):
    from tests.docs import blocks, page

    cat, _ = local
    for sql in blocks("sql", page("local-circuits.md")):
        assert len(_sql(cat, sql)) > 0, sql


@pytest.mark.parametrize("args,message", [
    (["attribute"], "give one of --prompt, --prompts or --task"),
    (["attribute", "--prompt", "the cat", "--task", "ioi"], "give one of --prompt, --prompts or --task"),
    (["attribute", "--prompt", "the dogs near the cat", "--target", "logit:runs runs"], "2 tokens"),
    (["attribute", "--prompt", "the dogs near the cat", "--target", "mlp_1/x@3"], "give logit:TOKEN"),
    (["attribute", "--prompt", "the dogs near the cat", "--target", "logit:zebra"], "'zebra' is a word"),
    (["attribute", "--prompt", "the zebra near the cat"], "does not know: zebra"),
    (["attribute", "--prompt", " ".join(["the cat"] * 20)], "at most 24"),
    (["attribute", "--task", "nope"], "unknown task"),
    (["explain", "resid_0", "3", "--prompt", "the dogs near the cat"], "no dictionary at 'resid_0'"),
    (["explain", "mlp_1", "100000", "--prompt", "the dogs near the cat"], "has features 0.."),
    (["explain", "mlp_1", "0", "--prompt", "the dogs near the cat", "--position", "30"], "outside the prompt"),
])
def test_what_cannot_be_explained_is_refused_in_one_line(local, args, message):
    cat, _ = local
    before = _sql(cat, "SELECT count(*) AS n FROM runs").n[0]
    r = run_cli(*args, catalog=cat)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 1 and len(errors) == 1 and message in errors[0] and "Traceback" not in r.stderr, r.stderr
    assert _sql(cat, "SELECT count(*) AS n FROM runs").n[0] == before


def test_a_feature_that_does_not_fire_is_refused_naming_those_that_do(local, zoo):
    cat, _ = local
    from compute.jobs.local import zoo_local_set

    transcoders, attention = zoo_local_set(zoo, progress=False)
    rep = Replacement(zoo.model, transcoders, attention, zoo.model.to_tokens("the dogs near the cat"))
    silent = int((rep.values["mlp_1"][-1] == 0).nonzero()[0, 0])
    r = run_cli("explain", "mlp_1", str(silent), "--prompt", "the dogs near the cat", catalog=cat)
    assert r.returncode == 1 and "does not fire at position" in r.stderr and "that do:" in r.stderr


def test_attribute_and_explain_a_checkpoint_with_its_dictionary_set(tmp_path):
    """A GPT-NeoX checkpoint (parallel attention, rotary) with a set of SAELens transcoders and
    attention SAEs on disk, found by their configs' hooks."""
    import shutil

    from checkpoints import write_checkpoint, write_local_set

    from compute.models.checkpoints import load_checkpoint

    prompt = "the cat near the dogs runs"
    checkpoint = write_checkpoint(tmp_path / "neox", "neox")
    model = load_checkpoint(str(checkpoint), progress=False).model
    transcoders, attention = write_local_set(tmp_path / "set", model, prompt)  # found by their configs' hooks
    given = ["--model", str(checkpoint), "--dictionaries", str(tmp_path / "set"), "--prompt", prompt]
    r = run_cli("attribute", *given, catalog=tmp_path / "cat")
    assert r.returncode == 0, r.stderr[-2000:]
    c = _sql(tmp_path / "cat", "SELECT * FROM circuits").iloc[0]
    assert c.method == "local" and c.model_id.startswith("gptneox-") and c.n_edges > 10
    rep = Replacement(model, transcoders, attention, model.to_tokens(prompt))
    feature = int(rep.active["attn_1"][rep.active["attn_1"][:, 0] == rep.n_pos - 1][0, 1])
    r = run_cli("explain", "attn_1", str(feature), *given, catalog=tmp_path / "cat")
    assert r.returncode == 0 and "head 1." in r.stdout, r.stderr[-2000:]
    root = _sql(tmp_path / "cat", "SELECT n.effect FROM nodes n JOIN circuits c USING (circuit_id) "
                "WHERE c.metric = 'feature' AND n.node_idx = 0").effect[0]
    assert root == pytest.approx(float(attribute(rep, [feature_target(rep, "attn_1", feature, -1)]).values[0]),
                                 rel=1e-5)
    # transcoders alone (what a circuit-tracer release is): attention a frozen path, no OV or QK edges
    frozen = run_cli("attribute", *given, "--attention", "frozen", "--format", "csv", catalog=tmp_path / "cat")
    shutil.rmtree(tmp_path / "set" / "dictionary3")  # attn_1's SAE: an SAE at some attention outputs only
    r = run_cli("attribute", *given, catalog=tmp_path / "cat")
    assert r.returncode == 1 and "at every attention output or at none" in r.stderr and "missing: attn_1" in r.stderr
    shutil.rmtree(tmp_path / "set" / "dictionary2")
    auto = run_cli("attribute", *given, "--format", "csv", catalog=tmp_path / "cat")
    assert frozen.returncode == 0 and auto.returncode == 0 and auto.stdout == frozen.stdout, auto.stderr[-2000:]
    runs = _sql(tmp_path / "cat", "SELECT r.params->>'attention' AS attention, count(e.kind) FILTER (e.kind <> "
                "'attribution') AS others, count(e.kind) AS edges FROM runs r JOIN circuits c USING (run_id) "
                "JOIN edges e USING (circuit_id) GROUP BY ALL ORDER BY r.params->>'attention'")
    assert runs.attention.tolist() == ["frozen", "saes"] and runs.others[0] == 0 < runs.others[1]
    assert runs.edges.min() > 10
    r = run_cli("attribute", *given, "--attention", "saes", catalog=tmp_path / "cat")
    assert r.returncode == 1 and "has no attention SAEs" in r.stderr
    shutil.rmtree(tmp_path / "set" / "dictionary1")  # mlp_1's transcoder
    r = run_cli("attribute", *given, catalog=tmp_path / "cat")
    assert r.returncode == 1 and "missing: mlp_1" in r.stderr
