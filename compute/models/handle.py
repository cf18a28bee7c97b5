"""A model handle: a loaded model with what the catalogue records of it.

Jobs take a handle, never the zoo itself, so a checkpoint loaded from disk goes wherever
the zoo goes: the handle carries the model, its stable id, where it came from, its
configuration and the hash of its weights (the `models` table's row).
"""

from __future__ import annotations

import json
from dataclasses import dataclass


def jsonable(v) -> bool:
    """Whether a configuration value can be stored as JSON (TransformerLens configs hold dtypes, devices)."""
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


@dataclass(frozen=True)
class ModelHandle:
    model: object  # a TransformerLens HookedTransformer
    model_id: str  # stable id: the same checkpoint is one model
    name: str  # human name
    source: str  # where it came from (a model folder)
    config: dict  # the model configuration, JSON-able
    weights_hash: str  # sha256 prefix of the weights

    def row(self) -> dict:
        """The handle as a row of the `models` table."""
        cfg = self.model.cfg
        return {"model_id": self.model_id, "name": self.name, "source": self.source, "n_layers": cfg.n_layers,
                "d_model": cfg.d_model, "d_vocab": cfg.d_vocab, "config": self.config,
                "weights_hash": self.weights_hash}
