"""Rebuilding the release (`cli.py zoo build`): every released artefact trained again from its
configuration on this machine's kernel path, compared with the released one file by file, and
where they differ, measured side by side (the zoo models' accuracy per task, the dictionaries'
variance explained and loss recovered, the SIIT model's interchange accuracy, the toys' loss)."""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

from catalog.errors import UserError
from compute import release
from compute.cache import environment, kernel_path, processor

FVE_TOLERANCE = 0.01  # --verify: a rebuilt dictionary may explain this much less variance than the released one


# Every artefact the release holds, by name (`cli.py zoo build --only NAME`).
ARTEFACTS = ("zoo", "zoo/saes", "zoo/transcoders", "zoo-cued", "zoo-cued/saes", "planted/handset", "planted/siit",
             "toy/xor", "toy/tms")


def build_all(only: tuple[str, ...] = (), progress: bool = True) -> dict[str, dict]:
    """Build (or take from the cache) the artefacts the release holds (those named in `only`, or all):
    {name: {"path", "kind", "key", "config"}}. Each trains in a pinned process of its own, as every
    cached build does; the caller decides where to (`CIRCUIT_CACHE`) and whether the release stands
    in (`CIRCUIT_NO_RELEASE`)."""
    from compute.dictionaries.building import (
        build_dictionaries,
        dictionaries_config,
        zoo_dictionaries,
        zoo_with_dictionaries,
    )
    from compute.dictionaries.training import SAEConfig
    from compute.groundtruth.build import build_planted, planted_config
    from compute.jobs.local import ZOO_TRANSCODERS
    from compute.models.zoo import ZOOS, build_zoo
    from compute.parameters.toys import CONFIGS, build_toy

    unknown = set(only) - set(ARTEFACTS)
    if unknown:
        raise ValueError(f"not a released artefact: {', '.join(sorted(unknown))}")
    names = tuple(only) or ARTEFACTS
    out = {}
    for zoo_name, cfg in ZOOS.items():
        name = "zoo" if zoo_name == "default" else f"zoo-{zoo_name}"
        if not {name, f"{name}/saes", f"{name}/transcoders"} & set(names):
            continue
        if f"{name}/saes" in names:  # the zoo and its SAEs build together, as everywhere else
            zoo, saes, _ = zoo_with_dictionaries(cfg, progress=progress)
            out[f"{name}/saes"] = _entry(_set_folder(saes), dictionaries_config(zoo.path, zoo_dictionaries(cfg)))
        else:
            zoo = build_zoo(cfg, progress)
        out[name] = _entry(zoo.path, asdict(cfg))
        if f"{name}/transcoders" in names:
            tc = SAEConfig(**ZOO_TRANSCODERS)
            out[f"{name}/transcoders"] = _entry(_set_folder(build_dictionaries(zoo, tc, progress)),
                                                dictionaries_config(zoo.path, tc))
    planted = tuple(n.split("/")[1] for n in names if n.startswith("planted/"))
    if planted:
        for planted_name, (pm, _) in build_planted(planted, progress).items():
            out[f"planted/{planted_name}"] = _entry(pm.path, planted_config(planted_name))
    for toy_name, cfg in CONFIGS.items():
        if f"toy/{toy_name}" in names:
            out[f"toy/{toy_name}"] = _entry(build_toy(toy_name).path, asdict(cfg))
    return {n: out[n] for n in ARTEFACTS if n in names}


def current_keys() -> dict[str, tuple[str, str]]:
    """The (cache kind, key) of every released artefact under today's configurations, computed without
    building anything: where one differs from the release's, the release is out of date."""
    from compute.cache import config_hash
    from compute.dictionaries.building import dictionaries_key, zoo_dictionaries
    from compute.dictionaries.training import SAEConfig
    from compute.groundtruth.build import planted_key
    from compute.groundtruth.planted import MODELS
    from compute.jobs.local import ZOO_TRANSCODERS
    from compute.models.zoo import ZOOS, zoo_path
    from compute.parameters.toys import TOYS, toy_key

    out = {}
    for zoo_name, cfg in ZOOS.items():
        name = "zoo" if zoo_name == "default" else f"zoo-{zoo_name}"
        out[name] = ("zoo", config_hash(cfg))
        out[f"{name}/saes"] = dictionaries_key(zoo_path(cfg), zoo_dictionaries(cfg), ())
        if zoo_name == "default":
            out[f"{name}/transcoders"] = dictionaries_key(zoo_path(cfg), SAEConfig(**ZOO_TRANSCODERS), ())
    out.update({f"planted/{n}": ("planted", planted_key(n)) for n in MODELS})
    out.update({f"toy/{n}": ("toys", toy_key(n)) for n in TOYS})
    return out


def _set_folder(dicts: dict) -> Path:
    """The folder of a built set of dictionaries (each lives in <folder>/<site name>)."""
    return next(iter(dicts.values())).path.parent


def _entry(path: Path, config: dict) -> dict:
    """A built artefact: its cache folder <cache>/<kind>/<key>-<kernel path>, and its configuration."""
    return {"path": str(path), "kind": path.parent.name, "key": path.name.rsplit("-", 1)[0], "config": config}


@dataclass
class Row:
    """One line of the comparison: an artefact's files, or one of its measures, released and rebuilt."""

    artefact: str
    identical: str  # yes | no | new (not in the release)
    measure: str = "-"
    released: float | None = None
    rebuilt: float | None = None
    ok: bool | None = None  # None: shown, not held to a tolerance


def compare(built: dict[str, dict]) -> list[Row]:
    """Each rebuilt artefact against the released one: bit-identical files, or else their measures side
    by side, each held to its tolerance (`ok`) where `--verify` checks it."""
    m = release.manifest()
    rows = []
    for name, b in built.items():
        a = (m or {"artefacts": {}})["artefacts"].get(name)
        if a is None:
            rows.append(Row(name, "new"))
            continue
        folder = release.check(name)
        if a["key"] == b["key"] and release.folder_files(Path(b["path"])) == a["files"]:
            rows.append(Row(name, "yes"))
        else:
            rows += [Row(name, "no", *r) for r in _measures(a["kind"], folder, Path(b["path"]))] or [Row(name, "no")]
    return rows


def _measures(kind: str, released: Path, rebuilt: Path) -> list[tuple]:
    """(measure, released, rebuilt, ok) of one artefact of this kind."""
    if kind == "zoo":
        from compute.models.zoo import accuracy, load_model
        from compute.tasks import load_task_file

        models = load_model(released), load_model(rebuilt)
        out = []
        for f in sorted((released / "tasks").glob("*.jsonl")):
            task = load_task_file(f)
            r, b = (accuracy(model, task, "test") for model in models)
            out.append((f"accuracy {task.name}", r, b, b >= r))
        return out
    if kind.startswith("dictionaries"):
        out = []
        for site in sorted(p.parent.name for p in released.glob("*/metrics.json")):
            r, b = (json.loads((folder / site / "metrics.json").read_text()) for folder in (released, rebuilt))
            fve = r["fraction_variance_explained"], b["fraction_variance_explained"]
            out.append((f"FVE {site}", *fve, fve[1] >= fve[0] - FVE_TOLERANCE))
            out.append((f"loss recovered {site}", r.get("loss_recovered"), b.get("loss_recovered"), None))
        return out
    if kind == "planted" and (released / "siit.json").exists():
        r, b = (json.loads((folder / "siit.json").read_text()) for folder in (released, rebuilt))
        return [(k, r[k], b.get(k), None if k != "accuracy" else b.get(k, 0) >= r[k])
                for k in r if isinstance(r[k], float)]
    if kind == "toys":
        r, b = (json.loads((folder / "config.json").read_text())["loss"] for folder in (released, rebuilt))
        return [("loss", r, b, None)]
    return []


def rebuild(cache: Path | None = None, write: bool = False, only: tuple[str, ...] = (),
            progress: bool = True) -> tuple[list[Row], dict | None]:
    """Train the released artefacts (those named in `only`, or all) again, ignoring the release, in
    `cache` (default: a temporary folder, removed after), and compare each with the released one;
    with `write`, make the rebuilt artefacts the new release unless they are the release's own.
    Returns (rows, the new manifest or None)."""
    if write and only:
        raise UserError("--release rebuilds every artefact (a release holds them all); leave out --only")
    with tempfile.TemporaryDirectory(prefix="zoo-build-") as tmp:
        with environment(CIRCUIT_CACHE=str(Path(cache or tmp).resolve()), CIRCUIT_NO_RELEASE="1"):
            built = build_all(only, progress)
        rows = compare(built)
        changed = any(r.identical != "yes" for r in rows) or set(built) != set((release.manifest() or {}).get(
            "artefacts", {}))
        return rows, _write_release(built) if write and changed else None


def _write_release(built: dict[str, dict]) -> dict:
    """The rebuilt artefacts as a new release (`release.write`), noting where and how they were built."""
    import torch

    return release.write(built, {"date": date.today().isoformat(), "processor": processor(),
                                 "kernel_path": kernel_path(), "torch": torch.__version__,
                                 "command": "python cli.py zoo build --release"})
