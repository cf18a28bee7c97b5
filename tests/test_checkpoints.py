"""Real checkpoints: tiny random GPT-2, GPT-NeoX and Llama checkpoints written by `transformers`, their
dictionary sets (SAELens and the Sparse Feature Circuits layout) and a task file in SFC's format."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch
from checkpoints import FAMILIES, write_checkpoint, write_saelens_set, write_sfc_set, write_task
from conftest import run_cli

from catalog.errors import UserError


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    """Checkpoints, dictionary sets and a task file, as a user has them on disk."""
    root = tmp_path_factory.mktemp("disk")
    for f in FAMILIES:
        write_checkpoint(root / f, f)
    write_task(root / "task.jsonl")
    write_sfc_set(root / "sfc")
    # GPT-2 style residual SAEs (resid_pre of blocks 1..n: the previous block's resid_post) for resid_0 and resid_1
    write_saelens_set(root / "saelens", {f"L{i}": f"blocks.{i}.hook_resid_pre" for i in (1, 2)})
    return root


@pytest.fixture(scope="module")
def handles(disk):
    from compute.models.checkpoints import load_checkpoint

    return {f: load_checkpoint(str(disk / f), progress=False) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_hugging_face(disk, handles, family):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(disk / family), local_files_only=True)
    model = handles[family].model
    tokens = model.to_tokens(["the cat near the dogs", "the dogs by the cat runs"], padding_side="right")
    with torch.no_grad():
        diff = (model(tokens) - hf(tokens).logits).abs().max().item()
    assert diff <= 1e-4, diff
    assert model.cfg.parallel_attn_mlp == (family == "neox")


def test_the_same_checkpoint_is_one_model(disk, handles, tmp_path):
    from compute.models.checkpoints import load_checkpoint

    moved = shutil.copytree(disk / "gpt2", tmp_path / "elsewhere")
    assert load_checkpoint(str(moved), progress=False).model_id == handles["gpt2"].model_id
    assert len({h.model_id for h in handles.values()}) == 3
    assert handles["llama"].row()["weights_hash"] == handles["llama"].weights_hash


def test_official_name_from_the_local_cache(disk, tmp_path, monkeypatch):
    """A TransformerLens name resolves to its snapshot in the local Hugging Face cache, offline."""
    from compute.models.checkpoints import resolve

    snap = tmp_path / "hub" / "models--EleutherAI--pythia-70m" / "snapshots" / "0123abc"
    shutil.copytree(disk / "neox", snap)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("0123abc")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve("pythia-70m") == snap  # an alias of EleutherAI/pythia-70m
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(UserError, match="not in the local Hugging Face cache"):
        resolve("pythia-70m")


def test_sfc_layout_is_mapped_without_a_spec(disk, handles):
    from compute.dictionaries.sets import find

    found = find(disk / "sfc", handles["neox"].model)
    assert [f.site.name for f in found] == ["embed", "attn_0", "mlp_0", "resid_0", "attn_1", "mlp_1", "resid_1"]
    assert {f.format for f in found} == {"dictionary_learning"} and {f.how for f in found} == {"folder"}
    # SAELens configs name their hooks: resid_pre of block i is resid_{i-1}
    assert [(f.site.name, f.how) for f in find(disk / "saelens", handles["gpt2"].model)] == \
        [("resid_0", "config"), ("resid_1", "config")]


def test_spec_file_places_what_cannot_be_guessed(disk, handles, tmp_path):
    from compute.dictionaries.sets import SPEC_FILE, find

    odd = shutil.copytree(disk / "sfc" / "mlp_out_layer1", tmp_path / "set" / "mystery")
    with pytest.raises(UserError, match="cannot tell which submodule") as e:
        find(tmp_path / "set", handles["gpt2"].model)
    assert SPEC_FILE in str(e.value)
    (tmp_path / "set" / SPEC_FILE).write_text('{"mystery/10_64": "mlp_1"}')
    [f] = find(tmp_path / "set", handles["gpt2"].model)
    assert (f.site.name, f.how, f.folder) == ("mlp_1", "spec", odd / "10_64")


def test_a_set_is_measured_with_shared_passes(disk, handles, tmp_path, monkeypatch):
    """Measuring a set shares one forward pass for every site's activations and one clean loss; each
    dictionary then costs its spliced and zero-ablated losses, and its metrics are those of measuring
    it alone."""
    from compute.dictionaries import metrics
    from compute.dictionaries.building import _save_measured
    from compute.dictionaries.sets import load_set

    monkeypatch.setenv("CIRCUIT_CACHE", str(tmp_path / "cache"))
    calls = {"collect_activations": 0, "lm_loss": 0}

    def counting(name, fn):
        def counted(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return counted

    for name in calls:
        monkeypatch.setattr(metrics, name, counting(name, getattr(metrics, name)))
    handle, prompts = handles["neox"], ["the cat near the dogs", "the dogs by the cat"]
    dicts, _ = load_set(disk / "sfc", handle, prompts, progress=False)
    assert calls == {"collect_activations": 1, "lm_loss": 1 + 2 * len(dicts)}, calls
    d = dicts["mlp_1"]
    acts = metrics.collect_activations(handle.model, [d.site.hook_out], prompts)
    _save_measured(handle.model, tmp_path / "alone", d.site, d.sae, acts[d.site.hook_out], None, prompts)
    alone = json.loads((tmp_path / "alone" / "mlp_1" / "metrics.json").read_text())
    assert alone.keys() == d.metrics.keys()
    for key, value in alone.items():  # loss_recovered is None where zeroing the site costs nothing
        assert d.metrics[key] == (value if value is None else pytest.approx(value, rel=1e-5, abs=1e-7)), key


@pytest.mark.parametrize("family", FAMILIES)
def test_spliced_checkpoint_is_exact(disk, handles, family):
    """Every dictionary spliced in reproduces the model: faithfulness of every node 1, of none 0, with
    both formats (the SAELens set covers two sites; neurons fill the rest)."""
    from compute.attribution.faithfulness import everything, set_faithfulness
    from compute.dictionaries.sets import load_set
    from compute.tasks import encode, load_task_file
    from schema.sites import sites

    handle, task = handles[family], load_task_file(disk / "task.jsonl")
    data = encode(handle.model, task)
    assert dict(data.dropped) == {"answer is not a single known token": 1,
                                  "clean and patch prompts differ in length": 1}
    prompts = [e["clean_prefix"] for e in task.examples]
    subs = sites(handle.model.cfg.n_layers)
    for name in ("sfc", "saelens"):
        dicts, filled = load_set(disk / name, handle, prompts, progress=False)
        assert len(filled) == (0 if name == "sfc" else 5)
        saes = {k: d.sae for k, d in dicts.items()}
        full, empty = set_faithfulness(handle.model, subs, saes, data, everything(subs, saes))
        assert full == pytest.approx(1.0, abs=1e-4) and empty == pytest.approx(0.0, abs=1e-4), (name, full, empty)


@pytest.mark.parametrize("family,layout", [(f, x) for f in FAMILIES for x in ("sfc", "saelens")])
def test_discover_on_a_checkpoint(disk, tmp_path, family, layout):
    """Each family with each format: the SFC set (dictionary_learning files at every submodule) and the
    SAELens set (resid_0 and resid_1; neurons elsewhere, which discover reports)."""
    import catalog

    path = tmp_path / "cat"
    r = run_cli("discover", "--model", str(disk / family), "--dictionaries", str(disk / layout), "--task-file",
                str(disk / "task.jsonl"), "--ablation", "mean", "--examples", "8", catalog=path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "dropped 1 examples: answer is not a single known token" in r.stderr
    assert ("no dictionary for embed, attn_0, mlp_0, attn_1, mlp_1: neurons" in r.stderr) == (layout == "saelens")
    cat = catalog.open(path)
    c = cat.sql("SELECT c.*, m.source, m.weights_hash FROM circuits c JOIN models m USING (model_id)").iloc[0]
    assert c.model_id.startswith({"gpt2": "gpt2-", "neox": "gptneox-", "llama": "llama-"}[family])
    assert c.n_examples == 8 and c.source == str((disk / family).resolve())
    kinds = cat.sql("SELECT kind, count(*) AS n FROM dictionaries GROUP BY kind ORDER BY kind")
    assert dict(zip(kinds.kind, kinds.n, strict=True)) == ({"sae": 7} if layout == "sfc" else {"identity": 5, "sae": 2})
    f = cat.sql("SELECT n_nodes, value FROM evaluations WHERE circuit_id = ? AND kind = 'faithfulness' "
                "AND ablation = 'mean' ORDER BY n_nodes", [c.circuit_id])
    assert f.value.iloc[0] == pytest.approx(0.0, abs=1e-6)  # the empty set
    assert cat.sql("SELECT count(*) AS n FROM edges WHERE circuit_id = ?", [c.circuit_id]).n[0] == c.n_edges


def test_what_cannot_be_used_is_refused_in_one_line(disk, tmp_path):
    import catalog

    path = tmp_path / "cat"
    task = str(disk / "task.jsonl")
    run_cli("discover", "--model", str(disk / "gpt2"), "--neurons", "--task-file", task, "--no-eval", catalog=path)
    before = catalog.open(path).sql("SELECT count(*) AS n FROM runs").n[0]

    narrow = write_sfc_set(tmp_path / "narrow", d=16)  # dictionaries of another model's width
    no_tok = write_checkpoint(tmp_path / "no-tokenizer", "gpt2", tokenizer=False)
    alien = shutil.copytree(disk / "gpt2", tmp_path / "alien")
    (alien / "config.json").write_text((alien / "config.json").read_text().replace("GPT2LMHeadModel", "FooForCausalLM"))
    cases = [
        (["--model", str(disk / "gpt2"), "--dictionaries", str(narrow)], "has d_in=16, but the hook has width 32"),
        (["--model", str(no_tok), "--neurons"], "no tokenizer"),
        (["--model", str(alien), "--neurons"], "FooForCausalLM cannot be converted by TransformerLens"),
        (["--model", str(tmp_path / "nowhere"), "--neurons"], "no TransformerLens model of that name"),
        (["--model", str(disk / "gpt2")], "--model needs --dictionaries"),
        (["--model", str(disk / "gpt2"), "--neurons", "--dictionaries", str(disk / "sfc")], "give one"),
    ]
    for args, message in cases:
        r = run_cli("discover", *args, "--task-file", task, "--no-eval", catalog=path)
        assert r.returncode == 1, (args, r.stderr[-2000:])
        lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in r.stderr, (args, r.stderr[-2000:])
    assert str(narrow / "embed") in run_cli("discover", *cases[0][0], "--task-file", task, catalog=path).stderr
    assert catalog.open(path).sql("SELECT count(*) AS n FROM runs").n[0] == before


@pytest.mark.parametrize("method", ["atp", "ig"])
def test_a_memory_budget_gives_the_same_circuit(disk, handles, method):
    """Under a budget of one example per batch (and, for AtP, too little to keep any batch's states for
    the edge pass: they are computed again) the circuit is the one found without a budget."""
    from compute.attribution.budget import examples_per_batch, kept_bytes
    from compute.attribution.discovery import DiscoveryParams, discover
    from compute.dictionaries.sets import load_set
    from compute.tasks import encode, load_task_file
    from schema.sites import sites

    handle, task = handles["gpt2"], load_task_file(disk / "task.jsonl")
    model, subs = handle.model, sites(handle.model.cfg.n_layers)
    prompts = [e["clean_prefix"] for e in task.examples]
    dicts = {k: d.sae for k, d in load_set(disk / "sfc", handle, prompts, progress=False)[0].items()}
    data = encode(model, task)
    length = data.batches[0].clean.shape[1]
    steps = 20 if method == "ig" else 1
    budget = 1.5 * length * 1e9 / examples_per_batch(model.cfg, dicts, length, steps, length * 1e9)  # 1.5 examples
    assert examples_per_batch(model.cfg, dicts, length, steps, budget) == 1
    streamed = kept_bytes(dicts, model.cfg.d_model, data.n_examples * length) > budget / 2
    assert streamed == (method == "atp")
    params = DiscoveryParams(method=method, node_threshold=0.02, edge_threshold=0.0, ablations=("mean",))
    whole = discover(model, subs, dicts, data, params, progress=False)
    budgeted = discover(model, subs, dicts, data, replace(params, max_memory=budget), progress=False)
    assert len(whole.edges) > 10 and [e[:2] for e in budgeted.edges] == [e[:2] for e in whole.edges]
    assert torch.allclose(torch.tensor([e[2] for e in budgeted.edges]), torch.tensor([e[2] for e in whole.edges]),
                          rtol=1e-4, atol=1e-7)
    assert [n.effect for n in budgeted.nodes] == pytest.approx([n.effect for n in whole.nodes], rel=1e-4, abs=1e-7)
    assert budgeted.curves[0].faithfulness == pytest.approx(whole.curves[0].faithfulness, abs=1e-6)
    assert sum(int((f.to_dense() if f.is_sparse else f).count_nonzero()) for _, _, f in budgeted.clean_features) \
        == sum(int(f.count_nonzero()) for _, _, f in whole.clean_features)


def test_qwen3_loads_with_its_logits_and_gives_exact_local_circuits(tmp_path):
    """Qwen3 (QK-norm: each head's query and key RMS-normalised; grouped-query attention) converts with
    Hugging Face's logits; with the per-head scales frozen, direct contributions add up to every target,
    with attention SAEs and with attention a frozen path, and QK pairs add up to every head's score."""
    from checkpoints import some_targets, write_local_set
    from transformers import AutoModelForCausalLM

    from compute.local.contributions import attribute
    from compute.local.qk import qk
    from compute.local.replacement import Replacement
    from compute.models.checkpoints import load_checkpoint

    prompt = "the cat near the dogs runs"
    checkpoint = write_checkpoint(tmp_path / "qwen3", "qwen3")
    model = load_checkpoint(str(checkpoint), progress=False).model
    hf = AutoModelForCausalLM.from_pretrained(str(checkpoint), local_files_only=True)
    tokens = model.to_tokens(prompt)
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max() <= 1e-4
    transcoders, attention = write_local_set(tmp_path / "set", model, prompt)
    for saes in (attention, {}):
        rep = Replacement(model, transcoders, saes, tokens)
        a = attribute(rep, some_targets(rep, per_site=2), batch_size=4)  # 4 copies: the frozen scales repeat
        assert ((a.scores.sum(1) + a.bias - a.values).abs() / a.values.abs().clamp_min(1e-3)).max() <= 1e-4
    rep = Replacement(model, transcoders, attention, tokens)
    for head in range(model.cfg.n_heads):
        q = qk(rep, 1, head, -1, 2)
        assert abs(q.pairs.sum().item() - q.score) <= 1e-4 * max(1.0, abs(q.score))
    r = run_cli("attribute", "--model", str(checkpoint), "--dictionaries", str(tmp_path / "set"), "--prompt", prompt,
                catalog=tmp_path / "c")
    assert r.returncode == 0, r.stderr[-2000:]


def test_a_gemma2_checkpoint_is_refused_in_one_line(tmp_path):
    """TransformerLens 3.9 does not convert Gemma2ForCausalLM from a checkpoint directory: one line says so."""
    checkpoint = write_checkpoint(tmp_path / "gemma2", "gemma2")
    r = run_cli("attribute", "--model", str(checkpoint), "--dictionaries", str(tmp_path), "--prompt", "the cat",
                catalog=tmp_path / "c")
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 1 and len(errors) == 1 and "Gemma2ForCausalLM" in errors[0], r.stderr

