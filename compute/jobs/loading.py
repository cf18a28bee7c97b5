"""What a command loads before it works: the zoo model and its dictionaries, a checkpoint and its
dictionary set, a zoo task by name. Each says on stderr what it loads (it may train on first use)."""

from __future__ import annotations

import sys
from pathlib import Path

from catalog.errors import UserError


def say(text: str) -> None:
    """A line for the person watching (stderr: never mixed into an answer on stdout)."""
    print(text, file=sys.stderr, flush=True)


def zoo_and_dictionaries(name: str = "default", identity: bool = False):
    """(zoo, its SAEs, identity dictionaries or None): released, or trained on first use and cached."""
    from compute.dictionaries.building import zoo_with_dictionaries
    from compute.models.zoo import zoo_config, zoo_path
    from compute.release import is_released

    where = "released" if is_released(zoo_path(zoo_config(name))) else "not in the release: trained on first use, then cached"
    say(f"zoo model {name!r} and its dictionaries ({where}) ...")
    return zoo_with_dictionaries(zoo_config(name), identity)


def zoo_tasks(tasks: dict, names, zoo_name: str = "default") -> list:
    """The zoo tasks of these names, in order; an unknown name is one line listing the known ones."""
    for name in names:
        if name not in tasks:
            raise UserError(f"unknown task {name!r}; {zoo_name} zoo tasks: {', '.join(sorted(tasks))}")
    return [tasks[name] for name in names]


def checkpoint_and_dictionaries(model_name: str, device: str, dtype: str, dictionary_set: Path | None,
                                spec: Path | None, fill: bool, prompts: list[str]):
    """A checkpoint's handle and its dictionaries (identity ones without a set), measured on the prompts."""
    from compute.dictionaries.sets import identity_set, load_set
    from compute.models.checkpoints import load_checkpoint

    say(f"loading {model_name} ...")
    handle = load_checkpoint(model_name, device, dtype)
    if dictionary_set is None:
        return handle, identity_set(handle, prompts)
    dicts, filled = load_set(dictionary_set, handle, prompts, spec, fill)
    if filled:
        say(f"no dictionary for {', '.join(filled)}: neurons (identity dictionaries) there")
    return handle, dicts
