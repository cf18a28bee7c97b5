"""`import-graph`: circuit-tracer's and Neuronpedia's graph JSON into the catalogue, this catalogue's own
exports back unchanged, and every malformed or hostile file refused in one line with nothing committed."""

from __future__ import annotations

import json
import os

from conftest import run_cli
from expect import one_line_error, snapshot

import catalog
from catalog.graph import circuit_tracer_json

KEY = ["component", "layer", "dictionary_id", "feature_idx", "is_error", "position"]


def _cantor(x: int, y: int) -> int:  # circuit-tracer 0.5's feature number of (layer, feature)
    return (x + y) * (x + y + 1) // 2 + y


def ct_graph(weight: float = 0.5, qk: bool = True) -> dict:
    """A graph as circuit-tracer 0.5 writes it (frontend/graph_models.py) for a 2-layer model: two token
    embeddings, transcoder features at layers 0 and 1, an error node, and two logits (layer 3)."""
    nodes = [
        {"node_id": "E_17_0", "feature": 0, "layer": "E", "ctx_idx": 0, "feature_type": "embedding", "influence": 0.9},
        {"node_id": "E_42_1", "feature": 1, "layer": "E", "ctx_idx": 1, "feature_type": "embedding", "influence": 0.7},
        {"node_id": "0_5_1", "feature": _cantor(0, 5), "layer": "0", "ctx_idx": 1,
         "feature_type": "cross layer transcoder", "influence": 0.6, "activation": 2.5},
        {"node_id": "1_9_1", "feature": _cantor(1, 9), "layer": "1", "ctx_idx": 1,
         "feature_type": "cross layer transcoder", "influence": 0.8, "activation": 1.5},
        {"node_id": "0_1_1", "feature": -1, "layer": "1", "ctx_idx": 1, "feature_type": "mlp reconstruction error",
         "influence": 0.1},
        {"node_id": "3_88_1", "feature": 88, "layer": "3", "ctx_idx": 1, "feature_type": "logit",
         "is_target_logit": True, "token_prob": 0.7, "clerp": 'Output " Paris" (p=0.700)'},
        {"node_id": "3_12_1", "feature": 12, "layer": "3", "ctx_idx": 1, "feature_type": "logit", "token_prob": 0.1},
    ]
    if qk:
        nodes[3]["qk_tracing_results"] = {"pair_wise_contributors": [["0_5_1", "E_17_0", 0.25]],
                                          "top_q_marginal_contributors": [["0_5_1", 0.3]],
                                          "top_k_marginal_contributors": [["E_17_0", 0.2]]}
    links = [{"source": "E_17_0", "target": "0_5_1", "weight": 1.0}, {"source": "E_42_1", "target": "0_5_1", "weight": weight},
             {"source": "0_5_1", "target": "1_9_1", "weight": 2.0}, {"source": "1_9_1", "target": "3_88_1", "weight": 3.0},
             {"source": "0_1_1", "target": "3_88_1", "weight": -0.5}, {"source": "1_9_1", "target": "3_12_1", "weight": 0.25}]
    return {"metadata": {"slug": "capital", "scan": "gemma-2-2b", "transcoder_list": ["gemma-scope-transcoders"],
                         "prompt_tokens": ["<bos>", " capital"], "prompt": "<bos> capital", "node_threshold": 0.8,
                         "schema_version": 1},
            "qParams": {"pinnedIds": [], "supernodes": [["capital", "0_5_1", "1_9_1"]], "linkType": "both",
                        "clickedId": "", "sg_pos": ""},
            "nodes": nodes, "links": links}


def _write(path, doc) -> str:
    path.write_text(json.dumps(doc))
    return str(path)


def _plain(row) -> tuple:
    """A row's values with pandas' missing values (NaN, NA, None) as None."""
    import pandas as pd

    return tuple(None if pd.isna(v) else v for v in row)


def _keys(df):
    return {_plain(r) for r in df[KEY].itertuples(index=False)}


def test_a_circuit_tracer_graph_becomes_a_circuit_every_command_reads(tmp_path):
    root = tmp_path / "c"
    files = [_write(tmp_path / "a.json", ct_graph(0.5)), _write(tmp_path / "b.json", ct_graph(0.75, qk=False))]
    r = run_cli("import-graph", *files, "--format", "json", catalog=root)
    assert r.returncode == 0, r.stderr
    (a, b) = [row["circuit_id"] for row in json.loads(r.stdout)]
    cat = catalog.open(root)
    nodes = cat.sql("SELECT * FROM nodes WHERE circuit_id = ? ORDER BY node_idx", [a])
    dicts = cat.sql("SELECT dictionary_id, layer, kind FROM dictionaries ORDER BY layer")
    d0, d1 = dicts.dictionary_id
    assert list(dicts.kind) == ["transcoder", "transcoder"] and list(dicts.layer) == [0, 1]
    assert [_plain(r) for r in nodes[KEY].itertuples(index=False)] == [
        ("embed", -1, None, 17, False, 0), ("embed", -1, None, 42, False, 1), ("mlp", 0, d0, 5, False, 1),
        ("mlp", 1, d1, 9, False, 1), ("mlp", 1, d1, None, True, 1), ("metric", 2, None, 88, False, 1),
        ("metric", 2, None, 12, False, 1)]
    edges = cat.sql("SELECT src_idx, dst_idx, kind, weight FROM edges WHERE circuit_id = ? ORDER BY kind, src_idx, dst_idx",
                    [a])
    assert len(edges[edges.kind == "attribution"]) == 6 and set(edges.kind) == {"attribution", "qk", "qk_query", "qk_key"}
    assert edges[edges.kind == "qk"][["src_idx", "dst_idx", "weight"]].values.tolist() == [[0, 2, 0.25]]
    c = cat.sql("SELECT * FROM circuits WHERE circuit_id = ?", [a]).iloc[0]
    assert (c.method, c.model_id, c.n_nodes, c.n_edges, c.node_threshold) == ("circuit-tracer", "gemma-2-2b", 7, 6, 0.8)
    ex = cat.sql("SELECT clean_tokens, clean_answer FROM examples WHERE task_id = ?", [c.task_id]).iloc[0]
    assert list(ex.clean_tokens) == ["<bos>", " capital"] and "Paris" in ex.clean_answer
    params = json.loads(cat.sql("SELECT params FROM runs WHERE kind = 'import-graph'").params[0])
    assert params["supernodes"][files[0]] == [["capital", "0_5_1", "1_9_1"]]
    d = run_cli("diff", a, b, "--format", "csv", catalog=root)  # two imported graphs: only one link changed
    assert d.returncode == 0, d.stderr
    assert "edges,changed,1," in d.stdout and "nodes,changed,0," in d.stdout
    for command in (["paths", a, "-k", "2"], ["render", a, "--out", str(tmp_path / "a.html")], ["compare", a, b]):
        assert run_cli(*command, catalog=root).returncode == 0, command
    from catalog.explorer import create_app

    client = create_app(root).test_client()  # and the explorer's pages of it
    for url in (f"/circuits/{a}", f"/circuits/{a}/render.html", f"/circuits/{a}/nodes/3", f"/diff/{a}/{b}"):
        assert client.get(url, headers={"Host": "127.0.0.1:8765"}).status_code == 200, url


def test_an_exported_circuit_comes_back_with_the_same_nodes_and_edges(local, tmp_path):
    """A local circuit (token positions, embeddings by token, QK-traced nodes outside the circuit) through
    `export --to circuit-tracer` and `import-graph`: every exported node with its key, effect and
    membership, and every attribution edge between them with its weight."""
    root, _ = local
    cat = catalog.open(root)
    original = cat.sql("SELECT circuit_id FROM circuits WHERE method = 'local' ORDER BY created_at LIMIT 1").circuit_id[0]
    exported = circuit_tracer_json(cat, original)
    out = _write(tmp_path / "g.json", exported)
    work = tmp_path / "c"
    r = run_cli("import-graph", out, "--format", "json", catalog=work)
    assert r.returncode == 0, r.stderr
    back = json.loads(r.stdout)[0]["circuit_id"]
    again = catalog.open(work)

    def rows(c, circuit_id):
        nodes = c.sql("SELECT * FROM nodes WHERE circuit_id = ?", [circuit_id])
        edges = c.sql("SELECT * FROM edges WHERE circuit_id = ? AND kind = 'attribution'", [circuit_id])
        key = {r.node_idx: _plain(r[1:]) for r in nodes[["node_idx", *KEY]].itertuples(index=False)}
        return nodes, {(key[s], key[d], round(w, 12)) for s, d, w in edges[["src_idx", "dst_idx", "weight"]].itertuples(
            index=False) if s in key and d in key}, key

    n0, e0, k0 = rows(cat, original)
    n1, e1, k1 = rows(again, back)
    kept = n0[n0.in_circuit | n0.node_idx.isin({k for k, v in k0.items() if v in set(k1.values())})]
    assert _keys(kept) == _keys(n1) and len(n1) == len(exported["nodes"])
    pick = ["component", "layer", "feature_idx", "position", "effect", "in_circuit"]
    assert sorted(map(str, kept[pick].values.tolist())) == sorted(map(str, n1[pick].values.tolist()))
    assert {e for e in e0 if e[0] in set(k1.values()) and e[1] in set(k1.values())} == e1 and len(e1) == len(exported["links"])
    assert len(e1) > 50 and (~n1.in_circuit).sum() > 0 and n1[n1.component != "metric"].position.notna().all()  # QK-traced nodes came too


def _hostile(tmp_path):
    good = ct_graph()
    deep = "[" * 100_000 + "]" * 100_000
    cases = {
        "not json": b"{nodes: [", "not utf-8": b'{"nodes": [], "links": [], "x": "\xff"}',
        "a list": b"[1, 2]", "NaN weight": json.dumps(good).replace('"weight": 3.0', '"weight": NaN').encode(),
        "nested": deep.encode(),
    }
    docs = {
        "unknown link end": {**good, "links": [*good["links"], {"source": "E_17_0", "target": "9_9_9", "weight": 1.0}]},
        "repeated node": {**good, "nodes": [*good["nodes"], good["nodes"][0]]},
        "repeated link": {**good, "links": [*good["links"], good["links"][0]]},
        "one node twice": {**good, "nodes": [*good["nodes"], {**good["nodes"][2], "node_id": "0_5_1b"}]},
        "unknown type": {**good, "nodes": [{**good["nodes"][0], "feature_type": "mystery"}, *good["nodes"][1:]]},
        "bad position": {**good, "nodes": [{**good["nodes"][0], "ctx_idx": -3}, *good["nodes"][1:]]},
        "bad layer": {**good, "nodes": [*good["nodes"][:2], {**good["nodes"][2], "layer": "../0"}, *good["nodes"][3:]]},
        "no logit": {**good, "nodes": good["nodes"][:5], "links": good["links"][:3]},
        "bad own key": {**good, "nodes": [{**good["nodes"][0], "catalog": {"component": 1}}, *good["nodes"][1:]]},
        "bad qk": {**good, "nodes": [*good["nodes"][:3], {**good["nodes"][3], "qk_tracing_results": {
            "pair_wise_contributors": [["0_5_1", "nowhere", 1.0]]}}, *good["nodes"][4:]]},
        "bad supernodes": {**good, "qParams": {**good["qParams"], "supernodes": "all"}},
    }
    paths = {}
    for name, data in cases.items():
        (tmp_path / f"{name}.json").write_bytes(data)
        paths[name] = str(tmp_path / f"{name}.json")
    for name, doc in docs.items():
        paths[name] = _write(tmp_path / f"{name}.json", doc)
    paths["a folder"] = str(tmp_path)
    paths["missing"] = str(tmp_path / "missing.json")
    paths["a device"] = os.devnull
    return paths


def test_a_malformed_or_hostile_file_is_one_line_and_nothing_is_committed(tmp_path):
    root = tmp_path / "c"
    catalog.init(root)
    good = _write(tmp_path / "good.json", ct_graph())
    before = snapshot(root)
    (tmp_path / "files").mkdir()
    for name, path in _hostile(tmp_path / "files").items():
        r = run_cli("import-graph", good, path, catalog=root)  # the good file is not committed either
        one_line_error(r)
        assert snapshot(root) == before, name
    assert catalog.open(root).sql("SELECT count(*) AS n FROM circuits").n[0] == 0


def test_import_graph_output_fits_pipes(tmp_path):
    r = run_cli("import-graph", _write(tmp_path / "g.json", ct_graph()), "--format", "csv", catalog=tmp_path / "c")
    assert r.returncode == 0 and r.stdout.startswith("circuit_id,file,model,nodes,edges,qk_edges\n")


# ---- circuit-tracer's Graph.to_pt files ----------------------------------------------------------------

def write_pt_graph(path, adjacency=None, extra=None):
    """A graph as circuit-tracer 0.5's Graph.to_pt saves it (its UnifiedConfig and LogitTarget pickled by
    name, which this test defines as circuit-tracer does), for a 2-layer model on 2 tokens: features
    0_5 and 1_9 at position 1 and layer 0's error term there carry the logit; 0_3 at position 0 and
    three links are weak."""
    import sys
    import types
    from typing import NamedTuple

    import torch

    class UnifiedConfig:
        def __init__(self, **fields):
            self.__dict__.update(fields)

    class LogitTarget(NamedTuple):
        token_str: str
        vocab_idx: int

    modules = {"circuit_tracer": types.ModuleType("circuit_tracer"),
               "circuit_tracer.utils": types.ModuleType("circuit_tracer.utils"),
               "circuit_tracer.utils.tl_nnsight_mapping": types.ModuleType("circuit_tracer.utils.tl_nnsight_mapping"),
               "circuit_tracer.attribution": types.ModuleType("circuit_tracer.attribution"),
               "circuit_tracer.attribution.targets": types.ModuleType("circuit_tracer.attribution.targets")}
    for cls, module in ((UnifiedConfig, "circuit_tracer.utils.tl_nnsight_mapping"),
                        (LogitTarget, "circuit_tracer.attribution.targets")):
        cls.__module__, cls.__qualname__ = module, cls.__name__
        setattr(modules[module], cls.__name__, cls)
    # nodes: features 0..2, errors 3..6 ([layer, position]), tokens 7..8, the logit 9
    A = torch.zeros(10, 10)
    for dst, src, w in [(0, 8, 2.0), (0, 7, 0.01), (1, 0, 1.0), (1, 4, 1.0), (1, 2, 0.01), (2, 7, 1.0),
                        (9, 1, 3.0), (9, 8, 1.0), (9, 2, 0.02)]:
        A[dst, src] = w
    d = {"input_string": "<bos> paris", "adjacency_matrix": A if adjacency is None else adjacency,
         "cfg": UnifiedConfig(n_layers=2, d_model=8, model_name="tiny", tokenizer_name="tiny"),
         "active_features": torch.tensor([[0, 1, 5], [1, 1, 9], [0, 0, 3]]),
         "logit_targets": [LogitTarget(" Paris", 88)], "logit_probabilities": torch.tensor([0.7]), "vocab_size": 100,
         "input_tokens": torch.tensor([1, 42]), "selected_features": torch.tensor([0, 1, 2]),
         "activation_values": torch.tensor([2.5, 1.5, 0.3]), "scan": "tiny-set", **(extra or {})}
    saved = {k: sys.modules.get(k) for k in modules}
    sys.modules.update(modules)
    try:
        torch.save(d, path)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k)
            else:
                sys.modules[k] = v
    return path


def test_a_circuit_tracer_pt_graph_is_read_without_its_code_and_pruned_as_circuit_tracer_prunes(tmp_path):
    from compute.jobs.import_graph import read_graph

    g = read_graph(write_pt_graph(tmp_path / "g.pt"))
    names = {(n["component"], n["layer"], n["feature_idx"], n["is_error"], n["position"]) for n in g.nodes}
    assert names == {("embed", -1, 1, False, 0), ("embed", -1, 42, False, 1), ("mlp", 0, 5, False, 1),
                     ("mlp", 1, 9, False, 1), ("mlp", 0, None, True, 1), ("metric", 2, 88, False, 1)}
    # the weak feature 0_3 and the weak links are pruned; the chain to the logit and the error term stay
    weights = sorted(round(e["weight"], 3) for e in g.edges)
    assert weights == [1.0, 1.0, 1.0, 2.0, 3.0] and g.answer.startswith('Output " Paris"')
    assert g.tokens == ["<1>", "<42>"] and g.model_id == "tiny-set"
    r = run_cli("import-graph", str(tmp_path / "g.pt"), catalog=tmp_path / "c")
    assert r.returncode == 0, r.stderr


def test_a_pt_file_that_needs_code_or_does_not_fit_is_one_line(tmp_path):
    import pickle
    import zipfile

    import torch

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    (tmp_path / "garbage.pt").write_bytes(b"PK\x03\x04 not a zip at all")
    with zipfile.ZipFile(tmp_path / "plain.pt", "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"x": 1}))
    torch.save({"adjacency_matrix": torch.zeros(2, 2)}, tmp_path / "fields.pt")
    write_pt_graph(tmp_path / "shape.pt", adjacency=torch.zeros(9, 9))
    write_pt_graph(tmp_path / "nan.pt", adjacency=torch.full((10, 10), float("nan")))
    good = write_pt_graph(tmp_path / "good.pt")
    cases = {"evil.pt": "needs code to load", "garbage.pt": "not a readable PyTorch file",
             "plain.pt": "not a readable PyTorch file", "fields.pt": "not a circuit-tracer graph (Graph.to_pt's fields",
             "shape.pt": "does not fit 3 features", "nan.pt": "NaN or infinite"}
    catalog.init(tmp_path / "c")
    before = snapshot(tmp_path / "c")
    for name, message in cases.items():
        r = run_cli("import-graph", str(good), str(tmp_path / name), catalog=tmp_path / "c")
        one_line_error(r, message)
        assert snapshot(tmp_path / "c") == before, name
    assert not (tmp_path / "pwned").exists()
