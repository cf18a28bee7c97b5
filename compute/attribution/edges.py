"""Edges between consecutive submodules by batched vector-Jacobian products.

The weight of the edge u -> d is the effect of u on the metric that flows
through d (Sparse Feature Circuits, eq. 6): left_d . (dd/du) . (u_patch - u_clean),
with left_d the metric's gradient at d. Submodules between u and d that must not
carry the edge are frozen (their output detached), so `prev resid -> resid` is the
skip path only, whose Jacobian is the identity.

The backward runs through activations only (d_model wide): each downstream node's
cotangent is mapped to the submodule output in closed form (through its
encoder), and upstream node weights are read off the gradient there (through
the upstream decoder). Only as much of the downstream block runs as lies between
the two submodules. A feature's cotangent is nonzero only where the feature is
active, so a chunk of nodes is cut into its nonzero pieces: single positions
where the path runs position by position (through the MLP), whole examples where
it crosses attention. One forward and one backward pass over the pieces serve
the whole chunk, and each piece's contributions are added to its node's weights.

With per-position nodes (aggregation `none`) a downstream node's cotangent is
nonzero at its own position only, and upstream weights are read at the upstream
node's position instead of summed over positions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

from compute.attribution.spliced import State
from compute.dictionaries.kinds import SAE
from compute.tasks import Batch
from schema.sites import ERROR, Site, site_name

PIECE_BUDGET = 2**24  # cotangent values per backward pass (64 MiB in float32), to bound memory


@dataclass(frozen=True)
class EdgePair:
    """Upstream and downstream submodule of one edge type, and what is frozen between them."""

    up: Site
    down: Site
    frozen: tuple[Site, ...] = ()


def edge_pairs(subs: list[Site], parallel: bool = False) -> list[EdgePair]:
    """Edge types of a GPT-2 style block, layer by layer.

    prev -> attn, prev -> mlp (not through attn), attn -> mlp (unless attention and MLP are
    `parallel`, both reading the block's input), prev -> resid (skip path), attn -> resid (not
    through mlp), mlp -> resid; prev is the embedding or the previous layer's resid.
    """
    by = {s.name: s for s in subs}
    layers = sorted({s.layer for s in subs if s.layer >= 0})
    pairs = []
    for layer in layers:
        prev = by[_block_input_site(layer)]
        attn, mlp, resid = (by[site_name(c, layer)] for c in ("attn", "mlp", "resid"))
        pairs += [EdgePair(prev, attn), EdgePair(prev, mlp, (attn,))]
        if not parallel:
            pairs.append(EdgePair(attn, mlp))
        pairs += [EdgePair(prev, resid, (attn, mlp)), EdgePair(attn, resid, (mlp,)), EdgePair(mlp, resid)]
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
    metric's gradient at the downstream submodule's output. Each chunk of K downstream nodes
    is one forward and one backward pass over the nonzero pieces of their cotangents.
    """
    path = _path(model, pair, batch, clean)
    up = _Nodes.upstream(dicts[pair.up.name], clean[pair.up.name], patch[pair.up.name], up_nodes, up_pos)
    down = _Nodes.downstream(dicts[pair.down.name], clean[pair.down.name], down_grad, down_nodes, down_pos)
    x_up = clean[pair.up.name].x
    for i in range(0, len(down_nodes), chunk):
        ids = down_nodes[i : i + chunk]
        owner, unit, cot = down.pieces(slice(i, i + chunk), path.local)
        weights = cot.new_zeros(len(ids), len(up_nodes))
        step = max(1, PIECE_BUDGET // max(1, cot[0].numel())) if len(cot) else 1
        for j in range(0, len(owner), step):  # passes of at most PIECE_BUDGET cotangent values
            rows = unit[j : j + step]

            def take(t: torch.Tensor, rows=rows) -> torch.Tensor:
                """Rows of a [B, T, ...] tensor laid out as the pieces ([P, 1, ...] or [P, T, ...])."""
                return t.flatten(0, 1)[rows][:, None] if path.local else t[rows]

            read = up.read(path.pull_back(take(x_up), take, cot[j : j + step]), take).sum(1)  # [P, n_up]
            weights.index_add_(0, owner[j : j + step], read)
        yield ids, weights


@dataclass(frozen=True)
class _Nodes:
    """One side of an edge type: node k's vector at (b, t) is coef[b, t, k] * dirs[k], plus
    extra[b, t] where err[t, k] (the error term; its dirs row is zero). Upstream, the vector is
    the node's change from clean to patch (coef = feature change, dirs = decoder rows, extra =
    error change); downstream, it is the cotangent that pulls the node's share of the metric
    back to the submodule output (coef = left, dirs = encoder columns, extra = the error
    term's cotangent). A node at a position (`pos`) keeps that position only."""

    coef: torch.Tensor  # [B, T, K]
    dirs: torch.Tensor  # [K, d]
    extra: torch.Tensor  # [B, T, d]
    err: torch.Tensor  # [T, K], 1.0 where node k is an error term (at that position)

    @classmethod
    def upstream(cls, sae: SAE, clean: State, patch: State, nodes: torch.Tensor,
                 pos: torch.Tensor | None) -> _Nodes:
        feats = nodes != ERROR
        safe = torch.where(feats, nodes, 0)
        return cls._at(feats, patch.f[..., safe] - clean.f[..., safe], sae.W_dec[safe], patch.err - clean.err, pos)

    @classmethod
    def downstream(cls, sae: SAE, clean: State, grad: torch.Tensor, nodes: torch.Tensor,
                   pos: torch.Tensor | None) -> _Nodes:
        """Feature n = act(pre_n(x)) pulls back left_n W_enc[:, n], with left_n = g . W_dec[n] where
        n is active and 0 elsewhere; the error term x - decode(f(x)) pulls back
        g - sum_n left_n W_enc[:, n] (computed only where g is nonzero)."""
        feats = nodes != ERROR
        safe = torch.where(feats, nodes, 0)
        left = (grad @ sae.W_dec[safe].T) * sae.active(clean.f[..., safe])
        err_cot = torch.zeros_like(grad)
        if not feats.all():
            at = grad.ne(0).any(-1)  # often the last position only
            g = grad[at]
            err_cot[at] = g - _left(sae, clean.f[at], g) @ sae.W_enc.T
        return cls._at(feats, left, sae.W_enc.T[safe], err_cot, pos)

    @classmethod
    def _at(cls, feats, coef, dirs, extra, pos) -> _Nodes:
        if pos is None:
            return cls(coef * feats, dirs * feats[:, None], extra, (~feats).to(coef.dtype).expand(coef.shape[1], -1))
        mask = torch.nn.functional.one_hot(pos, coef.shape[1]).T.to(coef.dtype)  # [T, K]
        return cls(coef * (mask * feats), dirs * feats[:, None], extra, mask * ~feats)

    def _support(self, at: slice) -> torch.Tensor:
        """[K', B, T]: where the nodes in `at` have a nonzero vector."""
        coef, err = self.coef[..., at], self.err[:, at]
        return ((coef != 0) | (err.bool() & self.extra.ne(0).any(-1)[..., None])).permute(2, 0, 1)

    def pieces(self, at: slice, local: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The nonzero pieces of the vectors of the nodes in `at`: each piece's node (index into
        `at`) [P], its unit (position b * T + t when `local`, else example b) [P], and its vector
        [P, 1, d] or [P, T, d]."""
        support = self._support(at)
        coef, dirs, err = self.coef[..., at], self.dirs[at], self.err[:, at]
        if local:
            owner, unit = support.flatten(1).nonzero(as_tuple=True)
            b, t = unit // coef.shape[1], unit % coef.shape[1]
            v = coef[b, t, owner][:, None] * dirs[owner] + err[t, owner][:, None] * self.extra[b, t]
            return owner, unit, v[:, None]
        owner, unit = support.any(2).nonzero(as_tuple=True)
        v = coef[unit, :, owner][..., None] * dirs[owner][:, None] + err[:, owner].T[..., None] * self.extra[unit]
        return owner, unit, v

    def read(self, y: torch.Tensor, take: Callable) -> torch.Tensor:
        """[..., K]: each node's vector . y, for y [..., d] laid out by `take`."""
        return (y @ self.dirs.T) * take(self.coef) + (y * take(self.extra)).sum(-1)[..., None] * take(
            self.err.expand(len(self.coef), *self.err.shape))


def edge_weights_looped(model, pair: EdgePair, dicts: dict[str, SAE], batch: Batch,
                        clean: dict[str, State], patch: dict[str, State], down_grad: torch.Tensor,
                        up_nodes: torch.Tensor, down_nodes: torch.Tensor,
                        up_pos: torch.Tensor | None = None, down_pos: torch.Tensor | None = None) -> torch.Tensor:
    """Reference for `edge_weights`: one forward over the batch, then one backward per
    downstream node, its cotangent built dense (`_cotangents`)."""
    path = _path(model, pair, batch, clean)
    pull_back = lambda cot: (cot,)  # noqa: E731  (the skip path's Jacobian is the identity)
    if path.forward is not None:
        with torch.enable_grad():
            _, pull_back = torch.func.vjp(lambda x: path.forward(x, lambda t: t), clean[pair.up.name].x)
    up = _Nodes.upstream(dicts[pair.up.name], clean[pair.up.name], patch[pair.up.name], up_nodes, up_pos)
    left = _left(dicts[pair.down.name], clean[pair.down.name].f, down_grad)
    rows = []
    for cot in _cotangents(down_nodes, left, dicts[pair.down.name], down_grad, down_pos):
        (g,) = pull_back(cot)
        rows.append(up.read(g, lambda t: t).sum((0, 1)))
    return torch.stack(rows)


@dataclass(frozen=True)
class _Path:
    """The forward from the upstream output to the downstream output, with the frozen
    submodules detached: `forward(x_up, take)`, where `take` lays out a [B, T, ...] tensor
    of the batch as x_up's rows are laid out; None where it is the identity. `local`: it
    works position by position (no attention on the way), so its rows may be single positions."""

    forward: Callable | None
    local: bool

    def pull_back(self, x_up: torch.Tensor, take: Callable, cot: torch.Tensor) -> torch.Tensor:
        """cot . d forward / d x_up at `x_up` (rows laid out by `take`): one backward pass."""
        if self.forward is None:
            return cot
        with torch.enable_grad():
            x = x_up.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.forward(x, take), x, cot)
        return g


def _path(model, pair: EdgePair, batch: Batch, clean: dict[str, State]) -> _Path:
    """The path between the pair's submodules. Both ends lie in the downstream submodule's
    block, so only as much of that block runs as lies between them (`_block_forward`);
    shortformer models, whose attention also reads the positions, run from the tokens."""
    if _skip_path_only(pair):
        return _Path(None, local=True)
    if model.cfg.positional_embedding_type != "shortformer":
        forward = _block_forward(model, pair, clean)
        if forward is not None:
            return _Path(forward, local=pair.down.component == "mlp")
    return _Path(_model_forward(model, pair, batch), local=False)


def _skip_path_only(pair: EdgePair) -> bool:
    """Whether the downstream resid is the upstream output plus frozen terms: every TransformerLens
    block writes resid_post = resid_pre + attn_out + mlp_out, so the Jacobian is the identity."""
    later = {"embed": ("attn", "mlp"), "resid": ("attn", "mlp"), "attn": ("mlp",), "mlp": ()}[pair.up.component]
    return pair.down.component == "resid" and set(later) <= {s.component for s in pair.frozen}


def _block_forward(model, pair: EdgePair, clean: dict[str, State]) -> Callable | None:
    """Upstream output -> downstream output within the downstream block, or None where the
    clean states lack what it starts from. An mlp is run from its input (the residual stream
    after attention, or before it in parallel blocks), the attention output frozen or clean;
    an attn output runs the block from its input and stops at the attn site's output hook."""
    layer, cfg = pair.down.layer, model.cfg
    block = model.blocks[layer]
    start = _block_input_site(layer)
    attn = site_name("attn", layer)
    up_is_input = pair.up.name == start
    parallel = cfg.parallel_attn_mlp  # the MLP reads the block's input, as attention does
    if pair.down.component == "mlp" and (up_is_input or pair.up.name == attn and not parallel):
        frozen_attn = attn in {s.name for s in pair.frozen}
        if not parallel and (up_is_input and not frozen_attn or attn not in clean or start not in clean):
            return None
        post_norm = cfg.original_architecture in POST_NORM_ARCHITECTURES

        def forward(x_up, take):
            if parallel:
                mlp_in = x_up
            else:
                mlp_in = x_up + take(clean[attn].x if up_is_input else clean[start].x)
            return block.apply_mlp(mlp_in if post_norm else block.ln2(mlp_in))
        return forward
    if pair.down.component == "attn" and up_is_input:
        return lambda x_up, take: _run_until(model.hook_dict[pair.down.hook_out], lambda: block(x_up))
    return None


def _block_input_site(layer: int) -> str:
    """The site whose output is block `layer`'s input: the embedding, or the previous resid."""
    return site_name("embed", -1) if layer == 0 else site_name("resid", layer - 1)


def _model_forward(model, pair: EdgePair, batch: Batch) -> Callable:
    """Upstream output -> downstream output through the model from the tokens, the upstream
    output set by a hook and the frozen submodules detached."""
    def forward(x_up, take):
        hooks = [*[(s.hook_name, lambda x, hook: x.detach()) for s in pair.frozen],
                 (pair.up.hook_name, lambda x, hook: x_up)]
        with model.hooks(fwd_hooks=hooks):
            return _run_until(model.hook_dict[pair.down.hook_name],
                              lambda: model(take(batch.clean), stop_at_layer=pair.down.layer + 1))
    return forward


class _Reached(Exception):
    """Raised by `_run_until`'s hook to stop a forward pass."""


def _run_until(hook_point, run: Callable) -> torch.Tensor:
    """The value at `hook_point` in the forward pass `run` starts, stopping the pass there."""
    seen = []

    def stop(module, args, output):
        seen.append(output)
        raise _Reached

    handle = hook_point.register_forward_hook(stop)
    try:
        run()
    except _Reached:
        return seen[0]
    finally:
        handle.remove()
    raise RuntimeError(f"the forward pass never reached {hook_point.name}")


def _left(sae: SAE, f: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """[..., d_sae]: each downstream feature's gradient (from the gradient at the output,
    grad [..., d]) times whether it is active (features f [..., d_sae])."""
    return (grad @ sae.W_dec.T) * sae.active(f)


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


