"""The command line: a thin layer over the library, one module per family of commands.

`main` is the click group (commands.base); importing this package registers every command on it.
`python cli.py ...` and the installed `circuit-catalog` script both run it.
"""

from commands import (  # noqa: F401 - each module adds its commands to main
    atlas,
    benchmarks,
    catalogue,
    dictionaries,
    discovery,
    explorer,
    local,
    parameters,
    questions,
    release,
    sweeps,
)
from commands.base import main

__all__ = ["main"]
