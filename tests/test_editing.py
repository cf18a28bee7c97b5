"""Editing: ablating features chosen by SQL and measuring the task again."""

import json

import pytest
import torch
from conftest import run_cli, run_readme_commands

from compute.attribution.editing import edit_and_measure
from compute.attribution.spliced import batch_metric, states
from compute.tasks import encode


def test_edit_equals_a_hand_written_ablation(zoo, subs, saes):
    """Mean-ablating one resid_0 feature everywhere is x - (f_i - mean f_i) W_dec[i] at every position."""
    task = zoo.tasks["sva_simple"]
    b = encode(zoo.model, task, "test").batches[0]
    sae = saes["resid_0"]
    tokens = torch.cat([b.clean, b.patch])
    f = states(zoo.model, subs, saes, tokens)["resid_0"].f
    i = int(f.abs().sum((0, 1)).argmax())
    mean = f[..., i].mean(0, keepdim=True)

    def hook(x, hook):
        return x - (sae.encode(x)[..., i] - mean)[..., None] * sae.W_dec[i]

    with torch.no_grad():
        logits = zoo.model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_post", hook)])
    want = batch_metric(logits[: len(b)], b).mean().item()
    assert len(encode(zoo.model, task, "test").batches) == 1  # one length: one mean
    (only,) = [m for m in edit_and_measure(zoo.model, subs, saes, task, {"resid_0": [i]}) if m.subset == "all"]
    assert only.metric_after == pytest.approx(want, rel=1e-4, abs=1e-5)
    assert only.metric_before == pytest.approx(batch_metric(zoo.model(b.clean), b).mean().item(), rel=1e-5)


def test_ablating_silent_features_changes_nothing(zoo, subs, saes):
    task = zoo.tasks["sva_simple"]
    f = states(zoo.model, subs, saes, encode(zoo.model, task, "test").batches[0].clean)["mlp_1"].f
    silent = (f.abs().sum((0, 1)) == 0).nonzero().flatten()[:20].tolist()
    for m in edit_and_measure(zoo.model, subs, saes, task, {"mlp_1": silent}, "zero"):
        assert m.metric_after == pytest.approx(m.metric_before, abs=1e-5)
        assert m.accuracy_after == m.accuracy_before


@pytest.fixture(scope="module")
def shift(tmp_path_factory, dicts):
    """The editing page's SHIFT commands, run as written in a fresh folder."""
    from tests.docs import page

    here = tmp_path_factory.mktemp("shift")
    return here, run_readme_commands("shift", page("editing.md"), here)


def test_removing_the_spurious_cue_raises_worst_group_accuracy(shift):
    here, (_, edit) = shift
    r = run_cli("query", "SELECT subset, n_examples, n_features, accuracy_before, accuracy_after, metric_before, "
                "metric_after FROM edits ORDER BY subset", "--format", "json", catalog=here / "shift")
    rows = {row["subset"]: row for row in json.loads(r.stdout)}
    assert set(rows) == {"all", "aligned", "conflicting"}
    before = min(rows["aligned"]["accuracy_before"], rows["conflicting"]["accuracy_before"])
    after = min(rows["aligned"]["accuracy_after"], rows["conflicting"]["accuracy_after"])
    assert rows["conflicting"]["accuracy_before"] < rows["aligned"]["accuracy_before"]  # the cue hurts
    assert after >= before + 0.05
    assert rows["conflicting"]["metric_after"] < rows["conflicting"]["metric_before"] - 0.5  # more right
    assert rows["aligned"]["accuracy_after"] >= rows["aligned"]["accuracy_before"] - 0.02
    assert "worst-group accuracy" in edit.stderr and "conflicting" in edit.stdout
    r = run_cli("query", "SELECT count(*) AS n, any_value(e.n_features) AS n_features, "
                "bool_and(f.dictionary_id IN (SELECT dictionary_id FROM dictionaries)) AS known "
                "FROM edit_features f JOIN edits e USING (edit_id) WHERE e.subset = 'all'",
                "--format", "json", catalog=here / "shift")
    (row,) = json.loads(r.stdout)
    assert row["n"] == row["n_features"] > 0 and row["known"]
    assert (here / "shift.png").stat().st_size > 10_000


def test_the_queries_of_the_editing_page_return_rows(shift):
    import catalog
    from tests.docs import blocks, page

    here, _ = shift
    found = blocks("sql", page("editing.md"))
    assert found
    for sql in found:
        assert len(catalog.open(here / "shift").sql(sql)) > 0, sql


@pytest.mark.parametrize("sql,needle", [
    ("SELECT 1 AS feature_idx", "must return dictionary_id and feature_idx"),
    ("SELECT dictionary_id, feature_idx FROM features WHERE false", "chose no features"),
    ("SELECT 'sae-nope' AS dictionary_id, 3 AS feature_idx", "does not have"),
    ("DELETE FROM nodes", "read-only"),
])
def test_bad_feature_queries_fail_clearly_and_change_nothing(shift, sql, needle):
    here, _ = shift
    cat = here / "shift"
    before = sorted(p.name for p in (cat / "runs").iterdir())
    r = run_cli("edit", "--zoo", "cued", "--task", "sva_pp_cue", "--features-sql", sql, catalog=cat)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 1 and len(lines) == 1 and needle in lines[0], r.stderr[-1000:]
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in (cat / "runs").iterdir()) == before
