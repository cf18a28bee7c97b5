"""Per-sample curvature of a divergence along directions in parameter space.

For a model f(W, x) at its trained weights W0 and a divergence D(W; x) between f(W, x) and
f(W0, x) (zero at W0), the curvature of sample x along a direction u is the second derivative
d²/dt² D(W0 + t·u; x) at t = 0, which is uᵀ H(x) u for the per-sample Hessian H(x). It is
computed by forward-mode Jacobian-vector products (`torch.func.jvp`), vectorised over directions
with `vmap`: the Hessian is never formed, and the result stays differentiable in u. Two ways:

- `nested`: d²/dt² D by a JVP of a JVP, for any divergence (the seed's method);
- `jvp` (the default): one JVP gives the output's change J·u, and the curvature is the quadratic
  form of D's Hessian in the outputs, (J·u)ᵀ ∇²_y D (J·u). This is exact, not the Gauss–Newton
  approximation, because both divergences have zero gradient in the outputs at W0, which removes
  the other term of the chain rule; it costs one forward-mode pass instead of two.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import jvp, vmap

DIVERGENCES = ("mse", "kl")
METHODS = ("jvp", "nested")


def divergence(kind: str, out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """D per sample (per position for logits [N, T, V]): 'mse', the mean squared difference over the
    last dimension; 'kl', KL(softmax(ref) ‖ softmax(out)) over the last dimension, which is the
    normalised KL of the seed (its KL(ref ‖ ref) term is 0), so D = 0 and ∇D = 0 at W0."""
    if kind == "mse":
        return (out - ref).pow(2).mean(-1)
    if kind == "kl":
        log_ref = ref.log_softmax(-1)
        return (log_ref.exp() * (log_ref - out.log_softmax(-1))).sum(-1)
    raise ValueError(f"unknown divergence {kind!r}; choose from {', '.join(DIVERGENCES)}")


def second_derivative(fn: Callable[[torch.Tensor], torch.Tensor], w0: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """d²/dt² fn(w0 + t·u) at t = 0, elementwise over fn's output: a JVP of a JVP."""
    def along_u(w: torch.Tensor) -> torch.Tensor:
        return jvp(fn, (w,), (u,))[1]

    return jvp(along_u, (w0,), (u,))[1]


def curvatures(fn: Callable[[torch.Tensor], torch.Tensor], w0: torch.Tensor, directions: torch.Tensor,
               chunk: int | None = None) -> torch.Tensor:
    """Second derivatives of fn (a divergence per sample, zero at w0) along each row of directions
    [K, P]: a tensor [K, *fn's output shape]. `chunk` bounds how many directions are vectorised at once
    (memory grows with it)."""
    return vmap(lambda u: second_derivative(fn, w0, u), chunk_size=chunk)(directions)


def output_curvature(kind: str, ref: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
    """changeᵀ ∇²_y D(y; ref) change at y = ref, per sample: for 'mse' 2·mean(change²); for 'kl' the
    variance of the logits' change under softmax(ref), Σ p·dz² − (Σ p·dz)²."""
    if kind == "mse":
        return 2 * change.pow(2).mean(-1)
    if kind == "kl":
        p = ref.softmax(-1)
        return (p * change.pow(2)).sum(-1) - (p * change).sum(-1).pow(2)
    raise ValueError(f"unknown divergence {kind!r}; choose from {', '.join(DIVERGENCES)}")


def output_curvatures(kind: str, forward: Callable[[torch.Tensor], torch.Tensor], w0: torch.Tensor,
                      directions: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """The same numbers as `curvatures` of D(forward(w), forward(w0)), from one JVP of the outputs per
    direction: [K, *per-sample shape]."""
    with torch.no_grad():
        ref = forward(w0)

    def along(u: torch.Tensor) -> torch.Tensor:
        return output_curvature(kind, ref, jvp(forward, (w0,), (u,))[1])

    return vmap(along, chunk_size=chunk)(directions)
