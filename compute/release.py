"""The release: the trained default artefacts, committed in `release/` and loaded instead of trained.

The zoo models (default and cued), their SAEs, the zoo's MLP transcoders, the planted-circuit
models and the toy models are trained once (`cli.py zoo build --release`) and committed with a
manifest: each file's sha256, each artefact's configuration and its hash (the cache key it is
found by), the kernel path and processor it was trained on, the command and the date. Every
machine then loads the same weights, so every number computed from them is the same everywhere
up to the last bits of in-process float arithmetic (docs/reproducibility.md, What is reproducible).

A released artefact takes the place of the cache entry of the same kind and key
(`compute.cache.cache_path`), whatever this machine's kernel path: the cache stays for
everything a user builds (other configurations, other dictionaries, identity dictionaries).
Files are checked against the manifest before first use in a process; a damaged or missing
one is one line naming it. `CIRCUIT_NO_RELEASE=1` ignores the release (`zoo build` retrains that
way); `CIRCUIT_RELEASE=DIR` reads another one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from catalog.errors import UserError
from catalog.shards import file_hash

MANIFEST = "manifest.json"
DEFAULT_RELEASE = Path(__file__).resolve().parent.parent / "release"


def release_root() -> Path:
    """`$CIRCUIT_RELEASE`, or `release/` beside the packages."""
    return Path(os.environ.get("CIRCUIT_RELEASE") or DEFAULT_RELEASE)


def enabled() -> bool:
    return not os.environ.get("CIRCUIT_NO_RELEASE")


_manifests: dict[Path, tuple[tuple, dict]] = {}  # root: (the manifest file's stat, the manifest)
_checked: set[tuple[Path, str]] = set()  # (root, artefact) whose files were checked against that manifest


def manifest(root: Path | None = None) -> dict | None:
    """The release's manifest (None where there is no release), read again only when its file changes."""
    root = root or release_root()
    path = root / MANIFEST
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UserError(f"{path}: cannot read the release manifest ({e.strerror})") from None
    stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
    if _manifests.get(root, ((),))[0] != stamp:
        _checked.difference_update({c for c in _checked if c[0] == root})
        try:
            m = json.loads(path.read_text())
            ok = isinstance(m, dict) and isinstance(m.get("artefacts"), dict) and all(
                isinstance(a, dict) and isinstance(a.get("files"), dict) and
                all(isinstance(a.get(k), str) for k in ("kind", "key", "folder"))
                for a in m["artefacts"].values())
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: not a readable release manifest ({e}); `git checkout -- {root}` "
                            "restores it") from None
        if not ok:
            raise UserError(f"{path}: not a release manifest (each artefact needs kind, key, folder and files); "
                            f"`git checkout -- {root}` restores it")
        _manifests[root] = stamp, m
    return _manifests[root][1]


def released(kind: str, key: str) -> Path | None:
    """The released folder of the cache entry (kind, key), checked against the manifest; None when
    the release does not hold it (or is switched off)."""
    if not enabled():
        return None
    m = manifest()
    if m is None:
        return None
    for name, a in m["artefacts"].items():
        if a["kind"] == kind and a["key"] == key:
            return check(name)
    return None


def is_released(path: Path) -> bool:
    """Whether a folder (as `compute.cache.cache_path` gives it) is a released artefact's."""
    return Path(path).resolve().is_relative_to(release_root().resolve())


def check(name: str | None = None, root: Path | None = None) -> Path | None:
    """Check one released artefact's files (every artefact's without a name) against the manifest,
    once per process: a file missing, changed or not in the manifest is one line naming it. Returns
    the artefact's folder (with a name)."""
    root = root or release_root()
    m = manifest(root)
    if m is None:
        return None
    names = [name] if name else list(m["artefacts"])
    for n in names:
        if (root, n) in _checked:
            continue
        a = m["artefacts"][n]
        folder = _inside(root, a["folder"])
        if not folder.is_dir():
            raise UserError(f"{folder}: missing from the release ({n}); `git checkout -- {root}` restores it")
        on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
        for rel in sorted(set(a["files"]) | on_disk):
            path = folder / rel
            if rel not in a["files"]:
                raise UserError(f"{path}: not part of the release ({n}); remove it")
            if rel not in on_disk:
                raise UserError(f"{path}: missing from the release ({n}); `git checkout -- {root}` restores it")
            if file_hash(path) != a["files"][rel]:
                raise UserError(f"{path}: damaged (its sha256 is not the one {root / MANIFEST} gives); "
                                f"`git checkout -- {root}` restores it")
        _checked.add((root, n))
    return _inside(root, m["artefacts"][name]["folder"]) if name else None


def _inside(root: Path, folder: str) -> Path:
    """A manifest's folder under the release root (a hostile manifest names nothing outside it)."""
    path = (root / folder).resolve()
    if not path.is_relative_to(root.resolve()) or path == root.resolve():
        raise UserError(f"{root / MANIFEST}: folder {folder!r} is not inside the release")
    return path


def folder_files(folder: Path) -> dict[str, str]:
    """{path relative to the folder: sha256} of every file under it."""
    return {p.relative_to(folder).as_posix(): file_hash(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def write(artefacts: dict[str, dict], info: dict, root: Path | None = None) -> dict:
    """Write a new release: each artefact's built folder ({name: {"path", "kind", "key", "config"}})
    copied under root/<kind>/<folder name>, and the manifest (its version one more than the release
    it replaces). The new release is assembled beside the old one and swapped in at the end."""
    root = root or release_root()
    old = manifest(root) if (root / MANIFEST).exists() else None
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        entries = {}
        for name, a in artefacts.items():
            src = Path(a["path"])
            rel = f"{a['kind']}/{src.name}"
            shutil.copytree(src, tmp / rel, ignore=shutil.ignore_patterns(".*"))
            files = folder_files(tmp / rel)
            entries[name] = {"kind": a["kind"], "key": a["key"], "folder": rel, "config": a["config"],
                             "bytes": sum((tmp / rel / f).stat().st_size for f in files), "files": files}
        m = {"version": (old or {}).get("version", 0) + 1, **info,
             "bytes": sum(e["bytes"] for e in entries.values()), "artefacts": entries}
        (tmp / MANIFEST).write_text(json.dumps(m, indent=1) + "\n")
        if root.exists():
            gone = root.with_name(f".{root.name}.old")
            shutil.rmtree(gone, ignore_errors=True)
            os.replace(root, gone)
            os.replace(tmp, root)
            shutil.rmtree(gone, ignore_errors=True)
        else:
            os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return m
