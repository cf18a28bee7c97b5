"""Edges between consecutive submodules by batched vector-Jacobian products.

The weight of the edge u -> d is the effect of u on the metric that flows
through d (Sparse Feature Circuits, eq. 6): left_d . (dd/du) . (u_patch - u_clean),
with left_d the metric's gradient at d. Upstream features and error are fresh
leaves; submodules between u and d that must not carry the edge are frozen
(their output detached), so `prev resid -> resid` is the skip path only.

One forward pass serves a whole chunk of downstream nodes: their cotangents are
stacked and pulled back together with `is_grads_batched`.
"""

from __future__ import annotations

from collections.abc import Iterator
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
                 up_nodes: torch.Tensor, down_nodes: torch.Tensor,
                 chunk: int = 32) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (downstream node ids [K], weights [K, len(up_nodes)]) summed over the batch.

    Node ids are feature indices, with ERROR for the error term. `down_grad` is
    the metric's gradient at the downstream submodule's output on this batch.
    """
    up_sae, down_sae = dicts[pair.up.name], dicts[pair.down.name]
    f_up = up_clean.f.clone().requires_grad_(True)
    e_up = up_clean.err.clone().requires_grad_(True)
    captured: dict[str, torch.Tensor] = {}

    def splice_up(x, hook):
        return up_sae.decode(f_up) + e_up

    def freeze(x, hook):
        return x.detach()

    def capture(x, hook):
        captured["x"] = x
        return x

    hooks = [(pair.up.hook_name, splice_up), *[(s.hook_name, freeze) for s in pair.frozen],
             (pair.down.hook_name, capture)]
    with torch.enable_grad():
        model.run_with_hooks(batch.clean, fwd_hooks=hooks, stop_at_layer=pair.down.layer + 1)
        x = captured["x"]
        f = down_sae.encode(x)
        y = torch.cat([f, x - down_sae.decode(f)], dim=-1)
        d_sae = f.shape[-1]
        left_f, left_e = down_grad @ down_sae.W_dec.T, down_grad
        delta_f = (up_patch.f - up_clean.f)
        delta_e = (up_patch.err - up_clean.err)
        up_feats = up_nodes[up_nodes != ERROR]
        has_up_err = bool((up_nodes == ERROR).any())
        for i in range(0, len(down_nodes), chunk):
            ids = down_nodes[i : i + chunk]
            cot = torch.zeros(len(ids), *y.shape)
            for k, n in enumerate(ids.tolist()):
                if n == ERROR:
                    cot[k, ..., d_sae:] = left_e
                else:
                    cot[k, ..., n] = left_f[..., n]
            g_f, g_e = torch.autograd.grad(y, [f_up, e_up], cot, retain_graph=True,
                                           is_grads_batched=True, allow_unused=True)
            w = []
            if len(up_feats):
                w.append((g_f[..., up_feats] * delta_f[..., up_feats]).sum((1, 2)))
            if has_up_err:
                w.append((g_e * delta_e).sum((1, 2, 3))[:, None])
            yield ids, torch.cat(w, dim=1)
