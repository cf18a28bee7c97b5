"""Attribution patching (AtP): node effects to first order.

effect(n) ~ (n_patch - n_clean) . d metric / d n, the gradient taken on the clean prompt.
Circuit discovery takes these gradients from the same spliced pass that reads the clean
and the patch features, run as one batch (`spliced.clean_and_patch(..., grads=True)`), so
AtP costs one forward over both prompt sets and one backward. Integrated gradients
(`ig.py`) uses the same formula with the gradient averaged along the clean->patch line.
"""

from __future__ import annotations

import torch

from compute.attribution.spliced import State
from compute.dictionaries.kinds import SAE


def node_effects(sae: SAE, clean: State, patch: State, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First-order effects (patch - clean) . gradient of every feature and of the error term.

    Returns feature effects [B, T, d_sae] and error effects [B, T]. Because x = decode(f) + err
    with decode affine, the error term moves by dx - (df) W_dec, so its effect is dx . g minus
    the features' effects: no decoder product is needed.
    """
    feature_effects = (patch.f - clean.f) * (grad @ sae.W_dec.T)
    return feature_effects, ((patch.x - clean.x) * grad).sum(-1) - feature_effects.sum(-1)
