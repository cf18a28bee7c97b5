"""Sparse Hessian eigendecomposition (seed 002): directions in parameter space with high, sparse
per-sample curvature and little interference between them.

For directions u_1..u_K (unit norm) and per-sample curvatures c_k(x) = u_kᵀ H(x) u_k, two losses:

- high curvature: L_high = −E_x Σ_k c_k(x)², which rewards directions along which some samples'
  outputs change sharply (squared, so a direction that is steep on few samples beats one that is
  mildly curved on all);
- low interference: L_int = E_x Σ_{k≠l} c_k(x) c_l(x) (u_k·u_l)², the off-diagonal of the Gram matrix
  of the curvature-weighted directions c_k u_k: two directions may overlap only where they are not
  both curved on the same sample. Both losses are quadratic in curvature, so the weight λ of L_int
  does not depend on the model's scale.

The optimisation is the seed's bi-level loop: per batch, one Adam step on L_high, then one on
L_high + λ L_int, the directions renormalised after each. It restarts from several seeded
initialisations and keeps the lowest final loss; the result is canonical (u·w0 ≥ 0, directions
ordered by E c²), so one configuration always gives the same directions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from catalog.progress import hidden
from compute.parameters.targets import Target


@dataclass(frozen=True)
class DecompositionConfig:
    n_features: int = 5
    steps: int = 600  # bi-level steps per restart
    lr: float = 0.01
    interference: float = 16.0  # λ: weight of L_int in the second step
    batch_size: int | None = None  # samples (inputs) per step; None: all
    restarts: int = 3
    seed: int = 0
    chunk: int | None = None  # directions vectorised at once (memory grows with it)


@dataclass
class Decomposition:
    directions: torch.Tensor  # [K, P], unit rows
    high: float  # E Σ c² on the training inputs
    interference: float  # E Σ_{k≠l} c_k c_l (u_k·u_l)²
    restart: int  # which restart was kept
    losses: list[float] = field(default_factory=list)  # each restart's final loss


def losses(c: torch.Tensor, directions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E Σ c², E Σ_{k≠l} c_k c_l (u_k·u_l)²) for curvatures c [S, K] of unit directions [K, P]."""
    overlap = (directions @ directions.T).pow(2)
    overlap = overlap - torch.diag(torch.diag(overlap))
    high = c.pow(2).sum(1).mean()
    interference = torch.einsum("sk,sl,kl->s", c, c, overlap).mean()
    return high, interference


def _samples(target: Target, inputs: torch.Tensor, mask: torch.Tensor | None, u: torch.Tensor,
             chunk: int | None) -> torch.Tensor:
    """Curvatures [S, K] over samples (every unmasked input position for language models)."""
    c = target.curvature(inputs, u, chunk)
    return c[mask] if mask is not None else c.reshape(-1, c.shape[-1])


def _unit(u: torch.Tensor) -> torch.Tensor:
    return u / u.norm(dim=1, keepdim=True).clamp_min(1e-12)


def decompose(target: Target, inputs: torch.Tensor, cfg: DecompositionConfig, mask: torch.Tensor | None = None,
              progress: bool = True) -> Decomposition:
    """Learn cfg.n_features directions over the target's parameters from these inputs (mask: which
    positions of token inputs count)."""
    n = len(inputs)
    batch = min(cfg.batch_size or n, n)
    bar = tqdm(total=cfg.restarts * cfg.steps, desc="decomposing", unit="step", disable=hidden(progress))
    best, finals = None, []
    for restart in range(cfg.restarts):
        g = torch.Generator().manual_seed(cfg.seed * 1000 + restart)
        raw = torch.randn(cfg.n_features, target.w0.numel(), generator=g, dtype=target.w0.dtype)
        raw = _unit(raw).requires_grad_(True)
        opt = torch.optim.Adam([raw], lr=cfg.lr)
        for _ in range(cfg.steps):
            rows = torch.randperm(n, generator=g)[:batch] if batch < n else slice(None)
            x, m = inputs[rows], None if mask is None else mask[rows]
            for with_interference in (False, True):
                u = _unit(raw)
                high, interference = losses(_samples(target, x, m, u, cfg.chunk), u)
                loss = -high + cfg.interference * interference if with_interference else -high
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    raw.copy_(_unit(raw))
            bar.update()
        with torch.no_grad():
            u = _unit(raw.detach())
            high, interference = losses(_samples(target, inputs, mask, u, cfg.chunk), u)
            final = float(-high + cfg.interference * interference)
        finals.append(final)
        if best is None or final < best[0]:
            best = (final, restart, u, float(high), float(interference))
    bar.close()
    _, restart, u, high, interference = best
    return Decomposition(canonical(target, u, inputs, mask, cfg.chunk), high, interference, restart, finals)


@torch.no_grad()
def canonical(target: Target, u: torch.Tensor, inputs: torch.Tensor, mask: torch.Tensor | None,
              chunk: int | None) -> torch.Tensor:
    """The same directions, each signed so that u·w0 ≥ 0 (curvature is even in u), ordered by E c²."""
    sign = torch.where(u @ target.w0 < 0, -1.0, 1.0).to(u.dtype)
    u = u * sign[:, None]
    order = _samples(target, inputs, mask, u, chunk).pow(2).mean(0).argsort(descending=True, stable=True)
    return u[order].contiguous()
