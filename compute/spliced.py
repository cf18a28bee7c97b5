"""The model with its dictionaries spliced in: feature values, error terms, and gradients.

At every submodule the activation x is written as x = decode(f) + err with
f = encode(x), so splicing changes nothing in the forward pass while making each
feature and each error term a node. Because decode is affine, the gradient of
the metric with respect to feature i is g . W_dec[i] and with respect to the
error term is g itself, where g is the gradient at the submodule's output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compute.dictionaries import SAE, Submodule
from compute.tasks import Batch


@dataclass
class State:
    """One submodule's activation, features and error term on a batch."""

    x: torch.Tensor  # [B, T, d]
    f: torch.Tensor  # [B, T, d_sae]
    err: torch.Tensor  # [B, T, d]


def metric(logits: torch.Tensor, clean_answer: torch.Tensor, patch_answer: torch.Tensor | None) -> torch.Tensor:
    """logit(patch answer) - logit(clean answer) at the last position, per row
    (-logit(clean answer) for a task without patch prompts)."""
    last = logits[:, -1]
    clean = last.gather(1, clean_answer[:, None])[:, 0]
    return -clean if patch_answer is None else last.gather(1, patch_answer[:, None])[:, 0] - clean


def prompts_right(last: torch.Tensor, b: Batch) -> torch.Tensor:
    """Per example, how many of its prompts the model gets right, from last-position logits of
    the clean prompts followed by the patch prompts: its own answer must outscore the contrast
    answer (for a task without patch prompts: be the top prediction)."""
    n = len(b)
    if b.patch_answer is None:
        return (last[:n].argmax(-1) == b.clean_answer).int()
    good, bad = b.clean_answer[:, None], b.patch_answer[:, None]
    clean_right = last[:n].gather(1, good) > last[:n].gather(1, bad)
    patch_right = last[n:].gather(1, bad) > last[n:].gather(1, good)
    return (clean_right.int() + patch_right.int())[:, 0]


def batch_metric(logits: torch.Tensor, batch: Batch, repeat: int = 1) -> torch.Tensor:
    pa = None if batch.patch_answer is None else batch.patch_answer.repeat(repeat)
    return metric(logits, batch.clean_answer.repeat(repeat), pa)


def zero_states(clean: dict[str, State], dicts: dict[str, SAE]) -> dict[str, State]:
    """The patch state of a task without patch prompts: every feature and error term at zero,
    so each submodule outputs decode(0) = b_dec (zero ablation, as in Sparse Feature Circuits)."""
    return {name: State(dicts[name].b_dec.expand_as(s.x), torch.zeros_like(s.f), torch.zeros_like(s.err))
            for name, s in clean.items()}


@torch.no_grad()
def states(model, subs: list[Submodule], dicts: dict[str, SAE], tokens: torch.Tensor) -> dict[str, State]:
    """Features and error terms of every submodule on a batch of prompts."""
    hooks = {s.hook_name for s in subs}
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in hooks)
    out = {}
    for s in subs:
        x = cache[s.hook_name]
        f = dicts[s.name].encode(x)
        out[s.name] = State(x, f, x - dicts[s.name].decode(f))
    return out


def output_grads(model, subs: list[Submodule], batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Metric on the clean prompts and its gradient at every submodule's output."""
    first = subs[0].hook_name
    saved: dict[str, torch.Tensor] = {}

    def keep(x, hook):
        if hook.name == first and not x.requires_grad:
            x = x.detach().requires_grad_(True)  # weights are frozen: start the graph here
        saved[hook.name] = x
        return x

    with torch.enable_grad():
        logits = model.run_with_hooks(batch.clean, fwd_hooks=[(s.hook_name, keep) for s in subs])
        m = batch_metric(logits, batch)
        grads = torch.autograd.grad(m.sum(), [saved[s.hook_name] for s in subs])
    return m.detach(), {s.name: g for s, g in zip(subs, grads, strict=True)}


def node_effects(sae: SAE, clean: State, patch: State, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First-order effects (patch - clean) . gradient of every feature and of the error term.

    Returns feature effects [B, T, d_sae] and error effects [B, T].
    """
    feature_grad = grad @ sae.W_dec.T
    return (patch.f - clean.f) * feature_grad, ((patch.err - clean.err) * grad).sum(-1)
