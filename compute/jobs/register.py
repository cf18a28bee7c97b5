"""The registering job: dictionaries into the catalogue, with their metrics and feature dashboards."""

from __future__ import annotations

from tqdm.auto import tqdm

from catalog.progress import hidden
from catalog.store import Catalog
from compute.dictionaries.kinds import TrainedDictionary
from compute.jobs.lifecycle import run, run_row
from compute.jobs.rows import (
    dictionaries_with_activations,
    write_activation_values,
    write_model_and_dictionaries,
    write_task,
)
from compute.models.handle import ModelHandle


def dictionary_job(cat: Catalog, handle: ModelHandle, dicts: dict[str, TrainedDictionary], n_top: int = 10,
                   progress: bool = True, params: dict | None = None) -> tuple[str, int]:
    """Register dictionaries with their metrics and feature dashboards (each feature's top corpus
    examples as rows of `activations`) as one run. Dictionaries whose dashboards the catalogue
    already holds are registered again but not recomputed. Returns (run_id, activation rows)."""
    from compute.dictionaries.dashboards import corpus_task, top_activations

    row = run_row("dictionaries", {**(params or {}), "dictionaries": sorted(d.dictionary_id for d in dicts.values()),
                                   "n_top": n_top})
    n_rows = 0
    with run(cat, row) as writer:
        corpus = corpus_task()
        have = dictionaries_with_activations(cat, corpus.name)
        write_model_and_dictionaries(writer, handle, dicts)
        write_task(writer, handle, corpus)
        prompts = [e["clean_prefix"] for e in corpus.examples]
        table = writer.table("activations")
        todo = [d for d in dicts.values() if d.dictionary_id not in have]
        for d in tqdm(todo, desc="feature dashboards", disable=hidden(progress), unit="dict"):
            top = {k: v.numpy() for k, v in top_activations(handle.model, d.sae, d.hook_in, prompts, n_top).items()}
            n_rows += write_activation_values(table, corpus.name, d.dictionary_id, top["example_idx"],
                                              top["feature_idx"], top["position"], top["value"])
    return row["run_id"], n_rows
