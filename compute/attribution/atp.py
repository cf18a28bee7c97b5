"""Attribution patching (AtP): node effects from one gradient at the clean input.

effect(n) ~ (n_patch - n_clean) . d metric / d n, evaluated on the clean prompt.
Circuit discovery takes these gradients from the same spliced pass that reads the
clean and the patch features, run as one batch (`clean_and_patch(..., grads=True)`), so
AtP costs one forward over both prompt sets and one backward; its error effects need no
decoder product (`node_effects`).
"""

from __future__ import annotations

import torch

from compute.attribution.spliced import State, output_grads
from compute.dictionaries.kinds import SAE, Submodule
from compute.tasks import Batch


def atp_grads(model, subs: list[Submodule], dicts: dict[str, SAE], batch: Batch,
              clean: dict[str, State], patch: dict[str, State]) -> dict[str, torch.Tensor]:
    """Gradient of the metric at each submodule's output, taken at the clean prompt."""
    _, grads = output_grads(model, subs, batch)
    return grads
