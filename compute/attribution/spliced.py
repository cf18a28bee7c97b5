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

from compute.dictionaries.kinds import SAE
from compute.tasks import Batch
from schema.sites import Site, enters_block


class State:
    """One submodule's activation x [B, T, d], features f [B, T, d_sae] and error term err
    [B, T, d] on a batch. Given `decode` instead of err, the error term x - decode(f) is
    computed on first use: AtP's node effects never need it, so its passes skip the decoders."""

    def __init__(self, x: torch.Tensor, f: torch.Tensor, err: torch.Tensor | None = None, decode=None):
        self.x, self.f, self._err, self._decode = x, f, err, decode

    @property
    def err(self) -> torch.Tensor:
        if self._err is None:
            with torch.no_grad():
                self._err = self.x - self._decode(self.f)
        return self._err

    def rows(self, at: slice) -> State:
        """The state of some rows of the batch."""
        return State(self.x[at], self.f[at], None if self._err is None else self._err[at], self._decode)


@dataclass
class Pass:
    """What one pass of the spliced model gives: the metric per row (when a batch was given),
    each submodule's state, and the metric's gradient at each submodule's output (on request)."""

    metric: torch.Tensor | None
    states: dict[str, State]
    grads: dict[str, torch.Tensor] | None


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


def last_logits(model, x: torch.Tensor, start_at_layer: int | None = None) -> torch.Tensor:
    """Logits [B, 1, vocab] at the last position, the only one the metric reads, from tokens or,
    with `start_at_layer`, from the residual stream entering that block (the blocks before it
    are skipped: their output is given)."""
    from transformer_lens.utilities.activation_functions import apply_softcap

    resid = model(x, start_at_layer=start_at_layer, stop_at_layer=model.cfg.n_layers)[:, -1:]
    if model.cfg.normalization_type is not None:
        resid = model.ln_final(resid)
    return apply_softcap(model.unembed(resid), model.cfg.output_logits_soft_cap)


def spliced_pass(model, subs: list[Site], dicts: dict[str, SAE], tokens: torch.Tensor,
                 batch: Batch | None = None, grads: bool = False, grad_rows: int | None = None) -> Pass:
    """One forward pass of the spliced model: every submodule's features and error term and,
    given the batch, the metric per row; with `grads`, one backward pass too, for the gradient
    of the metric (summed over the first `grad_rows` rows, or all) at every submodule's output
    (a feature's gradient is that times W_dec[i])."""
    held: dict[str, State] = {}
    saved: dict[str, torch.Tensor] = {}
    by_hook = {s.hook_name: s for s in subs}
    first = subs[0].hook_name

    def splice(x, hook):
        s = by_hook[hook.name]
        if s.name in dicts:
            with torch.no_grad():
                f = dicts[s.name].encode(x)
                held[s.name] = State(x.detach(), f, decode=dicts[s.name].decode)
        if grads:
            if hook.name == first and not x.requires_grad:
                x = x.detach().requires_grad_(True)  # weights are frozen: start the graph here
            saved[s.name] = x
        return x

    with torch.set_grad_enabled(grads), model.hooks(fwd_hooks=[(s.hook_name, splice) for s in subs]):
        logits = last_logits(model, tokens)
        m = None if batch is None else batch_metric(logits, batch, repeat=len(tokens) // len(batch))
        g = None
        if grads:
            g = dict(zip(saved, torch.autograd.grad(m[:grad_rows].sum(), list(saved.values())), strict=True))
    return Pass(None if m is None else m.detach(), held, g)


def clean_and_patch(model, subs: list[Site], dicts: dict[str, SAE], batch: Batch,
                    grads: bool = False) -> tuple[Pass, Pass]:
    """The spliced pass on the clean prompts and on the patch prompts, run as one batch (the
    two have one length), so the model's per-call cost is paid once; gradients, on request,
    are those of the clean rows' metric, at the clean rows."""
    n = len(batch)
    both = spliced_pass(model, subs, dicts, torch.cat([batch.clean, batch.patch]), batch, grads, grad_rows=n)

    def part(at: slice, part_grads: dict | None) -> Pass:
        return Pass(both.metric[at], {k: s.rows(at) for k, s in both.states.items()}, part_grads)

    clean_grads = None if both.grads is None else {k: g[:n] for k, g in both.grads.items()}
    return part(slice(0, n), clean_grads), part(slice(n, None), None)


def states(model, subs: list[Site], dicts: dict[str, SAE], tokens: torch.Tensor) -> dict[str, State]:
    """Features and error terms of every submodule on a batch of prompts."""
    return spliced_pass(model, subs, dicts, tokens).states


def output_grads(model, subs: list[Site], batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Metric on the clean prompts and its gradient at every submodule's output."""
    p = spliced_pass(model, subs, {}, batch.clean, batch, grads=True)
    return p.metric, p.grads


def logits_with_output(model, s: Site, value: torch.Tensor, subs: list[Site],
                       clean: dict[str, State], tokens: torch.Tensor, repeat: int) -> torch.Tensor:
    """Last-position logits with submodule `s` set to `value` ([repeat * B, T, d]) on the
    prompts `tokens` repeated. Everything upstream of `s` is as on the clean prompts, so only
    the blocks from its own on run: a resid submodule's value is the next block's input, and
    attn or mlp start from the clean residual stream entering their block when `clean` holds it."""
    if model.cfg.positional_embedding_type != "shortformer":
        if enters_block(s.hook_name, s.layer + 1):
            return last_logits(model, value, start_at_layer=s.layer + 1)
        start = next((clean[u.name].x for u in subs if enters_block(u.hook_name, s.layer) and u.name in clean), None)
        if start is not None:
            with model.hooks(fwd_hooks=[(s.hook_name, lambda x, hook: value)]):
                return last_logits(model, start.repeat(repeat, 1, 1), start_at_layer=s.layer)
    with model.hooks(fwd_hooks=[(s.hook_name, lambda x, hook: value)]):
        return last_logits(model, tokens.repeat(repeat, 1))
