"""Sites and node keys: where a dictionary splices into a transformer, and how a node is named.

This module is the one home of TransformerLens hook names and of submodule names. A site
is a component (embed, attn, mlp, resid) at a layer (-1 for the embedding), with the hook
its dictionary reads (hook_in) and the hook whose activation it reconstructs (hook_out);
the two differ for an MLP transcoder, which reads the MLP's normalised input. A node of a
circuit is keyed by its site, its feature index (or ERROR for the dictionary's error term)
and its token position (None when effects are summed over positions). The catalogue keeps
a node's key as columns (`NODE_KEY_COLUMNS`), never as a formatted string.

It lives in schema/ because both compute/ (which splices dictionaries in at sites) and
catalog/ (which names and orders nodes) use it, and catalog/ may not import compute/.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

COMPONENTS = ("embed", "attn", "mlp", "resid")
BLOCK = ("attn", "mlp", "resid")  # a block's submodules, in forward order
METRIC = "metric"  # the circuit node of the task's metric (layer n_layers, no dictionary)
ERROR = -1  # feature index of a dictionary's error term in node keys

# The columns that identify a node across circuits (a feature's identity is dictionary_id, feature_idx).
NODE_KEY_COLUMNS = ("component", "layer", "dictionary_id", "feature_idx", "is_error", "position")

_HOOKS = {"embed": "blocks.0.hook_resid_pre", "attn": "blocks.{layer}.hook_attn_out",
          "mlp": "blocks.{layer}.hook_mlp_out", "resid": "blocks.{layer}.hook_resid_post"}
_MLP_INPUT = "blocks.{layer}.ln2.hook_normalized"  # what a transcoder reads
_RESID_PRE = "blocks.{layer}.hook_resid_pre"  # the residual stream entering a block


@dataclass(frozen=True)
class Site:
    """A place in the model where a dictionary is spliced in."""

    component: str  # embed | attn | mlp | resid
    layer: int  # -1 for the embedding
    hook_out: str  # the hook whose activation the dictionary reconstructs (and where it is replaced)
    hook_in: str = ""  # the hook the dictionary reads, when it is another one (a transcoder's)

    @property
    def hook_name(self) -> str:
        """The hook where the site's value lives and is replaced: its output hook."""
        return self.hook_out

    @property
    def reads(self) -> str:
        """The hook the site's dictionary reads."""
        return self.hook_in or self.hook_out

    @property
    def name(self) -> str:
        return site_name(self.component, self.layer)


def site(component: str, layer: int) -> Site:
    """The site of a component's output (where an SAE reads and writes)."""
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}; choose from {', '.join(COMPONENTS)}")
    return Site(component, -1 if component == "embed" else layer, _HOOKS[component].format(layer=layer))


def transcoder_site(layer: int) -> Site:
    """An MLP transcoder's site: it reads the normalised MLP input and writes mlp_out."""
    return Site("mlp", layer, _HOOKS["mlp"].format(layer=layer), _MLP_INPUT.format(layer=layer))


def sites(n_layers: int) -> list[Site]:
    """The embedding and attn_out, mlp_out, resid_post of every layer, in forward order."""
    return [site("embed", -1), *(site(c, layer) for layer in range(n_layers) for c in BLOCK)]


def site_name(component: str, layer: int) -> str:
    """embed, attn_0, mlp_1, resid_1, metric: a site (or the metric node) as readers name it."""
    return component if component in ("embed", METRIC) else f"{component}_{int(layer)}"


def parse_site_name(name: str) -> tuple[str, int]:
    """(component, layer) of a site name: the inverse of `site_name` (embed: layer -1)."""
    if name in ("embed", METRIC):
        return name, -1
    component, _, layer = name.rpartition("_")
    return component, int(layer)


def row_names(n_layers: int) -> list[str]:
    """Every site name and the metric's, from the embedding up (a circuit picture's rows)."""
    return [s.name for s in sites(n_layers)] + [METRIC]


def stream_index(component: str, layer: int, n_layers: int) -> int:
    """A site's place in stream order: embedding 0, then attn, mlp, resid of each block; the
    metric last (circuit-tracer's layer numbering)."""
    if component == METRIC:
        return 3 * n_layers + 1
    return 0 if component == "embed" else 3 * int(layer) + BLOCK.index(component) + 1


def block_input(layer: int) -> str:
    """The hook of the residual stream entering block `layer` (the one after the last block is
    the stream the unembedding reads, before the final LayerNorm)."""
    return _RESID_PRE.format(layer=layer)


def attention_hook(layer: int, what: str) -> str:
    """A hook inside block `layer`'s attention: pattern, z (each head's mixed values) or attn_scores."""
    return f"blocks.{layer}.attn.hook_{what}"


def ln_scale_hook(layer: int | None, norm: str = "ln1") -> str:
    """The scale (the divisor) of block `layer`'s LayerNorm before attention (ln1) or the MLP (ln2);
    layer None: the final LayerNorm's, before the unembedding."""
    return "ln_final.hook_scale" if layer is None else f"blocks.{layer}.{norm}.hook_scale"


def qk_norm_scale_hook(layer: int, norm: str) -> str:
    """The scale of block `layer`'s QK-norm (Qwen3): of each head's query (q_norm) or key (k_norm), shaped
    [batch x positions x heads, 1]."""
    return f"blocks.{layer}.attn.{norm}.hook_scale"


def transcoder_input(hook: str, layer: int) -> str | None:
    """How a block's MLP transcoder reads the stream through the hook it reads: 'normalized' (the MLP's
    LayerNorm before its weight: what transcoders trained here read), 'stream' (the residual stream
    itself), or None (another hook)."""
    if hook == _MLP_INPUT.format(layer=layer):
        return "normalized"
    return "stream" if hook == f"blocks.{layer}.hook_resid_mid" else None


def is_frozen_by_local_circuits(hook: str) -> bool:
    """Whether a local replacement model freezes this hook's value: every LayerNorm scale (the final
    one included) and every attention pattern."""
    return hook.endswith(".hook_scale") or hook.endswith(".attn.hook_pattern")


def enters_block(hook: str, layer: int) -> bool:
    """Whether a hook's value is the residual stream entering block `layer` (that block's
    resid_pre, or the previous block's resid_post)."""
    return hook in (block_input(layer), _HOOKS["resid"].format(layer=layer - 1))


def is_mlp_neurons(hook: str) -> bool:
    """Whether a hook holds MLP neurons (d_mlp wide) rather than the residual width."""
    return "mlp" in hook and (hook.endswith("hook_post") or hook.endswith("hook_pre"))


def site_of_hook(hook: str, n_layers: int) -> Site | None:
    """The site whose output hook this is, if any."""
    return next((s for s in sites(n_layers) if s.hook_out == hook), None)


def site_of_equivalent_hook(hook: str, n_layers: int, positional_embedding: bool = True) -> Site | None:
    """The site whose output holds the same activation as `hook`: its own, or a block's resid_pre
    (the previous block's resid_post, or the embedding's for block 0), or hook_embed in a model
    with no positional embedding added to it (rotary models: Pythia, Llama)."""
    found = site_of_hook(hook, n_layers)
    if found is not None:
        return found
    if hook == "hook_embed" and not positional_embedding:
        return site("embed", -1)
    m = re.fullmatch(r"blocks\.(\d+)\.hook_resid_pre", hook)
    if m and 1 <= int(m.group(1)) <= n_layers:
        return site("resid", int(m.group(1)) - 1)
    return None


def site_of_folder(name: str) -> Site | None:
    """A site from a dictionary folder's name, as dictionary sets lay them out: Sparse Feature
    Circuits' embed, attn_out_layer3, mlp_out_layer0, resid_out_layer5 (also attn_3, resid_post_layer_3,
    or a site name such as mlp_1)."""
    if name == "embed":
        return site("embed", -1)
    m = re.fullmatch(r"(attn|mlp|resid)(?:_out|_post)?_(?:layer_?)?(\d+)", name)
    return site(m.group(1), int(m.group(2))) if m else None


def guess_site(submodule_name: str, layer: int | None) -> Site | None:
    """A site from a dictionary's own description of where it was trained (dictionary_learning's
    submodule_name and layer: 'embed', 'resid_post_layer_3', 'attn_out_layer_1', 'mlp_out_layer_0')."""
    for component in ("embed", "resid", "attn", "mlp"):
        if component in submodule_name and (layer is not None or component == "embed"):
            return site(component, -1 if layer is None else int(layer))
    return None


class NodeKey(NamedTuple):
    """A node of a circuit while it is computed: its site's name, its feature index (ERROR for the
    error term) and its token position (None when summed over positions)."""

    site: str
    feature: int
    position: int | None = None
