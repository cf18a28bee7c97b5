"""Exact activation patching: the ground truth the attribution methods are checked against.

A node is patched by replacing its clean value with its patch value (at every
position for `sum` aggregation, at its own position for `none`) and running the
model forward once; its effect is the change in the metric, averaged over examples.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from compute.attribution.spliced import State, batch_metric, last_logits, logits_with_output
from compute.dictionaries.kinds import SAE
from compute.tasks import Batch
from schema.sites import Site


@torch.no_grad()
def patch_effects(model, sub: Site, sae: SAE, batch: Batch, clean: State, patch: State,
                  nodes: list[int | None], positions: list[int | None] | None = None,
                  chunk: int = 32) -> torch.Tensor:
    """Exact effect of each node of one submodule (feature index, or None for the error term),
    patched at every position or, where `positions` gives one, at that position only.

    Returns [len(nodes)], the metric change summed over the batch's examples.
    Many nodes share one forward pass: the batch is repeated once per node.
    """
    positions = positions or [None] * len(nodes)
    return _measure(model, sub, batch, clean, [partial(_delta, sae, clean, patch, n, t)
                                               for n, t in zip(nodes, positions, strict=True)], chunk)


@torch.no_grad()
def joint_effects(model, subs: list[Site], batch: Batch, clean: dict[str, State],
                  patch: dict[str, State]) -> dict[str, float]:
    """The effect of patching each submodule whole (its output set to the patch value at every
    position, features and error term at once), summed over the batch's examples: what a
    method's effects over the submodule's nodes should add up to when they are complete, as
    integrated gradients' are up to its quadrature error."""
    base = batch_metric(last_logits(model, batch.clean), batch)
    out = {}
    for s in subs:
        logits = logits_with_output(model, s, patch[s.name].x, subs, clean, batch.clean, 1)
        out[s.name] = (batch_metric(logits, batch) - base).sum().item()
    return out


@torch.no_grad()
def set_effects(model, sub: Site, sae: SAE, batch: Batch, clean: State, patch: State,
                sets: list[tuple[list[int], bool]], chunk: int = 16) -> torch.Tensor:
    """Exact effect of patching each node set of one submodule at once, at every position: a set is
    (feature indices, whether the error term is in it). Returns [len(sets)], the metric change summed
    over the batch's examples."""
    return _measure(model, sub, batch, clean, [partial(_set_delta, sae, clean, patch, features, error)
                                               for features, error in sets], chunk)


def _measure(model, sub: Site, batch: Batch, clean: State, deltas: list[Callable[[], torch.Tensor]],
             chunk: int) -> torch.Tensor:
    """The metric change, summed over the batch, when the submodule's clean output moves by each delta
    ([B, T, d], made when its chunk runs, so memory holds one chunk): `chunk` deltas share one forward
    pass, the batch repeated once per delta."""
    base = batch_metric(last_logits(model, batch.clean), batch)
    out = []
    for i in range(0, len(deltas), chunk):
        part = torch.stack([make() for make in deltas[i : i + chunk]])  # [K, B, T, d]
        patched = (clean.x[None] + part).reshape(-1, *clean.x.shape[1:])
        logits = logits_with_output(model, sub, patched, [sub], {sub.name: clean}, batch.clean, len(part))
        m = batch_metric(logits, batch, repeat=len(part)).view(len(part), -1)
        out.append((m - base).sum(1))
    return torch.cat(out)


def _set_delta(sae: SAE, clean: State, patch: State, features: list[int], error: bool) -> torch.Tensor:
    """The change of the submodule's output when these features (and the error term) take their patch
    values: decoding is affine, so it is the features' change times their decoder rows."""
    idx = torch.tensor(features, dtype=torch.long)
    d = (patch.f[..., idx] - clean.f[..., idx]) @ sae.W_dec[idx]
    return d + (patch.err - clean.err) if error else d


def _delta(sae: SAE, clean: State, patch: State, node: int | None, position: int | None) -> torch.Tensor:
    if node is None:
        d = patch.err - clean.err
    else:
        d = (patch.f[..., node] - clean.f[..., node])[..., None] * sae.W_dec[node]
    if position is not None:
        only = torch.zeros(d.shape[1], 1, dtype=d.dtype, device=d.device)
        only[position] = 1
        d = d * only
    return d
