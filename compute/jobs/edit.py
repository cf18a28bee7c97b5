"""The editing job: ablate the features a query chooses and measure a task again (SHIFT)."""

from __future__ import annotations

from catalog.errors import UserError
from catalog.store import Catalog, new_id
from compute.dictionaries.kinds import TrainedDictionary
from compute.jobs.lifecycle import now, run, run_row
from compute.jobs.rows import write_context
from compute.models.handle import ModelHandle
from compute.tasks import Task
from schema.sites import sites


def edit_job(cat: Catalog, handle: ModelHandle, dicts: dict[str, TrainedDictionary], task: Task, features_sql: str,
             ablation: str = "mean", split: str = "test") -> tuple[str, list]:
    """Ablate the features a read-only query chose and measure the task again, as one run.

    The query must return dictionary_id and feature_idx columns naming features of the
    given dictionaries. Returns (edit_id, measures).
    """
    from compute.attribution.editing import edit_and_measure

    chosen = cat.sql(features_sql)
    missing = {"dictionary_id", "feature_idx"} - set(chosen.columns)
    if missing:
        raise UserError(f"the features query must return dictionary_id and feature_idx (missing: "
                        f"{', '.join(sorted(missing))})")
    chosen = chosen[["dictionary_id", "feature_idx"]].drop_duplicates()
    if chosen.empty:
        raise UserError("the features query chose no features; nothing was edited")
    by_id = {d.dictionary_id: (name, d) for name, d in dicts.items()}
    unknown = sorted(set(chosen["dictionary_id"]) - set(by_id))
    if unknown:
        raise UserError(f"the features query names dictionaries this model does not have: {', '.join(unknown[:3])}")
    features: dict[str, list[int]] = {}
    for dict_id, idx in chosen.itertuples(index=False):
        name, d = by_id[dict_id]
        if not 0 <= int(idx) < d.sae.d_sae:
            raise UserError(f"feature {idx} is out of range for {dict_id} ({d.sae.d_sae} features)")
        features.setdefault(name, []).append(int(idx))
    edit_id = new_id("edit")
    row = run_row("edit", {"task": task.name, "features_sql": features_sql, "ablation": ablation, "split": split})
    with run(cat, row, record_failure=False) as writer:
        model = handle.model
        measures = edit_and_measure(model, sites(model.cfg.n_layers), {k: d.sae for k, d in dicts.items()}, task,
                                    features, ablation, split)
        write_context(writer, handle, dicts, task)
        common = {"edit_id": edit_id, "run_id": row["run_id"], "model_id": handle.model_id, "task_id": task.name,
                  "split": split, "ablation": ablation, "features_sql": features_sql, "n_features": len(chosen),
                  "created_at": now()}
        writer.write("edits", [{**common, "subset": m.subset, "n_examples": m.n_examples,
                                "metric_before": m.metric_before, "metric_after": m.metric_after,
                                "accuracy_before": m.accuracy_before, "accuracy_after": m.accuracy_after}
                               for m in measures])
        writer.write("edit_features", [{"edit_id": edit_id, "dictionary_id": d, "feature_idx": int(i)}
                                       for d, i in chosen.itertuples(index=False)])
    return edit_id, measures
