"""Shared fixtures: the zoo, its dictionaries and a demo catalogue, built once per session.

The zoo and dictionaries are cached under `$CIRCUIT_CACHE` (default `.cache`),
the same cache `make demo` fills, so they are trained at most once per machine.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("CIRCUIT_CACHE", str(ROOT / ".cache"))


@pytest.fixture(scope="session")
def zoo_and_dicts():
    """The zoo and its dictionaries, built together (one build process) when not cached."""
    from compute.dictionaries.building import zoo_with_dictionaries
    from compute.models.zoo import ZooConfig

    return zoo_with_dictionaries(ZooConfig(), progress=False)[:2]


@pytest.fixture(scope="session")
def zoo(zoo_and_dicts):
    return zoo_and_dicts[0]


@pytest.fixture(scope="session")
def dicts(zoo_and_dicts):
    return zoo_and_dicts[1]


@pytest.fixture(scope="session")
def saes(dicts):
    return {k: d.sae for k, d in dicts.items()}


@pytest.fixture(scope="session")
def subs(zoo):
    from schema.sites import sites

    return sites(zoo.model.cfg.n_layers)


def run_cli(*args: str, catalog: Path | None = None, cwd: Path = ROOT, separate: bool = False
            ) -> subprocess.CompletedProcess:
    """Run `cli.py ...` as a user would, with its exit code, stdout and stderr.

    It runs in this process (click's runner, the same code path as the console script), which
    saves each call the 4 s of importing PyTorch and TransformerLens anew; `separate=True` runs
    `python cli.py` as a process of its own (what signals, forks and concurrent workers need)."""
    argv = [*(["--catalog", str(catalog)] if catalog else []), *args]
    if separate:
        return subprocess.run([sys.executable, str(ROOT / "cli.py"), *argv], capture_output=True, text=True,
                              cwd=cwd, timeout=900)
    from click.testing import CliRunner

    from commands import main

    here = os.getcwd()
    os.chdir(cwd)
    try:
        r = CliRunner().invoke(main, argv, prog_name="cli.py")
    finally:
        os.chdir(here)
    stderr = r.stderr
    if r.exception is not None and not isinstance(r.exception, SystemExit):  # a bug: show its traceback
        stderr += "".join(traceback.format_exception(*r.exc_info))
    return subprocess.CompletedProcess(argv, r.exit_code, r.stdout, stderr)


def run_readme_commands(catalog: str, text: str, here: Path) -> list[subprocess.CompletedProcess]:
    """Run, as written and in order, the documentation's blocks of `python cli.py --catalog CATALOG ...` commands
    found in `text`, in the folder `here`; each must succeed. Returns their outputs."""
    blocks = re.findall(rf"```bash\n(python cli.py --catalog {catalog} .*?)```", text, flags=re.S)
    assert blocks, f"no block of `python cli.py --catalog {catalog}` commands"
    outputs = []
    for command in re.split(r"\n(?=python cli.py)", "\n".join(b.strip() for b in blocks)):
        r = run_cli(*shlex.split(command)[2:], cwd=here)  # without "python cli.py"
        assert r.returncode == 0, (command, r.stderr[-2000:])
        outputs.append(r)
    return outputs


@pytest.fixture(scope="session")
def demo_catalog(tmp_path_factory, dicts) -> Path:
    """A catalogue filled by `cli.py demo` (every zoo task), shared by read-only tests."""
    path = tmp_path_factory.mktemp("demo") / "circuits"
    r = run_cli("demo", catalog=path)
    assert r.returncode == 0, r.stderr[-2000:]
    return path


@pytest.fixture(scope="session")
def local(tmp_path_factory, dicts):
    """The local-circuit page's commands, run as written in a fresh folder: (catalogue, outputs)."""
    from tests.docs import page

    here = tmp_path_factory.mktemp("local")
    return here / "local", run_readme_commands("local", page("local-circuits.md"), here)


@pytest.fixture(scope="module")
def browser():
    """Debian's headless Chromium, driven through Playwright."""
    from playwright.sync_api import sync_playwright

    from tests.browser import FLAGS, chromium

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium(), args=[f for f in FLAGS if f != "--headless"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    """A fresh browser page; a script error on it fails the test."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    pg = context.new_page()
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    context.close()
    assert not errors, f"the page's script failed: {errors}"
