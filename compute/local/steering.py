"""Interventions on features: set, scale or zero a feature at a position in the real model, and
compare the change of the root (a logit or logit difference) with what the prompt's graph predicts.

The real model runs with the feature's dictionary spliced in at its site and the error term kept:
its output there becomes reconstruction + error with the feature's value changed, which is the
model's own output plus (new value - old value) x the feature's decoder row. Everything
downstream is the real model (attention patterns, normalisation and later features respond).
The graph's prediction is linear: a node's influence is its value x d(root)/d(value) in the
replacement model frozen on the prompt (every path, `attribute` with threshold 0), so changing the
value from a to v moves the root by (v - a) x influence / a. A feature that is not active on the
prompt is not a node of the graph and has no prediction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from catalog.errors import UserError
from compute.local.contributions import Target, attribute, feature_target
from compute.local.replacement import Node, Replacement

MODES = ("set", "scale", "zero")


@dataclass(frozen=True)
class Intervention:
    site: str
    feature: int
    position: int
    mode: str  # set, scale or zero
    amount: float = 0.0  # the value set, or the factor

    @property
    def name(self) -> str:
        return f"{self.site}/{self.feature}@{self.position}"

    def new_value(self, old: float) -> float:
        return {"set": self.amount, "scale": old * self.amount, "zero": 0.0}[self.mode]


def parse_intervention(rep: Replacement, mode: str, spec: str) -> Intervention:
    """SITE/FEATURE@POSITION[=VALUE]: =VALUE with set (the value) and scale (the factor), none with zero."""
    where, eq, amount = spec.partition("=")
    site, slash, rest = where.partition("/")
    feature, at, position = rest.partition("@")
    if not (slash and at and feature.isdigit() and position.lstrip("-").isdigit()) or (mode == "zero") == bool(eq):
        form = "SITE/FEATURE@POSITION" + ("" if mode == "zero" else "=VALUE")
        raise UserError(f"--{mode} {spec!r}: give {form} (e.g. mlp_1/12@4{'' if mode == 'zero' else '=2.5'})")
    try:  # the site, feature and position checked as every local-circuit target is
        t = feature_target(rep, site, int(feature), int(position))
    except UserError as e:
        raise UserError(f"--{mode} {spec!r}: {e}") from None
    value = 0.0
    if mode != "zero":
        try:
            value = float(amount)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise UserError(f"--{mode} {spec!r}: {amount!r} is not a finite number")
    return Intervention(t.site, t.feature, t.position, mode, value)


def root_value(root: Target, logits: torch.Tensor) -> float:
    """A logit root's value in logits [batch 1, positions, vocabulary]."""
    row = logits[0, root.position]
    return float(row[root.feature] - (row[root.minus] if root.minus is not None else 0.0))


def _hooks(rep: Replacement, interventions: list[Intervention]) -> list:
    """Forward hooks adding (new - old) x decoder row at each intervention's position, in the output of its
    site (and, for a cross-layer transcoder's feature, of every later MLP it writes to)."""
    by_hook: dict[str, list] = {}
    for iv in interventions:
        old = float(rep.values[iv.site][iv.position, iv.feature])
        for out, decoder in rep.writes[iv.site]:
            delta = (iv.new_value(old) - old) * decoder.rows(torch.tensor([iv.feature], device=rep.device))[0].detach()
            by_hook.setdefault(rep.dicts[out].site.hook_out, []).append((iv.position, delta))

    def adder(changes):
        def fn(x, hook):
            x = x.clone()
            for position, delta in changes:
                x[:, position] += delta.to(x.device, x.dtype)
            return x
        return fn

    return [(hook, adder(changes)) for hook, changes in by_hook.items()]


@dataclass
class Steered:
    root: Target
    before: float  # the root's value in the real model
    after: float  # with every intervention at once
    predicted_joint: float  # the sum of the predictions (NaN if one has none)
    rows: list[dict]  # per intervention: node, old and new value, predicted and measured change alone
    logits_before: torch.Tensor  # the real model's logits at the root's position
    logits_after: torch.Tensor


def steer(rep: Replacement, root: Target, interventions: list[Intervention]) -> Steered:
    """Each intervention alone, then all at once, in the real model; beside the graph's predictions."""
    if root.site != "logit":
        raise UserError("interventions are measured on a logit or logit difference (give --target logit:TOKEN "
                        "or diff:TOKEN:OTHER)")
    model = rep.model
    influence = attribute(rep, [root], threshold=0.0).scores[0]
    before_logits = rep.logits.detach()  # the real model's, from the run that froze the replacement model
    before = root_value(root, before_logits)
    with torch.no_grad():
        rows = []
        for iv in interventions:
            old = float(rep.values[iv.site][iv.position, iv.feature])
            i = rep.index.get(Node(iv.site, iv.feature, iv.position))
            predicted = (iv.new_value(old) - old) * float(influence[i]) / old if i is not None and old != 0 else math.nan
            measured = root_value(root, model.run_with_hooks(rep.tokens, fwd_hooks=_hooks(rep, [iv]))) - before
            rows.append({"intervention": f"{iv.mode} {iv.name}" + ("" if iv.mode == "zero" else f"={iv.amount:g}"),
                         "value": old, "new_value": iv.new_value(old), "predicted": predicted, "measured": measured})
        after_logits = model.run_with_hooks(rep.tokens, fwd_hooks=_hooks(rep, interventions))
    return Steered(root, before, root_value(root, after_logits), sum(r["predicted"] for r in rows), rows,
                   before_logits[0, root.position].float().cpu(), after_logits[0, root.position].float().cpu())
