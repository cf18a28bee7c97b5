"""QK attribution: which nodes on the query side and on the key side make a head attend.

With LayerNorm scales frozen, a head's query at position d is an affine function of the
residual stream there, which is the sum of the write vectors of the nodes at d plus the
dictionaries' biases; the same holds for the key at s. The attention score
q[d] . k[s] / scale is then exactly the sum, over pairs (query-side node, key-side node),
of q_u . k_v / scale, where the bias of each side (dictionary biases, LayerNorm bias, b_Q or
b_K) is one more node. Rotary embeddings rotate q_u by d and k_v by s, and QK-norm (Qwen3)
divides each head's query and key by its frozen scale and multiplies them by its weight; both are
linear, so the decomposition stays exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from catalog.errors import UserError
from compute.local.replacement import EMBED, Node, Replacement
from schema.sites import qk_norm_scale_hook

BIAS = Node("bias", 0, -1)  # the pseudo-node of what no node accounts for (one per side)


@dataclass
class QK:
    """One head's score from query position `query` to key position `key`, decomposed:
    `pairs[i, j]` is the part from query-side node `query_nodes[i]` and key-side node
    `key_nodes[j]` (each list ends with BIAS); the rows sum to the query-side marginals, the
    columns to the key-side marginals, and everything to `score`."""

    layer: int
    head: int
    query: int
    key: int
    query_nodes: list[Node]
    key_nodes: list[Node]
    pairs: torch.Tensor
    score: float  # the model's own attention score (after scaling, before the softmax)

    @property
    def query_marginals(self) -> torch.Tensor:
        return self.pairs.sum(1)

    @property
    def key_marginals(self) -> torch.Tensor:
        return self.pairs.sum(0)


@torch.no_grad()
def qk(rep: Replacement, layer: int, head: int, query: int, key: int) -> QK:
    """Decompose head `layer`.`head`'s score from position `query` to position `key`."""
    cfg = rep.model.cfg
    if not 0 <= layer < cfg.n_layers or not 0 <= head < cfg.n_heads:
        raise UserError(f"no head {layer}.{head}: the model has {cfg.n_layers} layers of {cfg.n_heads} heads")
    query, key = (p + rep.n_pos if p < 0 else p for p in (query, key))
    if not 0 <= key <= query < rep.n_pos:
        raise UserError(f"a query at {query} attends to keys 0..{query} of the prompt's {rep.n_pos} tokens")
    if rep.frozen_attention:
        raise UserError("attention scores decompose into nodes only with attention SAEs: with attention a frozen path, "
                        "the stream a head reads also holds earlier attention outputs, which are not nodes")
    if getattr(cfg, "attn_scores_soft_cap", -1) > 0:
        raise UserError("this model's attention scores are not bilinear in the stream (they are soft-capped)")
    attn = rep.model.blocks[layer].attn
    q_nodes, q = _side(rep, layer, head, query, attn.W_Q, attn.b_Q, "q_norm")
    k_nodes, k = _side(rep, layer, head, key, attn.W_K, attn.b_K, "k_norm")
    pairs = q @ k.T / attn.attn_scale
    return QK(layer, head, query, key, q_nodes, k_nodes, pairs, float(rep.scores[layer][head, query, key]))


def _side(rep: Replacement, layer: int, head: int, position: int, W: torch.Tensor, b: torch.Tensor, norm: str
          ) -> tuple[list[Node], torch.Tensor]:
    """The nodes at `position` that the head's layer reads, and each one's part of the query (or
    key) there, through the head's frozen QK-norm if the model has one (`norm`: q_norm or k_norm),
    rotated to the position when the model is rotary: [nodes + 1 (bias), d_head]."""
    block, cfg = rep.model.blocks[layer], rep.model.cfg
    scale = rep.ln_scale(layer, position)
    names = rep.upstream(layer, "attn")
    nodes = [Node(EMBED, 0, position)]
    vectors = [rep.embed_value[position][None]]
    for name in names:
        at = rep.node_positions(name) == position
        first = rep.offsets[name]
        nodes += [rep.nodes[first + i] for i in at.nonzero()[:, 0].tolist()]
        vectors.append(rep.write_vectors(name, names)[at])
    vectors = torch.cat(vectors)
    parts = rep.normalise(vectors, block.ln1, scale) @ W[head]
    bias = (rep.normalise(rep.dictionary_bias(names)[None], block.ln1, scale) + rep.ln_bias(block.ln1)) @ W[head] \
        + b[head]
    parts = torch.cat([parts, bias.reshape(1, -1)])
    if getattr(cfg, "use_qk_norm", False):  # RMSNorm of each head's query or key, its scale frozen
        module = getattr(block.attn, norm)
        scale = rep.frozen[qk_norm_scale_hook(layer, norm)].reshape(rep.n_pos, -1)  # [positions, its heads]
        heads = scale.shape[1]  # a key norm covers the key-value heads of grouped-query attention
        parts = parts / scale[position, head // (cfg.n_heads // heads)] * module.w
    if cfg.positional_embedding_type == "rotary":
        parts = block.attn.apply_rotary(parts[:, None, None, :], position)[:, 0, 0]
    return nodes + [BIAS], parts
