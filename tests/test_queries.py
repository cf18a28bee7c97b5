"""The query layer on circuits whose diff, overlap and paths are known by construction."""

from __future__ import annotations

import io
import itertools
import json
import math

import networkx as nx
import numpy as np
import pandas as pd
import pytest

import catalog
from catalog.compare import compare, select_circuits
from catalog.diff import diff
from catalog.graph import circuit_tracer_json, neighbours, paths, to_networkx, write_graphml
from catalog.macros import listed
from tests.conftest import run_cli
from tests.synthetic import (
    A_EDGES,
    A_NODES,
    B_EDGES,
    B_NODES,
    edge_columns,
    layered_circuit,
    node_columns,
    save_decoder,
    write_circuit,
)


@pytest.fixture
def pair(tmp_path):
    cat = catalog.init(tmp_path / "c")
    a = write_circuit(cat, node_columns(A_NODES), edge_columns(A_EDGES), task_id="task_a", circuit_id="A")
    b = write_circuit(cat, node_columns(B_NODES), edge_columns(B_EDGES), task_id="task_b", circuit_id="B")
    return cat, a, b


def _name(r) -> str:
    return "metric" if r.component == "metric" else f"{r.component}/{'err' if r.is_error else r.feature_idx}"


def test_node_and_edge_diff_are_exact(pair):
    cat, a, b = pair
    d = diff(cat, a, b)
    assert d.match == "key"
    got = {_name(r): (r.status, r.effect_a, r.effect_b, r.rank_a, r.rank_b) for r in d.nodes.itertuples()}
    nan = None
    expected = {"embed/1": ("same", 2.0, 2.0, 2, 2), "embed/2": ("removed", 1.0, nan, 3, nan),
                "embed/3": ("added", nan, 0.4, nan, 5), "attn/5": ("changed", 0.5, 0.8, 4, 3),
                "attn/err": ("same", 0.3, 0.3, 5, 6), "resid/7": ("added", 0.05, 0.6, nan, 4),
                "metric": ("changed", 3.0, 3.5, 1, 1)}
    assert set(got) == set(expected)
    for k, (status, ea, eb, ra, rb) in expected.items():
        g = got[k]
        assert g[0] == status, k
        for x, y in ((g[1], ea), (g[2], eb), (g[3], ra), (g[4], rb)):
            assert (pd.isna(x) and y is None) or x == pytest.approx(y), (k, g)
    attn5 = d.nodes[d.nodes.feature_idx == 5].iloc[0]
    assert attn5.delta == pytest.approx(0.3) and attn5.rank_change == 1
    edges = {(r.src_component, r.src_feature if not r.src_is_error else "err", r.dst_component): (r.status, r.delta)
             for r in d.edges.itertuples()}
    assert {k: v[0] for k, v in edges.items()} == {
        ("embed", 1, "attn"): "same", ("embed", 2, "attn"): "removed", ("embed", 3, "attn"): "added",
        ("attn", 5, "metric"): "changed", ("attn", "err", "metric"): "same", ("resid", 7, "metric"): "added"}
    assert edges[("attn", 5, "metric")][1] == pytest.approx(0.5)
    assert edges[("embed", 2, "attn")][1] == pytest.approx(-0.5)
    counts = d.counts().set_index(["element", "status"]).n
    sql_counts = cat.sql("SELECT * FROM diff_summary('A', 'B')").set_index(["element", "status"]).n
    assert counts[counts > 0].to_dict() == sql_counts.to_dict()
    s = d.stats()
    assert (s["nodes_a"], s["nodes_b"], s["nodes_both"], s["edges_both"]) == (5, 6, 4, 3)
    assert s["node_jaccard"] == pytest.approx(4 / 7)


def test_a_circuit_against_itself_is_all_same(pair):
    cat, a, _ = pair
    d = diff(cat, a, a)
    assert set(d.nodes.status) == {"same"} and set(d.edges.status) == {"same"}
    assert len(d.nodes) == 5 and len(d.edges) == 4


def test_decoder_matching_recovers_a_permuted_dictionary(tmp_path):
    """B reads a different attn dictionary: A's decoder rows permuted, slightly perturbed, with one
    feature replaced by an unrelated direction. Matching must find the permutation and leave the
    replaced feature unmatched (removed in A's terms, added in B's)."""
    rng = np.random.default_rng(0)
    cat = catalog.init(tmp_path / "c")
    w_a = rng.normal(size=(32, 16))
    perm = rng.permutation(32)  # B's feature j is A's feature perm[j]
    w_b = w_a[perm] + 0.01 * rng.normal(size=(32, 16))
    inv = np.argsort(perm)  # A's feature i is B's feature inv[i]
    w_b[inv[7]] = rng.normal(size=16)  # A's feature 7 has no counterpart in B
    w_e = rng.normal(size=(8, 16))
    dicts = [{"dictionary_id": d, "path": str(save_decoder(tmp_path / d, w)), "d_in": 16, "d_sae": len(w),
              "component": c, "layer": lyr}
             for d, w, c, lyr in (("dE", w_e, "embed", -1), ("dA", w_a, "attn", 0), ("dB", w_b, "attn", 0))]
    a_feats, effects = [3, 7, 11], [1.0, 0.7, 0.4]
    a = write_circuit(cat, node_columns([("embed", -1, "dE", 1, False, 2.0, True),
                                   *[("attn", 0, "dA", f, False, e, True) for f, e in zip(a_feats, effects, strict=True)],
                                   ("attn", 0, "dA", None, True, 0.2, True), ("metric", 1, None, None, False, 3.0, True)]),
                      edge_columns([(0, 1, 1.0), (1, 5, 0.9), (2, 5, 0.5)]), circuit_id="A", dictionaries=dicts)
    b = write_circuit(cat, node_columns([("embed", -1, "dE", 1, False, 2.0, True),
                                   *[("attn", 0, "dB", int(inv[f]), False, e, True)
                                     for f, e in zip(a_feats, effects, strict=True)],
                                   ("attn", 0, "dB", None, True, 0.2, True), ("metric", 1, None, None, False, 3.0, True)]),
                      edge_columns([(0, 1, 1.0), (1, 5, 0.9), (2, 5, 0.5)]), circuit_id="B")
    d = diff(cat, a, b)
    assert d.match == "decoder"
    attn = d.matches[d.matches.component == "attn"].set_index("feature_a")
    assert sorted(attn.index) == [3, 11]
    for f in (3, 11):
        assert attn.loc[f, "feature_b"] == inv[f] and attn.loc[f, "similarity"] > 0.99
    status = {_name(r): r.status for r in d.nodes.itertuples()}
    assert status == {"embed/1": "same", "attn/3": "same", "attn/11": "same", "attn/err": "same", "metric": "same",
                      "attn/7": "removed", f"attn/{inv[7]}": "added"}
    added = d.nodes[d.nodes.status == "added"].iloc[0]
    assert added.dictionary_id == "dB" and added.feature_b == inv[7]
    e = {(r.src_feature, r.dst_component): r.status for r in d.edges.itertuples()}
    assert e == {(1, "attn"): "same", (3, "metric"): "same", (7, "metric"): "removed", (inv[7], "metric"): "added"}
    keyed = diff(cat, a, b, match="key")  # without matching, every attn feature differs
    assert set(keyed.nodes[keyed.nodes.component == "attn"].status) >= {"added", "removed"}


COMPARE = {  # circuit -> {feature: effect} on one embed dictionary
    "c1": {1: 4.0, 2: 3.0, 3: 2.0, 4: 1.0},
    "c2": {2: 1.0, 3: 2.0, 4: 3.0, 5: 9.0},
    "c3": {3: 0.5, 6: 0.75},
}


@pytest.fixture
def three(tmp_path):
    cat = catalog.init(tmp_path / "c")
    for cid, feats in COMPARE.items():
        rows = [("embed", -1, "dE", f, False, e, True) for f, e in feats.items()]
        if cid == "c3":  # feature 6 as two per-position nodes: 0.5 + 0.25
            rows = [("embed", -1, "dE", 3, False, 0.5, True, 0), ("embed", -1, "dE", 6, False, 0.5, True, 1),
                    ("embed", -1, "dE", 6, False, 0.25, True, 2)]
        rows += [("embed", -1, "dE", 99, False, 0.01, False), ("embed", -1, "dE", None, True, 5.0, True),
                 ("metric", 0, None, None, False, 8.0, True)]
        write_circuit(cat, node_columns(rows), edge_columns([]), task_id=f"task_{cid}", circuit_id=cid)
    return cat


def test_overlap_shared_unique_and_matrix_are_exact(three):
    cat = three
    ids = select_circuits(cat)
    assert ids == ["c1", "c2", "c3"]
    cmp = compare(cat, ids)
    ov = {(r.circuit_a, r.circuit_b): r for r in cmp.overlap.itertuples()}
    assert ov[("c1", "c2")].n_shared == 3 and ov[("c1", "c2")].jaccard == pytest.approx(3 / 5)
    assert ov[("c1", "c2")].rank_corr == pytest.approx(-1.0)  # c1 orders 2 > 3 > 4, c2 the reverse
    assert ov[("c1", "c3")].jaccard == pytest.approx(1 / 5) and ov[("c2", "c3")].jaccard == pytest.approx(1 / 5)
    assert cmp.in_all().feature_idx.tolist() == [3]
    assert dict(zip(cmp.unique().feature_idx, cmp.unique().unique_to, strict=True)) == {1: "c1", 5: "c2", 6: "c3"}
    m = cmp.matrix().droplevel(["dictionary_id", "component", "layer"])
    assert m.loc[6].tolist() == [0.0, 0.0, 0.75]  # per-position nodes of one feature are summed
    assert m.loc[3].tolist() == [2.0, 2.0, 0.5] and m.index[0] == 3  # the most shared feature first
    assert list(m.columns) == ["task_c1", "task_c2", "task_c3"]
    assert 99 not in m.index  # not in any circuit
    top = compare(cat, ids, k=2)  # each circuit's two strongest features
    assert set(top.features.circuit_id) == {"c1", "c2", "c3"}
    assert set(top.features[top.features.circuit_id == "c2"].feature_idx) == {5, 4}
    assert top.overlap.set_index(["circuit_a", "circuit_b"]).jaccard.loc[("c1", "c2")] == 0.0


def test_circuit_filters_combine_with_and(three):
    """`compare` and `plot` choose circuits with this one function: every filter given must hold."""
    cat = three
    assert select_circuits(cat, tasks=["task_c1", "task_c2"]) == ["c1", "c2"]
    assert select_circuits(cat, tasks=["task_c1", "task_c2"], sql="SELECT 'c2' AS circuit_id") == ["c2"]
    assert select_circuits(cat, ids=["c3"], tasks=["task_c1"]) == []
    assert select_circuits(cat, tasks=["task_c1"], methods=["no-such-method"]) == []


def test_compare_cli_writes_matrix_and_heatmap(three, tmp_path):
    out, csv = tmp_path / "cmp.png", tmp_path / "m.csv"
    r = run_cli("compare", "--matrix", str(csv), "--out", str(out), "--format", "csv", catalog=three.root)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].startswith("a,b,n_a,n_b,n_shared,jaccard,rank_corr")
    assert out.stat().st_size > 5000 and out.read_bytes()[:4] == b"\x89PNG"
    m = pd.read_csv(csv)
    assert list(m.columns[4:]) == ["task_c1", "task_c2", "task_c3"] and len(m) == 6


def _random_dag(seed: int):
    rng = np.random.default_rng(seed)
    dicts = {("embed", -1): "dE", **{(c, i): f"d{c}{i}" for i in range(2) for c in ("attn", "mlp", "resid")}}
    nodes, edges = layered_circuit(rng, n_layers=2, width=4, n_edges=70, dictionary_ids=dicts, feature_pool=50)
    # skip connections too, so paths of different lengths meet
    extra_src = rng.integers(0, 8, 12)
    extra_dst = rng.integers(16, 29, 12)
    keep = ~np.isin(extra_src * 100 + extra_dst, edges["src_idx"] * 100 + edges["dst_idx"])
    pairs = np.unique(np.stack([extra_src[keep], extra_dst[keep]]), axis=1)
    edges = {"src_idx": np.concatenate([edges["src_idx"], pairs[0]]),
             "dst_idx": np.concatenate([edges["dst_idx"], pairs[1]]),
             "weight": np.concatenate([edges["weight"], rng.normal(size=pairs.shape[1])])}
    return nodes, edges


@pytest.mark.parametrize("seed", [0, 1])
def test_strongest_paths_and_neighbourhoods_agree_with_networkx(tmp_path, seed):
    cat = catalog.init(tmp_path / "c")
    nodes, edges = _random_dag(seed)
    cid = write_circuit(cat, nodes, edges, circuit_id="g")
    g = nx.DiGraph()
    g.add_weighted_edges_from(zip(edges["src_idx"].tolist(), edges["dst_idx"].tolist(), edges["weight"].tolist(),
                                  strict=True))
    sources = [i for i in nodes["node_idx"] if nodes["component"][i] == "embed" and i in g]
    k = 4
    got = cat.sql("SELECT * FROM circuit_paths('g', k := ?)", [k])
    checked = 0
    for v in g.nodes:
        every = [p for s in sources if s != v for p in nx.all_simple_paths(g, s, v)]
        strength = sorted(((math.prod(g.edges[u, w]["weight"] for u, w in itertools.pairwise(p)), p) for p in every),
                          key=lambda t: -abs(t[0]))[:k]
        mine = got[got.node_idx == v].sort_values("rank")
        assert len(mine) == len(strength), v
        for (s, p), r in zip(strength, mine.itertuples(), strict=True):
            assert r.strength == pytest.approx(s, rel=1e-12) and list(r.path) == p
        checked += bool(strength)
    assert checked > 15
    metric = int(np.flatnonzero(nodes["component"] == "metric")[0])
    top = paths(cat, cid, k=3)
    assert top.path.iloc[0][-1] == metric and top.route.iloc[0].endswith("-> metric")
    for hops in (1, 2, 3):
        for node in (metric, 12):
            up = neighbours(cat, cid, node, hops, "ancestors")
            want = nx.single_source_shortest_path_length(g.reverse(), node, cutoff=hops)
            assert dict(zip(up.node_idx, up.hops, strict=True)) == {n: h for n, h in want.items() if n != node}
        down = neighbours(cat, cid, 2, hops, "descendants")
        want = nx.single_source_shortest_path_length(g, 2, cutoff=hops)
        assert dict(zip(down.node_idx, down.hops, strict=True)) == {n: h for n, h in want.items() if n != 2}


def test_networkx_graphml_and_circuit_tracer_exports(pair, tmp_path):
    cat, a, _ = pair
    g = to_networkx(cat, a)
    assert sorted(g.nodes) == [0, 1, 2, 3, 5]  # node 4 is not in the circuit
    assert g.edges[2, 5]["weight"] == 2.0 and g.nodes[2]["name"] == "attn_0/5" and g.nodes[3]["is_error"]
    assert sorted(to_networkx(cat, a, nodes=[0, 2, 5]).edges) == [(0, 2), (2, 5)]
    back = nx.read_graphml(write_graphml(cat, a, tmp_path / "a.graphml"))
    assert sorted((int(s), int(d), w) for s, d, w in back.edges(data="weight")) == sorted(A_EDGES)
    j = json.loads(json.dumps(circuit_tracer_json(cat, a)))
    assert set(j) == {"metadata", "qParams", "nodes", "links"}
    assert {"slug", "scan", "transcoder_list", "prompt_tokens", "prompt"} <= set(j["metadata"])
    node_fields = {"node_id": str, "feature": int, "layer": str, "ctx_idx": int, "feature_type": str,
                   "token_prob": float, "is_target_logit": bool, "run_idx": int, "reverse_ctx_idx": int,
                   "jsNodeId": str, "clerp": str}
    for n in j["nodes"]:
        for field, typ in node_fields.items():
            assert isinstance(n[field], typ), (field, n)
    ids = [n["node_id"] for n in j["nodes"]]
    assert len(set(ids)) == len(ids) == 5 and sum(n["is_target_logit"] for n in j["nodes"]) == 1
    assert sorted(ln["weight"] for ln in j["links"]) == sorted(w for *_, w in A_EDGES)
    assert all(ln["source"] in ids and ln["target"] in ids for ln in j["links"])


def test_query_list_names_every_named_query_and_the_docs_run_each():
    r = run_cli("query", "--list", catalog=None)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == len(listed())
    from tests.docs import blocks, page, pages

    examples = [b for name in pages() for b in blocks("sql", page(name))]
    for q in listed():
        assert any(line.startswith(q.signature) for line in lines)
        assert f"`{q.signature}`" in page("reference/queries.md"), q.name  # documented
        assert any(f"{q.name}(" in block for block in examples), q.name  # with an example the tests run


def test_bad_input_fails_in_one_line(pair):
    cat, a, b = pair
    for args, msg in ((("diff", a, "nope"), "unknown circuit 'nope'"), (("paths", a, "--to", "77"), "has no node 77"),
                      (("compare", "A"), "at least two circuits"), (("render", "zz"), "unknown circuit")):
        r = run_cli(*args, catalog=cat.root)
        assert r.returncode == 1 and r.stderr.strip().startswith("error:") and msg in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("neighbours", a, "2", "--hops", "1", "--format", "csv", catalog=cat.root)
    assert r.returncode == 0 and sorted(pd.read_csv(io.StringIO(r.stdout)).name) == ["embed/1", "embed/2"]


def test_csv_output_streams_and_a_closed_pipe_ends_it_quietly(tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    catalog.init(tmp_path / "c")
    r = run_cli("query", "SELECT range AS i, range % 3 = 0 AS third FROM range(70000)", "--format", "csv",
                catalog=tmp_path / "c")
    df = pd.read_csv(io.StringIO(r.stdout))  # many chunks, one header
    assert r.returncode == 0 and len(df) == 70000 and df.i.tolist() == list(range(70000)) and df.third.sum() == 23334
    p = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "--catalog", str(tmp_path / "c"), "query",
                          "SELECT * FROM range(50000000)", "--format", "csv"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "range\n"
    p.stdout.close()  # as `| head -1` does
    assert p.wait(timeout=120) == 141 and p.stderr.read() == ""
