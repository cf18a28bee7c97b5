"""The documentation: the README opens with the two set-up commands and stays short, every page's
examples run (SQL and Python against the demo catalogue here; the other pages' commands where their
catalogues are made), the reference pages are what the code says, and the site builds strictly."""

import contextlib
import io
import os
import re
import subprocess
import sys

import pytest

import catalog
from tests.docs import DOCS, ROOT, blocks, page, pages, section

# Pages (or sections) whose SQL reads a catalogue their own commands fill, run by the tests of that
# feature: editing (test_editing), ground truth (test_groundtruth), local circuits
# (test_local_circuits), sweeps (test_jobs), the atlas (test_atlas: its Python too). Every other SQL block
# reads the demo catalogue.
ELSEWHERE = {"editing.md": None, "ground-truth.md": None, "local-circuits.md": None, "sweeps.md": "Sweeps",
             "atlas.md": None}


def _demo_sql() -> list[tuple[str, str]]:
    found = []
    for name in pages():
        text = page(name)
        if name in ELSEWHERE:
            if ELSEWHERE[name] is None:
                continue
            text = text.replace(section(text, ELSEWHERE[name]), "")
        found += [(name, sql) for sql in blocks("sql", text)]
    return found


DEMO_SQL = _demo_sql()
PYTHON = [(name, code) for name in pages() if name != "atlas.md" for code in blocks("python", page(name))]


def test_readme_opens_with_the_two_setup_commands():
    first = re.search(r"```\n(.*?)```", page("README.md"), flags=re.S).group(1).strip().splitlines()
    assert [ln.split("#")[0].strip() for ln in first] == ["make demo", "make test"]


def test_the_readme_is_short_and_links_every_page_of_the_site():
    readme = page("README.md")
    assert len(readme.splitlines()) <= 200
    for name in pages()[1:]:
        assert f"docs/{name}" in readme or name.startswith("reference/") and "docs/reference/" in readme, name
    for target in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / target).exists(), target


def test_the_readme_tour_runs_as_written(demo_catalog, tmp_path):
    """The README's ten-line tour, on a copy of the demo catalogue (it commits local circuits)."""
    import shutil

    from tests.conftest import run_readme_commands

    shutil.copytree(demo_catalog, tmp_path / "circuits")
    out = run_readme_commands("circuits", page("README.md"), tmp_path)
    listed, overlap, compared, diffed, attributed, explained, plotted = out
    assert listed.stdout.count("features") == 6 and listed.stdout.count("neurons") == 6
    assert overlap.stdout.startswith("task_a,task_b,n_shared,jaccard") and len(overlap.stdout.splitlines()) == 4
    assert "wrote compare.png" in compared.stderr and "edges   added" in diffed.stdout
    assert "circuit circuit-" in attributed.stderr and "pre-activation" in explained.stderr
    assert all((tmp_path / f).stat().st_size > 10_000 for f in ("compare.png", "faithfulness.png"))


def test_the_readmes_node_counts_are_the_demos(demo_catalog):
    """'features need A–B nodes where neurons need C–D': the demo's nodes_for_faithfulness(0.8)."""
    m = re.search(r"features need (\d+)–(\d+) nodes where neurons need (\d+)–(\d+)", " ".join(page("README.md").split()))
    df = catalog.open(demo_catalog).sql("SELECT * FROM nodes_for_faithfulness(0.8)")
    assert [int(v) for v in m.groups()] == [df.features.min(), df.features.max(), df.neurons.min(), df.neurons.max()]


@pytest.mark.parametrize("name, sql", DEMO_SQL, ids=lambda v: v.split("\n")[0][:40])
def test_sql_examples_return_rows(demo_catalog, name, sql):
    df = catalog.open(demo_catalog).sql(sql)
    assert len(df) > 0, (name, sql)


@pytest.mark.parametrize("name, code", PYTHON, ids=lambda v: v.split("\n")[0][:40])
def test_python_examples_run(demo_catalog, name, code):
    here = os.getcwd()
    os.chdir(demo_catalog.parent)  # the examples open ./circuits
    try:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, name, "exec"), {})
    finally:
        os.chdir(here)
    text = out.getvalue()
    if "compare(" in code:  # the query layer: overlap table, diff summary, paths, and the two files it writes
        assert "jaccard" in text and "nodes matched by key" in text and "-> metric" in text
        for f in ("compare.png", "circuit.html"):
            assert (demo_catalog.parent / f).stat().st_size > 1000
            (demo_catalog.parent / f).unlink()
    elif "to_networkx" in code:  # pandas, Arrow, chunks and networkx
        assert re.search(r"\n\d+ nodes as Arrow", text) and "activation rows of ioi" in text
        assert re.search(r"\n\d+ nodes reach the metric", text)
    else:
        assert "task_id" in text and "resid" in text


def test_the_reference_pages_are_what_the_code_says(tmp_path):
    """docs/reference/ is generated (`make docs-reference`): a command's help, a table's columns or a
    named query changed without it fails here."""
    from commands.reference import write

    for made in write(tmp_path):
        checked_in = DOCS / "reference" / made.name
        assert checked_in.read_text() == made.read_text(), f"{checked_in} is stale: run `make docs-reference`"


def test_every_table_column_and_named_query_is_in_the_reference():
    from catalog.macros import listed
    from schema.derive import column_docs

    tables = page("reference/tables.md")
    for table, cols in column_docs().items():
        part = tables.split(f"## `{table}`")[1].split("\n## ")[0]
        for col, _, _ in cols:
            assert f"| {col} |" in part, (table, col)
    for q in listed():
        assert f"`{q.signature}`" in page("reference/queries.md"), q.name


def test_the_site_builds_with_no_broken_link(tmp_path):
    """`mkdocs build --strict`: a link to a page or an anchor that does not exist, or a page left out
    of the navigation, fails the build."""
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "cli" / "index.html").exists()
