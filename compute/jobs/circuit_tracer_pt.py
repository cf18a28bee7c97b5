"""circuit-tracer's `Graph.to_pt` files, read without running their code and pruned as circuit-tracer
prunes, as the graph JSON document its `create_graph_files` would write.

A `.pt` file is a pickle, which can run any code when loaded. It is read with PyTorch's
weights-only unpickler, which builds tensors and plain values only; the two classes circuit-tracer
0.5 pickles (its `UnifiedConfig` and `LogitTarget`) are stood in for by inert ones that only keep
their fields, and any other class is refused in one line. The dense adjacency is then pruned with
circuit-tracer's rule (`prune_graph`: node influence on the logits through the row-normalised
|adjacency|, the nodes carrying `node_threshold` of it, then the edges carrying `edge_threshold`,
then nodes left without edges dropped), and written as `create_graph_files` writes nodes and links
(node ids, layers, `ctx_idx`, cumulative influence, feature activations). The file holds token ids
but no tokenizer, so a token reads as `<id>`.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from catalog.errors import UserError, first_line

NODE_THRESHOLD, EDGE_THRESHOLD = 0.8, 0.98  # create_graph_files' defaults
KEYS = {"input_string", "adjacency_matrix", "cfg", "active_features", "logit_targets", "logit_probabilities",
        "vocab_size", "input_tokens", "selected_features", "activation_values", "scan"}


class _Fields:
    """Stands in for a pickled config object: its fields, nothing callable."""

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise TypeError("a config's state is not a dictionary")
        self.__dict__.update(state)


class _LogitTarget(tuple):
    """Stands in for circuit-tracer's LogitTarget(token_str, vocab_idx)."""

    def __new__(cls, *fields):
        return tuple.__new__(cls, fields)


STAND_INS = [(_Fields, "circuit_tracer.utils.tl_nnsight_mapping.UnifiedConfig"),
             (_Fields, "transformer_lens.HookedTransformerConfig.HookedTransformerConfig"),
             (_LogitTarget, "circuit_tracer.attribution.targets.LogitTarget")]


def load_graph(path: Path, data: bytes) -> dict:
    """The file's fields (its bytes `data`), loaded by the weights-only unpickler; anything unusable is
    one UserError."""
    where = str(path)
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data))
    except Exception as e:  # a damaged zip or pickle raises whatever its reader raises
        raise UserError(f"{where}: not a readable PyTorch file ({first_line(e)[:200]})") from None
    known = {name for _, name in STAND_INS}
    other = sorted(set(unsafe) - known)
    if other:
        raise UserError(f"{where}: refusing to load it, it needs code to load ({', '.join(other[:3])}); a circuit-tracer "
                        "graph needs none of it")
    try:
        with torch.serialization.safe_globals(STAND_INS):
            d = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as e:
        raise UserError(f"{where}: not a circuit-tracer graph ({first_line(e)[:200]})") from None
    if not isinstance(d, dict) or not KEYS <= set(d):
        raise UserError(f"{where}: not a circuit-tracer graph (Graph.to_pt's fields: {', '.join(sorted(KEYS))})")
    return d


def graph_document(path: Path, data: bytes) -> dict:
    """The graph JSON document (metadata, nodes, links) of a `.pt` graph (its bytes `data`), pruned as
    circuit-tracer prunes."""
    d = load_graph(path, data)
    where = str(path)
    A, active, selected = d["adjacency_matrix"], d["active_features"], d["selected_features"]
    tokens, probabilities, values = d["input_tokens"], d["logit_probabilities"], d["activation_values"]
    targets = d["logit_targets"]
    if isinstance(targets, torch.Tensor):  # circuit-tracer before 0.5: the token ids alone
        targets = [("", int(i)) for i in targets.tolist()]
    n_layers = getattr(d["cfg"], "n_layers", None)
    tensors = (A, active, selected, tokens, probabilities, values)
    if not isinstance(n_layers, int) or n_layers < 1 or not all(isinstance(t, torch.Tensor) for t in tensors) \
            or not isinstance(targets, list) or not all(isinstance(t, tuple) and len(t) == 2 for t in targets):
        raise UserError(f"{where}: not a circuit-tracer graph (its fields have the wrong types)")
    n_pos, n_logits, n_features = len(tokens), len(targets), len(selected)
    n = n_features + n_layers * n_pos + n_pos + n_logits
    if A.shape != (n, n) or active.dim() != 2 or active.shape[1] != 3 or len(probabilities) != n_logits \
            or len(values) != len(active) or (n_features and not 0 <= int(selected.min()) <= int(selected.max()) < len(active)):
        raise UserError(f"{where}: its adjacency ({tuple(A.shape)}) does not fit {n_features} features, {n_layers} "
                        f"layers, {n_pos} tokens and {n_logits} logits")
    if not torch.isfinite(A).all() or not torch.isfinite(values).all() or not torch.isfinite(probabilities).all():
        raise UserError(f"{where}: holds NaN or infinite values")
    A = A.float()
    node_mask, edge_mask, scores = prune(A, probabilities.float(), n_features, n_pos, n_logits)
    nodes: dict[int, dict] = {}
    errors_end, tokens_end = n_features + n_layers * n_pos, n_features + n_layers * n_pos + n_pos
    for i in node_mask.nonzero()[:, 0].tolist():
        if i < n_features:
            layer, pos, feature = active[selected[i]].tolist()
            node = {"node_id": f"{layer}_{feature}_{pos}", "layer": str(layer), "ctx_idx": pos,
                    "feature_type": "cross layer transcoder", "activation": float(values[selected[i]])}
        elif i < errors_end:
            layer, pos = divmod(i - n_features, n_pos)
            node = {"node_id": f"0_{layer}_{pos}", "layer": str(layer), "ctx_idx": pos,
                    "feature_type": "mlp reconstruction error"}
        elif i < tokens_end:
            pos = i - errors_end
            node = {"node_id": f"E_{int(tokens[pos])}_{pos}", "layer": "E", "ctx_idx": pos, "feature_type": "embedding"}
        else:
            k = i - tokens_end
            token, vocab_idx = targets[k]
            node = {"node_id": f"{n_layers + 1}_{int(vocab_idx)}_{n_pos - 1}", "layer": str(n_layers + 1),
                    "ctx_idx": n_pos - 1, "feature": int(vocab_idx), "feature_type": "logit", "is_target_logit": k == 0,
                    "clerp": f'Output "{token}" (p={float(probabilities[k]):.3f})'}
        nodes[i] = node if node["feature_type"] == "logit" else node | {"influence": float(scores[i])}  # as circuit-tracer
    dsts, srcs = edge_mask.nonzero(as_tuple=True)
    links = [{"source": nodes[s]["node_id"], "target": nodes[t]["node_id"], "weight": float(A[t, s])}
             for t, s in zip(dsts.tolist(), srcs.tolist(), strict=True) if s in nodes and t in nodes]
    linked = {x for link in links for x in (link["source"], link["target"])}
    kept = [v for v in nodes.values() if v["node_id"] in linked or v["feature_type"] in ("embedding", "logit")]
    prompt = d["input_string"] if isinstance(d["input_string"], str) else ""
    scan = d["scan"] if isinstance(d["scan"], str) else "unknown"
    return {"metadata": {"scan": scan, "prompt": prompt, "prompt_tokens": [f"<{int(t)}>" for t in tokens.tolist()],
                         "node_threshold": NODE_THRESHOLD},
            "nodes": kept, "links": links}


def prune(A: torch.Tensor, probabilities: torch.Tensor, n_features: int, n_tokens: int, n_logits: int
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """circuit-tracer's `prune_graph` at its defaults: (node mask, edge mask [dst, src], each node's
    cumulative influence score)."""
    weights = torch.zeros(len(A))
    weights[-n_logits:] = probabilities
    influence = _influence(_normalised(A), weights)
    node_mask = influence >= _threshold(influence, NODE_THRESHOLD)
    node_mask[-n_logits - n_tokens:] = True  # tokens and logits are always kept
    pruned = A.clone()
    pruned[~node_mask] = 0
    pruned[:, ~node_mask] = 0
    normalised = _normalised(pruned)
    edge_scores = normalised * (_influence(normalised, weights) + weights)[:, None]
    edge_mask = edge_scores >= _threshold(edge_scores.flatten(), EDGE_THRESHOLD)
    inner = slice(0, len(A) - n_logits - n_tokens)  # features and error terms
    while True:  # nodes left without an outgoing edge (or a feature without an incoming one) go, until none do
        before = node_mask.clone()
        node_mask[inner] &= edge_mask[:, inner].any(0)
        node_mask[:n_features] &= edge_mask[:n_features].any(1)
        if torch.equal(node_mask, before):
            break
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
    ranked, order = torch.sort(influence, descending=True)
    scores = torch.zeros_like(influence)
    scores[order] = torch.cumsum(ranked, 0) / ranked.sum()
    return node_mask, edge_mask, scores


def _normalised(A: torch.Tensor) -> torch.Tensor:
    a = A.abs()
    return a / a.sum(1, keepdim=True).clamp(min=1e-10)


def _influence(A: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """weights @ (A + A^2 + ...): the graph is acyclic, so the series ends (after at most its depth)."""
    current = weights @ A
    total = current.clone()
    for _ in range(len(A)):
        if not current.any():
            return total
        current = current @ A
        total += current
    raise UserError("the graph's adjacency has a cycle: influence does not converge")


def _threshold(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    ranked = torch.sort(scores, descending=True).values
    cumulative = torch.cumsum(ranked, 0) / ranked.sum()
    return ranked[min(int(torch.searchsorted(cumulative, fraction)), len(ranked) - 1)]

