"""Editing: ablate chosen features and measure a task again (SHIFT, Sparse Feature Circuits §5).

The chosen features are set to their ablated value (the mean over the measured prompts,
per position, or zero) at every position; every other feature and every error term keeps
its value, so only the chosen directions change. The task is measured with and without
the edit, for every case label of its examples and for all of them together: the metric
on clean prompts (as in `circuits.metric_clean`) and accuracy on clean and patch prompts
(as in `zoo.accuracy`). When a spurious cue decides some cases, the worst case's accuracy
is what the edit should raise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compute.attribution.faithfulness import ablated_states, ablation_hooks, node_set
from compute.attribution.spliced import metric, prompts_right, states
from compute.dictionaries.kinds import SAE
from compute.tasks import Batch, Task, encode
from schema.sites import Site

EDIT_ABLATIONS = ("mean", "zero")
ALL = "all"


@dataclass
class Measure:
    """A task subset measured before and after the edit."""

    subset: str  # a case label, or "all"
    n_examples: int
    metric_before: float
    metric_after: float
    accuracy_before: float
    accuracy_after: float


@torch.no_grad()
def edit_and_measure(model, subs: list[Site], dicts: dict[str, SAE], task: Task,
                     features: dict[str, list[int]], ablation: str = "mean", split: str = "test") -> list[Measure]:
    """Measure `task` on `split` with and without the features (submodule name -> indices) ablated.

    Returns one Measure for all examples, then one per case label (sorted).
    """
    if ablation not in EDIT_ABLATIONS:
        raise ValueError(f"unknown ablation {ablation!r}; choose from {', '.join(EDIT_ABLATIONS)}")
    touched = [s for s in subs if features.get(s.name)]
    if not touched:
        raise ValueError("no features to ablate")
    keep = node_set(touched, dicts, [(name, i) for name, ids in features.items() for i in ids]).complement()
    cases = {i: (ex.get("case") or "") for i, ex in task.split(split)}
    rows: list[tuple[str, float, float, float, float, int]] = []  # case, metrics, right counts, prompts
    for b in encode(model, task, split).batches:
        tokens = b.clean if b.patch is None else torch.cat([b.clean, b.patch])
        ablated = ablated_states(states(model, touched, dicts, tokens), ablation, dicts)
        before = model(tokens)[:, -1]
        after = model.run_with_hooks(tokens, fwd_hooks=ablation_hooks(touched, dicts, keep, ablated, "kept"))[:, -1]
        m_before, right_before = _measure(before, b)
        m_after, right_after = _measure(after, b)
        n_prompts = 1 if b.patch is None else 2
        for k, idx in enumerate(b.example_idx.tolist()):
            rows.append((cases[idx], m_before[k], m_after[k], right_before[k], right_after[k], n_prompts))
    if not rows:
        raise ValueError(f"task {task.name} has no usable {split} examples")
    groups = {ALL: rows}
    for case in sorted({r[0] for r in rows} - {""}):
        groups[case] = [r for r in rows if r[0] == case]
    return [_summary(name, g) for name, g in groups.items()]


def _measure(last: torch.Tensor, b: Batch) -> tuple[list[float], list[int]]:
    """Per example: the metric on its clean prompt, and how many of its prompts are right."""
    return metric(last[: len(b), None], b.clean_answer, b.patch_answer).tolist(), prompts_right(last, b).tolist()


def _summary(subset: str, rows: list) -> Measure:
    n = len(rows)
    prompts = sum(r[5] for r in rows)
    return Measure(subset, n, sum(r[1] for r in rows) / n, sum(r[2] for r in rows) / n,
                   sum(r[3] for r in rows) / prompts, sum(r[4] for r in rows) / prompts)


def worst_group(measures: list[Measure]) -> tuple[Measure, Measure]:
    """The case with the lowest accuracy before and after the edit (all examples if no cases)."""
    cases = [m for m in measures if m.subset != ALL] or measures
    return min(cases, key=lambda m: m.accuracy_before), min(cases, key=lambda m: m.accuracy_after)
