"""The local replacement model of one prompt: a transformer made linear in its feature nodes.

For a given prompt, every MLP is replaced by its transcoder and every attention output is
read by an attention SAE; each dictionary's error term (what it fails to reconstruct on this
prompt) is a node, and the attention patterns and LayerNorm scales are frozen at their values
on the prompt. Then the residual stream at every position is an exact sum of node write
vectors (token embedding, feature value x decoder row, error term) and dictionary biases, and
every feature's pre-activation is an affine function of the upstream nodes (Ge et al. 2024,
"linear computation graphs"; circuit-tracer's local replacement model).

`Replacement.trace(batch)` runs that model on `batch` copies of the prompt with the nodes as
gradient endpoints: each copy can carry its own target, so one backward pass serves a batch
of targets (see compute.local.attribution).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from catalog.errors import UserError
from compute.dictionaries.kinds import TrainedDictionary
from schema.sites import ERROR, site_name

EMBED = "embed"  # the embedding node's site name: one node per position (token + positional embedding)
_NORMS = ("LN", "LNPre", "RMS", "RMSPre", None)


@dataclass(frozen=True)
class Node:
    """A node of the linear graph: a feature at a position, an error term (feature ERROR) or the
    embedding at a position (site EMBED, feature 0)."""

    site: str
    feature: int
    position: int

    @property
    def is_error(self) -> bool:
        return self.feature == ERROR


@dataclass
class Trace:
    """One run of the replacement model on `batch` copies of the prompt. `pre` holds each
    dictionary's pre-activations (connected to the nodes upstream: a target's value), `features`
    the feature values that feed the stream (a backward hook on each sees its gradient), `errors`
    and `embed` are leaves, `z` each attention layer's per-head mixed values, `logits` the output."""

    pre: dict[str, torch.Tensor] = field(default_factory=dict)
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    errors: dict[str, torch.Tensor] = field(default_factory=dict)
    embed: torch.Tensor | None = None
    z: dict[int, torch.Tensor] = field(default_factory=dict)
    logits: torch.Tensor | None = None


class Replacement:
    """A model with a transcoder at every MLP and an SAE at every attention output, frozen on one
    prompt (`tokens`, one row). `nodes` lists the graph's nodes in stream order: embeddings, then
    per layer the attention features and errors, then the transcoder features and errors."""

    def __init__(self, model, transcoders: dict[int, TrainedDictionary], attention: dict[int, TrainedDictionary],
                 tokens: torch.Tensor):
        cfg = model.cfg
        missing = [f"mlp_{i}" for i in range(cfg.n_layers) if i not in transcoders] + \
                  [f"attn_{i}" for i in range(cfg.n_layers) if i not in attention]
        if missing:
            raise UserError(f"a local replacement model needs a transcoder at every MLP and an SAE at every "
                            f"attention output; missing: {', '.join(missing)}")
        if cfg.normalization_type not in _NORMS:
            raise UserError(f"cannot freeze normalisation {cfg.normalization_type!r} (known: LN, LNPre, RMS, RMSPre)")
        for i, d in transcoders.items():
            if d.sae.kind != "transcoder" or d.site.component != "mlp":
                raise UserError(f"mlp_{i}: a {d.sae.kind} at {d.site.name} is not an MLP transcoder")
        for i, d in attention.items():
            if d.site.component != "attn" or d.site.reads != d.site.hook_out:
                raise UserError(f"attn_{i}: the dictionary at {d.site.name} does not read the attention output")
        self.model, self.tokens = model, tokens.reshape(1, -1)
        self.dicts = {site_name("attn", i): attention[i] for i in range(cfg.n_layers)} | \
                     {site_name("mlp", i): transcoders[i] for i in range(cfg.n_layers)}
        self.order = [site_name(c, i) for i in range(cfg.n_layers) for c in ("attn", "mlp")]  # forward order
        self.n_pos = self.tokens.shape[1]
        self._freeze()

    @torch.no_grad()
    def _freeze(self) -> None:
        """Run the real model once: keep every LayerNorm scale and attention pattern, and each
        dictionary's feature values and error term on the prompt."""
        keep = lambda name: name.endswith("hook_scale") or name.endswith("hook_pattern")  # noqa: E731
        reads = {d.hook_in for d in self.dicts.values()} | {d.site.hook_out for d in self.dicts.values()}
        logits, cache = self.model.run_with_cache(self.tokens, names_filter=lambda n: keep(n) or n in reads
                                                  or n == "blocks.0.hook_resid_pre" or n.endswith("hook_attn_scores"))
        self.frozen = {k: v for k, v in cache.items() if keep(k)}
        self.scores = [cache[f"blocks.{i}.attn.hook_attn_scores"][0] for i in range(self.model.cfg.n_layers)]
        self.logits = logits
        self.embed_value = cache["blocks.0.hook_resid_pre"][0]
        self.values, self.error_values, self.active = {}, {}, {}
        for name, d in self.dicts.items():
            f = d.sae.encode(cache[d.hook_in])
            self.values[name] = f[0]
            self.error_values[name] = (cache[d.site.hook_out] - d.sae.decode(f))[0]
            self.active[name] = (f[0] != 0).nonzero()  # [n, 2]: (position, feature), in position order
        self.nodes = [Node(EMBED, 0, p) for p in range(self.n_pos)]
        self.offsets = {}  # where each site's nodes start in `nodes`
        for name in self.order:
            self.offsets[name] = len(self.nodes)
            self.nodes += [Node(name, int(i), int(p)) for p, i in self.active[name].tolist()]
            self.nodes += [Node(name, ERROR, p) for p in range(self.n_pos)]
        self.index = {n: i for i, n in enumerate(self.nodes)}

    def trace(self, batch: int, gate=None, zero: bool = False) -> Trace:
        """Run the frozen replacement model on `batch` copies of the prompt. `gate(name, f)` is
        called with each dictionary's feature values before they feed the stream (attribution
        registers its backward hooks there). With `zero`, every node is set to 0: the targets then
        hold their bias, the part no node accounts for."""
        t = Trace()
        model, frozen = self.model, self.frozen
        pending: dict[str, torch.Tensor] = {}

        def freeze(x, hook):
            return frozen[hook.name].expand_as(x)

        def embed(x, hook):
            t.embed = torch.zeros_like(x) if zero else x.detach().expand(batch, -1, -1).clone()
            t.embed.requires_grad_(True)
            return t.embed

        def read(name):
            def fn(x, hook):
                d = self.dicts[name]
                t.pre[name] = pre = d.sae.pre_activation(x)
                f = torch.zeros_like(pre) if zero else d.sae.activation(pre)
                t.features[name] = f
                pending[name] = f if gate is None or zero else gate(name, f)
                if d.hook_in == d.site.hook_out:
                    return write(name)(x, hook)
                return x
            return fn

        def write(name):
            def fn(x, hook):
                d = self.dicts[name]
                err = torch.zeros_like(x) if zero else self.error_values[name].expand_as(x).clone()
                t.errors[name] = err.requires_grad_(True)
                return d.sae.decode(pending.pop(name)) + err
            return fn

        def keep_z(layer):
            def fn(z, hook):
                t.z[layer] = z
                return z
            return fn

        hooks = [(n, freeze) for n in frozen] + [("blocks.0.hook_resid_pre", embed)]
        for name, d in self.dicts.items():
            hooks.append((d.hook_in, read(name)))
            if d.hook_in != d.site.hook_out:
                hooks.append((d.site.hook_out, write(name)))
        hooks += [(f"blocks.{i}.attn.hook_z", keep_z(i)) for i in range(model.cfg.n_layers)]
        with torch.enable_grad():
            t.logits = model.run_with_hooks(self.tokens.expand(batch, -1), fwd_hooks=hooks)
        return t

    def write_vectors(self, name: str) -> torch.Tensor:
        """What each node of a site writes into the residual stream on this prompt, in `nodes`
        order: [n_active + n_pos, d_model] (feature value x decoder row, then each error term)."""
        d, act = self.dicts[name], self.active[name]
        f = self.values[name][act[:, 0], act[:, 1]]
        return torch.cat([f[:, None] * d.sae.W_dec[act[:, 1]], self.error_values[name]])

    def node_positions(self, name: str) -> torch.Tensor:
        """The position of each node of a site, in `nodes` order."""
        return torch.cat([self.active[name][:, 0], torch.arange(self.n_pos)])

    def upstream(self, layer: int, component: str = "attn") -> list[str]:
        """The sites that write into the stream a component of `layer` reads (in a parallel-attention
        model, block `layer`'s MLP reads what its attention reads)."""
        stop = self.order.index(site_name(component, layer))
        if component == "mlp" and self.model.cfg.parallel_attn_mlp:
            stop -= 1
        return self.order[:stop]

    def normalise(self, x: torch.Tensor, ln, scale: torch.Tensor) -> torch.Tensor:
        """The linear part of a frozen LayerNorm/RMSNorm `ln` at the given scale [.., 1]: centring (LN),
        division by the frozen scale, and the learned weight (its bias is not linear: see `ln_bias`)."""
        kind = self.model.cfg.normalization_type
        if kind is None:
            return x
        if kind.startswith("LN"):
            x = x - x.mean(-1, keepdim=True)
        x = x / scale
        return x * ln.w if kind in ("LN", "RMS") else x

    def ln_scale(self, layer: int, positions) -> torch.Tensor | float:
        """Block `layer`'s frozen attention-input LayerNorm scale at some positions (1 without one)."""
        scale = self.frozen.get(f"blocks.{layer}.ln1.hook_scale")
        return 1.0 if scale is None else scale[0, positions]

    def ln_bias(self, ln) -> torch.Tensor | float:
        return ln.b if self.model.cfg.normalization_type == "LN" else 0.0

    def dictionary_bias(self, names: list[str]) -> torch.Tensor:
        """What the given sites write into the stream whatever their nodes: their decoder biases."""
        return sum((self.dicts[n].sae.b_dec for n in names), torch.zeros(self.model.cfg.d_model))
