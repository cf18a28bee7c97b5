"""What a decomposition works on: some of a model's parameters as one flat vector, and the model as a
function of that vector.

A parameter is named as the model names it (`W`, `b` for the toys; `blocks.0.attn.W_K` for the zoo),
optionally with an index into its first dimension (`blocks.0.attn.W_K[2]`: head 2's W_K). The other
parameters stay at their trained values.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from catalog.errors import UserError
from compute.parameters.curvature import curvatures, divergence, output_curvatures

_NAME = re.compile(r"^(?P<name>[A-Za-z_][\w.]*)(\[(?P<index>\d+)\])?$")


@dataclass
class Target:
    """The decomposed parameters at their trained values (flat, w0), how the model's output depends on
    them, and the divergence that measures a change of output."""

    params: tuple[str, ...]  # as given: names, with an optional [index]
    shapes: tuple[tuple[int, ...], ...]
    w0: torch.Tensor  # [P]
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (flat parameters, inputs) -> outputs
    divergence: str  # mse or kl

    def divergence_fn(self, inputs: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """w -> D(w; x) for each input (and position), against the outputs at w0."""
        with torch.no_grad():
            ref = self.forward(self.w0, inputs)
        return lambda w: divergence(self.divergence, self.forward(w, inputs), ref)

    def curvature(self, inputs: torch.Tensor, directions: torch.Tensor, chunk: int | None = None,
                  method: str = "jvp") -> torch.Tensor:
        """Curvature of each input (and position) along each direction: [N, (T,) K] (method: see
        compute.parameters.curvature)."""
        if method == "nested":
            c = curvatures(self.divergence_fn(inputs), self.w0, directions, chunk)
        else:
            c = output_curvatures(self.divergence, lambda w: self.forward(w, inputs), self.w0, directions, chunk)
        return c.movedim(0, -1)

    def layout(self) -> list[dict]:
        """Where each parameter lies in the flat vector (saved with the directions)."""
        out, offset = [], 0
        for name, shape in zip(self.params, self.shapes, strict=True):
            size = int(torch.Size(shape).numel())
            out.append({"name": name, "shape": list(shape), "offset": offset, "size": size})
            offset += size
        return out


def parse(spec: str, available: dict[str, torch.Tensor]) -> tuple[str, int | None]:
    """'name' or 'name[i]' checked against the model's parameters; a bad one is a UserError."""
    m = _NAME.match(spec.strip())
    if not m or m["name"] not in available:
        names = ", ".join(sorted(available)[:12])
        raise UserError(f"no parameter {spec!r} in the model (parameters: {names}{', ...' if len(available) > 12 else ''})")
    index = None if m["index"] is None else int(m["index"])
    if index is not None and not 0 <= index < available[m["name"]].shape[0]:
        raise UserError(f"{spec}: index out of range (first dimension {available[m['name']].shape[0]})")
    return m["name"], index


def make_target(all_params: dict[str, torch.Tensor], specs: tuple[str, ...] | list[str],
                call: Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor], kind: str) -> Target:
    """A target over the named parameters: `call(overrides, inputs)` runs the model with the given
    parameters replaced (full tensors) and the rest as trained."""
    if not specs:
        raise UserError("name at least one parameter to decompose")
    parsed = [parse(s, all_params) for s in specs]
    if len(set(parsed)) < len(parsed) or any(
            i is None and any(n == m and j is not None for m, j in parsed) for n, i in parsed):
        raise UserError(f"parameters named twice: {', '.join(specs)}")
    base = {name: all_params[name].detach() for name, _ in parsed}
    pieces = [base[n] if i is None else base[n][i] for n, i in parsed]
    shapes = tuple(tuple(p.shape) for p in pieces)
    sizes = [p.numel() for p in pieces]
    w0 = torch.cat([p.flatten() for p in pieces])

    def forward(w: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        full = dict(base)
        for (name, index), piece, shape in zip(parsed, w.split(sizes), shapes, strict=True):
            piece = piece.view(shape)
            if index is None:
                full[name] = piece
            else:  # out of place, so that forward-mode derivatives flow through
                t = full[name]
                full[name] = torch.cat([t[:index], piece.unsqueeze(0), t[index + 1:]])
        return call(full, inputs)

    return Target(tuple(s.strip() for s in specs), shapes, w0, forward, kind)


def toy_target(toy, specs: tuple[str, ...] | list[str]) -> Target:
    """A toy's parameters (`W`, `b`) under the MSE divergence."""
    return make_target(toy.params, specs, lambda p, x: toy.forward({**toy.params, **p}, x), "mse")


def lm_target(model, specs: tuple[str, ...] | list[str]) -> Target:
    """A TransformerLens model's parameters under the normalised KL of each position's next-token
    distribution; inputs are token ids [N, T]."""
    from torch.func import functional_call

    params = dict(model.named_parameters())
    return make_target(params, specs, lambda p, toks: functional_call(model, p, (toks,), strict=False), "kl")
