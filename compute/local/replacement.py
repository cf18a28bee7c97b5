"""The local replacement model of one prompt: a transformer made linear in its feature nodes.

For a given prompt, every MLP is replaced by its transcoder and every attention output is
read by an attention SAE; each dictionary's error term (what it fails to reconstruct on this
prompt) is a node, and the attention patterns and LayerNorm scales (with QK-norm, Qwen3's, also
each head's query and key scales) are frozen at their values on the prompt. Then the residual
stream at every position is an exact sum of node write vectors (token embedding, feature value x
decoder row, error term) and dictionary biases, and every feature's pre-activation is an affine
function of the upstream nodes (Ge et al. 2024, "linear computation graphs"; circuit-tracer's
local replacement model).

Without attention SAEs (transcoders only, as every circuit-tracer release is), each attention
layer is a frozen linear path between nodes instead of a site of nodes: its output is computed
from the stream through the frozen patterns and scales, so an edge between two features also
carries what attention moves between positions (circuit-tracer's graph). A skip transcoder's skip
connection (x W_skip) is such a path too: computed from its input, never a node, so a
transcoder's output is its features, its error term and the skip of its input. A cross-layer
transcoder's feature (read at one layer's MLP input) writes into that MLP's output and every later
one's, so each of those outputs is the features written there, from this layer and earlier ones,
plus its error term.

`Replacement.trace(batch)` runs that model on `batch` copies of the prompt with the nodes as
gradient endpoints: each copy can carry its own target, so one backward pass serves a batch
of targets (see compute.local.contributions).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from catalog.errors import UserError
from compute.dictionaries.kinds import TrainedDictionary, has_skip
from compute.tasks import model_device
from schema.sites import (
    ERROR,
    attention_hook,
    block_input,
    is_frozen_by_local_circuits,
    ln_scale_hook,
    parse_site_name,
    site_name,
)

EMBED = "embed"  # the embedding node's site name: one node per position (token + positional embedding)
_NORMS = ("LN", "LNPre", "RMS", "RMSPre", None)


class Rows:
    """A decoder as a replacement model reads it: its rows for some features. A dictionary's own decoder
    is read whole; a cross-layer transcoder's decoder into a later layer only at the features active
    on the prompt (read from its file when it is read lazily), others fetched when asked for."""

    def __init__(self, weight: torch.Tensor, features: torch.Tensor | None = None, fetch=None, d_sae: int = 0):
        self.weight, self.features, self.fetch = weight, features, fetch  # features None: every row, in order
        if features is not None:  # where each of the d_sae features' row is held (-1: not held)
            self.lookup = torch.full((d_sae,), -1, dtype=torch.long, device=weight.device)
            self.lookup[features] = torch.arange(len(features), device=weight.device)

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """The decoder rows of features idx [n] -> [n, d]."""
        if self.features is None:
            return self.weight[idx]
        at = self.lookup[idx]
        if (at >= 0).all():
            return self.weight[at]
        return self.fetch(idx).to(self.weight)  # a feature not active on the prompt (an intervention's)

    def apply(self, f: torch.Tensor) -> torch.Tensor:
        """f [..., d_sae] times the decoder (only its held rows: f is zero elsewhere)."""
        return f @ self.weight if self.features is None else f[..., self.features] @ self.weight


def _check_later(transcoders: dict[int, TrainedDictionary], n_layers: int) -> bool:
    """Whether some transcoder is a cross-layer one; one that writes to another number of layers than
    the model has after it is refused."""
    cross = False
    for i, d in transcoders.items():
        n_later = getattr(d.sae, "n_later", 0)
        if n_later and n_later != n_layers - 1 - i:
            raise UserError(f"mlp_{i}: its cross-layer transcoder writes to {n_later} later layers; the model has "
                            f"{n_layers - 1 - i} after it")
        cross |= bool(n_later)
    return cross


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
    """One run of the replacement model on `batch` copies of the prompt. `inputs` holds what each
    dictionary reads (connected to the nodes upstream: a feature target's value derives from it),
    `outputs` what each site writes into the stream, `z` each attention layer's per-head mixed
    values, `logits` the output. In a direct trace the outputs and `embed` are the leaves; in a
    live trace the features feed the stream (the gate sees them) and the error terms `errors`
    and `embed` are the leaves."""

    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    errors: dict[str, torch.Tensor] = field(default_factory=dict)
    embed: torch.Tensor | None = None
    z: dict[int, torch.Tensor] = field(default_factory=dict)
    logits: torch.Tensor | None = None


TRACE_MODES = ("direct", "live", "zero", "pair")


class Replacement:
    """A model with a transcoder at every MLP and an SAE at every attention output (or at none),
    frozen on one prompt (`tokens`, one row). `nodes` lists the graph's nodes in stream order:
    embeddings, then per layer the attention features and errors, then the transcoder features
    and errors."""

    def __init__(self, model, transcoders: dict[int, TrainedDictionary], attention: dict[int, TrainedDictionary],
                 tokens: torch.Tensor):
        cfg = model.cfg
        missing = [f"mlp_{i}" for i in range(cfg.n_layers) if i not in transcoders]
        if missing:
            raise UserError(f"a local replacement model needs a transcoder at every MLP; missing: {', '.join(missing)}")
        missing = [f"attn_{i}" for i in range(cfg.n_layers) if i not in attention]
        if attention and missing:
            raise UserError(f"a local replacement model needs an SAE at every attention output or at none (attention is "
                            f"then a frozen linear path, as in circuit-tracer); missing: {', '.join(missing)}")
        if cfg.normalization_type not in _NORMS:
            raise UserError(f"cannot freeze normalisation {cfg.normalization_type!r} (known: LN, LNPre, RMS, RMSPre)")
        for i, d in transcoders.items():
            if d.sae.kind != "transcoder" or d.site.component != "mlp":
                raise UserError(f"mlp_{i}: a {d.sae.kind} at {d.site.name} is not an MLP transcoder")
        self.skips = {site_name("mlp", i) for i, d in transcoders.items() if has_skip(d.sae)}
        if self.skips and attention:
            raise UserError("skip transcoders (W_skip) go with attention as a frozen path, as in circuit-tracer "
                            "(--attention frozen): an attention feature's OV split would miss what the skips carry")
        self.cross = _check_later(transcoders, cfg.n_layers)
        self.writes: dict[str, list[tuple[str, Rows]]] = {}  # site -> [(output site, decoder)]: see _freeze
        for i, d in attention.items():
            if d.site.component != "attn" or d.site.reads != d.site.hook_out:
                raise UserError(f"attn_{i}: the dictionary at {d.site.name} does not read the attention output")
        self.model, self.tokens = model, tokens.reshape(1, -1)
        self.device = model_device(model)  # where everything of this prompt is computed, in the model's dtype
        self.dtype = model.cfg.dtype
        self.frozen_attention = not attention  # attention a frozen linear path, not a site of nodes
        self.dicts = {site_name("attn", i): attention[i] for i in attention} | \
                     {site_name("mlp", i): transcoders[i] for i in range(cfg.n_layers)}
        self.order = [site_name(c, i) for i in range(cfg.n_layers) for c in ("attn", "mlp")
                      if site_name(c, i) in self.dicts]  # forward order
        self.n_pos = self.tokens.shape[1]
        self._writers: dict = {}  # reader -> writers_by_position
        self._freeze()

    @torch.no_grad()
    def _freeze(self) -> None:
        """Run the real model once: keep every LayerNorm scale and attention pattern, and each
        dictionary's feature values and error term on the prompt."""
        n_layers = self.model.cfg.n_layers
        scores = [attention_hook(i, "attn_scores") for i in range(n_layers)]
        wanted = {d.hook_in for d in self.dicts.values()} | {d.site.hook_out for d in self.dicts.values()} | \
            {block_input(0), *scores}
        logits, cache = self.model.run_with_cache(
            self.tokens, names_filter=lambda n: is_frozen_by_local_circuits(n) or n in wanted)
        # in the model's dtype: TransformerLens keeps half-precision norms and softmaxes in float32
        self.frozen = {k: v.to(self.dtype) for k, v in cache.items() if is_frozen_by_local_circuits(k)}
        self.scores = [cache[h][0].to(self.dtype) for h in scores]
        self.logits = logits
        self.embed_value = cache[block_input(0)][0]
        self.values, self.output_values, self.error_values, self.active = {}, {}, {}, {}
        for name, d in self.dicts.items():  # in stream order: a CLT's earlier layers come first
            x = cache[d.hook_in]
            f = d.sae.encode(x)
            self.values[name] = f[0]
            self.active[name] = (f[0] != 0).nonzero()  # [n, 2]: (position, feature), in position order
            self.writes[name] = self._decoders(name)
            skip = d.sae.skip(x)[0] if name in self.skips else 0.0
            self.output_values[name] = cache[d.site.hook_out][0] - skip  # what the nodes write (and b_dec)
            earlier = sum((w.apply(self.values[src]) for src, w in self.into(name)), 0.0)
            self.error_values[name] = (cache[d.site.hook_out] - d.sae.reconstruct(x, f))[0] - earlier
        self.nodes = [Node(EMBED, 0, p) for p in range(self.n_pos)]
        self.offsets = {EMBED: 0}  # where each site's nodes start in `nodes`
        for name in self.order:
            self.offsets[name] = len(self.nodes)
            self.nodes += [Node(name, int(i), int(p)) for p, i in self.active[name].tolist()]
            self.nodes += [Node(name, ERROR, p) for p in range(self.n_pos)]
        self.index = {n: i for i, n in enumerate(self.nodes)}

    def trace(self, batch: int, mode: str = "direct", gate=None) -> Trace:
        """Run the frozen replacement model on `batch` copies of the prompt.

        - direct: every site's output is a constant leaf (its value on the prompt): the gradient
          stops at every node, and a node's direct contribution is its write vector . the
          gradient at its site's output. Nothing is propagated through a dictionary's encoder.
        - live: features are computed from their inputs and `gate(name, f)` is called with each
          site's feature values before they feed the stream (hierarchical attribution registers
          its backward hooks there); error terms are constant leaves.
        - zero: every node is 0; each target then holds its bias, the part no node accounts for.
        - pair: two rows, the first direct, the second zero.
        """
        if mode not in TRACE_MODES:
            raise ValueError(f"mode {mode!r}: choose from {', '.join(TRACE_MODES)}")
        t = Trace()
        model, frozen = self.model, self.frozen
        pending: dict[str, torch.Tensor] = {}

        def leaf(value: torch.Tensor, like: torch.Tensor, when_zero: torch.Tensor | float = 0.0) -> torch.Tensor:
            """A constant that the backward pass stops at: the node's value (`when_zero` in a zero trace)."""
            zero = torch.zeros_like(like) + when_zero
            if mode == "pair":
                return torch.cat([value.expand_as(like[:1]), zero[1:]]).requires_grad_(True)
            return (zero if mode == "zero" else value.expand_as(like).clone()).requires_grad_(True)

        def freeze(x, hook):
            value = frozen[hook.name]
            if value.shape[0] in (1, x.shape[0]):
                return value.expand_as(x)
            return value.repeat(x.shape[0] // value.shape[0], 1)  # QK-norm's scales: [batch x pos x heads, 1]

        def embed(x, hook):
            t.embed = leaf(self.embed_value, x.expand(batch, -1, -1))
            return t.embed

        def read(name):
            def fn(x, hook):
                d = self.dicts[name]
                t.inputs[name] = x
                if mode == "live":
                    f = d.sae.activation(d.sae.pre_activation(x))
                    pending[name] = f if gate is None else gate(name, f)
                return write(name)(x, hook) if d.hook_in == d.site.hook_out else x
            return fn

        def write(name):
            def fn(x, hook):
                d = self.dicts[name]
                if mode == "live":  # a CLT's earlier layers' features are still pending: they write here too
                    t.errors[name] = leaf(self.error_values[name], x)
                    t.outputs[name] = d.sae.decode(pending[name]) + t.errors[name] + \
                        sum(w.apply(pending[src]) for src, w in self.into(name))
                else:
                    t.outputs[name] = leaf(self.output_values[name], x, when_zero=d.sae.b_dec.detach())
                if name in self.skips:  # a path from the input, as attention is (the nodes stay the leaves)
                    return t.outputs[name] + d.sae.skip(t.inputs[name])
                return t.outputs[name]
            return fn

        def keep_z(layer):
            def fn(z, hook):
                t.z[layer] = z
                return z
            return fn

        hooks = [(n, freeze) for n in frozen] + [(block_input(0), embed)]
        for name, d in self.dicts.items():
            hooks.append((d.hook_in, read(name)))
            if d.hook_in != d.site.hook_out:
                hooks.append((d.site.hook_out, write(name)))
        hooks += [(attention_hook(i, "z"), keep_z(i)) for i in range(model.cfg.n_layers)]
        with torch.enable_grad():
            t.logits = model.run_with_hooks(self.tokens.expand(batch, -1), fwd_hooks=hooks)
        return t

    def _decoders(self, name: str) -> list[tuple[str, Rows]]:
        """Where a site's features write: its own output (its decoder whole), and a cross-layer
        transcoder's every later MLP output (the rows of the features active on the prompt)."""
        sae = self.dicts[name].sae
        own = [(name, Rows(sae.W_dec))]
        if not getattr(sae, "n_later", 0):
            return own
        layer = parse_site_name(name)[1]
        features = self.active[name][:, 1].unique()
        later = sae.later_rows(features)  # [n, n_later, d]
        return own + [(site_name("mlp", layer + k), Rows(later[:, k - 1].contiguous(), features,
                                                         lambda idx, k=k: sae.later_rows(idx)[:, k - 1], sae.d_sae))
                      for k in range(1, sae.n_later + 1)]

    def into(self, name: str) -> list[tuple[str, Rows]]:
        """What earlier sites' features write into a site's output besides its own (a CLT's earlier
        layers): (source site, decoder [d_sae, d_model])."""
        return [(src, w) for src, outs in self.writes.items() if src != name for out, w in outs if out == name]

    def pre_activation(self, name: str, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Some features' pre-activations, each from its own row of the dictionary's input x [n, d]:
        only their encoder columns (a target's backward never goes through the whole encoder)."""
        sae = self.dicts[name].sae
        if sae.apply_b_dec_to_input:
            x = x - sae.b_dec
        return (x * sae.W_enc[:, features].T).sum(-1) + sae.b_enc[features]

    def write_vectors(self, name: str, reader: list[str] | None = None) -> torch.Tensor:
        """What each node of a site (or EMBED) writes into the residual stream on this prompt, in
        `nodes` order: [n_active + n_pos, d_model] (feature value x decoder row, then each error term).
        A cross-layer transcoder's features write at several outputs: `reader` (the sites upstream of
        where a target reads) keeps only the writes that land before it (None: every write)."""
        if name == EMBED:
            return self.embed_value
        act = self.active[name]
        decoder = sum((w.rows(act[:, 1]) for out, w in self.writes[name] if reader is None or out in reader),
                      self.zeros(len(act), self.model.cfg.d_model))
        f = self.values[name][act[:, 0], act[:, 1]]
        return torch.cat([f[:, None] * decoder, self.error_values[name]])

    def writers_by_position(self, reader: list[str] | None = None) -> dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]]:
        """Each site's (and EMBED's) write vectors grouped by position: (position, their indices in
        `nodes`, the vectors [n, d]), as a target reading after the sites `reader` sees them (they
        differ only with a cross-layer transcoder). Computed once per prompt (and reader)."""
        key = tuple(reader) if self.cross and reader is not None else None
        if key not in self._writers:
            self._writers[key] = {}
            for name in [EMBED, *self.order]:
                vectors, positions = self.write_vectors(name, reader if key else None), self.node_positions(name)
                order = torch.argsort(positions, stable=True)
                counts = torch.bincount(positions, minlength=self.n_pos).tolist()
                self._writers[key][name] = [(p, self.offsets[name] + cols, vectors[cols])
                                            for p, cols in enumerate(order.split(counts)) if len(cols)]
        return self._writers[key]

    def node_positions(self, name: str) -> torch.Tensor:
        """The position of each node of a site (or EMBED), in `nodes` order."""
        if name == EMBED:
            return torch.arange(self.n_pos, device=self.device)
        return torch.cat([self.active[name][:, 0], torch.arange(self.n_pos, device=self.device)])

    def upstream(self, layer: int, component: str = "attn") -> list[str]:
        """The sites that write into the stream a component of `layer` reads (in a parallel-attention
        model, block `layer`'s MLP reads what its attention reads)."""
        def before(name: str) -> bool:
            c, i = parse_site_name(name)
            if i != layer:
                return i < layer
            return c == "attn" and component == "mlp" and not self.model.cfg.parallel_attn_mlp

        return [n for n in self.order if before(n)]

    def normalise(self, x: torch.Tensor, ln, scale: torch.Tensor | float, weight: bool = True) -> torch.Tensor:
        """The linear part of a frozen LayerNorm/RMSNorm `ln` at the given scale [.., 1]: centring (LN),
        division by the frozen scale, and the learned weight unless `weight` is False (the bias is not
        linear: see `ln_bias`)."""
        kind = self.model.cfg.normalization_type
        if kind is None:
            return x
        if kind.startswith("LN"):
            x = x - x.mean(-1, keepdim=True)
        x = x / scale
        return x * ln.w if weight and kind in ("LN", "RMS") else x

    def normalise_transpose(self, y: torch.Tensor, ln, scale: torch.Tensor | float, weight: bool = True
                            ) -> torch.Tensor:
        """The transpose of `normalise`: what a reading vector y of the normalised stream reads of the
        stream itself (the weight, then the division, then the centring, which is symmetric)."""
        kind = self.model.cfg.normalization_type
        if kind is None:
            return y
        if weight and kind in ("LN", "RMS"):
            y = y * ln.w
        y = y / scale
        return y - y.mean(-1, keepdim=True) if kind.startswith("LN") else y

    def ln_scale(self, layer: int | None, positions, norm: str = "ln1") -> torch.Tensor | float:
        """A frozen LayerNorm scale at some positions (1 in a model without LayerNorm): block `layer`'s
        before attention (ln1) or the MLP (ln2), or the final one (layer None)."""
        scale = self.frozen.get(ln_scale_hook(layer, norm))
        return 1.0 if scale is None else scale[0, positions]

    def ln_bias(self, ln) -> torch.Tensor | float:
        return ln.b if self.model.cfg.normalization_type == "LN" else 0.0

    def dictionary_bias(self, names: list[str]) -> torch.Tensor:
        """What the given sites write into the stream whatever their nodes: their decoder biases."""
        return sum((self.dicts[n].sae.b_dec for n in names), self.zeros(self.model.cfg.d_model))

    def zeros(self, *shape: int) -> torch.Tensor:
        """Zeros where this prompt's tensors live: on the model's device, in its dtype."""
        return torch.zeros(*shape, device=self.device, dtype=self.dtype)
