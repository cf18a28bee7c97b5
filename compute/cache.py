"""Content-addressed cache for built artefacts (zoo model, task files, dictionaries).

Builds run with PyTorch's deterministic algorithms, so the same configuration
gives bit-identical weights in every process and at any thread count (without
them, the CPU backward of the embedding lookup accumulates in a varying order).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


def cache_root() -> Path:
    """`$CIRCUIT_CACHE`, or `.cache` in the working directory."""
    return Path(os.environ.get("CIRCUIT_CACHE", ".cache")).resolve()


def config_hash(config: object) -> str:
    """A short stable hash of a dataclass or JSON-able configuration."""
    if dataclasses.is_dataclass(config):
        config = dataclasses.asdict(config)
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def file_hash(path: Path) -> str:
    """sha256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def deterministic() -> Iterator[None]:
    """Run the body with deterministic PyTorch kernels, restoring the previous mode after."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def cached_dir(kind: str, key: str, build: Callable[[Path], None]) -> Path:
    """Return `<cache>/<kind>/<key>`, building it first if absent.

    `build` runs under `deterministic()` and fills a temporary directory that is
    renamed into place only when it returns, so an interrupted build never leaves
    a half-written entry.
    """
    final = cache_root() / kind / key
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=final.parent))
    try:
        with deterministic():
            build(tmp)
        os.replace(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.exists():  # not a lost race with another builder
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
