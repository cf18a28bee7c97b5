"""Job files: many `cli.py` commands in one TOML file, lists expanded into every combination.

    [defaults]                  # options every job whose command has them takes, unless it sets them
    examples = 16

    [[job]]
    command = "discover"        # any cli.py command: "discover", "dictionaries train", "explain", ...
    task = ["sva_simple", "ioi"]
    method = ["ig", "atp"]      # 2 tasks x 2 methods: four jobs
    neurons = [false, true]     # a flag: true gives --neurons, false leaves it out (or gives --no-X)

    [[job]]
    command = "explain"
    args = ["attn_1", "top"]    # positional arguments (a list of lists expands)
    prompt = "when kate and mary went to the school , kate gave the letter to"
    position = 14

A list value expands; a list of lists gives a repeatable option several values in one job. Each
job is checked against the command's own options before anything runs, and keyed by a hash of
its command line, so a rerun recognises the jobs already done.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import click

from catalog.errors import UserError
from compute.inputs import read_bounded


@dataclass(frozen=True)
class Job:
    command: tuple[str, ...]  # ("discover",) or ("dictionaries", "train")
    argv: tuple[str, ...]  # its options and arguments, as on the command line

    @cached_property
    def key(self) -> str:
        """A stable key: the same command line always gets it, another never does."""
        return hashlib.sha256(json.dumps([self.command, self.argv]).encode()).hexdigest()[:16]

    @property
    def name(self) -> str:
        return " ".join((*self.command, *self.argv))


MAX_JOBS = 10_000  # jobs one file may expand to (`cli.py run --max-jobs`)
MAX_BYTES = 1 << 20  # a job file's size at most


def read_jobs(path: Path, group: click.Group, max_jobs: int = MAX_JOBS) -> list[Job]:
    """The jobs of a job file, expanded and checked against the commands of `group` (cli.py's). Their
    number is counted before any is made (at most `max_jobs`), and each option value is checked once."""
    spec = _read(Path(path))
    unknown = set(spec) - {"defaults", "job"}
    if unknown:
        raise UserError(f"{path}: unknown section {sorted(unknown)[0]!r}; a job file has [defaults] and [[job]] tables")
    defaults, tables = spec.get("defaults", {}), spec.get("job", [])
    if not isinstance(defaults, dict) or not isinstance(tables, list) or not tables:
        raise UserError(f"{path}: no jobs; give one [[job]] table per command")
    plans, used, total = [], set(), 0
    for i, table in enumerate(tables, 1):
        where = f"{path}: job {i}"
        if not isinstance(table, dict):
            raise UserError(f"{where}: a job is a [[job]] table")
        options = dict(table)
        command = options.pop("command", None)
        if not isinstance(command, str) or not command.split():
            raise UserError(f"{where}: give its command, e.g. command = \"discover\"")
        cmd, names = _command(group, command.split(), where)
        taken = {k: v for k, v in defaults.items() if k not in options and k.replace("_", "-") in _option_names(cmd)}
        used |= set(taken)
        choices = _choices({**taken, **options})
        total += math.prod(len(c) for c in choices.values())
        if total > max_jobs:
            raise UserError(f"{path}: more than {max_jobs:,} jobs (job {i} alone expands to "
                            f"{math.prod(len(c) for c in choices.values()):,}); split the file, or raise --max-jobs")
        plans.append((cmd, names, choices, where))
    unused = sorted(set(defaults) - used)
    if unused:
        raise UserError(f"{path}: the default {unused[0]!r} is an option of none of the jobs' commands")
    jobs: list[Job] = []
    keys: set[str] = set()
    for cmd, names, choices, where in plans:
        for job in _jobs(cmd, names, choices, where):
            if job.key in keys:
                raise UserError(f"{path}: the job `{job.name}` is listed twice")
            keys.add(job.key)
            jobs.append(job)
    return jobs


def _read(path: Path) -> dict:
    """A job file's TOML: a regular file of at most MAX_BYTES (never a device, a pipe or a folder)."""
    data = read_bounded(path, MAX_BYTES, "job file")
    try:
        return tomllib.loads(data.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid TOML: {e}") from None


def _jobs(cmd: click.Command, names: list[str], choices: dict[str, list], where: str) -> Iterator[Job]:
    """The jobs of one [[job]] table, made one at a time: each option value is turned into its part of
    the command line and checked once (click checks each option on its own, so a combination fails only
    where one of its values does), then the parts are combined."""
    parts = {k: [_argv(cmd, {k: v}, where) for v in vs] for k, vs in choices.items()}
    first = {k: 0 for k in parts}
    _check(cmd, names, _line(parts, first), where)
    for k, options in parts.items():
        for i in range(1, len(options)):
            _check(cmd, names, _line(parts, {**first, k: i}), where)
    for combo in itertools.product(*(range(len(v)) for v in parts.values())):
        yield Job(tuple(names), tuple(_line(parts, dict(zip(parts, combo, strict=True)))))


def _line(parts: dict[str, list[list[str]]], chosen: dict[str, int]) -> list[str]:
    """A job's command line from the chosen value of each key: its options in the file's order, then
    its positional arguments."""
    options = [a for k, i in chosen.items() if k != "args" for a in parts[k][i]]
    return options + (parts["args"][chosen["args"]] if "args" in parts else [])


# Commands that cannot be jobs: one never ends, the other would run job files inside a job.
NOT_JOBS = ("serve", "run")


def _command(group: click.Group, words: list[str], where: str) -> tuple[click.Command, list[str]]:
    if words[0] in NOT_JOBS:
        raise UserError(f"{where}: {words[0]!r} cannot be a job")
    cmd: click.Command = group
    for w in words:
        sub = cmd.commands.get(w) if isinstance(cmd, click.Group) else None
        if sub is None:
            known = ", ".join(sorted(cmd.commands)) if isinstance(cmd, click.Group) else "none"
            raise UserError(f"{where}: no command {' '.join(words)!r} (commands: {known})")
        cmd = sub
    if isinstance(cmd, click.Group):
        raise UserError(f"{where}: {' '.join(words)!r} needs a subcommand ({', '.join(sorted(cmd.commands))})")
    return cmd, words


def _choices(options: dict) -> dict[str, list]:
    """Each key's values: a list expands into one job per value (a list of lists is one value per job,
    not expanded further); args, a flat list, is one job's positional arguments."""
    return {k: v if isinstance(v, list) and not (k == "args" and _flat(v)) else [v] for k, v in options.items()}


def _flat(values: list) -> bool:
    return not any(isinstance(v, list) for v in values)


def _option_names(cmd: click.Command) -> dict[str, tuple[click.Option, str]]:
    """A command's options by name without dashes ('examples', 'no-eval'), each with the flag it is."""
    return {opt.lstrip("-"): (p, opt) for p in cmd.params if isinstance(p, click.Option)
            for opt in (*p.opts, *p.secondary_opts)}


def _argv(cmd: click.Command, values: dict, where: str) -> list[str]:
    """The command line of one job: its options in the file's order, then its positional arguments."""
    by_name = _option_names(cmd)
    argv: list[str] = []
    for key, value in values.items():
        if key == "args":
            continue
        name = key.replace("_", "-")
        if name not in by_name:
            raise UserError(f"{where}: {' '.join(cmd.name.split())} has no option --{name}")
        p, opt = by_name[name]
        if p.is_eager:  # --help and the like print and exit: a job that runs nothing
            raise UserError(f"{where}: --{name} does not run the command; it cannot be part of a job")
        if p.is_flag:
            if not isinstance(value, bool):
                raise UserError(f"{where}: --{name} is a flag; give true or false, not {value!r}")
            if value:
                argv.append(opt)
            elif opt in p.secondary_opts:  # no-fill = false: --fill
                argv.append(p.opts[0])
            elif p.secondary_opts:  # fill = false: --no-fill (a plain flag set false is left out)
                argv.append(p.secondary_opts[0])
            continue
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, (dict, list)) or isinstance(v, bool):
                raise UserError(f"{where}: --{name} takes a value, not {v!r}")
            argv += [opt, str(v)]
    args = values.get("args", [])
    if not isinstance(args, list) or any(isinstance(a, (dict, list)) for a in args):
        raise UserError(f"{where}: args is a list of positional arguments, e.g. args = [\"attn_1\", \"top\"]")
    if any(str(a).startswith("-") for a in args):
        raise UserError(f"{where}: args holds {next(a for a in args if str(a).startswith('-'))!r}; positional "
                        "arguments are not options: give an option as a key of the job's table")
    return argv + [str(a) for a in args]


def _check(cmd: click.Command, names: list[str], argv: list[str], where: str) -> None:
    """Parse a job's command line as the command would, so a mistake is found before anything runs."""
    name = " ".join((*names, *argv))
    try:
        with cmd.make_context(names[-1], list(argv)):
            pass
    except click.ClickException as e:
        raise UserError(f"{where} (`{name}`): {e.format_message()}") from None
    except click.exceptions.Exit:  # it would print something (its help) and end without running
        raise UserError(f"{where} (`{name}`): this command line does not run the command") from None
