"""The zoo model's dictionaries: trained (any architecture) or identity, cached, with their metrics."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from catalog.errors import UserError
from catalog.progress import hidden
from compute.cache import cache_path, cached_dir, config_hash, pinned
from compute.dictionaries.formats import load_dictionary, save_dictionary
from compute.dictionaries.kinds import IdentityDictionary, TrainedDictionary, check_fits
from compute.dictionaries.metrics import collect_activations, evaluate, lm_loss, loss_recovered
from compute.dictionaries.training import SAEConfig, train_sae
from schema.sites import Site, site_of_hook, sites, transcoder_site

LOSS_SENTENCES = 500  # held-out sentences for the loss-recovered metric


def dictionary_sites(model, architecture: str, only: tuple[str, ...] = ()) -> list[Site]:
    """The sites a dictionary of this architecture is trained for: every site for an SAE, every
    MLP (reading its normalised input) for a transcoder and for each layer of a cross-layer transcoder."""
    n = model.cfg.n_layers
    found = [transcoder_site(layer) for layer in range(n)] if architecture in ("transcoder", "clt") else sites(n)
    if architecture == "clt" and only:
        raise UserError("a cross-layer transcoder spans every MLP: train it without --submodule")
    if only:
        unknown = set(only) - {s.name for s in found}
        if unknown:
            raise UserError(f"no submodule {', '.join(sorted(unknown))} for {architecture} dictionaries "
                            f"(choose from {', '.join(s.name for s in found)})")
        found = [s for s in found if s.name in only]
    return found


def build_dictionaries(zoo, cfg: SAEConfig | None = None, progress: bool = True,
                       only: tuple[str, ...] = ()) -> dict[str, TrainedDictionary]:
    """Train (or load from the cache) one dictionary per submodule of the zoo model (per MLP for
    transcoders), with held-out quality metrics and loss recovered. Without a configuration: the
    zoo's own standard SAEs, trained as its configuration says."""
    cfg = cfg or zoo_dictionaries(zoo.config)
    sites = dictionary_sites(zoo.model, cfg.architecture, tuple(only))
    folder, key = dictionaries_key(zoo.path, cfg, tuple(only))
    path = cached_dir(folder, key, _train_all, zoo.path, zoo.model_id, cfg, tuple(only), progress)
    return load_all(zoo.model, sites, path)


def zoo_dictionaries(config) -> SAEConfig:
    """How a zoo's own dictionaries (the demo's SAEs) train, as its configuration says."""
    return SAEConfig(steps=config.dictionary_steps, lr=config.dictionary_lr)


def dictionaries_config(zoo_path: Path, cfg: SAEConfig, only: tuple[str, ...] = ()) -> dict:
    """What a set of dictionaries of one zoo is built from (its cache key is this dictionary's hash)."""
    return {"sae": asdict(cfg), "model": zoo_path.name, **({"only": sorted(only)} if only else {})}


def dictionaries_key(zoo_path: Path, cfg: SAEConfig, only: tuple[str, ...]) -> tuple[str, str]:
    """(cache kind, key) of a set of dictionaries of one zoo."""
    key = config_hash(dictionaries_config(zoo_path, cfg, only))
    return ("dictionaries" if cfg.architecture == "standard" else f"dictionaries-{cfg.architecture}"), key


def _identity_key(zoo_path: Path) -> str:
    return config_hash([zoo_path.name, 2])


def zoo_with_dictionaries(config, identity: bool = False, progress: bool = True) -> tuple:
    """The zoo of a configuration with its own dictionaries (and, with `identity`, its identity
    dictionaries): (zoo, dictionaries, identity dictionaries or None). What is neither released nor
    cached yet is trained in one pinned process, not one per artefact (each costs seconds to start)."""
    from compute.models.zoo import build_zoo, zoo_path

    where = zoo_path(config)
    if not (where.exists() and cache_path(*dictionaries_key(where, zoo_dictionaries(config), ())).exists()):
        pinned(_build_zoo_with_dictionaries, config, identity, progress)
    zoo = build_zoo(config, progress)
    return zoo, build_dictionaries(zoo, progress=progress), identity_dictionaries(zoo, progress) if identity else None


def _build_zoo_with_dictionaries(config, identity: bool, progress: bool) -> None:
    """Inside a pinned build: each part's own (nested) build runs here, in this process."""
    from compute.models.zoo import build_zoo

    zoo = build_zoo(config, progress)
    build_dictionaries(zoo, progress=progress)
    if identity:
        identity_dictionaries(zoo, progress)


def _train_all(out: Path, model_path: Path, model_id: str, cfg: SAEConfig, only: tuple[str, ...],
               progress: bool) -> None:
    """Train and measure a dictionary for every site (a cached build: see `build_dictionaries`)."""
    from compute.models import grammar
    from compute.models.zoo import load_model

    model = load_model(model_path)
    todo = dictionary_sites(model, cfg.architecture, only)
    sentences = grammar.corpus(cfg.corpus_sentences, seed=cfg.seed + 1)
    held_sentences = grammar.corpus(LOSS_SENTENCES, seed=cfg.seed + 2)
    acts = collect_activations(model, sorted({s.reads for s in todo} | {s.hook_out for s in todo}), sentences)
    clean_loss = lm_loss(model, held_sentences)  # the same for every dictionary
    if cfg.architecture == "clt":
        return _train_clt(out, model, model_id, cfg, todo, acts, held_sentences, clean_loss, progress)
    for s in tqdm(todo, desc=f"training {cfg.architecture} dictionaries", disable=hidden(progress), unit="dict"):
        x = acts[s.reads]
        y = acts[s.hook_out] if s.reads != s.hook_out else None
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed))
        held = max(1, len(x) // 10)
        sae = train_sae(x[perm[held:]], cfg, s.reads, model_id, progress,
                        targets=None if y is None else y[perm[held:]],
                        hook_name_out="" if y is None else s.hook_out)
        _save_measured(model, out, s, sae, x[perm[:held]], None if y is None else y[perm[:held]],
                       held_sentences, clean_loss)


def _train_clt(out: Path, model, model_id: str, cfg: SAEConfig, todo: list[Site], acts: dict, held_sentences: list[str],
               clean_loss: float, progress: bool) -> None:
    """One cross-layer transcoder over every MLP, trained jointly and measured as a whole (each layer
    saved at its MLP's site, with its output's variance explained by the full reconstruction)."""
    from compute.dictionaries.clt_training import clt_metrics, train_clt

    n = len(acts[todo[0].reads])
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
    held, train = perm[:max(1, n // 10)], perm[max(1, n // 10):]
    xs, ys = [acts[s.reads] for s in todo], [acts[s.hook_out] for s in todo]
    layers = train_clt([x[train] for x in xs], [y[train] for y in ys], cfg, [s.reads for s in todo],
                       [s.hook_out for s in todo], model_id, progress)
    metrics = clt_metrics(model, layers, [x[held] for x in xs], [y[held] for y in ys], held_sentences, clean_loss)
    for s, t, m in zip(todo, layers, metrics, strict=True):
        save_dictionary(t, out / s.name, {"component": s.component, "layer": s.layer})
        (out / s.name / "metrics.json").write_text(json.dumps(m))


def identity_dictionaries(zoo, progress: bool = True, corpus: list[str] | None = None) -> dict[str, TrainedDictionary]:
    """Identity dictionaries (neurons as features) for every submodule of a zoo (or any model saved
    like one, with `path`, `model` and `model_id`), with their metrics measured on the grammar's
    sentences or on `corpus` (a model of another vocabulary: its prompts). Nothing trains, so they are
    measured in this process (cached like every build; a pinned process would cost seconds to start)."""
    path = cached_dir("identity", _identity_key(zoo.path), _measure_identity, zoo.path, zoo.model_id, progress,
                      corpus, pin=False)
    return load_all(zoo.model, sites(zoo.model.cfg.n_layers), path)


def _measure_identity(out: Path, model_path: Path, model_id: str, progress: bool,
                      corpus: list[str] | None = None) -> None:
    from compute.models import grammar
    from compute.models.zoo import load_model

    model = load_model(model_path)
    every = sites(model.cfg.n_layers)
    acts = collect_activations(model, [s.hook_out for s in every], corpus or grammar.corpus(2000, seed=1))
    held_sentences = corpus or grammar.corpus(LOSS_SENTENCES, seed=2)
    clean_loss = lm_loss(model, held_sentences)
    for s in tqdm(every, desc="identity dictionaries", disable=hidden(progress), unit="hook"):
        d = IdentityDictionary(model.cfg.d_model, s.hook_out, model_id)
        _save_measured(model, out, s, d, acts[s.hook_out], None, held_sentences, clean_loss)


def _save_measured(model, out: Path, s: Site, sae, x: torch.Tensor, y: torch.Tensor | None,
                   sentences: list[str], clean_loss: float | None = None, **extra) -> None:
    """Measure a dictionary on held-out activations (x, and a transcoder's targets y) and on the
    language-model loss over held-out sentences (`clean_loss`: the model's own there, if known), and
    save it in `out/<site name>` with metrics.json."""
    metrics = evaluate(sae, x, y) | loss_recovered(model, sae, sentences, sae.hook_name or s.reads, s.hook_out,
                                                   clean_loss)
    save_dictionary(sae, out / s.name, {"component": s.component, "layer": s.layer, **extra})
    (out / s.name / "metrics.json").write_text(json.dumps(metrics))


def load_all(model, at: list[Site], path: Path) -> dict[str, TrainedDictionary]:
    """Load the dictionaries saved under `path/<site name>`, refusing any that does not fit."""
    result = {}
    for s in at:
        sae = load_dictionary(path / s.name)
        check_fits(sae, model)
        metrics = json.loads((path / s.name / "metrics.json").read_text())
        result[s.name] = TrainedDictionary(s, sae, path / s.name, metrics)
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
    at = site_of_hook(hook_out, zoo.model.cfg.n_layers)
    if at is None:
        known = ", ".join(s.hook_out for s in sites(zoo.model.cfg.n_layers))
        raise UserError(f"hook {hook_out!r} is not a submodule circuits use (one of {known})")
    at = Site(at.component, at.layer, at.hook_out, sae.hook_name if sae.hook_name != hook_out else "")

    key = config_hash([file_hash(f) for f in files] + [sae.hook_name, zoo.path.name])
    path = cached_dir("imported", key, _measure_imported, zoo.path, sae, at, str(source))
    return load_all(zoo.model, [at], path)[at.name]


def _measure_imported(out: Path, model_path: Path, sae, at: Site, source: str) -> None:
    from compute.models import grammar
    from compute.models.zoo import load_model

    model = load_model(model_path)
    acts = collect_activations(model, sorted({at.reads, at.hook_out}), grammar.corpus(2000, seed=1))
    _save_measured(model, out, at, sae, acts[at.reads], acts[at.hook_out] if at.reads != at.hook_out else None,
                   grammar.corpus(LOSS_SENTENCES, seed=2), imported_from=source)
