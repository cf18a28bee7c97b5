"""The zoo model's dictionaries: trained (any architecture) or identity, cached, with their metrics."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from catalog.errors import UserError
from compute.cache import cached_dir, config_hash
from compute.dictionaries.formats import load_dictionary, save_dictionary
from compute.dictionaries.kinds import (
    IdentityDictionary,
    Submodule,
    TrainedDictionary,
    check_fits,
    submodules,
    transcoder_hooks,
)
from compute.dictionaries.metrics import collect_activations, evaluate, loss_recovered
from compute.dictionaries.training import SAEConfig, train_sae

LOSS_SENTENCES = 500  # held-out sentences for the loss-recovered metric


def dictionary_sites(model, architecture: str, only: tuple[str, ...] = ()) -> list[tuple[Submodule, str]]:
    """(submodule, input hook) pairs a dictionary of this architecture is trained for: every
    submodule for an SAE, every MLP (reading its normalised input) for a transcoder."""
    if architecture == "transcoder":
        sites = [(Submodule("mlp", layer, transcoder_hooks(layer)[1]), transcoder_hooks(layer)[0])
                 for layer in range(model.cfg.n_layers)]
    else:
        sites = [(s, s.hook_name) for s in submodules(model)]
    if only:
        unknown = set(only) - {s.name for s, _ in sites}
        if unknown:
            raise UserError(f"no submodule {', '.join(sorted(unknown))} for {architecture} dictionaries "
                            f"(choose from {', '.join(s.name for s, _ in sites)})")
        sites = [(s, h) for s, h in sites if s.name in only]
    return sites


def build_dictionaries(zoo, cfg: SAEConfig | None = None, progress: bool = True,
                       only: tuple[str, ...] = ()) -> dict[str, TrainedDictionary]:
    """Train (or load from the cache) one dictionary per submodule of the zoo model (per MLP for
    transcoders), with held-out quality metrics and loss recovered."""
    cfg = cfg or SAEConfig()
    sites = dictionary_sites(zoo.model, cfg.architecture, tuple(only))
    key = config_hash({"sae": asdict(cfg), "model": zoo.path.name, **({"only": sorted(only)} if only else {})})
    folder = "dictionaries" if cfg.architecture == "standard" else f"dictionaries-{cfg.architecture}"
    path = cached_dir(folder, key, _train_all, zoo.path, zoo.model_id, cfg, tuple(only), progress)
    return load_all(zoo.model, [s for s, _ in sites], path)


def _train_all(out: Path, model_path: Path, model_id: str, cfg: SAEConfig, only: tuple[str, ...],
               progress: bool) -> None:
    """Train and measure a dictionary for every site (a cached build: see `build_dictionaries`)."""
    from compute.models import grammar
    from compute.models.zoo import load_model

    model = load_model(model_path)
    sites = dictionary_sites(model, cfg.architecture, only)
    sentences = grammar.corpus(cfg.corpus_sentences, seed=cfg.seed + 1)
    held_sentences = grammar.corpus(LOSS_SENTENCES, seed=cfg.seed + 2)
    hooks = sorted({h for s, h in sites} | {s.hook_name for s, _ in sites})
    acts = collect_activations(model, hooks, sentences)
    for sub, hook_in in tqdm(sites, desc=f"training {cfg.architecture} dictionaries", disable=not progress,
                             unit="dict"):
        x = acts[hook_in]
        y = acts[sub.hook_name] if hook_in != sub.hook_name else None
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed))
        held = max(1, len(x) // 10)
        sae = train_sae(x[perm[held:]], cfg, hook_in, model_id, progress,
                        targets=None if y is None else y[perm[held:]],
                        hook_name_out="" if y is None else sub.hook_name)
        _save_measured(model, out, sub, sae, x[perm[:held]], None if y is None else y[perm[:held]],
                       held_sentences)


def identity_dictionaries(zoo, progress: bool = True) -> dict[str, TrainedDictionary]:
    """Identity dictionaries (neurons as features) for every submodule, with their metrics."""
    path = cached_dir("identity", config_hash([zoo.path.name, 2]), _measure_identity, zoo.path, zoo.model_id,
                      progress)
    return load_all(zoo.model, submodules(zoo.model), path)


def _measure_identity(out: Path, model_path: Path, model_id: str, progress: bool) -> None:
    from compute.models import grammar
    from compute.models.zoo import load_model

    model = load_model(model_path)
    subs = submodules(model)
    acts = collect_activations(model, [s.hook_name for s in subs], grammar.corpus(2000, seed=1))
    held_sentences = grammar.corpus(LOSS_SENTENCES, seed=2)
    for sub in tqdm(subs, desc="identity dictionaries", disable=not progress, unit="hook"):
        d = IdentityDictionary(model.cfg.d_model, sub.hook_name, model_id)
        _save_measured(model, out, sub, d, acts[sub.hook_name], None, held_sentences)


def _save_measured(model, out: Path, sub: Submodule, sae, x: torch.Tensor, y: torch.Tensor | None,
                   sentences: list[str], **extra) -> None:
    """Measure a dictionary on held-out activations (x, and a transcoder's targets y) and on the
    language-model loss over held-out sentences, and save it in `out/<submodule>` with metrics.json."""
    metrics = evaluate(sae, x, y) | loss_recovered(model, sae, sentences, sae.hook_name or sub.hook_name,
                                                   sub.hook_name)
    save_dictionary(sae, out / sub.name, {"component": sub.component, "layer": sub.layer, **extra})
    (out / sub.name / "metrics.json").write_text(json.dumps(metrics))


def load_all(model, subs: list[Submodule], path: Path) -> dict[str, TrainedDictionary]:
    """Load the dictionaries saved under `path/<submodule name>`, refusing any that does not fit."""
    result = {}
    for sub in subs:
        sae = load_dictionary(path / sub.name)
        check_fits(sae, model)
        metrics = json.loads((path / sub.name / "metrics.json").read_text())
        result[sub.name] = TrainedDictionary(sub, sae, path / sub.name, metrics)
    return result


def import_dictionary(zoo, source: Path, hook_name: str | None = None) -> TrainedDictionary:
    """Read an SAELens directory or a dictionary_learning one, refuse it unless it fits the zoo
    model, and keep an SAELens copy with its metrics in the cache."""
    from compute.cache import file_hash
    from compute.dictionaries.formats import import_dictionary_learning

    source = Path(source)
    if (source / "cfg.json").is_file():
        sae = load_dictionary(source)
        if hook_name:
            sae.hook_name = hook_name
        files = [source / "cfg.json", source / "sae_weights.safetensors"]
    elif (source / "ae.pt").is_file() or (source / "config.json").is_file():
        sae = import_dictionary_learning(source, hook_name, zoo.model_id)
        files = [source / "config.json", source / "ae.pt"]
    else:
        raise UserError(f"{source}: neither an SAELens directory (cfg.json) nor a dictionary_learning one (ae.pt)")
    check_fits(sae, zoo.model)
    hook_out = getattr(sae, "hook_name_out", "") or sae.hook_name
    by_hook = {s.hook_name: s for s in submodules(zoo.model)}
    if hook_out not in by_hook:
        raise UserError(f"hook {hook_out!r} is not a submodule circuits use (one of {', '.join(by_hook)})")
    sub = by_hook[hook_out]

    key = config_hash([file_hash(f) for f in files] + [sae.hook_name, zoo.path.name])
    path = cached_dir("imported", key, _measure_imported, zoo.path, sae, sub, str(source))
    return load_all(zoo.model, [sub], path)[sub.name]


def _measure_imported(out: Path, model_path: Path, sae, sub: Submodule, source: str) -> None:
    from compute.models import grammar
    from compute.models.zoo import load_model

    model = load_model(model_path)
    hook_out = sub.hook_name
    acts = collect_activations(model, sorted({sae.hook_name, hook_out}), grammar.corpus(2000, seed=1))
    _save_measured(model, out, sub, sae, acts[sae.hook_name], acts[hook_out] if hook_out != sae.hook_name else None,
                   grammar.corpus(LOSS_SENTENCES, seed=2), imported_from=source)
