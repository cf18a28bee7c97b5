"""Integrated gradients (IG) node effects, as in Sparse Feature Circuits.

For each submodule separately, its output is moved along the straight line from
the clean to the patch activation (features and error term together, which is
the same line because decode is affine); the metric's gradient there is averaged
over `steps` points (left Riemann sum, alpha = 0, 1/steps, ...). All steps run as
one batch; effects are then (patch - clean) . mean gradient, as in AtP.

Everything upstream of the submodule is the same at every step, so each pass
starts at the submodule's own block (`logits_with_output`).
"""

from __future__ import annotations

import torch

from compute.attribution.spliced import State, batch_metric, logits_with_output
from compute.dictionaries.kinds import SAE
from compute.tasks import Batch
from schema.sites import Site


def ig_grads(model, subs: list[Site], dicts: dict[str, SAE], batch: Batch,
             clean: dict[str, State], patch: dict[str, State], steps: int = 10) -> dict[str, torch.Tensor]:
    """Mean gradient of the metric at each submodule's output along the clean->patch line."""
    alphas = torch.arange(steps, dtype=torch.float32) / steps
    a = alphas.view(-1, 1, 1, 1)
    out = {}
    for s in subs:
        xc, xp = clean[s.name].x, patch[s.name].x
        x_line = ((1 - a) * xc + a * xp).reshape(-1, *xc.shape[1:]).requires_grad_(True)
        with torch.enable_grad():
            logits = logits_with_output(model, s, x_line, subs, clean, batch.clean, steps)
            m = batch_metric(logits, batch, repeat=steps)
            (g,) = torch.autograd.grad(m.sum(), x_line)
        out[s.name] = g.view(steps, *xc.shape).mean(0)
    return out
