"""Feature dashboards: each feature's top activating examples on a corpus, and the output tokens
its decoder direction promotes.

The examples go into the catalogue as a task (the corpus) and the activations
of each feature on its top examples as rows of `activations`, so a dashboard is
a query (`top_examples`) and the text is recoverable from `examples`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pandas as pd
import torch

from catalog.errors import UserError
from compute.dictionaries.kinds import SAE
from compute.tasks import Task

CORPUS_TASK = "zoo-corpus"


def corpus_task(n_sentences: int = 2000, seed: int = 3) -> Task:
    """Grammar sentences held out from dictionary training, as a task of plain prompts."""
    from compute.models import grammar

    return Task(name=CORPUS_TASK, source=f"zoo grammar corpus (seed {seed})",
                description="sentences for feature dashboards (top activating examples)",
                examples=[{"clean_prefix": s, "clean_answer": "", "split": "corpus"}
                          for s in grammar.corpus(n_sentences, seed)])


@torch.no_grad()
def top_activations(model, sae: SAE, hook_in: str, prompts: list[str], n_top: int = 10,
                    batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Every nonzero activation of each feature on the n_top prompts where its maximum is largest
    (and positive), as columns: example_idx, feature_idx, position (BOS is 0), value."""
    pad = model.tokenizer.pad_token_id
    values = []
    for i in range(0, len(prompts), batch_size):
        toks = model.to_tokens(prompts[i : i + batch_size], padding_side="right")
        _, cache = model.run_with_cache(toks, names_filter=hook_in)
        f = sae.encode(cache[hook_in]) * (toks != pad)[..., None]
        f = torch.nn.functional.pad(f, (0, 0, 0, model.cfg.n_ctx - f.shape[1]))
        values.append(f)
    f = torch.cat(values)  # [N, T, d_sae]
    top_val, top_idx = f.amax(1).topk(min(n_top, len(prompts)), dim=0)  # [k, d_sae]
    j, feature = (top_val > 0).nonzero(as_tuple=True)
    example = top_idx[j, feature]
    on_top = f[example, :, feature]  # [M, T]: each chosen example's activations of its feature
    row, position = on_top.nonzero(as_tuple=True)
    return {"example_idx": example[row], "feature_idx": feature[row], "position": position,
            "value": on_top[row, position]}


@torch.no_grad()
def promoted_tokens(model, sae: SAE, feature: int, n: int = 10) -> list[tuple[str, float]]:
    """The tokens whose logits the feature's decoder direction raises most (direct path, W_dec W_U)."""
    logits = sae.W_dec[feature] @ model.W_U
    top = logits.topk(min(n, len(logits)))
    return [(model.tokenizer.convert_ids_to_tokens(int(i)), float(v)) for v, i in zip(top.values, top.indices,
                                                                                   strict=True)]


@dataclass
class Dashboard:
    dictionary_id: str
    hook_name: str
    feature: int
    density: float
    max_activation: float
    label: str | None
    examples: pd.DataFrame  # top_examples rows: task_id, example_idx, position, token, value, text
    promoted: list[tuple[str, float]]
    kind: str = "sae"  # the dictionary's kind: a parameter dictionary's values are curvatures and it promotes nothing


def feature_dashboard(cat, dictionary: str, feature: int, n: int = 10) -> Dashboard:
    """Everything `cli.py feature` shows, from the catalogue (the dictionary may be named by a unique
    prefix of its id); promoted tokens need the dictionary's and the model's files."""
    found = cat.sql("SELECT d.*, m.source FROM dictionaries d LEFT JOIN models m USING (model_id) "
                    "WHERE starts_with(dictionary_id, ?) ORDER BY dictionary_id", [dictionary])
    if found.empty:
        raise UserError(f"no dictionary {dictionary!r} in the catalogue (see cli.py dictionaries)")
    if len(found) > 1 and dictionary not in set(found["dictionary_id"]):
        raise UserError(f"{dictionary!r} names {len(found)} dictionaries: {', '.join(found['dictionary_id'][:4])}")
    d = found[found["dictionary_id"] == dictionary].iloc[0] if len(found) > 1 else found.iloc[0]
    if not 0 <= feature < d.d_sae:
        raise UserError(f"{d.dictionary_id} has features 0..{d.d_sae - 1}, not {feature}")
    feat = cat.sql("SELECT density, max_activation, label FROM features WHERE dictionary_id = ? AND feature_idx = ?",
                   [d.dictionary_id, feature]).iloc[0]
    examples = cat.sql("SELECT * FROM top_examples(?, ?, ?)", [d.dictionary_id, feature, n])
    promoted = _promoted(d, feature, n)
    return Dashboard(d.dictionary_id, d.hook_name, feature, float(feat.density), float(feat.max_activation),
                     feat.label if isinstance(feat.label, str) else None, examples, promoted, d.kind)


def promoted_for(cat, dictionary_id: str, feature: int, n: int = 10) -> list[tuple[str, float]]:
    """The tokens a catalogued feature promotes, [] when its files are not on this machine (the
    explorer's node dashboards; model and dictionary stay loaded for the next feature)."""
    found = cat.sql("SELECT d.*, m.source FROM dictionaries d LEFT JOIN models m USING (model_id) "
                    "WHERE dictionary_id = ?", [dictionary_id])
    return _promoted(found.iloc[0], feature, n) if len(found) else []


def _promoted(d, feature: int, n: int) -> list[tuple[str, float]]:
    """Promoted tokens of a dictionary row's feature, when the model's and dictionary's files are here."""
    if (d.kind == "parameter" or not isinstance(d.source, str) or not isinstance(d.path, str)
            or not Path(d.source, "model.safetensors").is_file() or not Path(d.path, "cfg.json").is_file()):
        return []
    return promoted_tokens(_load_model(d.source), _load_dictionary(d.path), feature, n)


@lru_cache(maxsize=2)
def _load_model(source: str):
    from compute.models.zoo import load_model

    return load_model(Path(source))


@lru_cache(maxsize=8)
def _load_dictionary(path: str):
    from compute.dictionaries.formats import load_dictionary

    return load_dictionary(Path(path))
