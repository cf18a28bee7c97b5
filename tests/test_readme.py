"""The README's examples run against the demo catalogue, and it documents every column."""

import contextlib
import io
import os
import re
from pathlib import Path

import pytest

import catalog
from schema.derive import column_docs

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _blocks(lang, text=README):
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


# The editing section's queries read the catalogue its commands fill (tests/test_editing.py runs them).
SHIFT_SECTION = "## Editing" + README.split("## Editing", 1)[1].split("\n## ", 1)[0]
# The ground-truth section's queries read the benchmark's catalogue (tests/test_groundtruth.py runs them).
GROUND_TRUTH_SECTION = "## Ground truth" + README.split("## Ground truth", 1)[1].split("\n## ", 1)[0]
# The local-circuit section's queries read the catalogue its commands fill (tests/test_local_circuits.py runs them).
LOCAL_SECTION = "## Local circuits" + README.split("## Local circuits", 1)[1].split("\n## ", 1)[0]
# The sweeps section's queries read a catalogue `cli.py run` filled (tests/test_jobs.py runs them).
SWEEPS_SECTION = "## Sweeps" + README.split("## Sweeps", 1)[1].split("\n## ", 1)[0]
DEMO_SQL = [b for b in _blocks("sql") if b not in _blocks("sql", SHIFT_SECTION) + _blocks("sql", GROUND_TRUTH_SECTION)
            + _blocks("sql", LOCAL_SECTION) + _blocks("sql", SWEEPS_SECTION)]


def test_readme_opens_with_the_two_setup_commands():
    first = re.search(r"```\n(.*?)```", README, flags=re.S).group(1).strip().splitlines()
    assert [ln.split("#")[0].strip() for ln in first] == ["make demo", "make test"]


@pytest.mark.parametrize("sql", DEMO_SQL, ids=lambda s: s.split("\n")[0][:40])
def test_sql_examples_return_rows(demo_catalog, sql):
    df = catalog.open(demo_catalog).sql(sql)
    assert len(df) > 0


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_python_examples_run(demo_catalog, index):
    code = _blocks("python")[index]
    here = os.getcwd()
    os.chdir(demo_catalog.parent)  # the examples open ./circuits
    try:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, "README.md", "exec"), {})
    finally:
        os.chdir(here)
    text = out.getvalue()
    if "compare(" not in code:
        assert "task_id" in text and "resid" in text
    else:  # the query layer: overlap table, diff summary, paths, and the two files it writes
        assert "jaccard" in text and "nodes matched by key" in text and "-> metric" in text
        for f in ("compare.png", "circuit.html"):
            assert (demo_catalog.parent / f).stat().st_size > 1000
            (demo_catalog.parent / f).unlink()


def test_every_table_and_column_is_documented():
    for table, cols in column_docs().items():
        section = README.split(f"#### `{table}`")[1].split("####")[0]
        for col, _, _ in cols:
            assert f"| {col} |" in section, (table, col)
