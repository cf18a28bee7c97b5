"""A memory budget for discovery: how many examples one batch may hold, and whether every batch's
states may be kept for the edge pass or must be computed again there.

The estimate counts what grows with the examples: per token, each submodule's state on the
clean and patch prompts and the metric's gradient there (activation, features, error term),
and one forward+backward of the model kept for autograd — `ig_steps` of them at once for
integrated gradients, which runs its steps as one batch. Weights are not counted: they are
there whatever the batch.
"""

from __future__ import annotations

import math

BYTES = 4  # float32


def model_bytes_per_token(cfg) -> int:
    """Activations autograd keeps per token for one forward pass (residual stream, attention,
    MLP and logits), a generous estimate."""
    per_layer = 12 * cfg.d_model + 3 * cfg.d_mlp + 2 * cfg.n_heads * cfg.n_ctx
    return BYTES * (cfg.n_layers * per_layer + 2 * cfg.d_vocab)


def state_bytes_per_token(dicts: dict, d_model: int) -> int:
    """Clean and patch states and gradients of every submodule, per token."""
    return BYTES * sum(3 * (d.d_sae + 2 * d_model) for d in dicts.values())


def examples_per_batch(cfg, dicts: dict, length: int, steps: int, budget_bytes: float) -> int:
    """The most examples of `length` tokens one batch may hold within the budget (at least 1)."""
    per_example = length * (state_bytes_per_token(dicts, cfg.d_model) + 2 * max(steps, 1) * model_bytes_per_token(cfg))
    return max(1, math.floor(budget_bytes / per_example))


def kept_bytes(dicts: dict, d_model: int, n_tokens: int) -> int:
    """What keeping every batch's states for the edge pass costs."""
    return n_tokens * state_bytes_per_token(dicts, d_model)


def parse_size(text: str) -> float:
    """Bytes of a size such as 8G, 512M, 2.5GiB or a plain number of bytes."""
    units = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = t[-1] if t and t[-1] in units else ""
    try:
        value = float(t.removesuffix(unit)) * units[unit]
    except ValueError:
        raise ValueError(f"not a size: {text!r} (e.g. 8G, 512M)") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"not a size: {text!r} (must be above 0)")
    return value
