"""Faithfulness and completeness of a circuit, as in Sparse Feature Circuits.

The model runs on the clean prompts with every dictionary spliced in. At each
submodule, in forward order, the features and error term are recomputed from
the (already modified) input; nodes outside the kept set are replaced by their
ablated value. With F the mean metric,

    faithfulness(C) = (F(C) - F(empty)) / (F(model) - F(empty))

and completeness is the same number for the complement of C (a complete circuit
leaves nothing for the complement: completeness near 0). F(model) is the plain
model without hooks, so the faithfulness of the set of every node checks that
splicing is exact.

Ablations: `mean` (each node's mean over the batch's examples, per position),
`zero`, `resample` (the value from another example of the same length).
Error terms are nodes chosen by threshold like features (`node`), or always
kept (`kept`), always ablated (`ablated`), or set to zero (`removed`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from tqdm.auto import tqdm

from catalog.progress import hidden
from compute.attribution.spliced import State, batch_metric, states, zero_states
from compute.dictionaries.kinds import SAE
from compute.tasks import Encoded
from schema.sites import ERROR, Site
from schema.tables import ERROR_MODES

ABLATIONS = ("mean", "zero", "resample")
# |F(model) - F(empty)| at most this much (relative to |F(model)|, at least 1): splicing reproduces
# the model to float32 rounding, so a smaller gap is no ablation effect, and dividing by it
# would turn rounding into faithfulness values
SAME = 1e-4


@dataclass(frozen=True)
class NodeSet:
    """Kept nodes: a feature mask per submodule ([d_sae], or [T, d_sae] for per-position
    nodes) and whether its error term is kept ([] or [T])."""

    features: dict[str, torch.Tensor]
    errors: dict[str, torch.Tensor]

    def complement(self) -> NodeSet:
        return NodeSet({k: ~v for k, v in self.features.items()}, {k: ~v for k, v in self.errors.items()})

    @property
    def size(self) -> int:
        return sum(int(v.sum()) for v in self.features.values()) + sum(int(v.sum()) for v in self.errors.values())


def node_set(subs: list[Site], dicts: dict[str, SAE], nodes, length: int | None = None) -> NodeSet:
    """A NodeSet from (submodule name, feature index or ERROR[, position]) keys; per-position
    keys (position not None) need the prompts' `length`."""
    shape = () if length is None else (length,)
    on = {s.name: dicts[s.name].W_dec.device for s in subs}  # where the dictionaries (and the model) are
    feats = {s.name: torch.zeros(*shape, dicts[s.name].d_sae, dtype=torch.bool, device=on[s.name]) for s in subs}
    errs = {s.name: torch.zeros(shape, dtype=torch.bool, device=on[s.name]) for s in subs}
    for name, i, *pos in nodes:
        at = pos[0] if pos and pos[0] is not None else ...
        if at is not ... and length is None:
            raise ValueError("per-position nodes need the prompt length")
        if i == ERROR:
            errs[name][at] = True
        else:
            feats[name][at, i] = True
    return NodeSet(feats, errs)


def everything(subs: list[Site], dicts: dict[str, SAE]) -> NodeSet:
    return node_set(subs, dicts, []).complement()


def ablated_states(clean: dict[str, State], ablation: str, dicts: dict[str, SAE]) -> dict[str, State]:
    """The value each node takes when it is ablated, per submodule."""
    if ablation == "zero":
        return zero_states(clean, dicts)
    out = {}
    for name, s in clean.items():
        if ablation == "mean":
            out[name] = State(*(t.mean(0, keepdim=True).expand_as(t) for t in (s.x, s.f, s.err)))
        elif ablation == "resample":
            out[name] = State(*(t.roll(1, 0) for t in (s.x, s.f, s.err)))
        else:
            raise ValueError(f"unknown ablation {ablation!r}; choose from {', '.join(ABLATIONS)}")
    return out


def ablation_hooks(subs: list[Site], dicts: dict[str, SAE], keep: NodeSet | list[NodeSet],
                   ablated: dict[str, State], errors: str = "node") -> list:
    """Forward hooks that splice each dictionary in and set the nodes outside `keep` to their
    ablated value (features and error terms recomputed from the already modified input).

    Given K node sets, the batch is the prompts repeated K times (set k's rows are the k-th
    block of B rows), so one forward pass measures every set."""
    if errors not in ERROR_MODES:
        raise ValueError(f"unknown error mode {errors!r}; choose from {', '.join(ERROR_MODES)}")
    keeps = [keep] if isinstance(keep, NodeSet) else keep
    feats = {s.name: torch.stack([k.features[s.name] for k in keeps]) for s in subs}  # [K, (T,) d_sae]
    errs = {s.name: torch.stack([k.errors[s.name] for k in keeps]) for s in subs}  # [K, (T)]

    def splice(x, hook, s: Site):
        sae, abl = dicts[s.name], ablated[s.name]
        mask, keep_err = feats[s.name], errs[s.name]
        per_position = mask.dim() == 3
        x = x.view(len(keeps), -1, *x.shape[1:])  # [K, B, T, d]
        f = sae.encode(x)
        kept = torch.where(mask[:, None] if per_position else mask[:, None, None], f, abl.f)
        if errors == "removed":
            out = sae.decode(kept)
        elif errors == "ablated" or errors == "node" and not keep_err.any():
            out = sae.decode(kept) + abl.err
        else:
            # the error term x - decode(f) kept: decode(kept) + x - decode(f), one decoder product
            # as decode is affine
            out = x + (kept - f) @ sae.W_dec
            if errors == "node" and not keep_err.all():  # some sets (or positions) ablate it
                where = keep_err[:, None, :, None] if per_position else keep_err[:, None, None, None]
                out = torch.where(where, out, sae.decode(kept) + abl.err)
        return out.flatten(0, 1)

    return [(s.hook_name, partial(splice, s=s)) for s in subs]


# Node sets measured per forward pass: at most this many values in the widest feature tensor of a
# pass (8 MiB in float32). The sweep is compute-bound on a CPU, so more sets per pass do not help:
# on the zoo (ioi, 64 examples) one set per pass took 5.3 s, 2 sets 4.4 s, 4 sets 4.2 s, 8 sets 4.6 s.
SET_BUDGET = 2**21


@torch.no_grad()
def ablated_metrics(model, subs: list[Site], dicts: dict[str, SAE], tokens: torch.Tensor, batch,
                    keeps: list[NodeSet], ablated: dict[str, State], errors: str = "node") -> torch.Tensor:
    """Metric per node set and example [K, B] with the nodes outside each set ablated: the sets
    share forward passes (as many per pass as `SET_BUDGET` allows)."""
    widest = max(dicts[s.name].d_sae for s in subs)
    per_pass = max(1, SET_BUDGET // (tokens.numel() * widest))
    out = []
    for i in range(0, len(keeps), per_pass):
        chunk = keeps[i : i + per_pass]
        hooks = ablation_hooks(subs, dicts, chunk, ablated, errors)
        logits = model.run_with_hooks(tokens.repeat(len(chunk), 1), fwd_hooks=hooks)
        out.append(batch_metric(logits, batch, repeat=len(chunk)).view(len(chunk), -1))
    return torch.cat(out)


def ablated_metric(model, subs: list[Site], dicts: dict[str, SAE], tokens: torch.Tensor, batch,
                   keep: NodeSet, ablated: dict[str, State], errors: str = "node") -> torch.Tensor:
    """Metric per example with the nodes outside `keep` ablated."""
    return ablated_metrics(model, subs, dicts, tokens, batch, [keep], ablated, errors)[0]


@dataclass
class Curve:
    """Faithfulness and completeness at each node threshold, for one ablation and error mode.

    When the ablation changes nothing (F(model) = F(empty), e.g. mean or resample ablation of
    a single example) the ratios have no denominator: the value lists are empty and `note`
    says why, so that nothing downstream stores NaN."""

    ablation: str
    errors: str
    thresholds: list[float]
    n_nodes: list[int]
    faithfulness: list[float]
    completeness: list[float]
    random: list[float]  # faithfulness of random node sets of the same sizes (mean of draws; empty: none drawn)
    f_model: float
    f_empty: float
    note: str | None = None

    @property
    def computed(self) -> bool:
        return self.note is None


def threshold_sets(subs, dicts, effects: dict[tuple, float], thresholds: list[float],
                   length: int | None = None) -> list[NodeSet]:
    """The node set kept at each threshold (|effect| > threshold)."""
    return [node_set(subs, dicts, [k for k, e in effects.items() if abs(e) > t], length) for t in thresholds]


def random_sets(subs, dicts, effects: dict[tuple, float], sizes: list[int], draws: int,
                seed: int = 0, length: int | None = None) -> list[list[NodeSet]]:
    """`draws` random node sets of each size, drawn from the nodes with a nonzero effect."""
    rng = np.random.default_rng(seed)
    pool = list(effects)
    return [[node_set(subs, dicts, [pool[i] for i in rng.choice(len(pool), min(n, len(pool)), replace=False)],
                      length)
             for _ in range(draws)] for n in sizes]


def prompt_length(effects: dict[tuple, float], data: Encoded) -> int | None:
    """The single prompt length per-position node keys refer to (None for aggregated keys)."""
    if not any(len(k) > 2 and k[2] is not None for k in effects):
        return None
    lengths = {b.clean.shape[1] for b in data.batches}
    if len(lengths) != 1:
        raise ValueError("per-position nodes need examples of one length")
    return lengths.pop()


def sweep_thresholds(effects: dict[tuple, float], chosen: float, factor: int = 2) -> list[float]:
    """Thresholds that keep 0, 1, 2, 4, ... (`factor` 4: 1, 4, 16, ...) and all nodes, plus the chosen
    one (descending)."""
    mags = sorted((abs(e) for e in effects.values()), reverse=True)
    points = {chosen, 0.0}
    if mags:
        points.add(mags[0])
    k = 1
    while k < len(mags):
        points.add((mags[k - 1] + mags[k]) / 2)
        k *= factor
    return sorted(points, reverse=True)


@torch.no_grad()
def curves(model, subs: list[Site], dicts: dict[str, SAE], data: Encoded,
           effects: dict[tuple, float], thresholds: list[float],
           ablations: tuple[str, ...] = ABLATIONS, errors: str = "node",
           random_draws: int = 3, progress: bool = False) -> list[Curve]:
    """Faithfulness/completeness curves over `thresholds` for each ablation.

    `effects` maps (submodule name, feature index or ERROR, position or None) to the
    node's effect.
    """
    length = prompt_length(effects, data)
    sets = threshold_sets(subs, dicts, effects, thresholds, length)
    sizes = [s.size for s in sets]
    rand = random_sets(subs, dicts, effects, sizes, random_draws, length=length)
    empty = node_set(subs, dicts, [], length)
    every = [empty, *sets, *(x.complement() for x in sets), *(r for draws in rand for r in draws)]
    out = []
    for ablation in tqdm(ablations, desc="faithfulness", disable=hidden(progress), leave=False):
        f_model, totals = _summed_metrics(model, subs, dicts, data, every, ablation, errors)
        n, k = data.n_examples, len(sets)
        fm, fe = f_model / n, totals[0] / n
        faith, comp = totals[1 : 1 + k], totals[1 + k : 1 + 2 * k]
        rnd = totals[1 + 2 * k :].reshape(k, random_draws).mean(1) if random_draws else np.zeros(0)
        scale = fm - fe
        if abs(scale) <= SAME * max(1.0, abs(fm)):
            out.append(Curve(ablation, errors, list(thresholds), sizes, [], [], [], fm, fe,
                             note=_unchanged(ablation, data)))
            continue

        def norm(v: np.ndarray, n=n, fe=fe, scale=scale) -> list[float]:
            return ((v / n - fe) / scale).tolist()

        out.append(Curve(ablation, errors, list(thresholds), sizes, norm(faith), norm(comp), norm(rnd), fm, fe))
    return out


def _summed_metrics(model, subs, dicts, data: Encoded, sets: list[NodeSet], ablation: str,
                    errors: str) -> tuple[float, np.ndarray]:
    """(the model's metric, the metric with each set kept and the rest ablated), summed over examples."""
    f_model, totals = 0.0, np.zeros(len(sets))
    for b in data.batches:
        abl = ablated_states(states(model, subs, dicts, b.clean), ablation, dicts)
        f_model += batch_metric(model(b.clean), b).sum().item()
        totals += ablated_metrics(model, subs, dicts, b.clean, b, sets, abl, errors).sum(1).cpu().double().numpy()
    return f_model, totals


@torch.no_grad()
def set_faithfulness(model, subs: list[Site], dicts: dict[str, SAE], data: Encoded, keep: NodeSet,
                     ablation: str = "mean", errors: str = "node") -> tuple[float, float]:
    """(faithfulness of one node set, faithfulness of its complement): (F(set) - F(empty)) / (F(model) -
    F(empty)) with the nodes outside the set ablated, as the curves measure each threshold's set."""
    f_model, totals = _summed_metrics(model, subs, dicts, data, [node_set(subs, dicts, []), keep, keep.complement()],
                                      ablation, errors)
    fm, (fe, f_set, f_rest) = f_model / data.n_examples, totals / data.n_examples
    if abs(fm - fe) <= SAME * max(1.0, abs(fm)):
        raise ValueError(_unchanged(ablation, data))
    return float((f_set - fe) / (fm - fe)), float((f_rest - fe) / (fm - fe))


def _unchanged(ablation: str, data: Encoded) -> str:
    """Why faithfulness under `ablation` cannot be computed: ablating every node leaves the metric."""
    why = f"{ablation} ablation of every node leaves the metric unchanged (F(model) = F(empty))"
    if ablation in ("mean", "resample") and all(len(b) == 1 for b in data.batches):
        why += "; each prompt length has one example, which is its own mean and its own resample"
    return why


def nodes_for(curve: Curve, level: float = 0.8) -> int | None:
    """Fewest nodes at which faithfulness reaches `level` on this curve (None if never)."""
    hits = [n for n, v in zip(curve.n_nodes, curve.faithfulness, strict=True) if v >= level]
    return min(hits) if hits else None
