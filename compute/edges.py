"""Edges between consecutive submodules by batched vector-Jacobian products.

The weight of the edge u -> d is the effect of u on the metric that flows
through d (Sparse Feature Circuits, eq. 6): left_d . (dd/du) . (u_patch - u_clean),
with left_d the metric's gradient at d. The upstream output is a fresh leaf;
submodules between u and d that must not carry the edge are frozen (their
output detached), so `prev resid -> resid` is the skip path only.

The backward runs through activations only (d_model wide): each downstream node's
cotangent is mapped to the submodule output in closed form (through its
encoder), and upstream node weights are read off the gradient there (through
the upstream decoder). One forward pass (of the downstream block only) serves all
downstream nodes. A feature's cotangent is nonzero only where the feature is
active, so each chunk of nodes is packed into a few slots whose supports do not
meet (per position, or per example where the path crosses attention), and the
slots share one backward pass, vectorised over them (`torch.func.vmap` of the
vector-Jacobian product).

With per-position nodes (aggregation `none`) a downstream node's cotangent is
nonzero at its own position only, and upstream weights are read at the upstream
node's position instead of summed over positions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from compute.dictionaries import SAE, Submodule
from compute.spliced import State
from compute.tasks import Batch

ERROR = -1  # node index of a submodule's error term in edge computations


@dataclass(frozen=True)
class EdgePair:
    """Upstream and downstream submodule of one edge type, and what is frozen between them."""

    up: Submodule
    down: Submodule
    frozen: tuple[Submodule, ...] = ()


def edge_pairs(subs: list[Submodule]) -> list[EdgePair]:
    """Edge types of a sequential (GPT-2 style) block, layer by layer.

    prev -> attn, prev -> mlp (not through attn), attn -> mlp, prev -> resid
    (skip path), attn -> resid (not through mlp), mlp -> resid; prev is the
    embedding or the previous layer's resid.
    """
    by = {s.name: s for s in subs}
    layers = sorted({s.layer for s in subs if s.layer >= 0})
    pairs = []
    for layer in layers:
        prev = by["embed"] if layer == 0 else by[f"resid_{layer - 1}"]
        attn, mlp, resid = by[f"attn_{layer}"], by[f"mlp_{layer}"], by[f"resid_{layer}"]
        pairs += [EdgePair(prev, attn), EdgePair(prev, mlp, (attn,)), EdgePair(attn, mlp),
                  EdgePair(prev, resid, (attn, mlp)), EdgePair(attn, resid, (mlp,)), EdgePair(mlp, resid)]
    return pairs


def edge_weights(model, pair: EdgePair, dicts: dict[str, SAE], batch: Batch,
                 clean: dict[str, State], patch: dict[str, State], down_grad: torch.Tensor,
                 up_nodes: torch.Tensor, down_nodes: torch.Tensor, chunk: int = 32,
                 up_pos: torch.Tensor | None = None,
                 down_pos: torch.Tensor | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (downstream node ids [K], weights [K, len(up_nodes)]) summed over the batch.

    Node ids are feature indices, with ERROR for the error term; `up_pos` and
    `down_pos` give each node's token position when nodes are per position.
    `clean` and `patch` are every submodule's states on the batch; `down_grad` is the
    metric's gradient at the downstream submodule's output. One forward pass serves every
    chunk; each chunk of K nodes is one backward pass vectorised over the K cotangents.
    """
    pull_back = _graph(model, pair, batch, clean)
    pull_back_many = torch.func.vmap(pull_back)
    left = _left(dicts[pair.down.name], clean[pair.down.name], down_grad)
    up_clean, up_patch = clean[pair.up.name], patch[pair.up.name]
    for i in range(0, len(down_nodes), chunk):
        ids = down_nodes[i : i + chunk]
        pos = None if down_pos is None else down_pos[i : i + chunk]
        packed, owner = _pack(_cotangents(ids, left, dicts[pair.down.name], down_grad, pos),
                              per_example=pair.down.component == "attn")
        (g,) = pull_back_many(packed)
        c = _contributions(g, dicts[pair.up.name], up_clean, up_patch, up_nodes)  # [S, B, T, n_up]
        at = owner >= 0
        rows = owner[at] * c.shape[2] + torch.arange(c.shape[2]).expand_as(owner)[at]
        per_pos = c.new_zeros(len(ids) * c.shape[2], c.shape[3]).index_add_(0, rows, c[at])
        yield ids, _at_positions(per_pos.view(len(ids), c.shape[2], -1), up_pos)


def edge_weights_looped(model, pair: EdgePair, dicts: dict[str, SAE], batch: Batch,
                        clean: dict[str, State], patch: dict[str, State], down_grad: torch.Tensor,
                        up_nodes: torch.Tensor, down_nodes: torch.Tensor,
                        up_pos: torch.Tensor | None = None, down_pos: torch.Tensor | None = None) -> torch.Tensor:
    """Reference for `edge_weights`: one forward, then one backward per downstream node."""
    pull_back = _graph(model, pair, batch, clean)
    left = _left(dicts[pair.down.name], clean[pair.down.name], down_grad)
    rows = []
    for cot in _cotangents(down_nodes, left, dicts[pair.down.name], down_grad, down_pos):
        (g,) = pull_back(cot)
        rows.append(_weights(g[None], dicts[pair.up.name], clean[pair.up.name], patch[pair.up.name], up_nodes,
                             up_pos))
    return torch.cat(rows)


def _graph(model, pair: EdgePair, batch: Batch, clean: dict[str, State]) -> Callable:
    """The vector-Jacobian product of the forward from the upstream output to the downstream
    output, with the frozen submodules detached (cotangent at the downstream output ->
    gradient at the upstream output). Both ends lie in the downstream submodule's block, so
    only that block runs: from the upstream output itself when that is the residual stream
    entering the block, else (upstream attn) from the block's clean input."""
    layer = pair.down.layer
    block_input = {f"blocks.{layer}.hook_resid_pre", f"blocks.{layer - 1}.hook_resid_post"}
    starts_block = pair.up.hook_name in block_input
    start = "embed" if layer == 0 else f"resid_{layer - 1}"  # the block's input (see `submodules`)
    from_block = model.cfg.positional_embedding_type != "shortformer" and (starts_block or start in clean)

    def forward(x_up):
        captured: dict[str, torch.Tensor] = {}
        hooks = [*[(s.hook_name, lambda x, hook: x.detach()) for s in pair.frozen],
                 (pair.down.hook_name, lambda x, hook: captured.setdefault("x", x))]
        if not (from_block and starts_block):
            hooks.append((pair.up.hook_name, lambda x, hook: x_up))
        with model.hooks(fwd_hooks=hooks):
            if not from_block:
                model(batch.clean, stop_at_layer=layer + 1)
            else:
                model(x_up if starts_block else clean[start].x, start_at_layer=layer, stop_at_layer=layer + 1)
        return captured["x"]

    with torch.enable_grad():
        _, pull_back = torch.func.vjp(forward, clean[pair.up.name].x)
    return pull_back


def _left(sae: SAE, down_clean: State, down_grad: torch.Tensor) -> torch.Tensor:
    """[B, T, d_sae]: each downstream feature's gradient times whether it is active."""
    return (down_grad @ sae.W_dec.T) * sae.active(down_clean.f)


def _cotangents(ids: torch.Tensor, left: torch.Tensor, sae: SAE, down_grad: torch.Tensor,
                positions: torch.Tensor | None = None) -> torch.Tensor:
    """[K, B, T, d] cotangents at the downstream output x that pull back each node's share.

    Feature n = act(pre_n(x)): left_n * W_enc[:, n], with left_n = g . W_dec[n] where n is active.
    Error term x - decode(f(x)): g - left W_enc^T.
    A per-position node keeps its cotangent at its own position only.
    """
    feats = ids != ERROR
    safe = torch.where(feats, ids, 0)
    cot = left[..., safe].permute(2, 0, 1)[..., None] * sae.W_enc.T[safe][:, None, None, :]
    if not feats.all():
        cot[~feats] = down_grad - left @ sae.W_enc.T
    if positions is not None:
        mask = torch.nn.functional.one_hot(positions, cot.shape[2]).to(cot.dtype)  # [K, T]
        cot = cot * mask[:, None, :, None]
    return cot


def _pack(cot: torch.Tensor, per_example: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """K nodes' cotangents [K, B, T, d] packed into S <= K slots, and each slot's owner
    [S, B, T] (the node whose share it carries there, -1 where none).

    A feature's cotangent is nonzero only where it is active, and the backward pass keeps
    examples apart, and positions too unless the path crosses attention: so nodes can share a
    slot wherever their supports do not meet (per position, or per example when `per_example`),
    and one backward pass per slot serves them all. Pieces with zero cotangent carry nothing."""
    k_nodes, b, t, d = cot.shape
    active = cot.ne(0).any(-1)  # [K, B, T]
    if per_example:
        active = active.any(-1, keepdim=True).expand(k_nodes, b, t)
    slot = active.cumsum(0) - 1
    k, bi, ti = active.nonzero(as_tuple=True)
    s = slot[k, bi, ti]
    n_slots = int(s.max()) + 1 if len(s) else 1
    packed = cot.new_zeros(n_slots, b, t, d)
    packed[s, bi, ti] = cot[k, bi, ti]
    owner = torch.full((n_slots, b, t), -1, dtype=torch.long)
    owner[s, bi, ti] = k
    return packed, owner


def _contributions(g: torch.Tensor, up_sae: SAE, up_clean: State, up_patch: State,
                   up_nodes: torch.Tensor) -> torch.Tensor:
    """[S, B, T, n_up] from gradients g [S, B, T, d] at the upstream output: each upstream
    node's (patch - clean) times its gradient (g . W_dec[j] for feature j, g for the error)."""
    feats = up_nodes != ERROR
    safe = torch.where(feats, up_nodes, 0)
    c = (g @ up_sae.W_dec[safe].T) * (up_patch.f - up_clean.f)[..., safe]
    err = (g * (up_patch.err - up_clean.err)).sum(-1)  # [S, B, T]
    return torch.where(feats, c, err[..., None])


def _at_positions(per_pos: torch.Tensor, up_pos: torch.Tensor | None) -> torch.Tensor:
    """[K, n_up] from [K, T, n_up]: summed over positions, or read at each upstream node's own."""
    if up_pos is None:
        return per_pos.sum(1)
    return per_pos[:, up_pos, torch.arange(per_pos.shape[2])]


def _weights(g: torch.Tensor, up_sae: SAE, up_clean: State, up_patch: State,
             up_nodes: torch.Tensor, up_pos: torch.Tensor | None = None) -> torch.Tensor:
    """[K, len(up_nodes)] from one node's gradients per row of g [K, B, T, d] (no packing)."""
    return _at_positions(_contributions(g, up_sae, up_clean, up_patch, up_nodes).sum(1), up_pos)
