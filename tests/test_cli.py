"""The CLI as a user meets it: the demo catalogue, queries, and one-line errors."""

import io
import json

import pandas as pd
import pytest
from conftest import run_cli
from expect import one_line_error, snapshot

from compute.models import grammar


def test_demo_catalogue_lists_every_task(demo_catalog):
    r = run_cli("query", "select task_id, count(*) from circuits join nodes using (circuit_id) group by all",
                "--format", "csv", catalog=demo_catalog, separate=True)  # as its own process, as users run it
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(io.StringIO(r.stdout))
    assert set(df.task_id) == set(grammar.TASKS)
    assert (df["count_star()"] > 10).all()


def test_demo_fills_every_table(demo_catalog):
    import catalog

    cat = catalog.open(demo_catalog)
    counts = {t: cat.sql(f"SELECT count(*) AS n FROM {t}").n[0] for t in
              ("models", "dictionaries", "features", "tasks", "examples", "runs", "circuits", "nodes",
               "edges", "activations")}
    # features and neurons (identity dictionaries) for every task
    assert counts["models"] == 1 and counts["dictionaries"] == 14 and counts["circuits"] == 2 * len(grammar.TASKS)
    assert all(n > 0 for n in counts.values()), counts
    metrics = json.loads(cat.sql("SELECT metrics FROM dictionaries LIMIT 1").metrics[0])
    assert {"mse", "fraction_variance_explained", "l0", "dead_fraction"} <= set(metrics)
    c = cat.sql("SELECT * FROM circuits WHERE task_id = 'sva_simple' ORDER BY created_at").iloc[0]
    assert c.method == "ig" and (c.ig_steps, c.ig_rule) == (20, "midpoint") and c.accuracy >= 0.95 and c.n_examples == 64
    assert c.node_threshold == 0.1 and c.edge_threshold == 0.01
    # every circuit's completeness check: one row per submodule, IG's effects within 1% of the joint effect
    checks = cat.sql("SELECT count(*) AS n, max(abs(relative_error)) AS worst FROM completeness_errors()")
    assert checks.n[0] == 7 * counts["circuits"] and checks.worst[0] <= 0.01, checks
    # structured node keys: every feature node names its dictionary and index, errors have none
    bad = cat.sql("SELECT count(*) AS n FROM nodes WHERE component <> 'metric' AND "
                  "(dictionary_id IS NULL OR (is_error = (feature_idx IS NOT NULL)))").n[0]
    assert bad == 0


def test_query_formats(demo_catalog):
    r = run_cli("query", "SELECT task_id FROM tasks ORDER BY 1", "--format", "json", catalog=demo_catalog)
    assert [row["task_id"] for row in json.loads(r.stdout)] == sorted([*grammar.TASKS, "zoo-corpus"])
    r = run_cli("circuits", "--format", "csv", catalog=demo_catalog)
    listing = pd.read_csv(io.StringIO(r.stdout))
    assert r.returncode == 0 and len(listing) == 2 * len(grammar.TASKS)
    assert sorted(listing.basis.unique()) == ["features", "neurons"] and listing.faithfulness.notna().all()


@pytest.mark.parametrize("sql,needle", [
    ("DELETE FROM nodes", "read-only"),
    ("CREATE TABLE x (a INT)", "read-only"),
    ("SELECT * FROM no_such_table", "SQL error"),
    ("SELEC 1", "SQL error"),
])
def test_bad_queries_fail_clearly_and_change_nothing(demo_catalog, sql, needle):
    before = snapshot(demo_catalog)
    one_line_error(run_cli("query", sql, catalog=demo_catalog), needle)
    assert snapshot(demo_catalog) == before


def test_missing_catalogue(tmp_path):
    one_line_error(run_cli("query", "SELECT 1", catalog=tmp_path / "none", separate=True), "no catalogue")
    assert not (tmp_path / "none").exists()


def test_malformed_task_file_names_the_line(demo_catalog, tmp_path):
    f = tmp_path / "bad.jsonl"
    good = json.dumps({"clean_prefix": "the cat", "patch_prefix": "the cats",
                       "clean_answer": " runs", "patch_answer": " run"})
    f.write_text(good + "\n" + good + "\n{\"clean_prefix\": \"the cat\", oops}\n")
    before = snapshot(demo_catalog)
    one_line_error(run_cli("discover", "--task-file", str(f), catalog=demo_catalog), "bad.jsonl:3")
    f.write_text(good + "\n" + json.dumps({"clean_prefix": "the cat"}) + "\n")
    one_line_error(run_cli("discover", "--task-file", str(f), catalog=demo_catalog), "bad.jsonl:2",
                           "missing field")
    f.write_text(good + "\n" + json.dumps({"clean_prefix": "the cat", "clean_answer": " runs"}) + "\n")
    one_line_error(run_cli("discover", "--task-file", str(f), catalog=demo_catalog), "bad.jsonl:2",
                           "with and without a patch prompt")
    f.write_text(json.dumps({"clean_prefix": "the cat", "clean_answer": " runs", "patch_answer": " run"}) + "\n")
    one_line_error(run_cli("discover", "--task-file", str(f), catalog=demo_catalog), "bad.jsonl:1",
                           "come together")
    assert snapshot(demo_catalog) == before


def test_unknown_task(demo_catalog):
    before = snapshot(demo_catalog)
    one_line_error(run_cli("discover", "--task", "no_such_task", catalog=demo_catalog),
                           "unknown task", "sva_simple")
    assert snapshot(demo_catalog) == before


def test_discover_from_a_task_file(tmp_path, dicts):
    f = tmp_path / "agreement.jsonl"
    rows = [{"clean_prefix": f"the {s}", "patch_prefix": f"the {p}", "clean_answer": " runs",
             "patch_answer": " run", "case": "singular"} for s, p in grammar.NOUNS]
    rows.append({"clean_prefix": "the cat", "patch_prefix": "the cats near", "clean_answer": " runs",
                 "patch_answer": " run"})
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cat = tmp_path / "cat"
    r = run_cli("discover", "--task-file", str(f), "--method", "atp", catalog=cat)
    assert r.returncode == 0, r.stderr
    r = run_cli("query", "SELECT task_id, method, n_examples, n_dropped FROM circuits", "--format", "json",
                catalog=cat)
    assert json.loads(r.stdout) == [{"task_id": "agreement", "method": "atp", "n_examples": len(grammar.NOUNS),
                                     "n_dropped": 1}]


def test_task_without_patch_prompts_uses_zero_ablation(tmp_path, dicts):
    f = tmp_path / "clean_only.jsonl"
    rows = [{"clean_prefix": f"the {s}", "clean_answer": " runs"} for s, _ in grammar.NOUNS]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cat = tmp_path / "cat"
    r = run_cli("discover", "--task-file", str(f), "--ablation", "mean", catalog=cat)
    assert r.returncode == 0, r.stderr
    r = run_cli("query", "SELECT metric, n_examples, n_nodes > 0 AS has_nodes, faithfulness IS NOT NULL AS "
                "evaluated, metric_patch > metric_clean AS ablating_hurts FROM circuits", "--format", "json",
                catalog=cat)
    assert json.loads(r.stdout) == [{"metric": "neg_logit", "n_examples": len(grammar.NOUNS), "has_nodes": True,
                                     "evaluated": True, "ablating_hurts": True}]
    r = run_cli("query", "SELECT count(*) AS n FROM examples WHERE patch_prefix IS NULL", "--format", "json",
                catalog=cat)
    assert json.loads(r.stdout) == [{"n": len(grammar.NOUNS)}]


def test_discover_options_reach_the_catalogue(tmp_path, dicts):
    """--neurons, --method exact, --ablation and --errors are what the catalogue records."""
    cat = tmp_path / "cat"
    r = run_cli("discover", "--task", "sva_simple", "--neurons", "--method", "exact", "--examples", "16",
                "--ablation", "zero", "--errors", "kept", catalog=cat)
    assert r.returncode == 0, r.stderr
    r = run_cli("circuits", "--format", "json", catalog=cat)
    (row,) = json.loads(r.stdout)
    assert (row["basis"], row["method"], row["n_examples"]) == ("neurons", "exact", 16)
    r = run_cli("query", "SELECT DISTINCT ablation, errors FROM evaluations", "--format", "json", catalog=cat)
    assert json.loads(r.stdout) == [{"ablation": "zero", "errors": "kept"}]
    r = run_cli("discover", "--task", "sva_simple", "--no-eval", "--examples", "8", "--steps", "4",
                "--ig-rule", "midpoint", catalog=cat)
    assert r.returncode == 0, r.stderr
    r = run_cli("query", "SELECT method, ig_steps, ig_rule FROM circuits WHERE faithfulness IS NULL "
                "UNION ALL SELECT method, ig_steps, ig_rule FROM circuits WHERE method = 'exact'", "--format", "json",
                catalog=cat)
    assert json.loads(r.stdout) == [{"method": "ig", "ig_steps": 4, "ig_rule": "midpoint"},
                                    {"method": "exact", "ig_steps": None, "ig_rule": None}]
    r = run_cli("query", "SELECT DISTINCT method FROM completeness_errors()", "--format", "json", catalog=cat)
    assert json.loads(r.stdout) == [{"method": "exact"}]  # the --no-eval circuit has no completeness check


def test_per_position_aggregation_keeps_the_shortest_prompts(tmp_path, dicts):
    """--aggregation none keeps one prompt length (SFC's loader), says what it dropped and why,
    and stores a position on every feature node."""
    f = tmp_path / "lengths.jsonl"
    rows = [{"clean_prefix": f"the {s}", "patch_prefix": f"the {p}", "clean_answer": " runs",
             "patch_answer": " run"} for s, p in grammar.NOUNS]
    rows += [{"clean_prefix": f"the {s} near the dog", "patch_prefix": f"the {p} near the dog",
              "clean_answer": " runs", "patch_answer": " run"} for s, p in grammar.NOUNS[:3]]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cat = tmp_path / "cat"
    r = run_cli("discover", "--task-file", str(f), "--aggregation", "none", "--ablation", "mean", catalog=cat)
    assert r.returncode == 0, r.stderr
    assert "lengths: dropped 3 examples: longer than the shortest prompt (3 tokens" in r.stderr
    # evaluated: the circuit's faithfulness is its curve's point at its own threshold (whether a
    # 12-prompt per-position circuit is faithful swings with the zoo's weights; that per-position
    # circuits are is asserted on a zoo task in test_faithfulness)
    r = run_cli("query", "SELECT aggregation, n_examples, n_dropped, "
                "faithfulness = (SELECT value FROM evaluations e WHERE e.kind = 'faithfulness' AND "
                "e.threshold = c.node_threshold) AS evaluated, "
                "(SELECT count(*) FROM nodes WHERE component <> 'metric' AND position IS NULL) AS no_position, "
                "(SELECT max(position) FROM nodes) AS last, "
                "(SELECT params->'dropped' FROM runs WHERE status = 'ok') AS dropped FROM circuits c",
                "--format", "json", catalog=cat)
    (row,) = json.loads(r.stdout)
    assert row == {"aggregation": "none", "n_examples": len(grammar.NOUNS), "n_dropped": 3, "evaluated": True,
                   "no_position": 0, "last": 2, "dropped": row["dropped"]}
    assert list(json.loads(row["dropped"]).values()) == [3]


def test_demo_evaluates_every_circuit_and_features_beat_neurons(demo_catalog):
    import catalog

    cat = catalog.open(demo_catalog)
    c = cat.sql("SELECT faithfulness, completeness FROM circuits")
    assert c.faithfulness.between(0.8, 1.2).all() and c.completeness.abs().lt(0.2).all()
    points = cat.sql("SELECT circuit_id, ablation, count(*) AS n FROM evaluations "
                     "WHERE kind = 'faithfulness' GROUP BY ALL")
    assert len(points) == 3 * 2 * len(grammar.TASKS) and (points.n >= 5).all()
    table = cat.sql("SELECT * FROM nodes_for_faithfulness(0.8)")
    assert set(table.task_id) == set(grammar.TASKS)
    assert (table.features < table.neurons).all(), table


def test_the_readme_table_of_features_and_neurons_is_the_demos(demo_catalog):
    """The features-vs-neurons table (docs/sql.md) is what `make demo` gives on the released zoo, here."""
    import re

    import catalog
    from tests.docs import page

    table = page("sql.md").split("| task | features | neurons |\n|---|---|---|\n")[1].split("\n\n")[0]
    documented = {m[0]: (int(m[1]), int(m[2])) for m in re.findall(r"\| (\w+) \| (\d+) \| (\d+) \|", table)}
    measured = catalog.open(demo_catalog).sql("SELECT * FROM nodes_for_faithfulness(0.8)")
    assert documented == {r.task_id: (int(r.features), int(r.neurons)) for r in measured.itertuples()}


def test_plot_writes_the_curves(demo_catalog, tmp_path):
    out = tmp_path / "curves.png"
    r = run_cli("plot", "--task", "sva_simple", "--out", str(out), catalog=demo_catalog)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
    r = run_cli("plot", "circuit-nope", "--out", str(out), catalog=demo_catalog)
    assert r.returncode == 1 and "unknown circuit" in r.stderr and "Traceback" not in r.stderr


def test_nested_sets_predict_the_measured_change(demo_catalog, tmp_path):
    """Every demo circuit stores its nested node sets; IG's predicted change matches the measured one with
    Pearson r >= 0.95 on every task (measured here: sva_across_pp 0.951, sva_across_rc 0.958, sva_simple
    0.966, sva_within_rc 0.981, ioi and pronoun_gender 0.999; the floor leaves 0.01 for other processors'
    zoo builds), and `plot --predictions` draws them."""
    import catalog

    cat = catalog.open(demo_catalog)
    r = cat.sql("SELECT c.task_id, corr(p.predicted, p.measured) AS r, count(*) FILTER (WHERE NOT p.all_nodes) AS nested "
                "FROM predictions p JOIN circuits c USING (circuit_id) "
                "WHERE circuit_basis(c.circuit_id) = 'features' AND c.method = 'ig' GROUP BY ALL")
    assert len(r) == 6 and (r["nested"] >= 30).all()
    assert (r["r"] >= 0.94).all(), r
    out = tmp_path / "predictions.png"
    done = run_cli("plot", "--predictions", "--task", "sva_simple", "--out", str(out), catalog=demo_catalog)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
