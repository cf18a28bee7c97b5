"""Integrated gradients (IG) node effects, as in Sparse Feature Circuits.

For each submodule separately, its output is moved along the straight line from
the clean to the patch activation (features and error term together, which is
the same line because decode is affine), and the metric's gradient there is
integrated over the line by a quadrature rule: `midpoint` (the default), `gauss`
(Gauss–Legendre nodes) or `left` (the left Riemann sum alpha = 0, 1/steps, ... that
Sparse Feature Circuits uses). All steps run as one batch; effects are then
(patch - clean) . integrated gradient, as in AtP. Which rule and how many steps:
bench/ig_rules.py measures it (the metric can change in a narrow band of the line,
which Gauss's points mostly miss).

A submodule's effects add up to (patch - clean) . integrated gradient, which the
fundamental theorem of calculus makes the joint effect of patching the whole
submodule, up to the quadrature's error: the completeness check
(`patching.joint_effects`) measures that error for every circuit.

Everything upstream of the submodule is the same at every step, so each pass
starts at the submodule's own block (`logits_with_output`).
"""

from __future__ import annotations

import numpy as np
import torch

from compute.attribution.spliced import State, batch_metric, logits_with_output
from compute.dictionaries.kinds import SAE
from compute.tasks import Batch
from schema.sites import Site

RULES = ("midpoint", "gauss", "left")


def quadrature(rule: str, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Points alpha in [0, 1] and weights (summing to 1) of a `steps`-point rule for the
    integral over [0, 1]."""
    if rule == "left":
        alphas = np.arange(steps) / steps
        weights = np.full(steps, 1 / steps)
    elif rule == "midpoint":
        alphas = (np.arange(steps) + 0.5) / steps
        weights = np.full(steps, 1 / steps)
    elif rule == "gauss":  # exact for polynomials of degree 2 * steps - 1
        x, w = np.polynomial.legendre.leggauss(steps)
        alphas, weights = (x + 1) / 2, w / 2
    else:
        raise ValueError(f"unknown IG rule {rule!r}; choose from {', '.join(RULES)}")
    return torch.tensor(alphas, dtype=torch.float32), torch.tensor(weights, dtype=torch.float32)


def ig_grads(model, subs: list[Site], dicts: dict[str, SAE], batch: Batch, clean: dict[str, State],
             patch: dict[str, State], steps: int, rule: str) -> dict[str, torch.Tensor]:
    """The metric's gradient at each submodule's output, integrated along the clean->patch line."""
    alphas, weights = quadrature(rule, steps)
    out = {}
    for s in subs:
        xc, xp = clean[s.name].x, patch[s.name].x
        a, w = (t.to(xc.device, xc.dtype).view(-1, 1, 1, 1) for t in (alphas, weights))  # where the model is
        x_line = ((1 - a) * xc + a * xp).reshape(-1, *xc.shape[1:]).requires_grad_(True)
        with torch.enable_grad():
            logits = logits_with_output(model, s, x_line, subs, clean, batch.clean, steps)
            m = batch_metric(logits, batch, repeat=steps)
            (g,) = torch.autograd.grad(m.sum(), x_line)
        out[s.name] = (w * g.view(steps, *xc.shape)).sum(0)
    return out
