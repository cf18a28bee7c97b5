"""One job's command run in this process (a worker of `cli.py run`), its output kept from the terminal.

The command line is named by its entry point ("module:group"), which the CLI
passes in: the compute layer never imports the CLI, and workers and Ray import the group by name.
"""

from __future__ import annotations

import importlib
import io
from contextlib import redirect_stderr, redirect_stdout
from functools import partial

from compute.jobs import lifecycle


def entry_module(entry: str) -> str:
    """The module an entry point ("module:group") lives in (what workers import before any job)."""
    return entry.partition(":")[0]


def execute_command(entry: str, root: str, command: list, argv: list, key: str, threads: int) -> tuple[int, str]:
    """Run `command argv` of the entry point's click group on the catalogue at root with `threads` torch
    threads: (exit status, the one line that says why it failed)."""
    import torch

    module, _, name = entry.partition(":")
    group = getattr(importlib.import_module(module), name)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    lifecycle.JOB_KEY = key
    err = io.StringIO()
    try:
        with redirect_stderr(err), redirect_stdout(io.StringIO()):
            group.main(["--catalog", root, *command, *argv], prog_name="cli.py")
        status = 0
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    finally:
        lifecycle.JOB_KEY = None
        torch.set_num_threads(before)
    if status == 0:
        return 0, ""
    lines = [line.strip() for line in err.getvalue().replace("\r", "\n").splitlines() if line.strip()]
    said = [line for line in lines if line.startswith(("error:", "terminated", "interrupted"))]
    reason = (said or lines or [""])[-1]
    return status, reason.removeprefix("error: ")


def executor(entry: str):
    """execute(root, command, argv, key, threads) for the entry point: picklable, so that worker
    processes and Ray tasks receive it."""
    return partial(execute_command, entry)
