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
                 up_clean: State, up_patch: State, down_grad: torch.Tensor,
                 up_nodes: torch.Tensor, down_nodes: torch.Tensor, chunk: int = 32,
                 up_pos: torch.Tensor | None = None,
                 down_pos: torch.Tensor | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (downstream node ids [K], weights [K, len(up_nodes)]) summed over the batch.

    Node ids are feature indices, with ERROR for the error term; `up_pos` and
    `down_pos` give each node's token position when nodes are per position.
    `down_grad` is the metric's gradient at the downstream submodule's output on
    this batch. One forward pass serves every chunk; each chunk of K nodes is one
    backward pass vectorised over the K cotangents.
    """
    x_down, pull_back = _graph(model, pair, batch, up_clean)
    pull_back_many = torch.func.vmap(pull_back)
    for i in range(0, len(down_nodes), chunk):
        ids = down_nodes[i : i + chunk]
        pos = None if down_pos is None else down_pos[i : i + chunk]
        (g,) = pull_back_many(_cotangents(ids, x_down, dicts[pair.down.name], down_grad, pos))
        yield ids, _weights(g, dicts[pair.up.name], up_clean, up_patch, up_nodes, up_pos)


def edge_weights_looped(model, pair: EdgePair, dicts: dict[str, SAE], batch: Batch,
                        up_clean: State, up_patch: State, down_grad: torch.Tensor,
                        up_nodes: torch.Tensor, down_nodes: torch.Tensor,
                        up_pos: torch.Tensor | None = None, down_pos: torch.Tensor | None = None) -> torch.Tensor:
    """Reference for `edge_weights`: one forward, then one backward per downstream node."""
    x_down, pull_back = _graph(model, pair, batch, up_clean)
    rows = []
    for cot in _cotangents(down_nodes, x_down, dicts[pair.down.name], down_grad, down_pos):
        (g,) = pull_back(cot)
        rows.append(_weights(g[None], dicts[pair.up.name], up_clean, up_patch, up_nodes, up_pos))
    return torch.cat(rows)


def _graph(model, pair: EdgePair, batch: Batch, up_clean: State) -> tuple[torch.Tensor, Callable]:
    """Forward from the upstream output to the downstream output, with the frozen submodules
    detached: the downstream output and its vector-Jacobian product (cotangent at the
    downstream output -> gradient at the upstream output)."""

    def forward(x_up):
        captured: dict[str, torch.Tensor] = {}
        hooks = [(pair.up.hook_name, lambda x, hook: x_up),
                 *[(s.hook_name, lambda x, hook: x.detach()) for s in pair.frozen],
                 (pair.down.hook_name, lambda x, hook: captured.setdefault("x", x))]
        model.run_with_hooks(batch.clean, fwd_hooks=hooks, stop_at_layer=pair.down.layer + 1)
        return captured["x"]

    with torch.enable_grad():
        x_down, pull_back = torch.func.vjp(forward, up_clean.x)
    return x_down.detach(), pull_back


def _cotangents(ids: torch.Tensor, x: torch.Tensor, sae: SAE, down_grad: torch.Tensor,
                positions: torch.Tensor | None = None) -> torch.Tensor:
    """[K, B, T, d] cotangents at the downstream output x that pull back each node's share.

    Feature n = act(pre_n(x)): left_n * 1[active_n] * W_enc[:, n], with left_n = g . W_dec[n].
    Error term x - decode(f(x)): g - ((g W_dec^T) * 1[active]) W_enc^T.
    A per-position node keeps its cotangent at its own position only.
    """
    f = sae.encode(x)
    left = (down_grad @ sae.W_dec.T) * sae.active(f)  # [B, T, d_sae]
    cot = x.new_empty(len(ids), *x.shape)
    for k, n in enumerate(ids.tolist()):
        if n == ERROR:
            cot[k] = down_grad - left @ sae.W_enc.T
        else:
            cot[k] = left[..., n, None] * sae.W_enc[:, n]
    if positions is not None:
        mask = torch.nn.functional.one_hot(positions, x.shape[1]).to(cot.dtype)  # [K, T]
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
