"""Attribution in the local replacement model: direct contributions, hierarchical attribution, OV edges.

A target is a scalar of the replacement model on the prompt: a feature's pre-activation at a
position, a logit, or a logit difference. Every node u has a value a_u and writes a_u w_u
into the residual stream; the target's gradient g there gives the node's attribution a_u w_u . g.

- **Direct contributions** stop the gradient at every feature: only paths through no other
  node count, so they are the graph's edges into the target, and with the bias (the target
  when every node is 0) they sum exactly to the target.
- **Hierarchical attribution** (Ge et al. 2024) lets the gradient through features, and
  detaches, during the backward pass, each feature whose attribution is under `threshold`:
  only paths through important nodes count. Threshold 0 keeps every path (one backward
  through the linearised model: the total attribution); an infinite threshold keeps none
  (the direct contributions).
- **OV edges** split a direct contribution into an attention feature per head and source
  position: a_u x pattern[h, d, s] x (w_u . frozen LN . W_V[h] W_O[h] . encoder row).

Targets are batched: each copy of the prompt in one trace carries its own target, and one
backward pass gives every target's attributions. Memory grows with the targets in a batch and
the active nodes, never with nodes x nodes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from catalog.errors import UserError
from compute.local.replacement import EMBED, Replacement, Trace
from schema.sites import attention_hook

DIRECT = math.inf  # the threshold of direct contributions: every feature detached


@dataclass(frozen=True)
class Target:
    """A scalar to explain: a feature's pre-activation (`site`, `feature`, `position`), a logit
    (`site` "logit", `feature` the token) or a logit difference (`minus` the token subtracted)."""

    site: str
    feature: int
    position: int
    minus: int | None = None

    def value(self, rep: Replacement, t: Trace, row: int) -> torch.Tensor:
        """The target's value in row `row` of a trace."""
        if self.site == "logit":
            v = t.logits[row, self.position, self.feature]
            return v if self.minus is None else v - t.logits[row, self.position, self.minus]
        return rep.pre_activation(self.site, t.inputs[self.site][row, self.position], self.feature)

    @property
    def component_layer(self) -> tuple[str, int]:
        if self.site == "logit":
            return "logit", -1
        component, layer = self.site.split("_")
        return component, int(layer)


def feature_target(rep: Replacement, site: str, feature: int, position: int) -> Target:
    """A feature of one of the replacement model's dictionaries at a position, checked."""
    if site not in rep.dicts:
        raise UserError(f"no dictionary at {site!r}; choose from {', '.join(rep.order)}")
    d_sae = rep.dicts[site].sae.d_sae
    if not 0 <= feature < d_sae:
        raise UserError(f"{site} has features 0..{d_sae - 1}; got {feature}")
    return Target(site, feature, _position(rep, position))


def logit_target(rep: Replacement, token: int, minus: int | None = None, position: int = -1) -> Target:
    """A logit (or logit difference) at a position (the last by default)."""
    return Target("logit", int(token), _position(rep, position), None if minus is None else int(minus))


def _position(rep: Replacement, position: int) -> int:
    p = position + rep.n_pos if position < 0 else position
    if not 0 <= p < rep.n_pos:
        raise UserError(f"position {position} is outside the prompt's {rep.n_pos} tokens")
    return p


@dataclass
class Attribution:
    """Per target (rows) and node (columns, `rep.nodes` order): the attribution; each target's
    value, and its bias (the value with every node at 0; with direct contributions, value =
    bias + the row's sum)."""

    scores: torch.Tensor  # [targets, nodes]
    values: torch.Tensor  # [targets]
    bias: torch.Tensor | None  # [targets], only for direct contributions
    ov: torch.Tensor | None = None  # [targets, nodes, heads]: direct contributions per head (attention targets)


def attribute(rep: Replacement, targets: list[Target], threshold: float = DIRECT, batch_size: int = 32,
              ov: bool = False, progress: bool = False) -> Attribution:
    """Attribute each target to every node (direct contributions by default; a finite threshold
    gives hierarchical attribution), `batch_size` targets per backward pass over one shared trace.
    With `ov`, direct contributions into attention features are also split per head."""
    from tqdm.auto import tqdm

    direct = threshold == DIRECT
    if ov and not direct:
        raise ValueError("OV edges are direct contributions: use threshold=DIRECT")
    scores = torch.zeros(len(targets), len(rep.nodes))
    per_head = torch.zeros(len(targets), len(rep.nodes), rep.model.cfg.n_heads) if ov else None
    values = torch.zeros(len(targets))
    batch = min(batch_size, max(1, len(targets)))
    recorded: dict[str, torch.Tensor] = {}
    t = rep.trace(batch, "direct") if direct else rep.trace(batch, "live", _gate(rep, threshold, recorded))
    sites = t.outputs if direct else t.errors
    leaves = [t.embed, *(sites[n] for n in rep.order)]
    z_layers = sorted(t.z) if ov else []
    starts = range(0, len(targets), batch)
    for start in tqdm(starts, desc="attributing", unit="batch", disable=not progress or len(starts) < 2):
        chunk = targets[start:start + batch]
        rows = slice(start, start + len(chunk))
        recorded.clear()
        value = torch.stack([tg.value(rep, t, row) for row, tg in enumerate(chunk)])
        values[rows] = value.detach()
        grads = torch.autograd.grad(value.sum(), leaves + [t.z[i] for i in z_layers], retain_graph=True,
                                    allow_unused=True)
        grads = [None if g is None else g[:len(chunk)] for g in grads]
        scores[rows] = _node_scores(rep, grads[:len(leaves)], recorded, direct, len(chunk))
        if ov:
            z_grads = {i: torch.zeros_like(t.z[i][:len(chunk)]) if g is None else g
                       for i, g in zip(z_layers, grads[len(leaves):], strict=True)}
            per_head[rows] = _ov(rep, z_grads, chunk)
    return Attribution(scores, values, _bias(rep, targets) if direct else None, per_head)


def _gate(rep: Replacement, threshold: float, recorded: dict):
    """The live trace's gate: a backward hook on each site's features that records their
    attributions (gradient x value, per target row) and lets the gradient through only those
    that reach `threshold` (all of them at threshold 0)."""

    def gate(name, f):
        value = rep.values[name].to(f.dtype)
        pos, feat = rep.active[name][:, 0], rep.active[name][:, 1]

        def hook(g):
            attr = g * value
            recorded[name] = attr[:, pos, feat]
            return g * (attr.abs() >= threshold) if threshold > 0 else g

        if f.requires_grad:
            f.register_hook(hook)
        return f

    return gate


def _node_scores(rep: Replacement, grads: list, recorded: dict, direct: bool, n: int) -> torch.Tensor:
    """One row per target: embeddings, then per site its features and its error terms. A direct
    trace's gradients are at the sites' outputs (a feature's contribution is its value x decoder
    row . gradient); a live trace's are at the error terms, its features' were recorded by the gate."""
    embed_grad, *site_grads = grads
    parts = [_dot(rep.embed_value, embed_grad, n)]
    for name, g in zip(rep.order, site_grads, strict=True):
        act = rep.active[name]
        if direct:
            if g is None:
                features = torch.zeros(n, len(act))
            else:
                decoder = rep.dicts[name].sae.W_dec[act[:, 1]]  # [active, d]
                features = torch.einsum("bad,ad->ba", g[:, act[:, 0]], decoder) * rep.values[name][act[:, 0], act[:, 1]]
        else:
            features = recorded.get(name, torch.zeros(n, len(act)))[:n]
        parts += [features.detach(), _dot(rep.error_values[name], g, n)]
    return torch.cat(parts, dim=1)


def _dot(vectors: torch.Tensor, grad: torch.Tensor | None, n: int) -> torch.Tensor:
    """Per target and position: a node's write vector [pos, d] . the target's gradient there."""
    if grad is None:
        return torch.zeros(n, vectors.shape[0])
    return (grad * vectors).sum(-1).detach()


def _ov(rep: Replacement, z_grads: dict[int, torch.Tensor], chunk: list[Target]) -> torch.Tensor:
    """Direct contributions into attention-feature targets, per head: [targets, nodes, heads]."""
    model, n_heads = rep.model, rep.model.cfg.n_heads
    out = torch.zeros(len(chunk), len(rep.nodes), n_heads)
    for layer, g_z in z_grads.items():
        rows = [r for r, tg in enumerate(chunk) if tg.component_layer == ("attn", layer)]
        if not rows:
            continue
        block = model.blocks[layer]
        pattern = rep.frozen[attention_hook(layer, "pattern")][0]  # [heads, dst, src]
        # what each head's values at source s send to the targets: sum_d pattern[h, d, s] g_z[d, h]
        sent = torch.einsum("hds,bdhk->bhsk", pattern, g_z[rows])
        for name in [EMBED, *rep.upstream(layer, "attn")]:
            if name == EMBED:
                vectors, positions = rep.embed_value, torch.arange(rep.n_pos)
                first = 0
            else:
                vectors, positions = rep.write_vectors(name), rep.node_positions(name)
                first = rep.offsets[name]
            v = torch.einsum("nd,hdk->nhk", rep.normalise(vectors, block.ln1, rep.ln_scale(layer, positions)), block.attn.W_V)
            contrib = torch.einsum("nhk,bhnk->bnh", v, sent[:, :, positions])
            out[rows, first:first + len(vectors)] = contrib.detach()
    return out


@torch.no_grad()
def _bias(rep: Replacement, targets: list[Target]) -> torch.Tensor:
    """Each target's value with every node at 0: the part of it no node accounts for."""
    t = rep.trace(1, "zero")
    return torch.stack([tg.value(rep, t, 0) for tg in targets]) if targets else torch.zeros(0)


def node_label(rep: Replacement, i: int) -> str:
    """attn_0/12@3, mlp_1/err@4, embed@2: a node as a reader sees it."""
    n = rep.nodes[i]
    if n.site == EMBED:
        return f"embed@{n.position}"
    return f"{n.site}/{'err' if n.is_error else n.feature}@{n.position}"

