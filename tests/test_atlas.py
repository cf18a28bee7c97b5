"""The atlas: a graph per prompt of a data set, and questions across them.

Every stored graph is compared with the graph `attribute --prompt` commits for its prompt alone;
the cross-graph queries with the same computation in pandas over the same rows; a run killed with
SIGKILL is rerun and every prompt is then committed exactly once; hostile files give one line or a
counted drop per prompt.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, run_cli

import catalog
from catalog import atlas
from tests.browser import SHOTS, open_page

# zoo grammar: two labels, answers the model gets right and wrong, one explicit target (the docs' file)
PROMPTS = [json.loads(line) for line in (ROOT / "docs" / "atlas-prompts.jsonl").read_text().splitlines()]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def made(tmp_path_factory, dicts):
    """An atlas of PROMPTS committed by the command line in chunks of 3: (catalogue, its stderr)."""
    here = tmp_path_factory.mktemp("atlas")
    data = write_jsonl(here / "agreement.jsonl", PROMPTS)
    r = run_cli("attribute", "--prompts", str(data), "--chunk", "3", catalog=here / "c")
    assert r.returncode == 0, r.stderr[-2000:]
    return here / "c", r


def test_every_graph_equals_its_prompt_alone(made):
    root, r = made
    assert "atlas agreement: 8 graphs committed" in r.stderr
    cat = catalog.open(root)
    graphs = atlas.graphs(cat, "agreement")
    assert graphs.prompt.tolist() == [p["prompt"] for p in PROMPTS] and graphs.prompt_idx.tolist() == list(range(8))
    assert len(cat.sql("SELECT DISTINCT run_id FROM prompts")) == 3  # chunks of 3 lines
    for i in (0, 2, 6):  # a plain one, one with another field, one with a target
        p = PROMPTS[i]
        alone = run_cli("attribute", "--prompt", p["prompt"], *(["--target", p["target"]] if "target" in p else []),
                        "--format", "csv", catalog=root)
        assert alone.returncode == 0, alone.stderr
        cid = cat.sql("SELECT circuit_id FROM circuits WHERE task_id LIKE 'prompt-%' ORDER BY created_at DESC "
                      "LIMIT 1").circuit_id[0]
        mine = graphs.circuit_id[i]
        for table, key in (("nodes", "node_idx"), ("edges", "kind, src_idx, dst_idx, head")):
            a = cat.sql(f"SELECT * EXCLUDE (circuit_id) FROM {table} WHERE circuit_id = ? ORDER BY {key}", [mine])
            b = cat.sql(f"SELECT * EXCLUDE (circuit_id) FROM {table} WHERE circuit_id = ? ORDER BY {key}", [cid])
            assert len(a) > (40 if table == "nodes" else 200)
            pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-9)
        row = graphs.iloc[i]
        assert (None if pd.isna(row.target) else row.target) == p.get("target")
        assert row.answer == p["answer"] and row.label == p["label"]
    meta = graphs.set_index("prompt_idx")
    assert meta.correct.tolist() == [pr.strip() == a for pr, a in zip(meta.prediction, meta.answer, strict=True)]
    assert meta.correct.any() and not meta.correct.all()  # both groups exist
    assert meta.root[6] == "she - he" and meta.root[0] == meta.prediction[0]
    assert json.loads(meta.fields[2]) == {"source": "hand"} and 0 < meta.probability.min() <= meta.probability.max() <= 1
    acts = cat.sql("SELECT count(*) AS n FROM activations WHERE task_id = 'agreement'").n[0]
    assert acts > 8 * 20  # each prompt's nonzero feature values, for 'why does it fire'


def _rows(cat):
    nodes = cat.sql("SELECT n.*, p.label, p.n_tokens, p.correct FROM nodes n JOIN prompts p USING (circuit_id) "
                    "WHERE p.atlas_id = 'agreement'")
    edges = cat.sql("SELECT e.*, p.label FROM edges e JOIN prompts p USING (circuit_id) "
                    "WHERE p.atlas_id = 'agreement' AND e.kind = 'attribution'")
    return nodes, edges


def _name(n) -> str:
    """A node's name across graphs, as the atlas queries spell it (position from the end)."""
    if n.component == "metric":
        return "metric"
    site = "embed" if n.component == "embed" else f"{n.component}_{n.layer}"
    feat = "/err" if n.is_error else ("" if pd.isna(n.feature_idx) else f"/{int(n.feature_idx)}")
    return f"{site}{feat}" + ("" if pd.isna(n.position) else f"@{int(n.position) - int(n.n_tokens)}")


def test_recurrence_contrast_and_typical_graph_match_pandas(made):
    cat = catalog.open(made[0])
    nodes, edges = _rows(cat)
    sizes = nodes.groupby("label").circuit_id.nunique()
    feats = nodes[nodes.in_circuit & nodes.feature_idx.notna() & nodes.dictionary_id.notna()]
    per = feats.groupby(["label", "circuit_id", "dictionary_id", "feature_idx"]).effect.sum().reset_index()
    expect = per.groupby(["label", "dictionary_id", "feature_idx"]).agg(n=("effect", "size"), mu=("effect", "mean"))
    got = atlas.recurrence(cat, "agreement", "label").set_index(["grp", "dictionary_id", "feature_idx"])
    assert len(got) == len(expect) > 20
    for (label, d, f), e in expect.iterrows():
        g = got.loc[(label, d, f)]
        assert g.n_graphs == e.n and g.share == pytest.approx(e.n / sizes[label]) and g.mean_effect == pytest.approx(e.mu)
    assert (atlas.recurrence(cat, "agreement", "label", 0.5).share >= 0.5).all()

    names = nodes.assign(name=[_name(n) for n in nodes.itertuples()]).set_index(["circuit_id", "node_idx"]).name
    e = edges.assign(src=names.loc[list(zip(edges.circuit_id, edges.src_idx, strict=True))].values,
                     dst=names.loc[list(zip(edges.circuit_id, edges.dst_idx, strict=True))].values)
    wide = e.pivot_table(index="circuit_id", columns=["src", "dst"], values="weight", aggfunc="sum", fill_value=0.0)
    label = e.groupby("circuit_id").label.first()
    a, b = wide[label[wide.index] == "pp"], wide[label[wide.index] == "simple"]
    pooled = np.sqrt((len(a) * a.var(ddof=0) + len(b) * b.var(ddof=0)) / (len(a) + len(b) - 2))
    d = (a.mean() - b.mean()) / pooled
    got = atlas.contrast(cat, "agreement", "label", "pp", "simple").set_index(["src", "dst"])
    assert len(got) == wide.shape[1]
    checked = 0
    for key in d.index:
        assert got.loc[key].mean_a == pytest.approx(a[key].mean(), abs=1e-9)
        assert got.loc[key].share_b == pytest.approx((b[key] != 0).mean())
        if np.isfinite(d[key]) and pooled[key] > 1e-6:
            assert got.loc[key].effect_size == pytest.approx(d[key], rel=1e-6)
            checked += 1
    assert checked > 50

    typical = atlas.typical(cat, "agreement", "label", "pp", 0.75).set_index(["src", "dst"])
    share = (a != 0).mean()
    assert set(typical.index) == set(share[share >= 0.75].index) and len(typical) > 10
    key = typical.index[0]
    assert typical.loc[key].mean_weight == pytest.approx(a[key][a[key] != 0].mean())


def test_head_flow_and_cooccurrence_read_the_same_rows(made):
    cat = catalog.open(made[0])
    nodes, _ = _rows(cat)
    ov = cat.sql("SELECT e.* FROM edges e JOIN prompts p USING (circuit_id) WHERE p.atlas_id = 'agreement' "
                 "AND e.kind = 'ov'")
    heads = atlas.head_flow(cat, "agreement")
    assert heads.mean_flow.sum() * 8 == pytest.approx(ov.weight.abs().sum())  # every OV edge counted once
    pairs = atlas.cooccurrence(cat, "agreement", 2)
    feats = nodes[nodes.in_circuit & nodes.feature_idx.notna() & nodes.dictionary_id.notna()]
    sets = feats.groupby(["dictionary_id", "feature_idx"]).circuit_id.agg(set)
    top = pairs.iloc[0]
    sa, sb = sets[(top.dictionary_a, top.feature_a)], sets[(top.dictionary_b, top.feature_b)]
    assert (top.n_both, top.n_a, top.n_b) == (len(sa & sb), len(sa), len(sb))
    assert top.jaccard == pytest.approx(len(sa & sb) / len(sa | sb))


def test_the_atlas_commands_answer_and_refuse_in_one_line(made):
    root = made[0]
    r = run_cli("atlas", "contrast", "agreement", "true", "false", "--by", "correct", "--format", "csv", catalog=root)
    assert r.returncode == 0 and r.stdout.startswith("src,dst,mean_a,mean_b")
    for args, says in ((("summary", "nope"), "no atlas 'nope'"), (("heads", "agreement", "--by", "colour"), "grouping"),
                       (("typical", "agreement", "nothing", "--by", "label"), "no group 'nothing'")):
        r = run_cli("atlas", *args, catalog=root)
        assert r.returncode == 1 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_hostile_file_drops_what_it_cannot_read_and_counts_it(tmp_path, dicts):
    lines = [json.dumps(PROMPTS[0]), "", b"\xff\xfe not utf-8".decode("latin-1"), '{"prompt": 5}', "not json {",
             json.dumps({"prompt": "the dog " * 40}), json.dumps({"prompt": "the zorblax near the cat"}),
             json.dumps({"prompt": "the cat", "target": "logit:runs fast"}), json.dumps({"prompt": "x" * 10_000_000})]
    data = tmp_path / "hostile.jsonl"
    data.write_bytes(b"\n".join(line.encode("latin-1") if "\xff" in line else line.encode() for line in lines))
    r = run_cli("attribute", "--prompts", str(data), catalog=tmp_path / "c")
    assert r.returncode == 0, r.stderr
    said = r.stderr.strip().splitlines()[-1]
    assert "1 graphs committed; dropped 8" in said, said
    for reason in ("1 empty (line 2)", "1 not UTF-8 text (line 3)", "1 no prompt field", "1 not valid JSON (line 5)",
                   "1 longer than the model's context (line 6)", "1 words the tokenizer does not know (line 7)",
                   "1 target not usable (line 8)", "1 over 65536 bytes (line 9)"):
        assert reason in said, reason
    assert "Traceback" not in r.stderr
    text = tmp_path / "plain.txt"
    text.write_text("the dogs near the cat\n\nthe cat\n")
    r = run_cli("attribute", "--prompts", str(text), "--format", "csv", catalog=tmp_path / "c")
    assert r.returncode == 0 and "atlas plain: 2 graphs committed; dropped 1: 1 empty (line 2)" in r.stderr
    for content, says in ((b"", "has no prompts"), (b"\n\n", "has no prompts: 2 empty"),
                          (json.dumps({"prompt": "the zorblax"}).encode(), "no prompt could be used")):
        data.write_bytes(content)
        r = run_cli("attribute", "--prompts", str(data), "--name", "other", catalog=tmp_path / "c")
        assert r.returncode == 1 and says in r.stderr and len(r.stderr.strip().splitlines()) <= 3, r.stderr
        assert "Traceback" not in r.stderr
    for where, says in ((tmp_path / "missing.jsonl", "No such file"), (tmp_path, "not a regular file"),
                        (Path("/dev/zero"), "not a regular file")):
        r = run_cli("attribute", "--prompts", str(where), catalog=tmp_path / "c")
        assert r.returncode == 1 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_run_killed_with_sigkill_resumes_and_commits_every_prompt_once(tmp_path, dicts):
    data = write_jsonl(tmp_path / "many.jsonl", [{"prompt": p["prompt"], "label": p["label"]} for p in PROMPTS] * 3)
    root = tmp_path / "c"
    cmd = [sys.executable, str(ROOT / "cli.py"), "--catalog", str(root), "attribute", "--prompts", str(data),
           "--chunk", "2", "--format", "csv"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((root / "runs").glob("run-atlas-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)  # mid-run: at least one chunk committed, the next being computed
    proc.wait()
    before = catalog.open(root).sql("SELECT count(*) AS n FROM prompts").n[0]
    assert 2 <= before < 24
    r = run_cli("attribute", "--prompts", str(data), "--chunk", "2", "--format", "csv", catalog=root)
    assert r.returncode == 0, r.stderr
    assert f"{24 - before} graphs committed ({before} committed before)" in r.stderr
    got = catalog.open(root).sql("SELECT count(*) AS n, count(DISTINCT prompt_idx) AS d, count(DISTINCT circuit_id) "
                                 "AS c FROM prompts")
    assert (got.n[0], got.d[0], got.c[0]) == (24, 24, 24)
    again = run_cli("attribute", "--prompts", str(data), "--chunk", "2", catalog=root)
    assert "0 graphs committed (24 committed before)" in again.stderr
    other = run_cli("attribute", "--prompts", str(data), "--chunk", "2", "--node-budget", "10", catalog=root)
    assert other.returncode == 1 and "give this one another --name" in other.stderr


@pytest.fixture(scope="module")
def site(made, tmp_path_factory):
    """The explorer on a copy of the atlas's catalogue, with the prompt box's model loaded."""
    import shutil
    import threading

    from catalog.explorer import bind, create_app, url_of
    from compute.jobs.local import PromptGrapher, local_model

    root = tmp_path_factory.mktemp("site") / "c"
    shutil.copytree(made[0], root)
    grapher = PromptGrapher(lambda: local_model("default", None, None, None, "cpu", "float32", []))
    grapher.start()
    server = bind(create_app(root, grapher=grapher), "127.0.0.1", 0, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, url_of(server), grapher
    server.shutdown()


def test_the_prompt_box_draws_a_new_prompts_graph(site, page):
    root, url, grapher = site
    open_page(page, url)
    page.fill("#prompt-text", "the farmers near the doctor")
    started = time.perf_counter()
    with page.expect_navigation():
        page.click("#prompt-submit")
    page.wait_for_selector("body[data-ready='1']")
    seconds = time.perf_counter() - started  # the goal (<= 0.5 s, once the model is loaded) is bench.atlas's
    drawn = page.evaluate("performance.getEntriesByName('explorer-ready')[0].startTime") / 1000  # from submission
    cid = page.url.rsplit("/", 1)[1]
    cat = catalog.open(root)
    c = cat.sql("SELECT * FROM circuits WHERE circuit_id = ?", [cid]).iloc[0]
    assert c.method == "local" and "the farmers near the doctor" in page.locator("#prompt").inner_text()
    assert page.locator("#graph g.node").count() == cat.sql("SELECT count(*) AS n FROM nodes WHERE circuit_id = ? "
                                                            "AND in_circuit", [cid]).n[0] > 10
    print(f"prompt box: submitted to drawn {drawn:.2f} s ({seconds:.2f} s from the click)")
    open_page(page, url)
    page.fill("#prompt-text", "the zorblax near the doctor")
    with page.expect_navigation():
        page.click("#prompt-submit")
    assert "does not know: zorblax" in page.locator("#error").inner_text()
    SHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SHOTS / "prompt-error.png"))


def test_the_atlas_page_shows_its_groups_features_contrast_and_graphs(site, page):
    root, url, _ = site
    cat = catalog.open(root)
    open_page(page, f"{url}atlas", "atlases")
    assert page.locator("tr.atlas-row").count() == len(atlas.names(cat))
    open_page(page, f"{url}atlas/agreement?by=label", "atlas")
    groups = atlas.summary(cat, "agreement", "label")
    assert page.locator("#atlas-groups tbody tr").count() == len(groups) == 2
    contrast = atlas.contrast(cat, "agreement", "label", groups.grp[0], groups.grp[1])
    rows = page.locator("#atlas-contrast tbody tr")
    assert rows.count() == min(30, len(contrast))
    assert rows.first.locator("td").all_inner_texts()[:2] == [contrast.src[0], contrast.dst[0]]
    top = atlas.recurrence(cat, "agreement", "label").iloc[0]
    assert page.locator("#atlas-recurrence tbody tr").first.locator("td").first.inner_text() == top.grp
    assert page.locator("#atlas-graphs tbody tr").count() == 8
    with page.expect_navigation():  # a group's graphs, then one graph's own page
        page.select_option("#atlas-by", "correct")
    page.wait_for_selector("body[data-ready='1']")
    assert page.locator("#atlas-groups tbody tr").count() == 2 and "by=correct" in page.url
    with page.expect_navigation():
        page.locator("#atlas-graphs tbody tr a").nth(2).click()
    page.wait_for_selector("body[data-ready='1']")
    assert "prompt 2 of the atlas" in page.locator("#atlas-of").inner_text()
    assert PROMPTS[2]["prompt"] in page.locator("#prompt").inner_text()  # its own prompt, not the data set's first


def test_the_atlas_page_of_the_docs_runs_as_written(tmp_path, dicts):
    """docs/atlas.md: its commands in a fresh folder, then its SQL and Python on what they made."""
    import contextlib
    import io
    import shutil

    from conftest import run_readme_commands

    from tests.docs import blocks, page

    text = page("atlas.md")
    (tmp_path / "docs").mkdir()
    shutil.copy(ROOT / "docs" / "atlas-prompts.jsonl", tmp_path / "docs")
    made, per_prompt, recurrence, contrast, heads, typical, groups, merged = run_readme_commands("atlas", text,
                                                                                                 tmp_path)
    assert groups.stdout.startswith("supernode,dictionary_id") and merged.stdout.startswith("src,dst,weight")
    assert "atlas atlas-prompts: 8 graphs committed" in made.stderr
    assert "atlas sva_across_pp: 40 graphs committed" in per_prompt.stderr
    for out, header in ((recurrence, "grp,dictionary_id,feature_idx"), (contrast, "src,dst,mean_a"),
                        (heads, "grp,head,src_from_end"), (typical, "src,dst,n_graphs")):
        assert out.stdout.startswith(header) and len(out.stdout.splitlines()) > 3, out.stdout[:300]
    cat = catalog.open(tmp_path / "atlas")
    for sql in blocks("sql", text):
        assert len(cat.sql(sql)) > 0, sql
    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        for code in blocks("python", text):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(compile(code, "atlas.md", "exec"), {})
            assert "n_graphs" in out.getvalue() and "src_from_end" in out.getvalue()
    finally:
        os.chdir(here)


def test_shards_make_one_atlas_and_a_job_file_runs_them(tmp_path, dicts):
    from commands import main
    from compute.jobs.jobfile import read_jobs
    from tests.docs import blocks, page

    data = write_jsonl(tmp_path / "agreement.jsonl", PROMPTS)
    root = tmp_path / "c"
    for shard, n in (("0/3", 3), ("1/3", 3), ("2/3", 2)):
        r = run_cli("attribute", "--prompts", str(data), "--shard", shard, "--format", "csv", catalog=root)
        assert r.returncode == 0 and f"{n} graphs committed" in r.stderr and f"shard {shard}" in r.stderr, r.stderr
    got = catalog.open(root).sql("SELECT count(*) AS n, count(DISTINCT prompt_idx) AS d FROM prompts")
    assert (got.n[0], got.d[0]) == (8, 8)
    again = run_cli("attribute", "--prompts", str(data), "--format", "csv", catalog=root)  # the whole file: done
    assert "0 graphs committed (8 committed before)" in again.stderr
    for bad in ("3/3", "x/2", "1"):
        r = run_cli("attribute", "--prompts", str(data), "--shard", bad, catalog=root)
        assert r.returncode == 1 and "give I/N" in r.stderr
    (toml,) = blocks("toml", page("atlas.md"))  # the docs' job file: four shards of one data set
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "atlas-prompts.jsonl").write_text(data.read_text())
    (tmp_path / "atlas.toml").write_text(toml)
    jobs = read_jobs(tmp_path / "atlas.toml", main)
    assert [j.argv[-2:] for j in jobs] == [("--shard", f"{i}/4") for i in range(4)]


def test_supernodes_group_features_in_the_same_graphs_that_write_alike(made):
    import shutil

    from catalog.diff import decoder, unit_rows

    root = made[0].parent / "supernodes"
    shutil.copytree(made[0], root)
    r = run_cli("atlas", "supernodes", "agreement", "--min-graphs", "2", "--min-jaccard", "0.6", "--min-cosine", "0.1",
                "--format", "csv", catalog=root)
    assert r.returncode == 0, r.stderr
    cat = catalog.open(root)
    groups = atlas.supernodes(cat, "agreement")
    assert groups.supernode.nunique() >= 2 and (groups.groupby("supernode").size() >= 2).all()
    nodes, _ = _rows(cat)
    feats = nodes[nodes.in_circuit & nodes.feature_idx.notna() & nodes.dictionary_id.notna()]
    sets = feats.groupby(["dictionary_id", "feature_idx"]).circuit_id.agg(set)
    paths = dict(cat.sql("SELECT dictionary_id, path FROM dictionaries").itertuples(index=False))
    cache: dict = {}
    for _, members in groups.groupby("supernode"):
        keys = list(zip(members.dictionary_id, members.feature_idx, strict=True))
        for k in keys:  # each member is linked to another: in the same graphs, writing alike
            assert len(sets[k]) >= 2
            linked = [o for o in keys if o != k and len(sets[k] & sets[o]) / len(sets[k] | sets[o]) >= 0.6 and
                      float(unit_rows(decoder(cache, k[0], paths[k[0]])[[k[1]]])[0] @
                            unit_rows(decoder(cache, o[0], paths[o[0]])[[o[1]]])[0]) >= 0.1]
            assert linked, k
    # a graph read at the supernode level: fewer ends, the same total flow
    plain = atlas.graph(cat, "agreement", 0)
    merged = atlas.graph(cat, "agreement", 0, by_supernode=True)
    assert merged.weight.sum() == pytest.approx(plain.weight.sum())
    assert merged.n_edges.sum() == len(plain) and len(merged) < len(plain) and merged.grouped.any()
    assert any(name.startswith("S") for name in merged.src)


def test_top_examples_remembered_across_commits_equal_a_fresh_read(made, tmp_path):
    """The explorer's labels: each feature's top examples, read once and then only from the shards
    committed since (or again from all when a shard goes), equal what a fresh query gives."""
    import shutil

    from catalog.examples import top_examples

    root = tmp_path / "c"
    shutil.copytree(made[0], root)
    cat = catalog.open(root)
    keys = [tuple(k) for k in cat.sql("SELECT DISTINCT dictionary_id, feature_idx FROM nodes WHERE in_circuit AND "
                                      "feature_idx IS NOT NULL AND dictionary_id IS NOT NULL ORDER BY ALL LIMIT 40")
            .itertuples(index=False)]

    def fresh() -> pd.DataFrame:
        return cat.sql("SELECT * FROM features_examples(?::VARCHAR[], ?::BIGINT[], n := 3)",
                       [[d for d, _ in keys], [int(f) for _, f in keys]])

    def same(got: pd.DataFrame) -> None:
        want = fresh()
        key = ["dictionary_id", "feature_idx", "value", "task_id", "example_idx"]
        got = got.sort_values(key, ascending=[True, True, False, True, True]).reset_index(drop=True)
        pd.testing.assert_frame_equal(got[want.columns], want.reset_index(drop=True), check_dtype=False)

    same(top_examples(cat, keys))  # read from every shard
    more = write_jsonl(tmp_path / "more.jsonl", [{"prompt": "the dogs near the cats"}, {"prompt": "the cat"}] * 4)
    assert run_cli("attribute", "--prompts", str(more), "--format", "csv", catalog=root).returncode == 0
    same(top_examples(cat, keys))  # merged with the new run's shard only
    assert run_cli("compact", catalog=root).returncode == 0
    same(top_examples(cat, keys))  # the shards were repacked: read again
