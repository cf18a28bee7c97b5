"""Attribution in the local replacement model: direct contributions, hierarchical attribution, OV edges.

A target is a scalar of the replacement model on the prompt: a feature's pre-activation at a
position, a logit, or a logit difference. Every node u has a value a_u and writes a_u w_u
into the residual stream; the target's gradient g there gives the node's attribution a_u w_u . g.

- **Direct contributions** stop the gradient at every feature: only paths through no other
  node count, so they are the graph's edges into the target, and with the bias (the target
  when every node is 0) they sum exactly to the target.
- **Hierarchical attribution** (Ge et al. 2024) lets the gradient through features, and
  detaches, during the backward pass, each feature whose attribution is under `threshold`:
  only paths through important nodes count. Threshold 0 keeps every path (one backward
  through the linearised model: the total attribution); an infinite threshold keeps none
  (the direct contributions).
- **OV edges** split a direct contribution into an attention feature per head and source
  position: a_u x pattern[h, d, s] x (w_u . frozen LN . W_V[h] W_O[h] . encoder row).

Targets are batched. Direct contributions come from reading vectors, with no backward pass
(see `attribute`); hierarchical attribution runs one copy of the prompt per target, each with
its own detachments. Memory grows with the targets in a batch and the active nodes, never with
nodes x nodes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from catalog.errors import UserError
from catalog.progress import hidden
from compute.local.replacement import EMBED, Replacement, Trace
from schema.sites import attention_hook, parse_site_name, site_name, transcoder_input

DIRECT = math.inf  # the threshold of direct contributions: every feature detached


@dataclass(frozen=True)
class Target:
    """A scalar to explain: a feature's pre-activation (`site`, `feature`, `position`), a logit
    (`site` "logit", `feature` the token) or a logit difference (`minus` the token subtracted)."""

    site: str
    feature: int
    position: int
    minus: int | None = None

    @property
    def component_layer(self) -> tuple[str, int]:
        return ("logit", -1) if self.site == "logit" else parse_site_name(self.site)


def feature_target(rep: Replacement, site: str, feature: int, position: int) -> Target:
    """A feature of one of the replacement model's dictionaries at a position, checked."""
    if site not in rep.dicts:
        raise UserError(f"no dictionary at {site!r}; choose from {', '.join(rep.order)}")
    d_sae = rep.dicts[site].sae.d_sae
    if not 0 <= feature < d_sae:
        raise UserError(f"{site} has features 0..{d_sae - 1}; got {feature}")
    return Target(site, feature, _position(rep, position))


def logit_target(rep: Replacement, token: int, minus: int | None = None, position: int = -1) -> Target:
    """A logit (or logit difference) at a position (the last by default)."""
    return Target("logit", int(token), _position(rep, position), None if minus is None else int(minus))


def _position(rep: Replacement, position: int) -> int:
    p = position + rep.n_pos if position < 0 else position
    if not 0 <= p < rep.n_pos:
        raise UserError(f"position {position} is outside the prompt's {rep.n_pos} tokens")
    return p


@dataclass
class Attribution:
    """Per target (rows) and node (columns, `rep.nodes` order): the attribution; each target's
    value, and its bias (the value with every node at 0; with direct contributions, value =
    bias + the row's sum)."""

    scores: torch.Tensor  # [targets, nodes]
    values: torch.Tensor  # [targets]
    bias: torch.Tensor | None  # [targets], only for direct contributions
    ov: torch.Tensor | None = None  # [targets, nodes, heads]: direct contributions per head (attention targets)


ENGINES = ("readers", "autograd")


def attribute(rep: Replacement, targets: list[Target], threshold: float = DIRECT, batch_size: int = 32,
              ov: bool = False, progress: bool = False, engine: str = "readers", values: bool = True) -> Attribution:
    """Attribute each target to every node (direct contributions by default; a finite threshold
    gives hierarchical attribution), `batch_size` targets at a time. With `ov`, direct
    contributions into attention features are also split per head.

    Direct contributions are computed from reading vectors (engine "readers", see `_readers`):
    each target's encoder row carried back through its own frozen LayerNorm (and, for an
    attention feature, W_O, W_V and the pattern) to the residual stream, dotted with every
    upstream node's write vector, with no backward pass at all. Engine "autograd" gets them from
    the frozen replacement model's backward pass instead: one forward of one copy of the prompt
    and a vectorised backward per batch (`is_grads_batched`); it is the readers' independent
    reference in the tests, and what a dictionary read through another hook falls back to.
    Hierarchical attribution's backward hooks see one target per row: `batch_size` copies.
    Without `values`, reading vectors skip the trace that measures the targets' values and biases
    (a graph's edges need only the contributions): they are then NaN."""
    from tqdm.auto import tqdm

    direct = threshold == DIRECT
    if ov and not direct:
        raise ValueError("OV edges are direct contributions: use threshold=DIRECT")
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r}: choose from {', '.join(ENGINES)}")
    if direct and engine == "readers" and _readable(rep, targets):
        return _attribute_by_readers(rep, targets, batch_size, ov, progress, values)
    on = rep.device
    scores = rep.zeros(len(targets), len(rep.nodes))
    per_head = rep.zeros(len(targets), len(rep.nodes), rep.model.cfg.n_heads) if ov else None
    values = rep.zeros(len(targets))
    batch = min(batch_size, max(1, len(targets)))
    recorded: dict[str, torch.Tensor] = {}
    t = rep.trace(1, "direct") if direct else rep.trace(batch, "live", _gate(rep, threshold, recorded))
    sites = t.outputs if direct else t.errors
    leaves = [t.embed, *(sites[n] for n in rep.order)]
    z_layers = [i for i in sorted(t.z) if site_name("attn", i) in rep.dicts] if ov else []
    wanted = leaves + [t.z[i] for i in z_layers]
    starts = range(0, len(targets), batch)
    for start in tqdm(starts, desc="attributing", unit="batch", disable=hidden(progress and len(starts) > 1)):
        chunk = targets[start:start + batch]
        rows = slice(start, start + len(chunk))
        recorded.clear()
        if direct:  # every target reads the one copy; row i of the batched gradient is target i's
            value = _values(rep, t, chunk, torch.zeros(len(chunk), dtype=torch.long, device=on))
            grads = torch.autograd.grad(value, wanted, grad_outputs=torch.eye(len(chunk), device=on), is_grads_batched=True,
                                        retain_graph=True, allow_unused=True)
            grads = [None if g is None else g[:, 0] for g in grads]
        else:  # each copy carries its own target
            value = _values(rep, t, chunk, torch.arange(len(chunk), device=on))
            grads = torch.autograd.grad(value.sum(), wanted, retain_graph=True, allow_unused=True)
            grads = [None if g is None else g[:len(chunk)] for g in grads]
        values[rows] = value.detach()
        scores[rows] = _node_scores(rep, grads[:len(leaves)], recorded, direct, len(chunk))
        if ov:
            z_grads = {i: torch.zeros_like(t.z[i][:1]).expand(len(chunk), -1, -1, -1) if g is None else g
                       for i, g in zip(z_layers, grads[len(leaves):], strict=True)}
            per_head[rows] = _ov(rep, z_grads, chunk)
    return _on_cpu(Attribution(scores, values, _bias(rep, targets) if direct else None, per_head))


def _on_cpu(a: Attribution) -> Attribution:
    """An attribution computed where the model is, handed back on the CPU (graphs are chosen and
    written from it), half precision as float32."""
    return Attribution(*(None if t is None else t.cpu().to(torch.promote_types(t.dtype, torch.float32))
                         for t in (a.scores, a.values, a.bias, a.ov)))


def _readable(rep: Replacement, targets: list[Target]) -> bool:
    """Whether every target's reading vector is known: logits, attention features, and features of
    transcoders that read the MLP's normalised input or the stream itself, in a model whose
    attention outputs are all nodes (a frozen attention path carries a target's reading to every
    earlier position, and a skip connection to the stream its transcoder reads: the backward pass
    follows them)."""
    if rep.frozen_attention or rep.skips:
        return False
    for tg in targets:
        component, layer = tg.component_layer
        if component == "mlp" and transcoder_input(rep.dicts[tg.site].hook_in, layer) is None:
            return False
    return True


def _attribute_by_readers(rep: Replacement, targets: list[Target], batch_size: int, ov: bool,
                          progress: bool, values: bool = True) -> Attribution:
    from tqdm.auto import tqdm

    n_heads = rep.model.cfg.n_heads
    scores = rep.zeros(len(targets), len(rep.nodes))
    per_head = rep.zeros(len(targets), len(rep.nodes), n_heads) if ov else None
    sites = [EMBED, *rep.order]
    starts = range(0, len(targets), batch_size)
    with torch.no_grad():
        for start in tqdm(starts, desc="attributing", unit="batch", disable=hidden(progress and len(starts) > 1)):
            chunk = targets[start:start + batch_size]
            r, r_heads = _readers(rep, chunk, ov)  # [B, pos, d], [B, pos, heads, d]
            reading = r.abs().sum(-1) > 0  # [B, pos]: where each target reads the stream
            reads = [_upstream(rep, tg) for tg in chunk]
            # a cross-layer transcoder's feature writes at several outputs: each reader sees those before it
            for reader in dict.fromkeys(map(tuple, reads)) if rep.cross else [None]:
                groups = rep.writers_by_position(None if reader is None else list(reader))
                for name in sites:
                    upstream = torch.tensor([name in reads[b] and reader in (None, tuple(reads[b]))
                                             for b in range(len(chunk))], device=rep.device)
                    for p, cols, vectors in groups[name]:
                        wanted = upstream & reading[:, p]
                        if wanted.all():  # every target reads here: slices, no gathers
                            scores[start:start + len(chunk), cols] = r[:, p] @ vectors.T
                            if ov:
                                per_head[start:start + len(chunk), cols] = torch.einsum(
                                    "bhd,nd->bnh", r_heads[:, p], vectors)
                            continue
                        rows = wanted.nonzero()[:, 0]
                        if len(rows):
                            scores[start + rows[:, None], cols] = r[rows, p] @ vectors.T
                            if ov:
                                per_head[start + rows[:, None], cols] = torch.einsum(
                                    "bhd,nd->bnh", r_heads[rows, p], vectors)
    unknown = torch.full((len(targets),), torch.nan, device=rep.device, dtype=rep.dtype)
    return _on_cpu(Attribution(scores, *(_values_and_bias(rep, targets) if values else (unknown, unknown)), per_head))


def _upstream(rep: Replacement, tg: Target) -> list[str]:
    """The sites whose nodes a target reads directly (besides the embedding)."""
    component, layer = tg.component_layer
    return [EMBED, *(rep.order if component == "logit" else rep.upstream(layer, component))]


def _readers(rep: Replacement, chunk: list[Target], per_head: bool = True
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each target's reading vector at every position of the stream it reads, [B, pos, d]; with
    `per_head`, an attention feature's also per head, [B, pos, heads, d] (zero for the other
    targets). A node's direct contribution is its write vector . the reading vector at its
    position. Targets of one component and layer are read together."""
    model, cfg = rep.model, rep.model.cfg
    on = rep.device
    r = rep.zeros(len(chunk), rep.n_pos, cfg.d_model)
    r_heads = rep.zeros(len(chunk), rep.n_pos, cfg.n_heads, cfg.d_model) if per_head else None
    groups: dict[tuple[str, int], list[int]] = {}
    for b, tg in enumerate(chunk):
        groups.setdefault(tg.component_layer, []).append(b)
    for (component, layer), rows in groups.items():
        targets = [chunk[b] for b in rows]
        rows, pos = torch.tensor(rows, device=on), torch.tensor([tg.position for tg in targets], device=on)
        feature = torch.tensor([tg.feature for tg in targets], device=on)
        if component == "logit":
            e = model.W_U[:, feature].T.clone()
            for i, tg in enumerate(targets):
                if tg.minus is not None:
                    e[i] -= model.W_U[:, tg.minus]
            r[rows, pos] = rep.normalise_transpose(e, getattr(model, "ln_final", None), rep.ln_scale(None, pos))
            continue
        d = rep.dicts[targets[0].site]
        e = d.sae.W_enc[:, feature].T  # [targets, d]
        block = model.blocks[layer]
        if component == "mlp":
            stream = transcoder_input(d.hook_in, layer) == "stream"
            r[rows, pos] = e if stream else rep.normalise_transpose(e, block.ln2, rep.ln_scale(layer, pos, "ln2"),
                                                                     weight=False)
            continue
        # attention: head h carries W_V[h] W_O[h] e from source s by pattern[h, d, s], through ln1 at s
        values = rep.normalise_transpose(_value_readers(block.attn, e), block.ln1, 1.0)  # [targets, heads, d]
        scale = rep.ln_scale(layer, torch.arange(rep.n_pos, device=on))  # [pos, 1]
        weight = rep.frozen[attention_hook(layer, "pattern")][0][:, pos, :].permute(1, 2, 0) / scale  # [t, src, h]
        if per_head:
            r_heads[rows] = weight[..., None] * values[:, None]
        r[rows] = torch.einsum("tsh,thd->tsd", weight, values)
    return r, r_heads


def _value_readers(attn, e: torch.Tensor) -> torch.Tensor:
    """What each head's value input must carry to move attention SAE encoder rows e [t, d]: W_V[h] W_O[h] e,
    [t, heads, d]."""
    return torch.einsum("hmk,thk->thm", attn.W_V, torch.einsum("hkn,tn->thk", attn.W_O, e))


@torch.no_grad()
def _values_and_bias(rep: Replacement, targets: list[Target]) -> tuple[torch.Tensor, torch.Tensor]:
    """The targets' values and biases (their values with every node at 0), from one trace."""
    if not targets:
        return rep.zeros(0), rep.zeros(0)
    t, rows = rep.trace(2, "pair"), torch.zeros(len(targets), dtype=torch.long, device=rep.device)
    return _values(rep, t, targets, rows), _values(rep, t, targets, rows + 1)


def _values(rep: Replacement, t: Trace, chunk: list[Target], rows: torch.Tensor) -> torch.Tensor:
    """Each target's value in its row of a trace, one gather per site (one per target would make
    the vectorised backward fill a copy-sized gradient for every target)."""
    out: list[torch.Tensor | None] = [None] * len(chunk)
    groups: dict[str, list[int]] = {}
    for i, tg in enumerate(chunk):
        groups.setdefault(tg.site, []).append(i)
    for site, idx in groups.items():
        row, pos = rows[idx], torch.tensor([chunk[i].position for i in idx], device=rep.device)
        feature = torch.tensor([chunk[i].feature for i in idx], device=rep.device)
        if site == "logit":
            v = t.logits[row, pos, feature]
            minus = [chunk[i].minus for i in idx]
            if any(m is not None for m in minus):
                has = torch.tensor([m is not None for m in minus], device=rep.device)
                other = t.logits[row, pos, torch.tensor([0 if m is None else m for m in minus], device=rep.device)]
                v = v - torch.where(has, other, torch.zeros_like(other))
        else:
            v = rep.pre_activation(site, t.inputs[site][row, pos], feature)
        for j, i in enumerate(idx):
            out[i] = v[j]
    return torch.stack(out)


def _gate(rep: Replacement, threshold: float, recorded: dict):
    """The live trace's gate: a backward hook on each site's features that records their
    attributions (gradient x value, per target row) and lets the gradient through only those
    that reach `threshold` (all of them at threshold 0)."""

    def gate(name, f):
        value = rep.values[name].to(f.dtype)
        pos, feat = rep.active[name][:, 0], rep.active[name][:, 1]

        def hook(g):
            attr = g * value
            recorded[name] = attr[:, pos, feat]
            return g * (attr.abs() >= threshold) if threshold > 0 else g

        if f.requires_grad:
            f.register_hook(hook)
        return f

    return gate


def _node_scores(rep: Replacement, grads: list, recorded: dict, direct: bool, n: int) -> torch.Tensor:
    """One row per target: embeddings, then per site its features and its error terms. A direct
    trace's gradients are at the sites' outputs (a feature's contribution is its value x decoder
    row . gradient); a live trace's are at the error terms, its features' were recorded by the gate."""
    embed_grad, *site_grads = grads
    grad_at = dict(zip(rep.order, site_grads, strict=True))
    parts = [_dot(rep.embed_value, embed_grad, n)]
    for name, g in grad_at.items():
        act = rep.active[name]
        features = rep.zeros(n, len(act))
        if not direct:
            features = recorded.get(name, features)[:n]
        elif len(act):  # value x (gradient . decoder row) at every output it writes (a CLT's: several),
            values = rep.values[name]  # one product per position over the features active there
            counts = torch.bincount(act[:, 0], minlength=rep.n_pos).tolist()
            for out, decoder in rep.writes[name]:
                g_out = grad_at[out]
                if g_out is not None:
                    features = features + torch.cat([g_out[:, p] @ decoder.rows(a[:, 1]).T * values[p, a[:, 1]]
                                                     for p, a in enumerate(act.split(counts)) if len(a)], dim=1)
        parts += [features.detach(), _dot(rep.error_values[name], g, n)]
    return torch.cat(parts, dim=1)


def _dot(vectors: torch.Tensor, grad: torch.Tensor | None, n: int) -> torch.Tensor:
    """Per target and position: a node's write vector [pos, d] . the target's gradient there."""
    if grad is None:
        return torch.zeros(n, vectors.shape[0], device=vectors.device, dtype=vectors.dtype)
    return (grad * vectors).sum(-1).detach()


def _ov(rep: Replacement, z_grads: dict[int, torch.Tensor], chunk: list[Target]) -> torch.Tensor:
    """Direct contributions into attention-feature targets, per head: [targets, nodes, heads]."""
    model, n_heads = rep.model, rep.model.cfg.n_heads
    out = rep.zeros(len(chunk), len(rep.nodes), n_heads)
    for layer, g_z in z_grads.items():
        rows = [r for r, tg in enumerate(chunk) if tg.component_layer == ("attn", layer)]
        if not rows:
            continue
        block = model.blocks[layer]
        pattern = rep.frozen[attention_hook(layer, "pattern")][0]  # [heads, dst, src]
        # what each head's values at source s send to the targets: sum_d pattern[h, d, s] g_z[d, h]
        sent = torch.einsum("hds,bdhk->bhsk", pattern, g_z[rows])
        reader = rep.upstream(layer, "attn")
        for name in [EMBED, *reader]:
            vectors, positions, first = rep.write_vectors(name, reader), rep.node_positions(name), rep.offsets[name]
            normalised = rep.normalise(vectors, block.ln1, rep.ln_scale(layer, positions))
            v = torch.einsum("nd,hdk->nhk", normalised, block.attn.W_V)
            contrib = torch.einsum("nhk,bhnk->bnh", v, sent[:, :, positions])
            out[rows, first:first + len(vectors)] = contrib.detach()
    return out


@torch.no_grad()
def _bias(rep: Replacement, targets: list[Target]) -> torch.Tensor:
    """Each target's value with every node at 0: the part of it no node accounts for."""
    if not targets:
        return rep.zeros(0)
    return _values(rep, rep.trace(1, "zero"), targets, torch.zeros(len(targets), dtype=torch.long, device=rep.device))


def node_label(rep: Replacement, i: int) -> str:
    """attn_0/12@3, mlp_1/err@4, embed@2: a node as a reader sees it."""
    n = rep.nodes[i]
    if n.site == EMBED:
        return f"embed@{n.position}"
    return f"{n.site}/{'err' if n.is_error else n.feature}@{n.position}"

