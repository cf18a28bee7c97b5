"""Integrated gradients (IG) node effects, as in Sparse Feature Circuits.

For each submodule separately, its output is moved along the straight line from
the clean to the patch activation (features and error term together, which is
the same line because decode is affine); the metric's gradient there is averaged
over `steps` points (left Riemann sum, alpha = 0, 1/steps, ...). All steps run as
one batch; effects are then (patch - clean) . mean gradient, as in AtP.
"""

from __future__ import annotations

import torch

from compute.dictionaries import SAE, Submodule
from compute.spliced import State, batch_metric
from compute.tasks import Batch


def ig_grads(model, subs: list[Submodule], dicts: dict[str, SAE], batch: Batch,
             clean: dict[str, State], patch: dict[str, State], steps: int = 10) -> dict[str, torch.Tensor]:
    """Mean gradient of the metric at each submodule's output along the clean->patch line."""
    alphas = torch.arange(steps, dtype=torch.float32) / steps
    tokens = batch.clean.repeat(steps, 1)
    out = {}
    for s in subs:
        xc, xp = clean[s.name].x, patch[s.name].x
        a = alphas.view(-1, 1, 1, 1)
        x_line = ((1 - a) * xc + a * xp).reshape(-1, *xc.shape[1:]).requires_grad_(True)
        with torch.enable_grad():
            logits = model.run_with_hooks(tokens, fwd_hooks=[(s.hook_name, lambda x, hook, v=x_line: v)])
            m = batch_metric(logits, batch, repeat=steps)
            (g,) = torch.autograd.grad(m.sum(), x_line)
        out[s.name] = g.view(steps, *xc.shape).mean(0)
    return out
