"""Circuit discovery: node effects, thresholds, then edges among the kept nodes.

Node effects come from integrated gradients (`ig`), attribution patching
(`atp`) or exact activation patching (`exact`, one forward per node: the ground
truth, and the slowest). A task without patch prompts uses zero ablation as its patch state and
-logit(answer) as its metric. Effects are averaged over examples and either summed over
positions (`sum` aggregation: a node is a feature) or kept per position (`none`: a node is
a feature at a token position; the examples must share one length, see
`tasks.encode(one_length=True)`). A node is in the circuit when |effect| > node_threshold;
edges are computed for every node kept after aggregation and kept when |weight| >
edge_threshold. The last resid's kept nodes get an edge to the metric node whose
weight is their effect.

Every circuit is then evaluated (`compute.attribution.faithfulness`): faithfulness and
completeness over a sweep of node thresholds for each ablation, with random
node sets of the same sizes as a baseline.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from catalog.errors import UserError
from catalog.progress import hidden
from compute.attribution.atp import node_effects
from compute.attribution.budget import examples_per_batch, kept_bytes
from compute.attribution.edges import edge_pairs, edge_weights
from compute.attribution.faithfulness import ABLATIONS, ERROR_MODES, Curve, curves, sweep_thresholds
from compute.attribution.ig import RULES, ig_grads
from compute.attribution.patching import joint_effects, patch_effects, set_effects
from compute.attribution.spliced import (
    batch_metric,
    clean_and_patch,
    logits_with_output,
    spliced_pass,
    zero_states,
)
from compute.dictionaries.kinds import SAE
from compute.tasks import Encoded, model_device
from schema.sites import ERROR, Site

METHODS = ("ig", "atp", "exact")
FULL_EVALUATION = {"ablations": ABLATIONS, "random_draws": 3, "sweep_factor": 2}
AGGREGATIONS = ("sum", "none")


@dataclass(frozen=True)
class DiscoveryParams:
    method: str = "ig"
    ig_steps: int = 20  # with the midpoint rule, complete to 1% on every zoo task and submodule (bench/ig_rules.py)
    ig_rule: str = "midpoint"
    node_threshold: float = 0.1
    edge_threshold: float = 0.01
    aggregation: str = "sum"
    n_examples: int = 64
    edge_chunk: int = 64  # downstream nodes per edge pass (memory is bounded by edges.PIECE_BUDGET)
    # evaluation: mean ablation and one random draw per size by default, which costs less than discovery
    # (bench/attribution.py); FULL_EVALUATION is all three ablations and three draws. () skips it.
    ablations: tuple[str, ...] = ("mean",)
    errors: str = "node"  # error terms in the evaluation: node, kept, ablated or removed
    random_draws: int = 1
    sweep_factor: int = 4  # the sweep keeps 1, 4, 16, ... nodes (FULL_EVALUATION: 1, 2, 4, ...)
    max_memory: float | None = None  # bytes: batches sized to it, states recomputed for edges beyond it

    def __post_init__(self):
        """Refuse settings that would silently give wrong numbers (NaN effects from 0 steps, a
        negative example count that slices from the end, a NaN threshold that keeps nothing)."""
        for name, value, choices in (("method", self.method, METHODS), ("aggregation", self.aggregation, AGGREGATIONS),
                                     ("errors", self.errors, ERROR_MODES), ("IG rule", self.ig_rule, RULES)):
            if value not in choices:
                raise UserError(f"unknown {name} {value!r}; choose from {', '.join(choices)}")
        bad = sorted(set(self.ablations) - set(ABLATIONS))
        if bad:
            raise UserError(f"unknown ablation {bad[0]!r}; choose from {', '.join(ABLATIONS)}")
        if not isinstance(self.sweep_factor, int) or self.sweep_factor < 2:
            raise UserError(f"sweep_factor must be a whole number >= 2, not {self.sweep_factor!r}")
        for name in ("ig_steps", "n_examples", "edge_chunk"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise UserError(f"{name} must be a whole number >= 1, not {getattr(self, name)!r}")
        if self.max_memory is not None and not (isinstance(self.max_memory, int | float) and self.max_memory > 0):
            raise UserError(f"max_memory must be a number of bytes above 0, not {self.max_memory!r}")
        if not isinstance(self.random_draws, int) or self.random_draws < 0:
            raise UserError(f"random_draws must be a whole number >= 0, not {self.random_draws!r}")
        for name in ("node_threshold", "edge_threshold"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise UserError(f"{name} must be a finite number >= 0, not {value!r}")


@dataclass
class Node:
    site: Site | None  # None for the metric node
    feature: int | None  # None for error terms and the metric node
    effect: float
    in_circuit: bool
    position: int | None = None  # token position under aggregation `none`


@dataclass
class Circuit:
    """A discovered circuit: every node with a nonzero effect, and edges among kept nodes."""

    params: DiscoveryParams
    nodes: list[Node]
    edges: list[tuple[int, int, float]]  # (src node_idx, dst node_idx, weight)
    n_examples: int
    metric_clean: float
    metric_patch: float
    dropped: dict[str, int] = field(default_factory=dict)
    clean_features: list[tuple[int, str, torch.Tensor]] = field(default_factory=list)
    curves: list[Curve] = field(default_factory=list)
    joint_effects: dict[str, float] = field(default_factory=dict)  # submodule -> effect of patching it whole
    # (submodule, n) -> (sum of the method's effects over the submodule's n strongest nodes, the effect of
    # patching those n at once), for n = 1, 2, 4, ... below the submodule's node count
    nested: dict[tuple[str, int], tuple[float, float]] = field(default_factory=dict)

    @property
    def total_effect(self) -> float:
        return self.metric_patch - self.metric_clean

    def effects(self) -> dict[tuple[str, int, int | None], float]:
        """(submodule name, feature index or ERROR, position or None) -> effect, for every node
        but the metric."""
        return {(n.site.name, ERROR if n.feature is None else n.feature, n.position): n.effect
                for n in self.nodes if n.site is not None}

    def at_threshold(self, ablation: str = "mean") -> tuple[float, float] | None:
        """(faithfulness, completeness) at the circuit's own node threshold, if evaluated."""
        for c in self.curves:
            if c.ablation == ablation and c.computed:
                j = c.thresholds.index(self.params.node_threshold)
                return c.faithfulness[j], c.completeness[j]
        return None

    def completeness_checks(self) -> list[tuple[str, int, float, float]]:
        """(submodule, nodes, sum of their effects, effect of patching the submodule whole) for
        every submodule, when evaluated: the method's effects are complete where the two agree."""
        out = []
        for name, joint in self.joint_effects.items():
            effects = [n.effect for n in self.nodes if n.site is not None and n.site.name == name]
            out.append((name, len(effects), sum(effects), joint))
        return out

    def ranked_sets(self, site: str) -> list[tuple[int, list[Node]]]:
        """The nested sets of a submodule in the method's own ranking (|effect|, strongest first): the top
        1, 2, 4, ... nodes, below the submodule's node count (the whole is the completeness check)."""
        ranked = sorted((n for n in self.nodes if n.site is not None and n.site.name == site),
                        key=lambda n: -abs(n.effect))
        sizes = [2**k for k in range(max(len(ranked) - 1, 1).bit_length()) if 2**k < len(ranked)]
        return [(k, ranked[:k]) for k in sizes]

    @property
    def evaluation_note(self) -> str | None:
        """Why some evaluation could not be computed (None when every curve was)."""
        notes = [c.note for c in self.curves if not c.computed]
        return "; ".join(notes) if notes else None


def discover(model, subs: list[Site], dicts: dict[str, SAE], data: Encoded,
             params: DiscoveryParams, progress: bool = True) -> Circuit:
    n = data.n_examples
    if n == 0:
        raise ValueError("no usable examples")
    spliced_elsewhere = [s.name for s in subs if dicts[s.name].hook_name not in ("", s.hook_name)]
    if spliced_elsewhere:
        raise UserError(f"dictionaries for {', '.join(spliced_elsewhere)} read another hook than they write "
                        "(transcoders); circuits are discovered over SAEs and identity dictionaries")
    per_position = params.aggregation == "none"
    lengths = {b.clean.shape[1] for b in data.batches}
    if per_position and len(lengths) != 1:
        raise ValueError("aggregation none needs examples of one length (encode with one_length=True)")
    shape = (lengths.pop(),) if per_position else ()
    # sums over batches, in float64 on the CPU (what an accelerator hands back each batch is small)
    feat_eff = {s.name: torch.zeros(*shape, dicts[s.name].d_sae, dtype=torch.float64) for s in subs}
    err_eff = {s.name: torch.zeros(shape, dtype=torch.float64) for s in subs}
    summed = (0,) if per_position else (0, 1)  # over examples (and positions)
    evaluated, keep = data, True
    if params.max_memory is not None:  # batches sized to the budget; states kept for the edges only if they fit
        steps = params.ig_steps if params.method == "ig" else 1
        data = data.rebatched(lambda length: examples_per_batch(model.cfg, dicts, length, steps, params.max_memory))
        tokens = sum(b.clean.numel() for b in data.batches)
        keep = kept_bytes(dicts, model.cfg.d_model, tokens) <= params.max_memory / 2
    per_batch = []
    m_clean = m_patch = 0.0
    clean_features = []
    bar = tqdm(total=n, desc=f"{params.method} node effects", unit="example", disable=hidden(progress), leave=False)
    for batch in data.batches:
        clean, patch, grads, mc, mp = _batch_pass(model, subs, dicts, batch, params)
        m_clean, m_patch = m_clean + mc, m_patch + mp
        for s in subs:
            if params.method == "exact":
                _exact(model, s, dicts[s.name], batch, clean[s.name], patch[s.name], per_position,
                       feat_eff[s.name], err_eff[s.name])
            else:
                fe, ee = node_effects(dicts[s.name], clean[s.name], patch[s.name], grads[s.name])
                feat_eff[s.name] += fe.sum(summed).cpu()
                err_eff[s.name] += ee.sum(summed).cpu()
            # kept on the CPU (what the catalogue is written from); beyond the budget only the nonzero values
            f = clean[s.name].f
            clean_features.append((batch.example_idx, s.name, (f if keep else f.to_sparse()).cpu()))
        per_batch.append((batch, clean, patch, grads) if keep else (batch,))
        bar.update(len(batch))
    bar.close()

    def replay() -> Iterator[tuple]:
        """Every batch with its states: kept from the node pass, or computed again (beyond the budget)."""
        for item in per_batch:
            yield item if len(item) == 4 else (item[0], *_batch_pass(model, subs, dicts, item[0], params)[:3])

    nodes: list[Node] = []
    index: dict[tuple, int] = {}  # (submodule name, feature or ERROR, position) -> node index
    kept: dict[str, list[tuple[int, int | None]]] = {}  # submodule -> (feature or ERROR, position)
    for s in subs:
        kept[s.name] = []
        eff = torch.cat([feat_eff[s.name], err_eff[s.name].unsqueeze(-1)], -1) / n  # error term last
        for *at, i in eff.nonzero().tolist():
            key = (ERROR if i == eff.shape[-1] - 1 else i, at[0] if at else None)
            effect = eff[(*at, i)].item()
            index[(s.name, *key)] = len(nodes)
            nodes.append(Node(s, None if key[0] == ERROR else i, effect, abs(effect) > params.node_threshold,
                              key[1]))
            if nodes[-1].in_circuit:
                kept[s.name].append(key)
    metric_idx = len(nodes)
    nodes.append(Node(None, None, (m_patch - m_clean) / n, True))

    edges = list(_edges(model, subs, dicts, replay, kept, index, n, params, progress))
    last = subs[-1].name
    for key in kept[last]:
        i = index[(last, *key)]
        edges.append((i, metric_idx, nodes[i].effect))
    circuit = Circuit(params, nodes, edges, n, m_clean / n, m_patch / n, dict(data.dropped), clean_features)
    if params.ablations:
        _joint_and_nested(model, subs, dicts, replay, circuit, n, per_position)
        effects = circuit.effects()
        circuit.curves = curves(model, subs, dicts, evaluated, effects,
                                sweep_thresholds(effects, params.node_threshold, params.sweep_factor), params.ablations,
                                params.errors, params.random_draws, progress)
    return circuit


def _batch_pass(model, subs: list[Site], dicts: dict[str, SAE], batch, params: DiscoveryParams):
    """One batch's clean and patch states, the gradients the method uses, and the summed clean and
    patch metrics: one spliced pass over both prompt sets (and, for IG, its integration steps)."""
    with_grads = params.method != "ig"
    if batch.patch is not None:
        run, on_patch = clean_and_patch(model, subs, dicts, batch, grads=with_grads)
        clean, patch = run.states, on_patch.states
        m_patch = on_patch.metric.sum().item()
    else:  # zero ablation: the last submodule outputs decode(0), so nothing else matters
        run = spliced_pass(model, subs, dicts, batch.clean, batch, grads=with_grads)
        clean, patch = run.states, zero_states(run.states, dicts)
        with torch.no_grad():
            logits = logits_with_output(model, subs[-1], patch[subs[-1].name].x, subs, clean, batch.clean, 1)
        m_patch = batch_metric(logits, batch).sum().item()
    if params.method == "ig":
        grads = ig_grads(model, subs, dicts, batch, clean, patch, params.ig_steps, params.ig_rule)
    else:  # AtP's gradients, from the clean pass; exact patching measures nodes directly,
        grads = run.grads  # and its edges use these gradients
    return clean, patch, grads, run.metric.sum().item(), m_patch


def _joint_and_nested(model, subs: list[Site], dicts: dict[str, SAE], replay, circuit: Circuit, n: int,
                      per_position: bool) -> None:
    """Measure every submodule patched whole (the completeness check) and, for sum-aggregated nodes, its
    nested sets patched at once beside the method's predicted change (a per-position set would mix
    positions). One pass over the batches, so a batch recomputed under a memory budget is computed once."""
    ranked = {} if per_position else {s.name: r for s in subs if (r := circuit.ranked_sets(s.name))}
    sets = {name: [([m.feature for m in nodes if m.feature is not None], any(m.feature is None for m in nodes))
                   for _, nodes in r] for name, r in ranked.items()}
    measured = {name: torch.zeros(len(v), dtype=torch.float64) for name, v in sets.items()}
    for batch, clean, patch, _ in replay():
        for name, v in joint_effects(model, subs, batch, clean, patch).items():
            circuit.joint_effects[name] = circuit.joint_effects.get(name, 0.0) + v / n
        for s in subs:
            if s.name in sets:
                measured[s.name] += set_effects(model, s, dicts[s.name], batch, clean[s.name], patch[s.name],
                                                sets[s.name]).cpu()
    for name, r in ranked.items():
        for (k, nodes), m in zip(r, (measured[name] / n).tolist(), strict=True):
            circuit.nested[(name, k)] = (sum(x.effect for x in nodes), m)


def _exact(model, s: Site, sae: SAE, batch, clean, patch, per_position: bool,
           feat_eff: torch.Tensor, err_eff: torch.Tensor) -> None:
    """Add the exact patching effect of every node whose clean and patch values differ."""
    moved = (patch.f != clean.f).any(0)  # [T, d_sae]
    if per_position:
        at = moved.nonzero().tolist()  # (position, feature)
        length = moved.shape[0]
        eff = patch_effects(model, s, sae, batch, clean, patch, [i for _, i in at] + [None] * length,
                            [t for t, _ in at] + list(range(length))).cpu()
        for (t, i), v in zip(at, eff[: len(at)].tolist(), strict=True):
            feat_eff[t, i] += v
        err_eff += eff[len(at):]
    else:
        ids = moved.any(0).nonzero().flatten().tolist()
        eff = patch_effects(model, s, sae, batch, clean, patch, ids + [None]).cpu()
        feat_eff[ids] += eff[:-1]
        err_eff += eff[-1]


def _edges(model, subs, dicts, replay, kept, index, n, params: DiscoveryParams,
           progress: bool) -> Iterator[tuple[int, int, float]]:
    """Edge weights among kept nodes of every edge type, summed batch by batch (each batch's states
    used once, so a batch recomputed under a memory budget is computed once)."""
    per_position = params.aggregation == "none"
    pairs = [p for p in edge_pairs(subs, model.cfg.parallel_attn_mlp) if kept[p.up.name] and kept[p.down.name]]
    totals = [torch.zeros(len(kept[p.down.name]), len(kept[p.up.name]), dtype=torch.float64) for p in pairs]

    on = model_device(model)

    def ids_and_positions(nodes: list[tuple[int, int | None]]) -> tuple[torch.Tensor, torch.Tensor | None]:
        return (torch.tensor([i for i, _ in nodes], device=on),
                torch.tensor([t for _, t in nodes], device=on) if per_position else None)

    ends = [(ids_and_positions(kept[p.up.name]), ids_and_positions(kept[p.down.name])) for p in pairs]
    bar = tqdm(total=len(pairs) * n, desc="edges", unit="example", disable=hidden(progress and bool(pairs)), leave=False)
    for batch, clean, patch, grads in replay():
        for pair, total, ((up_ids, up_pos), (down_ids, down_pos)) in zip(pairs, totals, ends, strict=True):
            row = 0
            for ids, w in edge_weights(model, pair, dicts, batch, clean, patch, grads[pair.down.name], up_ids,
                                       down_ids, params.edge_chunk, up_pos, down_pos):
                total[row : row + len(ids)] += w.cpu()
                row += len(ids)
            bar.update(len(batch))
    bar.close()
    for pair, total in zip(pairs, totals, strict=True):
        up, down = kept[pair.up.name], kept[pair.down.name]
        total /= n
        rows, cols = (total.abs() > params.edge_threshold).nonzero(as_tuple=True)
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            yield (index[(pair.up.name, *up[c])], index[(pair.down.name, *down[r])], total[r, c].item())
