"""The explorer (`cli.py serve`) driven in Debian's headless Chromium through Playwright: every page
against the catalogue's own answers (SQL, `cli.py diff`, `cli.py query`). Screenshots of each page
go to tests/screenshots/ for a person to look at."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import catalog
from catalog.explorer import bind, create_app, url_of
from catalog.explorer.app import DEFAULT_EDGES, LOCAL_ROWS, MAX_SQL_ROWS
from tests.browser import SHOTS, open_page
from tests.conftest import ROOT, run_cli
from tests.synthetic import layered_circuit, write_circuit


def _start(path: Path, promoted=None):
    server = bind(create_app(path, promoted=promoted), "127.0.0.1", 0, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def demo_site(demo_catalog):
    """`cli.py serve` on the demo catalogue, as a user starts it (any free port)."""
    p = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "--catalog", str(demo_catalog), "serve", "--port", "0",
                          "--no-prompt-box"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = p.stdout.readline()
    url = re.search(r"at (http://\S+/)", line)
    assert url, f"cli.py serve did not start: {line!r}"
    yield url.group(1)
    p.terminate()
    p.wait(timeout=30)


def _sql(path, sql, *params):
    return catalog.open(path).sql(sql, list(params))


def _shown_edges(page) -> int:
    return page.locator("#graph path.edge:not(.hidden)").count()


def test_the_circuit_list_shows_every_circuit_and_filters(demo_site, demo_catalog, page):
    open_page(page, demo_site, "circuits")
    n = len(_sql(demo_catalog, "SELECT * FROM circuits"))
    assert page.locator("tr.circuit-row").count() == n
    with page.expect_navigation():
        page.select_option("select[name=basis]", "neurons")
    page.wait_for_selector("body[data-ready='1']")
    neurons = _sql(demo_catalog, "SELECT * FROM circuit_list() WHERE basis = 'neurons'")
    assert 0 < page.locator("tr.circuit-row").count() == len(neurons) < n
    assert "basis=neurons" in page.url  # a filter is a link


def test_a_circuit_page_draws_its_graph_thresholds_edges_and_opens_a_node(demo_site, demo_catalog, page):
    cid = _sql(demo_catalog, "SELECT circuit_of('sva_across_pp') AS c").c[0]
    crowded = _sql(demo_catalog, "SELECT max(n) AS m FROM (SELECT count(*) AS n FROM nodes WHERE circuit_id = ? AND "
                                 "in_circuit GROUP BY component, layer, position)", cid).m[0]
    assert crowded <= 40  # so every in-circuit node is drawn (at most 40 per layer and position are)
    open_page(page, f"{demo_site}circuits/{cid}", "circuit")
    n_nodes = len(_sql(demo_catalog, "SELECT * FROM nodes WHERE circuit_id = ? AND in_circuit", cid))
    assert page.locator("#graph g.node").count() == n_nodes
    weights = _sql(demo_catalog, """
        SELECT abs(e.weight) AS w FROM edges e
        JOIN nodes s ON s.circuit_id = e.circuit_id AND s.node_idx = e.src_idx AND s.in_circuit
        JOIN nodes d ON d.circuit_id = e.circuit_id AND d.node_idx = e.dst_idx AND d.in_circuit
        WHERE e.circuit_id = ? AND e.kind = 'attribution' ORDER BY w DESC""", cid).w.to_numpy()
    assert page.locator("#graph path.edge").count() == len(weights) > DEFAULT_EDGES
    # the default threshold shows the strongest DEFAULT_EDGES edges
    t = float(page.locator("#threshold-value").get_attribute("data-threshold"))
    assert t == weights[DEFAULT_EDGES - 1]
    assert _shown_edges(page) == (weights >= t).sum() == int(page.locator("#edge-count").inner_text())
    # moving the slider (as a user does, with the keyboard) changes the edges shown, and the link
    page.locator("#threshold").focus()
    for _ in range(5):
        page.keyboard.press("ArrowRight")
    t2 = float(page.locator("#threshold-value").get_attribute("data-threshold"))
    assert t2 > t and _shown_edges(page) == (weights >= t2).sum() < (weights >= t).sum()
    assert "threshold=" in page.url
    # clicking the strongest feature shows its dashboard: its top example, with the token marked
    top = _sql(demo_catalog, "SELECT node_idx, dictionary_id, feature_idx FROM nodes WHERE circuit_id = ? AND "
                             "in_circuit AND feature_idx IS NOT NULL ORDER BY abs(effect) DESC LIMIT 1", cid).iloc[0]
    page.locator(f"#graph g.node[data-idx='{top.node_idx}']").click()
    page.wait_for_selector("#top-examples li")
    example = _sql(demo_catalog, "SELECT * FROM top_examples(?, ?, n := 1)", top.dictionary_id,
                   int(top.feature_idx)).iloc[0]
    first = page.locator("#top-examples li").first
    assert first.inner_text().startswith(example.text.replace("[", "").replace("]", ""))
    assert first.locator("mark").inner_text() == example.token
    assert page.locator("#promoted").inner_text()  # the decoder's promoted tokens (the zoo's files are here)
    sharing = _sql(demo_catalog, "SELECT DISTINCT circuit_id FROM nodes WHERE dictionary_id = ? AND feature_idx = ? "
                                 "AND in_circuit AND circuit_id <> ?", top.dictionary_id, int(top.feature_idx), cid)
    assert page.locator("#sharing li").count() == len(sharing)
    SHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SHOTS / "circuit-node.png"), full_page=True)
    # the node's own page is a stable link
    open_page(page, f"{demo_site}circuits/{cid}/nodes/{top.node_idx}", "node")
    assert page.locator("#top-examples li").first.locator("mark").inner_text() == example.token


def test_labels_are_the_features_top_tokens(demo_site, demo_catalog, page):
    cid = _sql(demo_catalog, "SELECT circuit_of('sva_simple') AS c").c[0]
    open_page(page, f"{demo_site}circuits/{cid}")
    labelled = page.locator("#graph g.node[data-idx]:has(text.node-label)")
    assert labelled.count() > 0
    for i in range(min(labelled.count(), 8)):
        g = labelled.nth(i)
        idx = int(g.get_attribute("data-idx"))
        n = _sql(demo_catalog, "SELECT * FROM nodes WHERE circuit_id = ? AND node_idx = ?", cid, idx).iloc[0]
        label = g.locator("text.node-label").text_content()
        if n.is_error:
            assert label == "err"
            continue
        tokens = _sql(demo_catalog, "SELECT token FROM top_examples(?, ?, n := 3)", n.dictionary_id,
                      int(n.feature_idx)).token
        assert label.rstrip("…") and "/".join(dict.fromkeys(tokens)).startswith(label.rstrip("…"))


def test_the_diff_page_counts_equal_the_cli(demo_site, demo_catalog, page):
    a = _sql(demo_catalog, "SELECT circuit_of('sva_across_pp') AS c").c[0]
    b = _sql(demo_catalog, "SELECT circuit_of('sva_across_rc') AS c").c[0]
    open_page(page, f"{demo_site}diff/{a}/{b}", "diff")
    r = run_cli("diff", a, b, "--format", "json", catalog=demo_catalog)
    assert r.returncode == 0, r.stderr
    cli = {(x["element"], x["status"]): x["n"] for x in json.loads(r.stdout)}
    rows = page.locator("#diff-counts tbody tr")
    shown = {}
    for i in range(rows.count()):
        element, status, n, _ = rows.nth(i).locator("td").all_inner_texts()
        shown[(element, status)] = int(n)
    assert shown == cli and sum(cli.values()) > 0
    assert page.locator("#graph g.node.added").count() > 0


def test_compare_never_mixes_features_and_neurons_unless_asked(demo_site, demo_catalog, page):
    bases = _sql(demo_catalog, "SELECT basis, count(*) AS n FROM circuit_list() GROUP BY basis").set_index("basis").n
    open_page(page, f"{demo_site}compare", "compare")
    assert page.locator("#heatmap thead th").count() - 1 == bases["features"]  # one column per feature circuit
    assert f"{bases['neurons']} over neurons" in page.locator("#compare-note").inner_text()
    features = _sql(demo_catalog, "SELECT list(circuit_id) AS ids FROM circuit_list() WHERE basis = 'features'").ids[0]
    overlap = _sql(demo_catalog, "SELECT * FROM feature_overlap(?)", list(features))
    assert page.locator("#pairs tbody tr").count() == len(overlap)
    open_page(page, f"{demo_site}compare?basis=all")
    assert page.locator("#heatmap thead th").count() - 1 == bases.sum()
    r = run_cli("compare", "--format", "csv", catalog=demo_catalog)  # the command line keeps the same rule
    assert r.returncode == 0 and len(pd.read_csv(io.StringIO(r.stdout))) == len(overlap)
    assert f"{bases['neurons']} over neurons" in r.stderr


def test_the_sql_box_shows_results_downloads_csv_and_refuses_writes(demo_site, demo_catalog, page):
    q = "SELECT task_id, n_nodes FROM circuit_list() ORDER BY task_id, n_nodes"
    open_page(page, f"{demo_site}sql")
    page.fill("#q", q)
    with page.expect_navigation():
        page.click("#run")
    page.wait_for_selector("#result")
    SHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SHOTS / "sql.png"), full_page=True)
    expected = run_cli("query", q, "--format", "csv", catalog=demo_catalog).stdout
    assert page.locator("#result tbody tr").count() == len(pd.read_csv(io.StringIO(expected)))
    with urllib.request.urlopen(page.locator("#csv").evaluate("a => a.href")) as f:
        assert f.read().decode() == expected
    # a large result: the page shows the first rows, the CSV (streamed) has them all
    open_page(page, f"{demo_site}sql?q=" + urllib.parse.quote("SELECT range AS i FROM range(1234)"))
    assert page.locator("#result tbody tr").count() == MAX_SQL_ROWS
    assert page.locator("#row-count").inner_text().startswith(f"more than {MAX_SQL_ROWS} rows")
    with urllib.request.urlopen(page.locator("#csv").evaluate("a => a.href")) as f:
        assert f.read().decode() == "i\n" + "".join(f"{i}\n" for i in range(1234))
    for write in ("DROP TABLE circuits", "COPY circuits TO '/tmp/x.csv'", "INSTALL httpfs"):
        page.fill("#q", write)
        with page.expect_navigation():
            page.click("#run")
        page.wait_for_selector("#sql-error")
        r = run_cli("query", write, catalog=demo_catalog)
        assert r.returncode == 1 and r.stderr.strip() == f"error: {page.locator('#sql-error').inner_text()}"
    SHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SHOTS / "sql-refused.png"), full_page=True)


def test_faithfulness_curves_load(demo_site, demo_catalog, page):
    ids = _sql(demo_catalog, "SELECT circuit_of('sva_simple') AS a, circuit_of('sva_simple', 'neurons') AS b").iloc[0]
    open_page(page, f"{demo_site}faithfulness?ids={ids.a}&ids={ids.b}")
    page.wait_for_function("document.getElementById('curves').complete")
    assert page.locator("#curves").evaluate("img => img.naturalWidth") > 400
    SHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SHOTS / "faithfulness.png"), full_page=True)


def test_unknown_ids_and_malformed_urls_give_404_pages_not_tracebacks(demo_site, demo_catalog):
    cid = _sql(demo_catalog, "SELECT circuit_of('ioi') AS c").c[0]
    for path, status in (("circuits/nope", 404), ("no/such/page", 404), (f"circuits/{cid}/nodes/99999", 404),
                         (f"api/circuits/{cid}/nodes/99999", 404), (f"circuits/{cid}/nodes/x", 404),
                         (f"diff/{cid}/nope", 404), ("compare?ids=nope", 404), (f"circuits/{cid}?threshold=abc", 400),
                         ("compare?basis=words", 400), (f"circuits/{cid}/%ff%00", 404), ("sql.csv?q=DROP+TABLE+x", 400)):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(demo_site + path)
        body = e.value.read().decode()
        assert e.value.code == status, (path, e.value.code, body[-300:])
        assert "Traceback" not in body and 'id="error"' in body, path


def test_requests_must_name_this_machine(demo_site):
    """A page elsewhere that points its own name at 127.0.0.1 (DNS rebinding) cannot read the catalogue."""
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(urllib.request.Request(demo_site, headers={"Host": "attacker.example:8765"}))
    assert e.value.code == 400 and "unexpected Host" in e.value.read().decode()
    with urllib.request.urlopen(demo_site.replace("127.0.0.1", "localhost")) as f:
        assert f.status == 200


def test_serve_binds_to_loopback_by_default(demo_catalog):
    p = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "--catalog", str(demo_catalog), "serve", "--port", "0",
                          "--no-prompt-box"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        url = re.search(r"at (http://\S+/)", line).group(1)
        assert url.startswith("http://127.0.0.1:"), line
        with urllib.request.urlopen(url) as f:
            assert f.status == 200 and "circuit-row" in f.read().decode()
    finally:
        p.terminate()
        _, err = p.communicate(timeout=30)
    assert "Traceback" not in err
    r = run_cli("serve", catalog=demo_catalog.parent / "missing")
    assert r.returncode == 1 and "no catalogue" in r.stderr and "Traceback" not in r.stderr


def test_a_local_circuit_page_shows_its_ov_and_qk_edges(local, browser):
    path, _ = local
    server = _start(path)
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        cid = _sql(path, "SELECT circuit_id FROM circuits WHERE method = 'local' ORDER BY created_at LIMIT 1").circuit_id[0]
        open_page(page, f"{url_of(server)}circuits/{cid}", "local-circuit")
        prompt = _sql(path, "SELECT clean_prefix FROM examples JOIN circuits USING (task_id) WHERE circuit_id = ? "
                            "ORDER BY example_idx LIMIT 1", cid).clean_prefix[0]
        assert prompt in page.locator("#prompt").inner_text()
        kinds = _sql(path, "SELECT kind, count(*) AS n FROM edges WHERE circuit_id = ? GROUP BY kind", cid)
        kinds = kinds.set_index("kind").n
        assert page.locator("#graph path.edge").count() == kinds["attribution"]
        for kind in ("ov", "qk"):
            assert page.locator(f"#edges-{kind} tbody tr").count() == min(kinds[kind], LOCAL_ROWS)
        page.close()
    finally:
        server.shutdown()


def test_a_5000_edge_circuit_opens_with_its_strongest_edges_first(tmp_path, browser):
    rng = np.random.default_rng(0)
    cat = catalog.init(tmp_path / "c")
    from schema.sites import sites

    dicts = {(s.component, s.layer): f"d-{s.component}-{s.layer}" for s in sites(4)}
    nodes, edges = layered_circuit(rng, n_layers=4, width=40, n_edges=5400, dictionary_ids=dicts, feature_pool=300)
    cid = write_circuit(cat, nodes, edges)
    server = _start(tmp_path / "c")
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        open_page(page, f"{url_of(server)}circuits/{cid}", "circuit-5000-edges")
        assert page.locator("#graph path.edge").count() == len(edges["src_idx"]) >= 5000
        assert _shown_edges(page) == DEFAULT_EDGES
        page.close()
    finally:
        server.shutdown()
