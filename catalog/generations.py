"""Generations: the folder of committed runs, switched whole when compaction rewrites it.

    runs -> generations/g-000002        a relative symbolic link: the current generation
    generations/g-000002/<run_id>/      committed runs (a commit renames a run into runs/<run_id>,
                                        that is, into the current generation)

Compaction (`catalog.compaction`) builds the next generation beside the current one and
switches the link with one rename, under the commit lock. Readers resolve the link when a query
starts: the sandbox's views and the catalogue file's views name the generation's own folder, so
a query lists and reads one generation, never a mix, and a query running across a switch
finishes on the generation it started on, which stays on disk while any query reads it.

Catalogues created before generations have a plain `runs/` folder; `convert` moves them to this
layout without changing what any reader sees (the new generation holds hard links to the same
files under the same names).
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from catalog.errors import UserError

RUNS = "runs"
GENERATIONS = "generations"
READERS = ".readers"  # in a generation's folder: every query holds a shared lock on it while it reads
_NAME = re.compile(r"g-(\d{6})")


def current(root: Path) -> Path:
    """The folder that holds the committed runs now (absolute, the link resolved)."""
    return (Path(root) / RUNS).resolve()


def views_base(root: Path) -> str:
    """Where the catalogue file's views read shards from, relative to the catalogue folder: the
    current generation's folder, or `runs` in the old layout (or before the first run)."""
    runs = Path(root) / RUNS
    return os.readlink(runs) if runs.is_symlink() else RUNS


def create(root: Path) -> None:
    """The layout of a new catalogue: an empty first generation and the link to it."""
    first = Path(root) / GENERATIONS / "g-000000"
    first.mkdir(parents=True, exist_ok=True)
    (first / READERS).touch()
    if not (Path(root) / RUNS).exists():
        os.symlink(first.relative_to(root), Path(root) / RUNS)


def listed(root: Path) -> list[Path]:
    """Every finished generation folder, oldest first."""
    folder = Path(root) / GENERATIONS
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and _NAME.fullmatch(p.name))


def next_folder(root: Path) -> Path:
    """A fresh folder name for the next generation (its `.tmp` twin is where it is built)."""
    numbers = [int(_NAME.fullmatch(p.name).group(1)) for p in listed(root)]
    return Path(root) / GENERATIONS / f"g-{max(numbers, default=-1) + 1:06d}"


def start(root: Path) -> tuple[Path, Path]:
    """(the next generation's folder, the empty `.tmp` folder it is built in, renamed to it when whole)."""
    target = next_folder(root)
    building = target.with_name(target.name + ".tmp")
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    (building / READERS).touch()
    return target, building


def link_tree(source: Path, target: Path) -> None:
    """A copy of a run folder made of hard links (no bytes copied; the files stay shared)."""
    try:
        shutil.copytree(source, target, copy_function=os.link)
    except OSError as e:
        raise UserError(f"cannot link {source} into {target.parent}: {e.strerror or e} "
                        "(compaction needs a filesystem with hard links)") from None


def switch(root: Path, generation: Path) -> Path:
    """Make `generation` the current one, in one rename of the link; returns the folder that was
    current. The caller holds the commit lock."""
    root = Path(root)
    retired = current(root)
    os.replace(_link_to(root, generation), root / RUNS)  # a link over a link: atomic
    return retired


def convert(root: Path) -> bool:
    """Move a catalogue of the old layout (a plain `runs/` folder) to generations. Every reader sees
    the same runs before and after. Returns whether there was anything to do; the caller holds the
    commit lock."""
    root = Path(root)
    runs = root / RUNS
    if runs.is_symlink() or not runs.is_dir():
        return False
    target, building = start(root)
    for run in runs.iterdir():
        if run.is_dir():
            link_tree(run, building / run.name)
    os.replace(building, target)
    link = _link_to(root, target)
    _exchange(link, runs)  # the folder and the link trade places at once
    shutil.rmtree(link)  # the old folder now; its files live on in the new generation under the same names
    return True


def _link_to(root: Path, generation: Path) -> Path:
    """A fresh link `runs.next` to a generation (relative, so a copied catalogue keeps working)."""
    link = root / (RUNS + ".next")
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.is_dir():  # left by a conversion killed after its exchange
        shutil.rmtree(link)
    os.symlink(generation.relative_to(root), link)
    return link


@contextmanager
def reading(root: Path) -> Iterator[Path]:
    """The current generation, held for the body: a shared lock on its `.readers` file, which
    `remove_old` must take exclusively before it removes a generation. A catalogue this process
    cannot write is read without the lock."""
    while True:
        generation = current(root)
        try:
            f = open(generation / READERS, "a")  # noqa: SIM115  (held for the body)
        except FileNotFoundError:  # removed since it was resolved: take the current one again
            continue
        except OSError:  # a read-only catalogue
            yield generation
            return
        with f:
            fcntl.flock(f, fcntl.LOCK_SH)
            if (generation / READERS).exists():  # not moved aside while we waited for the lock
                yield generation
                return


def remove_old(root: Path, keep: set[Path]) -> int:
    """Remove every generation except the current one, `keep`, and those a query is reading, and any
    half-built one left by a killed compaction. Returns how many went."""
    spared = {current(root), *(p.resolve() for p in keep)}
    gone = 0
    for path in (Path(root) / GENERATIONS).iterdir() if (Path(root) / GENERATIONS).is_dir() else []:
        if path.resolve() in spared or not path.is_dir():
            continue
        try:
            f = open(path / READERS, "a")  # noqa: SIM115
        except OSError:
            continue
        with f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a query is reading it: a later compaction removes it
                continue
            trash = path.with_name(path.name + ".removing")
            os.replace(path, trash)  # gone for readers at once; they take the current one instead
        shutil.rmtree(trash, ignore_errors=True)
        gone += 1
    return gone


def _exchange(a: Path, b: Path) -> None:
    """Swap two paths atomically (Linux renameat2 with RENAME_EXCHANGE)."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        raise UserError("this catalogue predates generations and converting it needs Linux's renameat2; "
                        "convert it on Linux once (`cli.py compact`)")
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) != 0:
        err = ctypes.get_errno()
        raise UserError(f"cannot switch {b} to the new generation: {os.strerror(err)}")
