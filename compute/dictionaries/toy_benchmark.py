"""The ground-truth benchmark for dictionaries (Sharkey et al.; seed 004): synthetic activations
made of known features, a sweep of SAEs over L1 penalty x dictionary size, and PCA as the baseline.

Data: n ground-truth features drawn uniformly on the unit sphere of R^d. Each
vector switches features on through a Gaussian copula (correlated normals with
a random correlation matrix, compared against per-feature probabilities that
decay exponentially with the feature index and are rescaled to a chosen mean
number of active features); an active feature gets a uniform(0, 1) coefficient.
Metrics: reconstruction MSE, MMCS against the true features, MMCS against the
next larger dictionary of the same L1, dead features and L0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from catalog.progress import hidden
from compute.dictionaries.training import SAEConfig, train_sae


@dataclass(frozen=True)
class ToyData:
    d: int = 32
    n_features: int = 64
    mean_active: float = 4.0  # expected features per vector
    decay: float = 0.97  # p_i proportional to decay ** i before rescaling
    n_train: int = 50_000
    n_test: int = 10_000
    seed: int = 0


@dataclass(frozen=True)
class ToySweep:
    l1_coefficients: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0)
    sizes: tuple[int, ...] = (32, 64, 128, 256)
    steps: int = 3000
    batch_size: int = 1024
    lr: float = 3e-3


def feature_probabilities(data: ToyData) -> torch.Tensor:
    p = data.decay ** torch.arange(data.n_features, dtype=torch.float64)
    p = p * data.mean_active / p.sum()
    return p.clamp(max=1.0).float()


def make_data(data: ToyData) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(true features [n, d] with unit rows, train vectors, test vectors)."""
    g = torch.Generator().manual_seed(data.seed)
    truth = torch.randn(data.n_features, data.d, generator=g)
    truth = truth / truth.norm(dim=1, keepdim=True)
    a = torch.randn(data.n_features, data.n_features, generator=g)
    cov = a @ a.T / data.n_features + torch.eye(data.n_features) * 0.5  # symmetric positive definite
    std = cov.diag().sqrt()
    corr = cov / std[:, None] / std[None, :]
    chol = torch.linalg.cholesky(corr)
    p = feature_probabilities(data)
    n = data.n_train + data.n_test
    z = torch.randn(n, data.n_features, generator=g) @ chol.T
    on = torch.special.ndtr(z) < p  # Gaussian copula: each marginal is Bernoulli(p_i), correlations kept
    coeff = torch.rand(n, data.n_features, generator=g) * on
    x = coeff @ truth
    return truth, x[: data.n_train], x[data.n_train :]


def mmcs(learned: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over reference rows of the largest cosine similarity with any learned row."""
    a = learned / learned.norm(dim=1, keepdim=True).clamp_min(1e-12)
    b = reference / reference.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return float((b @ a.T).max(dim=1).values.mean())


def pca_baseline(train: torch.Tensor, test: torch.Tensor, truth: torch.Tensor, k: int) -> dict:
    """Principal components (at most d of them) as the dictionary."""
    mean = train.mean(0)
    _, _, v = torch.linalg.svd(train - mean, full_matrices=False)
    comps = v[: min(k, v.shape[0])]
    recon = (test - mean) @ comps.T @ comps + mean
    return {"method": "pca", "l1_coefficient": 0.0, "d_sae": len(comps),
            "mse": float((test - recon).pow(2).sum(-1).mean()), "l0": float(len(comps)),
            "mmcs_truth": mmcs(comps, truth), "mmcs_larger": None, "dead_features": 0}


def run_sweep(data: ToyData, sweep: ToySweep, progress: bool = True) -> list[dict]:
    """Train every (L1, size) SAE on the synthetic data and measure it; PCA last."""
    truth, train, test = make_data(data)
    rows, decoders = [], {}
    grid = [(l1, size) for l1 in sweep.l1_coefficients for size in sweep.sizes]
    for l1, size in tqdm(grid, desc="toy sweep", disable=hidden(progress), unit="sae"):
        cfg = SAEConfig(l1_coefficient=l1, steps=sweep.steps, batch_size=sweep.batch_size, lr=sweep.lr,
                        seed=data.seed, resample_every=sweep.steps // 5)
        sae = train_sae(train, cfg, "toy", "toy", progress=False, d_sae=size)
        with torch.no_grad():
            f = sae.encode(test)
            mse = float((test - sae.decode(f)).pow(2).sum(-1).mean())
        decoders[l1, size] = sae.W_dec.detach()
        rows.append({"method": "sae", "l1_coefficient": l1, "d_sae": size, "mse": mse,
                     "l0": float((f > 0).float().sum(-1).mean()), "mmcs_truth": mmcs(sae.W_dec, truth),
                     "mmcs_larger": None, "dead_features": int(((f > 0).sum(0) == 0).sum())})
    sizes = sorted(sweep.sizes)
    for r in rows:
        bigger = [s for s in sizes if s > r["d_sae"]]
        if bigger:  # how many of this dictionary's features the next larger one also finds
            r["mmcs_larger"] = mmcs(decoders[r["l1_coefficient"], bigger[0]], decoders[r["l1_coefficient"], r["d_sae"]])
    rows.append(pca_baseline(train, test, truth, data.d))
    for r in rows:
        r |= {"d_in": data.d, "n_true_features": data.n_features}
    return rows
