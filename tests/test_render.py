"""Circuit pictures open in headless Chromium (Debian's `chromium`; `make test` installs it) and
draw every node where the SVG says, in its colour, with its hover text."""

from __future__ import annotations

import html as html_lib
import json
import re
import subprocess
from pathlib import Path

import numpy as np

import catalog
from catalog.render import render_circuit, render_diff
from tests.browser import FLAGS, chromium
from tests.conftest import run_cli
from tests.synthetic import (
    A_EDGES,
    A_NODES,
    B_EDGES,
    B_NODES,
    edge_columns,
    node_columns,
    write_circuit,
)


def _open(html: Path, tmp: Path) -> tuple[str, np.ndarray]:
    """The DOM after the page ran, and a screenshot of the page at the SVG's own size."""
    text = html.read_text()
    w, h = (int(v) for v in re.search(r'<svg[^>]* width="(\d+)" height="(\d+)"', text).groups())
    common = [chromium(), *FLAGS, f"--user-data-dir={tmp / 'profile'}"]
    dom = subprocess.run([*common, "--dump-dom", html.resolve().as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    png = tmp / "shot.png"
    subprocess.run([*common, f"--window-size={w},{h}", f"--screenshot={png}", html.resolve().as_uri()],
                   capture_output=True, timeout=120, check=True)
    import matplotlib.image

    return dom, matplotlib.image.imread(str(png))


def _check_drawn(html: Path, tmp: Path, n_expected: int) -> str:
    text = html.read_text()
    assert not re.search(r'(src|href)="(https?:)?//', text), "the page must not load anything from a network"
    dom, img = _open(html, tmp)
    nodes = re.findall(r'<g class="node[^"]*" id="n\d+" data-key="[^"]*" data-x="([\d.]+)" data-y="([\d.]+)" '
                       r'data-fill="#([0-9a-f]{6})"', dom)
    assert len(nodes) == n_expected, "every node is in the rendered DOM"
    for x, y, fill in nodes:
        px = img[round(float(y)), round(float(x)), :3]
        want = np.array([int(fill[i:i + 2], 16) for i in (0, 2, 4)]) / 255
        assert np.abs(px - want).max() < 3 / 255, f"node at ({x}, {y}) drawn as {px * 255}, not #{fill}"
    assert 'id="info"' in dom  # the hover panel is in the page
    return dom


def test_a_diff_renders_every_node_in_its_status_colour(tmp_path):
    cat = catalog.init(tmp_path / "c")
    write_circuit(cat, node_columns(A_NODES), edge_columns(A_EDGES), task_id="task_a", circuit_id="A")
    write_circuit(cat, node_columns(B_NODES), edge_columns(B_EDGES), task_id="task_b", circuit_id="B")
    dom = _check_drawn(render_diff(cat, "A", "B", tmp_path / "d.html"), tmp_path, 7)
    assert len(re.findall(r'class="node added"', dom)) == 2 and len(re.findall(r'class="node removed"', dom)) == 1
    assert dom.count('class="edge"') == 6


def test_per_position_circuits_put_positions_in_columns(tmp_path):
    cat = catalog.init(tmp_path / "c")
    rows = [("embed", -1, "dE", 1, False, 1.0, True, 0), ("embed", -1, "dE", 2, False, -0.5, True, 2),
            ("attn", 0, "dA", 4, False, 0.7, True, 2), ("resid", 0, "dR", None, True, 0.2, True, 1),
            ("metric", 1, None, None, False, 1.2, True)]
    write_circuit(cat, node_columns(rows), edge_columns([(0, 2, 0.3), (1, 2, -0.2), (2, 4, 0.6), (3, 4, 0.1)]), circuit_id="P")
    html = render_circuit(cat, "P", tmp_path / "p.html")
    dom = _check_drawn(html, tmp_path, 5)
    at = {}  # (component, feature or -1, position or -1) -> (x, y, fill)
    for k, x, y, f in re.findall(r'data-key="([^"]*)" data-x="([\d.]+)" data-y="([\d.]+)" data-fill="#([0-9a-f]{6})"', dom):
        component, _, _, feature, position = json.loads(html_lib.unescape(k))
        at[(component, feature, position)] = (float(x), float(y), f)
    e1, e2, a4, err, metric = (at[("embed", 1, 0)], at[("embed", 2, 2)], at[("attn", 4, 2)], at[("resid", -1, 1)],
                               at[("metric", -1, -1)])
    assert e2[0] == a4[0] and e1[0] < err[0] < e2[0]  # columns follow positions
    assert e1[1] > a4[1] > err[1] > metric[1]  # rows go up from the embedding to the metric
    assert int(e2[2][4:], 16) > int(e2[2][:2], 16)  # negative effect: blue
    assert int(e1[2][:2], 16) > int(e1[2][4:], 16)  # positive effect: red


def test_demo_circuit_renders_with_labels_density_and_examples(demo_catalog, tmp_path):
    cat = catalog.open(demo_catalog)
    cid = cat.sql("SELECT circuit_of('sva_across_pp') AS c").c[0]
    out = tmp_path / "circuit.html"
    r = run_cli("render", cid, "--out", str(out), catalog=demo_catalog)
    assert r.returncode == 0, r.stderr
    drawn = cat.sql("SELECT sum(least(n, 40)) AS n FROM (SELECT count(*) AS n FROM nodes WHERE circuit_id = ? "
                    "AND in_circuit GROUP BY component, layer, position)", [cid]).n[0]  # 40 per row at most
    dom = _check_drawn(out, tmp_path, int(drawn))
    titles = re.findall(r"<title>(.*?)</title>", dom, flags=re.S)
    features = [t for t in titles if re.match(r"(embed|attn_\d|mlp_\d|resid_\d)/\d+  effect", t)]
    assert features and all("density" in t and "top examples:" in t and "[" in t for t in features)
    # each feature is labelled with the token it fires on most (its top example's marked token)
    labels = dict(re.findall(r'data-idx="(\d+)">.*?<text class="node-label"[^>]*>([^<]*)</text>', dom))
    top = cat.sql("SELECT n.node_idx, t.token FROM nodes n, top_examples(n.dictionary_id, n.feature_idx, n := 1) t "
                  "WHERE n.circuit_id = ? AND n.in_circuit AND NOT n.is_error", [cid])
    assert len(top) > 10 and all(html_lib.unescape(labels[str(i)]).startswith(tok[:8])
                                 for i, tok in zip(top.node_idx, top.token, strict=True))
    other = cat.sql("SELECT circuit_of('sva_across_rc') AS c").c[0]
    r = run_cli("render", cid, "--diff", other, "--out", str(tmp_path / "diff.html"), catalog=demo_catalog)
    assert r.returncode == 0, r.stderr
    assert "nodes matched by key" in (tmp_path / "diff.html").read_text()
