"""Dictionary sets: a directory of dictionaries for one model, found, mapped to sites and checked.

A set holds dictionaries in the SAELens layout (`cfg.json` + `sae_weights.safetensors`,
whose config names the hook; a transcoder's names the hook it writes too), the dictionary_learning one (`ae.pt` + `config.json`),
or circuit-tracer's transcoder sets (`config.yaml` + `layer_{i}.safetensors`, Gemma Scope's
`params.npz`, or a cross-layer transcoder's `W_enc_{i}`/`W_dec_{i}.safetensors`; see
compute.dictionaries.circuit_tracer), at any depth. Each is placed at a site by, in order: the set's spec file
(`dictionaries.json`: {"relative/folder": "site name or hook name"}), the hook its own
config names, or its folder's name — which is how the Sparse Feature Circuits Pythia
layout (`embed`, `attn_out_layer{i}`, `mlp_out_layer{i}`, `resid_out_layer{i}`, each with
`<size>/ae.pt`) is mapped with no spec. A hook holding the same activation as a site's
(a block's resid_pre, a rotary model's hook_embed) places the dictionary at that site.

Every dictionary is checked against the model (its width must fit the hook) and kept
as an SAELens copy in the cache with its metrics, measured on the given prompts the first
time it is used. Sites the set does not cover can be filled with identity dictionaries
(neurons as features), so that a circuit spans every submodule.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from tqdm.auto import tqdm

from catalog.errors import UserError
from catalog.progress import hidden
from compute.cache import cached_dir, config_hash, file_hash
from compute.dictionaries import circuit_tracer
from compute.dictionaries.formats import import_dictionary_learning, load_dictionary
from compute.dictionaries.kinds import SAE, IdentityDictionary, TrainedDictionary, check_fits
from compute.models.handle import ModelHandle
from schema.sites import Site, site_of_equivalent_hook, site_of_folder, sites

SPEC_FILE = "dictionaries.json"


@dataclass(frozen=True)
class Found:
    """A dictionary found in a set: its folder, its format and the site it is placed at."""

    folder: Path  # (a circuit-tracer set's transcoder: its file)
    format: str  # saelens | dictionary_learning | circuit-tracer
    site: Site
    how: str  # spec | config | folder


def find(root: Path, model, spec: Path | None = None) -> list[Found]:
    """Every dictionary under `root`, placed at a site (see the module docstring). A dictionary that
    cannot be placed, or two for one site, is refused by name."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no dictionary set there (a directory of dictionaries is expected)")
    n_layers = model.cfg.n_layers
    rotary = model.cfg.positional_embedding_type != "standard"
    given = _read_spec(spec or root / SPEC_FILE, root, n_layers) if spec or (root / SPEC_FILE).is_file() else {}
    found: dict[str, Found] = {}
    for config in sorted(root.rglob(circuit_tracer.CONFIG)):  # circuit-tracer transcoder sets
        cfg = circuit_tracer.read_config(config.parent)
        for layer, file in (circuit_tracer.layer_files(config.parent, cfg).items() if cfg else ()):
            at = _transcoder_site(cfg, layer, model, config)
            if at.name in found:
                raise UserError(f"two dictionaries for {at.name}: {found[at.name].folder} and {file}")
            found[at.name] = Found(file, "circuit-tracer", at, "config")
    folders = sorted({p.parent for name in ("cfg.json", "ae.pt") for p in root.rglob(name)})
    for folder in folders:
        fmt = "saelens" if (folder / "cfg.json").is_file() else "dictionary_learning"
        rel = folder.relative_to(root).as_posix()
        at, how = given.get(rel), "spec"
        if at is None:
            at, how = _from_config(folder, fmt, n_layers, rotary), "config"
        if at is None:
            at, how = next((s for s in map(site_of_folder, reversed(folder.relative_to(root).parts)) if s), None), \
                "folder"
        if at is None:
            raise UserError(f"{folder}: cannot tell which submodule this dictionary is for; name it in "
                            f"{root / SPEC_FILE} as {{\"{rel}\": \"resid_0\"}}")
        if at.layer >= n_layers:
            raise UserError(f"{folder}: for {at.name}, but the model has {n_layers} layers")
        if at.name in found:
            raise UserError(f"two dictionaries for {at.name}: {found[at.name].folder} and {folder}; "
                            f"choose one in {root / SPEC_FILE}")
        found[at.name] = Found(folder, fmt, at, how)
    if not found:
        raise UserError(f"{root}: no dictionaries (SAELens cfg.json or dictionary_learning ae.pt) found")
    order = [s.name for s in sites(n_layers)]
    return sorted(found.values(), key=lambda f: order.index(f.site.name))


def _transcoder_site(cfg: dict, layer: int, model, config: Path) -> Site:
    """The site of a circuit-tracer set's transcoder at a layer: the MLP whose output it writes, read
    from the hook its config names (both must be hooks the model has)."""
    hook_in, hook_out = (f"blocks.{layer}.{cfg[k]}" for k in ("feature_input_hook", "feature_output_hook"))
    if layer >= model.cfg.n_layers:
        raise UserError(f"{config}: a transcoder for layer {layer}, but the model has {model.cfg.n_layers} layers")
    at = site_of_equivalent_hook(hook_out, model.cfg.n_layers)
    if hook_in not in model.hook_dict or at is None or at.component != "mlp":
        raise UserError(f"{config}: {hook_in} -> {hook_out} is not a hook of the model read and an MLP output "
                        "written (feature_input_hook, feature_output_hook)")
    return Site("mlp", layer, at.hook_out, hook_in)


def _read_spec(path: Path, root: Path, n_layers: int) -> dict[str, Site]:
    try:
        spec = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable JSON spec ({e})") from None
    if not isinstance(spec, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in spec.items()):
        raise UserError(f"{path}: the spec maps folders to sites, e.g. {{\"layer3\": \"resid_3\"}}")
    out = {}
    for folder, where in spec.items():
        at = site_of_folder(where) or site_of_equivalent_hook(where, n_layers)
        if at is None:
            known = ", ".join(s.name for s in sites(n_layers))
            raise UserError(f"{path}: {where!r} is neither a submodule ({known}) nor a hook of one")
        out[Path(folder).as_posix().strip("/")] = at
    return out


def _from_config(folder: Path, fmt: str, n_layers: int, rotary: bool) -> Site | None:
    """The site a dictionary's own config names (SAELens hook_name; dictionary_learning's submodule)."""
    try:
        if fmt == "saelens":
            cfg = json.loads((folder / "cfg.json").read_text())
            meta = cfg.get("metadata") or {}
            hook = meta.get("hook_name") or cfg.get("hook_name") or ""
            out = meta.get("hook_name_out") or cfg.get("hook_name_out") or ""
            at = site_of_equivalent_hook(out, n_layers, not rotary) if out and out != hook else None
            if at is not None and at.component == "mlp":  # a transcoder: it reads another hook than it writes
                return Site("mlp", at.layer, at.hook_out, hook)
            return site_of_equivalent_hook(hook, n_layers, not rotary)
        trainer = json.loads((folder / "config.json").read_text()).get("trainer", {})
        name, layer = str(trainer.get("submodule_name") or ""), trainer.get("layer")
        return site_of_folder(name if layer is None or name == "embed" else f"{name.split('_')[0]}_{int(layer)}")
    except (OSError, ValueError, TypeError, AttributeError):
        return None  # an unreadable config is reported when the dictionary is loaded


def load_set(root: Path, handle: ModelHandle, prompts: list[str], spec: Path | None = None,
             fill: bool = True, progress: bool = True) -> tuple[dict[str, TrainedDictionary], list[str]]:
    """The set's dictionaries by site name, checked against the model and measured on `prompts`;
    with `fill`, identity dictionaries at the sites the set lacks. Returns (dictionaries, filled sites)."""
    model = handle.model
    found = find(root, model, spec)
    measure = _Measurement(handle, prompts, [f.site for f in found])
    out: dict[str, TrainedDictionary] = {}
    for f in tqdm(found, desc="dictionaries", disable=hidden(progress), unit="dict", leave=False):
        sae = _read(f, handle.model_id)
        if not f.site.hook_in:  # an SAE is placed at its site (an equivalent hook holds the same values)
            sae.hook_name = f.site.hook_out
        try:
            check_fits(sae, model)
        except UserError as e:
            raise UserError(f"{f.folder}: {e}") from None
        key = config_hash([file_hash(p) for p in _files(f)] + [f.site.name, handle.model_id])
        path = cached_dir("imported", key, measure, sae, f.site, str(f.folder), pin=False)
        out[f.site.name] = _loaded(model, f.site, path)
    filled = [s for s in sites(model.cfg.n_layers) if s.name not in out] if fill else []
    for s in filled:
        out[s.name] = _identity(measure, s)
    return {s.name: out[s.name] for s in sites(model.cfg.n_layers) if s.name in out}, [s.name for s in filled]


def identity_set(handle: ModelHandle, prompts: list[str]) -> dict[str, TrainedDictionary]:
    """Identity dictionaries (neurons as features) at every site of a loaded checkpoint."""
    measure = _Measurement(handle, prompts)
    return {s.name: _identity(measure, s) for s in sites(handle.model.cfg.n_layers)}


def _identity(measure: _Measurement, s: Site) -> TrainedDictionary:
    handle = measure.handle
    sae = IdentityDictionary(handle.model.cfg.d_model, s.hook_out, handle.model_id)
    key = config_hash(["identity", s.name, handle.model_id])
    return _loaded(handle.model, s, cached_dir("identity", key, measure, sae, s, "", pin=False))


def _files(f: Found) -> list[Path]:
    """The files a found dictionary is read from (what its cached copy's key hashes)."""
    if f.format == "circuit-tracer":  # a cross-layer transcoder's layer: its encoder and its decoder file
        decoder = circuit_tracer.decoder_file(f.folder)
        return [f.folder, *([decoder] if decoder != f.folder else []), _ct_config(f)]
    return [f.folder / n for n in (("cfg.json", "sae_weights.safetensors") if f.format == "saelens"
                                   else ("config.json", "ae.pt"))]


def _ct_config(f: Found) -> Path:
    """The config.yaml of the circuit-tracer set a transcoder file belongs to (the nearest above it)."""
    return next(p / circuit_tracer.CONFIG for p in f.folder.parents if (p / circuit_tracer.CONFIG).is_file())


def _read(f: Found, model_id: str) -> SAE:
    if f.format == "circuit-tracer":
        return circuit_tracer.read_transcoder(f.folder, f.site.layer, circuit_tracer.read_config(_ct_config(f).parent),
                                              model_id)
    if f.format == "saelens":
        return load_dictionary(f.folder)
    return import_dictionary_learning(f.folder, f.site.hook_out, model_id)


def _loaded(model, s: Site, built: Path) -> TrainedDictionary:
    path = built / s.name  # where _save_measured put it
    sae = load_dictionary(path).to(device=model.cfg.device, dtype=model.cfg.dtype)
    return TrainedDictionary(s, sae, path, json.loads((path / "metrics.json").read_text()))


class _Measurement:
    """Measures a set's dictionaries on the prompts (a cached build per dictionary: `measure(out,
    sae, site, source)` saves `sae` as SAELens files with its metrics). What every dictionary's
    measurement shares is computed once, at first need: the activations of every site (one forward
    pass) and the clean loss; a GPT-2-sized set over neurons took 4 forward passes per site before."""

    def __init__(self, handle: ModelHandle, prompts: list[str], extra: list[Site] = ()):
        self.handle, self.prompts = handle, prompts
        every = [*sites(handle.model.cfg.n_layers), *extra]
        self.hooks = sorted({s.reads for s in every} | {s.hook_out for s in every})

    @cached_property
    def acts(self) -> dict[str, torch.Tensor]:
        from compute.dictionaries.metrics import collect_activations

        return collect_activations(self.handle.model, self.hooks, self.prompts)

    @cached_property
    def clean_loss(self) -> float:
        from compute.dictionaries.metrics import lm_loss

        return lm_loss(self.handle.model, self.prompts)

    @torch.no_grad()
    def __call__(self, out: Path, sae: SAE, s: Site, source: str) -> None:
        from compute.dictionaries.building import _save_measured

        model = self.handle.model
        sae = sae.to(device=model.cfg.device, dtype=model.cfg.dtype)
        _save_measured(model, out, s, sae, self.acts[s.reads], self.acts[s.hook_out] if s.reads != s.hook_out else None,
                       self.prompts, clean_loss=self.clean_loss, **({"imported_from": source} if source else {}))
