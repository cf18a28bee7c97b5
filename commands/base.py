"""The command line's frame: the `main` group every command joins, how errors and signals end a
command (one line, an exit status, never a traceback), and how answers are printed."""

from __future__ import annotations

import os
import signal
import sys
import warnings
from pathlib import Path

import click

from catalog.errors import PartialAnswer, Terminated, UserError

DEFAULT_CATALOG = "circuits"
OLD_DEFAULT_CATALOG = "catalog"  # until release 1: the catalog package's folder, so a catalogue found there is moved
CATALOG_HELP = f"catalogue directory (env CIRCUIT_CATALOG, default ./{DEFAULT_CATALOG})"
ENTRY = "commands:main"  # the group, by name: how job workers and Ray import it


class Group(click.Group):
    """Turns user errors into one line on stderr and exit code 1, never a traceback; SIGTERM stops a
    job like Ctrl-C does, so that it removes what it staged."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:  # a bare group: its help, as click shows it
            click.echo(e.ctx.get_help())
            sys.exit(0)
        except click.UsageError as e:
            hint = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
            click.echo(f"error: {e.format_message()}{hint}", err=True)
            sys.exit(1)
        except click.ClickException as e:
            click.echo(f"error: {e.format_message()}", err=True)
            sys.exit(1)
        except click.exceptions.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(1)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)

    def invoke(self, ctx):
        previous = signal.signal(signal.SIGTERM, _terminate) if _main_thread() else None
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", PartialAnswer)
                rv = super().invoke(ctx)
            notes = dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, PartialAnswer))
            for note in notes:  # runs left out of what a query read: said once, and an answer is marked
                click.echo(f"warning: {note}", err=True)
            if notes and ctx.meta.get(ANSWERS):
                sys.exit(PARTIAL)
            return rv
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except Terminated:
            click.echo("terminated: nothing partial was committed", err=True)
            sys.exit(143)
        except KeyboardInterrupt:
            click.echo("interrupted: nothing partial was committed", err=True)
            sys.exit(130)
        except BrokenPipeError:  # the reader of a pipe stopped (`| head`): nothing to say, as for SIGPIPE
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail
            sys.exit(141)
        except OSError as e:  # the machine's answer about a file: unwritable, missing, disk full
            where = f": {e.filename}" if e.filename else ""
            click.echo(f"error: {e.strerror or e}{where}", err=True)
            sys.exit(1)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


def _terminate(signum, frame):
    raise Terminated()


ANSWERS = "answers"  # ctx.meta key: the command prints an answer read from the catalogue
PARTIAL = 3  # the exit code of such an answer read without runs that could not be trusted


def answers(command):
    """Mark a command whose output is an answer read from the catalogue: when runs were left out of
    what it read (`catalog.verified`), it exits PARTIAL after its output."""
    import functools

    @functools.wraps(command)
    def marked(*args, **kwargs):
        click.get_current_context().meta[ANSWERS] = True
        return command(*args, **kwargs)

    return marked


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


@click.group(cls=Group)
@click.option("--catalog", "catalog_path", envvar="CIRCUIT_CATALOG", default=DEFAULT_CATALOG,
              show_default=True, type=click.Path(path_type=Path), help=CATALOG_HELP)
@click.pass_context
def main(ctx, catalog_path: Path):
    """A DuckDB/Parquet catalogue of sparse feature circuits."""
    from compute.allocator import keep_freed_memory

    keep_freed_memory()
    if ctx.get_parameter_source("catalog_path") == click.core.ParameterSource.DEFAULT:
        _move_old_default(Path(catalog_path))
    ctx.obj = catalog_path


def _move_old_default(new: Path) -> None:
    """The default catalogue was ./catalog, the `catalog` package's own folder: move one found there."""
    old = Path(OLD_DEFAULT_CATALOG)
    if not new.exists() and (old / "catalog.duckdb").is_file():
        from catalog.store import move

        move(old, new)
        click.echo(f"moved the catalogue from ./{old} (the catalog package's folder) to ./{new}, its new default",
                   err=True)


def output(df, fmt: str) -> None:
    """A data frame as the table, CSV or JSON the user asked for (--format)."""
    from catalog.query import format_frame

    click.echo(format_frame(df, fmt), nl=False)


def console():
    """A rich console that stays wide when piped, so summary tables do not wrap."""
    from rich.console import Console

    c = Console()
    return c if c.is_terminal else Console(width=160)
