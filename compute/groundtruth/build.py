"""Building, caching and loading the planted-circuit models (`compute.groundtruth.planted`, `.siit`)
with their identity dictionaries, like the zoo's: built once on the pinned kernels, then loaded."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

from compute.cache import cache_path, cached_dir, config_hash, file_hash, pinned
from compute.groundtruth.planted import (
    DIMS,
    MODELS,
    VOCABULARY,
    Truth,
    build_handset,
    handset_truth,
    planted_task,
    prompts,
)
from compute.groundtruth.siit import SIITConfig, siit_truth, train_siit
from compute.models.handle import ModelHandle
from compute.tasks import Task


@dataclass
class PlantedModel:
    """A built planted model: the model, where it lives, its task and its truth."""

    name: str  # handset or siit
    model: object  # HookedTransformer
    path: Path
    task: Task
    truth: Truth
    trained: dict = field(default_factory=dict)  # siit: its training's settings and measured accuracies

    @property
    def model_id(self) -> str:
        return f"planted-{self.name}-{self.path.name}"

    @cached_property
    def handle(self) -> ModelHandle:
        return ModelHandle(self.model, self.model_id, f"planted-{self.name}", str(self.path),
                           json.loads((self.path / "config.json").read_text()),
                           file_hash(self.path / "model.safetensors")[:16])


VERSION = 2  # bump when a planted model's construction or training changes


def planted_config(name: str) -> dict:
    """What a planted model is built from (its cache key is this dictionary's hash)."""
    return {"model": name, "version": VERSION, "vocabulary": VOCABULARY, "dims": DIMS,
            "task": planted_task().content_hash, **({"siit": asdict(SIITConfig())} if name == "siit" else {})}


def planted_key(name: str) -> str:
    return config_hash(planted_config(name))


def _build(out: Path, name: str) -> None:
    """Build one planted model into `out` (in a pinned build process)."""
    if name == "handset":
        build_handset(out)
    else:
        train_siit(out)


def _build_missing(names: list[str], progress: bool) -> None:
    from compute.dictionaries.building import identity_dictionaries

    for name in names:
        cached_dir("planted", planted_key(name), _build, name)
        identity_dictionaries(load_planted(name), progress, corpus=prompts())


def build_planted(names: tuple[str, ...] = MODELS, progress: bool = True) -> dict[str, tuple[PlantedModel, dict]]:
    """{name: (planted model, its identity dictionaries)}, what is missing built in one pinned process."""
    from compute.dictionaries.building import identity_dictionaries

    unknown = set(names) - set(MODELS)
    if unknown:
        raise ValueError(f"unknown planted model {sorted(unknown)[0]!r}; choose from {', '.join(MODELS)}")
    if not all(cache_path("planted", planted_key(n)).exists() for n in names):
        pinned(_build_missing, list(names), progress)
    out = {}
    for n in names:
        pm = load_planted(n)
        out[n] = (pm, identity_dictionaries(pm, progress, corpus=prompts()))
    return out


def load_planted(name: str) -> PlantedModel:
    from compute.models.zoo import load_model

    path = cache_path("planted", planted_key(name))
    trained = json.loads((path / "siit.json").read_text()) if (path / "siit.json").exists() else {}
    truth = handset_truth() if name == "handset" else siit_truth()
    return PlantedModel(name, load_model(path), path, planted_task(), truth, trained)
