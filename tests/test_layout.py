"""The code's layout: layers import only downward, no import cycles, one home for hook names,
and every CLI command documented."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("schema", "catalog", "compute", "commands")
LAYER = {"schema": 0, "catalog": 1, "compute": 2, "commands": 3, "cli": 4}  # a module may import its layer and those below


def _modules() -> dict[str, Path]:
    mods = {"cli": ROOT / "cli.py"}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = f
    return mods


def _imports(path: Path, known: set[str]) -> set[str]:
    """The project modules a file imports (at any depth in the file, lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            while n and n not in known:
                n = n.rpartition(".")[0]
            if n:
                found.add(n)
    return found


def test_layers_import_only_downward():
    mods = _modules()
    for name, path in mods.items():
        mine = LAYER[name.split(".")[0]]
        for other in _imports(path, set(mods)):
            assert LAYER[other.split(".")[0]] <= mine, f"{name} imports {other}, a layer above it"


def test_no_import_cycles():
    mods = _modules()
    graph = {name: _imports(path, set(mods)) - {name} for name, path in mods.items()}
    state: dict[str, int] = {}

    def visit(n: str, trail: list[str]) -> None:
        state[n] = 1
        for m in graph[n]:
            if m.startswith(n + "."):  # a package imports its own submodules: not a cycle
                continue
            assert state.get(m) != 1, "import cycle: " + " -> ".join([*trail, n, m])
            if m not in state:
                visit(m, [*trail, n])
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n, [])


def test_hook_names_are_spelled_out_in_one_module():
    templates = re.compile(r"hook_resid_pre|hook_resid_post|hook_attn_out|hook_mlp_out|hook_normalized")
    homes = sorted(name for name, path in _modules().items() if templates.search(path.read_text()))
    assert homes == ["schema.sites"]


def test_the_command_line_is_a_thin_layer():
    """cli.py only runs the commands package; no command module is long; nothing below the CLI names
    it (not even as a string: job workers get the entry point from the CLI), and no test or bench
    script reaches into it for a private name."""
    import tomllib

    import cli
    import commands
    from commands.base import ENTRY

    assert len((ROOT / "cli.py").read_text().splitlines()) <= 150
    script = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["circuit-catalog"]
    assert cli.main is commands.main and script == ENTRY == "commands:main"  # python cli.py = circuit-catalog
    for f in (ROOT / "commands").glob("*.py"):
        assert len(f.read_text().splitlines()) <= 400, f.name
    for f in (ROOT / "compute").rglob("*.py"):
        assert not re.search(r"""["']cli["']|["']commands[:"']""", f.read_text()), f"{f} names the CLI"
    for f in [*(ROOT / "tests").glob("*.py"), *(ROOT / "bench").glob("*.py"), *(ROOT / "catalog").rglob("*.py"),
              *(ROOT / "compute").rglob("*.py")]:
        text = f.read_text()
        assert not re.search(r"^\s*(from cli import|import cli\b)", text, re.M) or f.name == "test_layout.py", f
        assert not re.search(r"from commands[.\w]* import _|commands\.\w+\._", text), f"{f} imports a private name"


def test_tests_and_benchmarks_share_helpers_through_helper_modules():
    """No test imports from another test file (shared helpers live in tests/*.py helper modules), and no
    bench script edits sys.path (they run as `python -m bench.NAME` from the repository)."""
    for f in (ROOT / "tests").glob("*.py"):
        assert not re.search(r"^\s*from (tests\.)?test_\w+ import", f.read_text(), re.M), f.name
    for f in (ROOT / "bench").glob("*.py"):
        assert "sys.path" not in f.read_text(), f.name


def test_every_command_is_documented():
    """Every CLI command and subcommand has a row in the command table of docs/getting-started.md."""
    import click

    from cli import main  # the entry point's own test

    table = (ROOT / "docs" / "getting-started.md").read_text().split("## The command line")[1].split("\n## ")[0]

    def commands(group: click.Group, prefix: str):
        for name, cmd in group.commands.items():
            yield f"{prefix} {name}"
            if isinstance(cmd, click.Group):
                yield from commands(cmd, f"{prefix} {name}")

    for path in commands(main, "cli.py"):
        assert f"`{path}" in table, f"{path} has no row in the command table of docs/getting-started.md"
