"""Edges between consecutive submodules by batched vector-Jacobian products.

The weight of the edge u -> d is the effect of u on the metric that flows
through d (Sparse Feature Circuits, eq. 6): left_d . (dd/du) . (u_patch - u_clean),
with left_d the metric's gradient at d. The upstream output is a fresh leaf;
submodules between u and d that must not carry the edge are frozen (their
output detached), so `prev resid -> resid` is the skip path only.

The backward runs through activations only (d_model wide): each downstream node's
cotangent is mapped to the submodule output in closed form (through its
encoder), and upstream node weights are read off the gradient there (through
the upstream decoder). One forward pass serves all downstream nodes; each
chunk of them shares one backward pass, vectorised over the chunk
(`torch.func.vmap` of the vector-Jacobian product).

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
        (g,) = pull_back_many(_cotangents(ids, left, dicts[pair.down.name], down_grad, pos))
        yield ids, _weights(g, dicts[pair.up.name], up_clean, up_patch, up_nodes, up_pos)


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


def _weights(g: torch.Tensor, up_sae: SAE, up_clean: State, up_patch: State,
             up_nodes: torch.Tensor, up_pos: torch.Tensor | None = None) -> torch.Tensor:
    """[K, len(up_nodes)] from gradients g [K, B, T, d] at the upstream output: each upstream
    node's (patch - clean) times its gradient (g . W_dec[j] for feature j, g for the error),
    summed over positions, or read at the node's own position when `up_pos` is given."""
    feats = up_nodes != ERROR
    safe = torch.where(feats, up_nodes, 0)
    g_f = g @ up_sae.W_dec[safe].T  # [K, B, T, n_up]
    per_pos = (g_f * (up_patch.f - up_clean.f)[..., safe]).sum(1)  # [K, T, n_up]
    err = (g * (up_patch.err - up_clean.err)).sum((1, 3))  # [K, T]
    per_pos = torch.where(feats, per_pos, err[..., None])
    if up_pos is None:
        return per_pos.sum(1)
    return per_pos[:, up_pos, torch.arange(len(up_nodes))]
