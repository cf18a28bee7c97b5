"""Toy models with known parameter-space features (seed 002): XOR and a toy model of superposition.

XOR: one hidden layer of two GELU units whose outputs are summed, y = Σ_k gelu(W_k·x + b_k),
trained on the four inputs of {0, 1}². TMS (Elhage et al. 2022): x̂ = ReLU(Wᵀ W x + b) with
five features, two hidden dimensions and tied weights, trained on features uniform in [0, 1]
that are each present with probability 5%; it stores them as a pentagon. Each feature of TMS
has a true parameter component, the column W[:, i] (APD's and SPD's reference), against which
the directions found are scored (MMCS, ML2R).

Both train seeded on the pinned kernels of `compute.cache` and are cached like the zoo.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from compute.cache import cached_dir, config_hash

TOYS = ("xor", "tms")


@dataclass(frozen=True)
class ToyConfig:
    name: str  # xor or tms
    n_features: int = 5  # tms: input features
    n_hidden: int = 2
    density: float = 0.05  # tms: probability that a feature is present
    steps: int = 10_000
    batch_size: int = 1024
    lr: float = 1e-2
    seed: int = 0
    version: int = 1  # bump when the training changes


CONFIGS = {"xor": ToyConfig("xor", n_features=2, steps=3000, lr=0.05), "tms": ToyConfig("tms")}


def xor_forward(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """[N, 2] inputs -> [N, 1]: the sum of two GELU units."""
    return torch.nn.functional.gelu(x @ p["W"].T + p["b"]).sum(-1, keepdim=True)


def tms_forward(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """[N, n_features] -> [N, n_features]: ReLU(Wᵀ W x + b), tied weights."""
    return torch.relu(x @ p["W"].T @ p["W"] + p["b"])


FORWARD = {"xor": xor_forward, "tms": tms_forward}
XOR_INPUTS = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])


def tms_sample(cfg: ToyConfig, n: int, generator: torch.Generator) -> torch.Tensor:
    """n inputs: each feature uniform in [0, 1] with probability cfg.density, else 0."""
    x = torch.rand(n, cfg.n_features, generator=generator)
    return x * (torch.rand(n, cfg.n_features, generator=generator) < cfg.density)


@dataclass
class Toy:
    """A trained toy model: its parameters, its forward function and where it is cached."""

    config: ToyConfig
    params: dict[str, torch.Tensor]
    path: Path
    loss: float

    @property
    def name(self) -> str:
        return self.config.name

    def forward(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return FORWARD[self.name](params, x)

    @property
    def model_id(self) -> str:
        return f"toy-{self.name}-{self.path.name}"

    def row(self) -> dict:
        """The toy as a row of the `models` table."""
        from compute.cache import file_hash

        return {"model_id": self.model_id, "name": self.name, "source": str(self.path), "n_layers": 1,
                "d_model": self.config.n_hidden, "d_vocab": None,
                "config": {**asdict(self.config), "parameters": {k: list(v.shape) for k, v in self.params.items()}},
                "weights_hash": file_hash(self.path / "model.safetensors")[:16]}

    def examples(self, n_sampled: int = 200, seed: int = 1) -> torch.Tensor:
        """The inputs a decomposition's features are shown on: XOR's four; for TMS the five one-hot
        inputs, then n_sampled nonzero inputs drawn from the training distribution."""
        if self.name == "xor":
            return XOR_INPUTS.clone()
        g = torch.Generator().manual_seed(seed)
        drawn = tms_sample(self.config, 40 * n_sampled, g)
        drawn = drawn[drawn.sum(1) > 0][:n_sampled]
        return torch.cat([torch.eye(self.config.n_features), drawn])

    def training_inputs(self, n: int = 2000, seed: int = 2) -> torch.Tensor:
        """The inputs a decomposition trains on: XOR's four, or n draws from TMS's distribution (the
        all-zero ones left out: every direction's curvature is 0 there)."""
        if self.name == "xor":
            return XOR_INPUTS.clone()
        x = tms_sample(self.config, n, torch.Generator().manual_seed(seed))
        return x[x.sum(1) > 0]


def _train(folder: Path, cfg: ToyConfig) -> None:
    """Train a toy (seeded; restarts with the next seed until XOR is solved) and save it to folder."""
    forward = FORWARD[cfg.name]
    for attempt in range(20):
        g = torch.Generator().manual_seed(cfg.seed + attempt)
        if cfg.name == "xor":
            p = {"W": torch.randn(cfg.n_hidden, 2, generator=g), "b": torch.randn(cfg.n_hidden, generator=g)}
        else:
            p = {"W": 0.5 * torch.randn(cfg.n_hidden, cfg.n_features, generator=g), "b": torch.zeros(cfg.n_features)}
        for v in p.values():
            v.requires_grad_(True)
        opt = torch.optim.Adam(p.values(), lr=cfg.lr)
        for _ in range(cfg.steps):
            x = XOR_INPUTS if cfg.name == "xor" else tms_sample(cfg, cfg.batch_size, g)
            y = (x[:, :1] != x[:, 1:]).float() if cfg.name == "xor" else x
            loss = (forward(p, x) - y).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        if cfg.name != "xor" or loss.item() < 1e-6:
            break
    save_file({k: v.detach().contiguous() for k, v in p.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({**asdict(cfg), "loss": loss.item(), "attempts": attempt + 1}))


def toy_key(name: str) -> str:
    """The cache key of a toy: its name and the hash of its configuration."""
    if name not in CONFIGS:
        raise ValueError(f"unknown toy {name!r}; choose from {', '.join(TOYS)}")
    return f"{name}-{config_hash(CONFIGS[name])}"


def build_toy(name: str) -> Toy:
    """The trained toy model of this name (released, or trained on the pinned kernels and cached)."""
    path = cached_dir("toys", toy_key(name), _train, CONFIGS[name])
    saved = json.loads((path / "config.json").read_text())
    return Toy(CONFIGS[name], load_file(str(path / "model.safetensors")), path, saved["loss"])


def blank_params(name: str) -> dict[str, torch.Tensor]:
    """A toy's parameters as zeros of their shapes: enough to check parameter names without training."""
    cfg = CONFIGS[name]
    n_in = 2 if name == "xor" else cfg.n_features
    return {"W": torch.zeros(cfg.n_hidden, n_in), "b": torch.zeros(cfg.n_hidden if name == "xor" else n_in)}


def true_components(toy: Toy) -> torch.Tensor:
    """TMS's per-feature parameter components over its W (the decomposed parameter): [n_features, W.numel()],
    row i is W with every column but i set to 0."""
    w = toy.params["W"]
    eye = torch.eye(w.shape[1])
    return torch.stack([(w * eye[i]).flatten() for i in range(w.shape[1])])


def component_scores(directions: torch.Tensor, w0: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """MMCS: mean over true components of the largest |cosine| with a direction. ML2R: mean over true
    components of ‖(u·w0) u‖ / ‖true‖ for the best-matching unit direction u, the direction scaled to
    the weights' component along it (1 when the direction's component has the true one's size)."""
    cos = (truth / truth.norm(dim=1, keepdim=True)) @ directions.T  # [n_true, K]
    best = cos.abs().argmax(1)
    scale = (directions[best] @ w0).abs()  # ‖(u·w0) u‖ for unit u
    return {"mmcs": float(cos.abs().max(1).values.mean()), "ml2r": float((scale / truth.norm(dim=1)).mean())}
