"""A decomposition on disk: the directions and what they are directions of.

    <folder>/directions.safetensors   directions [K, P] (unit rows), w0 [P] (the trained values)
    <folder>/cfg.json                 {"format": "parameter-directions/1", "model": ..., "model_id": ...,
                                       "parameters": [{"name", "shape", "offset", "size"}, ...],
                                       "divergence": "mse" | "kl", "decomposition": {settings},
                                       "data": {what it trained on}, "high", "interference",
                                       "restart", "losses"}

Direction k's entries for a parameter are directions[k, offset : offset + size], reshaped to its
shape (row-major, as PyTorch flattens): e.g. `blocks.1.attn.W_K[0]` is head 0's [d_model, d_head].
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from catalog.errors import UserError
from compute.cache import config_hash, file_hash

FORMAT = "parameter-directions/1"


@dataclass
class ParameterDictionary:
    """A saved decomposition: its folder, directions, trained values and configuration."""

    path: Path
    directions: torch.Tensor  # [K, P]
    w0: torch.Tensor  # [P]
    cfg: dict

    @property
    def dictionary_id(self) -> str:
        digest = config_hash([file_hash(self.path / "directions.safetensors"), file_hash(self.path / "cfg.json")])
        return f"parameter-{digest}"

    @property
    def params(self) -> list[str]:
        return [p["name"] for p in self.cfg["parameters"]]

    def direction(self, k: int) -> dict[str, torch.Tensor]:
        """Direction k as one tensor per parameter, in the parameter's shape."""
        return {p["name"]: self.directions[k, p["offset"]: p["offset"] + p["size"]].view(p["shape"])
                for p in self.cfg["parameters"]}


def save(folder: Path, directions: torch.Tensor, w0: torch.Tensor, cfg: dict) -> None:
    save_file({"directions": directions.float().contiguous(), "w0": w0.float().contiguous()},
              str(folder / "directions.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"format": FORMAT, **cfg}, indent=1, sort_keys=True))


def load(folder: Path) -> ParameterDictionary:
    """Read a saved decomposition; a folder that is not one is a UserError."""
    folder = Path(folder)
    try:
        cfg = json.loads((folder / "cfg.json").read_text())
        tensors = load_file(str(folder / "directions.safetensors"))
    except (OSError, ValueError) as e:
        raise UserError(f"{folder} is not a saved decomposition ({e})") from None
    if cfg.get("format") != FORMAT:
        raise UserError(f"{folder}: format {cfg.get('format')!r}, expected {FORMAT!r}")
    return ParameterDictionary(folder, tensors["directions"], tensors["w0"], cfg)
