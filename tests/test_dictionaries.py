"""Dictionaries: architectures, SAELens and dictionary_learning formats, quality metrics,
dashboards, and the ground-truth (toy) benchmark."""

import json

import pytest
import torch
from conftest import run_cli
from expect import one_line_error, snapshot

from catalog.errors import UserError
from compute.dictionaries.formats import (
    import_dictionary_learning,
    load_dictionary,
    save_dictionary,
)
from compute.dictionaries.kinds import (
    SAE,
    IdentityDictionary,
    JumpReLUSAE,
    TopKSAE,
    Transcoder,
    check_fits,
)
from compute.dictionaries.metrics import evaluate, lm_loss, loss_recovered
from compute.dictionaries.toy_benchmark import ToyData, ToySweep, make_data
from compute.dictionaries.training import SAEConfig, train_sae


def _randomised(sae, seed=0):
    """Every weight (biases and thresholds too) random, so a round trip cannot pass by accident."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        if isinstance(sae, JumpReLUSAE):
            sae.threshold.abs_()
    return sae


ARCHS = {
    "standard": lambda: SAE(16, 48, "blocks.0.hook_resid_post", "m"),
    "topk": lambda: TopKSAE(16, 48, "blocks.0.hook_resid_post", "m", k=5),
    "jumprelu": lambda: JumpReLUSAE(16, 48, "blocks.0.hook_resid_post", "m"),
    "transcoder": lambda: Transcoder(16, 48, "blocks.0.ln2.hook_normalized", "m", d_out=12,
                                     hook_name_out="blocks.0.hook_mlp_out"),
}


@pytest.mark.parametrize("arch", ARCHS)
def test_saelens_round_trip_and_sae_lens_loads_ours(arch, tmp_path):
    from sae_lens import SAE as LensSAE

    ours = _randomised(ARCHS[arch]())
    save_dictionary(ours, tmp_path / arch)
    back = load_dictionary(tmp_path / arch)
    assert type(back) is type(ours) and back.settings() == ours.settings()
    assert (back.hook_name, back.model_name, back.apply_b_dec_to_input) == (ours.hook_name, "m",
                                                                             ours.apply_b_dec_to_input)
    assert getattr(back, "hook_name_out", "") == getattr(ours, "hook_name_out", "")
    a, b = ours.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical

    lens = LensSAE.load_from_disk(tmp_path / arch)
    assert lens.cfg.architecture() == arch
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        f_ours, f_lens = ours.encode(x), lens.encode(x)
        assert (f_ours > 0).float().mean() > 0.05  # the comparison is not between two zero matrices
        assert torch.allclose(f_ours, f_lens, atol=1e-6, rtol=0)
        assert torch.allclose(ours.decode(f_ours), lens.decode(f_lens), atol=1e-6, rtol=0)
    if arch == "topk":
        assert ((f_ours > 0).sum(-1) <= 5).all()


def test_identity_round_trip(tmp_path):
    d = IdentityDictionary(8, "h", "m")
    save_dictionary(d, tmp_path / "id")
    back = load_dictionary(tmp_path / "id")
    assert isinstance(back, IdentityDictionary)
    x = torch.randn(5, 8)
    assert torch.equal(back.encode(x), x) and torch.equal(back.decode(back.encode(x)), x)


def test_bad_saelens_directories_are_refused(tmp_path):
    save_dictionary(_randomised(ARCHS["standard"]()), tmp_path / "d")
    cfg = json.loads((tmp_path / "d" / "cfg.json").read_text())
    (tmp_path / "d" / "cfg.json").write_text(json.dumps({**cfg, "architecture": "gated"}))
    with pytest.raises(UserError, match="architecture 'gated' is not supported"):
        load_dictionary(tmp_path / "d")
    (tmp_path / "d" / "cfg.json").write_text(json.dumps({**cfg, "d_sae": 40}))
    with pytest.raises(UserError, match="weights do not fit cfg.json"):
        load_dictionary(tmp_path / "d")
    with pytest.raises(UserError, match="no dictionary"):
        load_dictionary(tmp_path / "missing")


# ---- dictionary_learning ---------------------------------------------------------------------

def _reference_dictionary_learning(cls, s, x):
    """dictionary_learning's own encode/decode for each class, written from its source."""
    if cls == "AutoEncoder":
        f = torch.relu((x - s["bias"]) @ s["encoder.weight"].T + s["encoder.bias"])
        return f @ s["decoder.weight"].T + s["bias"], None
    if cls == "AutoEncoderTopK":
        post = torch.relu((x - s["b_dec"]) @ s["encoder.weight"].T + s["encoder.bias"])
        v, i = post.topk(int(s["k"]), dim=-1)
        f = torch.zeros_like(post).scatter(-1, i, v)
        return f @ s["decoder.weight"].T + s["b_dec"], f
    if cls == "BatchTopKSAE":
        post = torch.relu((x - s["b_dec"]) @ s["encoder.weight"].T + s["encoder.bias"])
        f = post * (post > s["threshold"])
        return f @ s["decoder.weight"].T + s["b_dec"], None
    pre = x @ s["W_enc"] + s["b_enc"]  # JumpReluAutoEncoder, apply_b_dec_to_input False
    norm = s["W_dec"].norm(dim=1)
    f = torch.relu(pre * (pre > s["threshold"])) * norm
    return (f / norm) @ s["W_dec"] + s["b_dec"], f


def _dictionary_learning_files(cls, path, d=16, n=40):
    g = torch.Generator().manual_seed(3)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.4  # noqa: E731
    if cls == "JumpReluAutoEncoder":
        s = {"W_enc": r(d, n), "b_enc": r(n), "W_dec": r(n, d) * 3, "b_dec": r(d), "threshold": r(n).abs() * 0.2}
    else:  # decoder columns deliberately not unit-norm
        s = {"encoder.weight": r(n, d), "encoder.bias": r(n), "decoder.weight": r(d, n) * 3}
        s |= {"bias": r(d)} if cls == "AutoEncoder" else {"b_dec": r(d)}
        s |= {"k": torch.tensor(6)} if cls == "AutoEncoderTopK" else {}
        s |= {"k": torch.tensor(6), "threshold": torch.tensor(0.15)} if cls == "BatchTopKSAE" else {}
    path.mkdir(parents=True)
    torch.save(s, path / "ae.pt")
    (path / "config.json").write_text(json.dumps({"trainer": {
        "dict_class": cls, "activation_dim": d, "dict_size": n, "layer": 1, "lm_name": "zoo",
        "submodule_name": "resid_post_layer_1"}, "buffer": {"d_submodule": d}}))
    return s


@pytest.mark.parametrize("cls", ["AutoEncoder", "AutoEncoderTopK", "JumpReluAutoEncoder", "BatchTopKSAE"])
def test_dictionary_learning_import_matches_its_own_formulas(cls, tmp_path):
    s = _dictionary_learning_files(cls, tmp_path / cls)
    sae = import_dictionary_learning(tmp_path / cls)
    assert sae.hook_name == "blocks.1.hook_resid_post" and sae.d_in == 16 and sae.d_sae == 40
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(4))
    want, want_f = _reference_dictionary_learning(cls, s, x)
    with torch.no_grad():
        got_f = sae.encode(x)
        assert (got_f > 0).float().mean() > 0.02
        assert torch.allclose(sae.decode(got_f), want, atol=1e-5, rtol=0)
        if want_f is not None:  # TopK keeps its decoder; JumpReLU's features are its own, norm included
            assert torch.allclose(got_f, want_f, atol=1e-5, rtol=0)
    save_dictionary(sae, tmp_path / "saelens")  # and it goes on to the SAELens format unchanged
    back = load_dictionary(tmp_path / "saelens")
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in sae.state_dict().items())


def test_dictionary_learning_errors(tmp_path):
    _dictionary_learning_files("AutoEncoder", tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    cfg["trainer"]["dict_class"] = "GatedAutoEncoder"
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="GatedAutoEncoder' is not supported"):
        import_dictionary_learning(tmp_path / "a")
    cfg["trainer"] |= {"dict_class": "AutoEncoder", "submodule_name": "something"}
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="pass --hook"):
        import_dictionary_learning(tmp_path / "a")
    assert import_dictionary_learning(tmp_path / "a", "blocks.0.hook_mlp_out").hook_name == "blocks.0.hook_mlp_out"
    (tmp_path / "a" / "ae.pt").unlink()
    with pytest.raises(UserError, match="ae.pt missing"):
        import_dictionary_learning(tmp_path / "a")


def test_a_dictionary_that_does_not_fit_its_hook_is_refused(zoo, demo_catalog, tmp_path):
    with pytest.raises(UserError, match="d_in=32, but the hook has width 64"):
        check_fits(SAE(32, 64, "blocks.0.hook_resid_post"), zoo.model)
    with pytest.raises(UserError, match="does not have"):
        check_fits(SAE(64, 64, "blocks.7.hook_resid_post"), zoo.model)
    with pytest.raises(UserError, match="d_out=12"):
        check_fits(Transcoder(64, 64, "blocks.0.ln2.hook_normalized", d_out=12,
                              hook_name_out="blocks.0.hook_mlp_out"), zoo.model)
    save_dictionary(SAE(32, 64, "blocks.0.hook_resid_post"), tmp_path / "narrow")
    before = snapshot(demo_catalog)
    one_line_error(run_cli("dictionaries", "import", str(tmp_path / "narrow"), catalog=demo_catalog),
                           "d_in=32", "width 64")
    assert snapshot(demo_catalog) == before


# ---- training and metrics ---------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu", "transcoder"])
def test_every_architecture_trains(arch):
    truth, train, test = make_data(ToyData(d=16, n_features=32, n_train=20_000, n_test=2000))
    mix = torch.randn(16, 12, generator=torch.Generator().manual_seed(5))
    cfg = SAEConfig(architecture=arch, steps=600, expansion=4, k=4, resample_every=200)
    targets = train @ mix if arch == "transcoder" else None
    sae = train_sae(train, cfg, "h", "m", progress=False, targets=targets, hook_name_out="o" if targets is not None else "")
    m = evaluate(sae, test, test @ mix if arch == "transcoder" else None)
    assert m["fraction_variance_explained"] > 0.8, m["fraction_variance_explained"]
    assert 0 < m["l0"] < 16 and 0 <= m["dead_fraction"] <= 1 and len(m["density"]) == sae.d_sae
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(sae.d_sae), atol=1e-5)
    if arch == "topk":
        assert m["l0"] <= 4
    if arch == "jumprelu":
        assert (sae.threshold > 0).float().mean() > 0.5


def test_seeded_training_gives_identical_weights():
    _, train, _ = make_data(ToyData(d=16, n_features=32, n_train=4000, n_test=10))
    cfg = SAEConfig(steps=50, expansion=2, batch_size=256)
    first, second = (train_sae(train, cfg, "h", "m", progress=False).state_dict() for _ in range(2))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    other = train_sae(train, SAEConfig(steps=50, expansion=2, batch_size=256, seed=1), "h", "m", progress=False)
    assert not torch.equal(other.state_dict()["W_enc"], first["W_enc"])


def test_loss_recovered_against_hand_computed_cases(zoo, dicts):
    from compute.models import grammar

    sentences = grammar.corpus(100, seed=9)
    clean = lm_loss(zoo.model, sentences)
    ident = loss_recovered(zoo.model, IdentityDictionary(64, "blocks.0.hook_resid_post"), sentences,
                           "blocks.0.hook_resid_post")
    assert ident["loss_clean"] == pytest.approx(clean) and ident["loss_spliced"] == pytest.approx(clean, abs=1e-6)
    assert ident["loss_recovered"] == pytest.approx(1.0, abs=1e-6) and ident["loss_zero_ablated"] > clean + 1
    d = dicts["resid_0"]
    lr = loss_recovered(zoo.model, d.sae, sentences, d.sae.hook_name)
    want = (lr["loss_zero_ablated"] - lr["loss_spliced"]) / (lr["loss_zero_ablated"] - lr["loss_clean"])
    assert lr["loss_recovered"] == pytest.approx(want) and 0.5 < want <= 1.01
    assert {"loss_recovered", "fraction_variance_explained", "dead_fraction", "dense_fraction"} <= set(d.metrics)


# ---- catalogue: metrics, dashboards -----------------------------------------------------------

def test_cli_dictionaries_prints_the_stored_metrics(demo_catalog):
    import io

    import pandas as pd

    r = run_cli("dictionaries", "--format", "csv", catalog=demo_catalog)
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(io.StringIO(r.stdout))
    assert len(df) == 14 and set(df.kind) == {"sae", "identity"}
    assert {"mse", "fve", "l0", "dead", "dense", "loss_clean", "loss_spliced", "loss_recovered"} <= set(df.columns)
    assert (df[df.kind == "identity"].loss_recovered == 1.0).all() and (df.loss_recovered > 0.9).all()


def test_feature_dashboard_matches_the_dictionary(demo_catalog, zoo, dicts):
    import catalog
    from compute.dictionaries.dashboards import CORPUS_TASK, feature_dashboard

    cat = catalog.open(demo_catalog)
    d = dicts["resid_0"]
    feature = int(torch.tensor(d.metrics["density"]).argsort(descending=True)[20])
    dash = feature_dashboard(cat, d.dictionary_id[:12], feature, n=5)
    assert dash.dictionary_id == d.dictionary_id and len(dash.examples) == 5
    assert dash.density == pytest.approx(d.metrics["density"][feature])
    values = dash.examples.value.tolist()
    assert values == sorted(values, reverse=True)
    assert CORPUS_TASK in set(cat.sql("SELECT DISTINCT task_id FROM activations WHERE dictionary_id = ?",
                                      [d.dictionary_id]).task_id)
    for r in dash.examples.itertuples():  # the stored value is the SAE's activation at the marked token
        assert f"[{r.token}]" in r.text
        prompt = cat.sql("SELECT clean_prefix FROM examples WHERE task_id = ? AND example_idx = ?",
                         [r.task_id, r.example_idx]).clean_prefix[0]
        _, cache = zoo.model.run_with_cache(prompt, names_filter=d.sae.hook_name)
        f = d.sae.encode(cache[d.sae.hook_name])[0, :, feature]
        assert float(f[r.position]) == pytest.approx(r.value, abs=1e-5) and float(f.max()) == pytest.approx(r.value, abs=1e-5)
    want = (d.sae.W_dec[feature] @ zoo.model.W_U).topk(5)
    assert [t for t, _ in dash.promoted] == zoo.model.tokenizer.convert_ids_to_tokens(want.indices.tolist())

    r = run_cli("feature", d.dictionary_id, str(feature), "-n", "3", catalog=demo_catalog)
    assert r.returncode == 0, r.stderr
    assert "top activating examples" in r.stdout and "promoted tokens" in r.stdout
    assert dash.examples.text[0] in r.stdout
    one_line_error(run_cli("feature", d.dictionary_id, "100000", catalog=demo_catalog), "features 0..511")
    one_line_error(run_cli("feature", "nope", "1", catalog=demo_catalog), "no dictionary 'nope'")


# ---- the ground-truth benchmark ---------------------------------------------------------------

def test_toy_benchmark_recovers_true_features_and_pca_does_not(tmp_path):
    """32 dimensions, 64 true features: the best SAE of a small sweep (two sizes) finds them (MMCS >= 0.95),
    PCA cannot (MMCS < 0.6); every row reports its dead features."""
    import catalog
    from compute.jobs.benchmark import toy_benchmark_job

    cat = catalog.init(tmp_path / "cat")
    run_id, rows = toy_benchmark_job(cat, ToyData(d=32, n_features=64),
                                     ToySweep(l1_coefficients=(1.0,), sizes=(64, 128), steps=2000),
                                     progress=False)
    sae = [r for r in rows if r["method"] == "sae"]
    pca = [r for r in rows if r["method"] == "pca"][0]
    assert max(r["mmcs_truth"] for r in sae) >= 0.95
    assert pca["mmcs_truth"] < 0.6 and pca["d_sae"] == 32
    assert all(isinstance(r["dead_features"], int) and 0 <= r["dead_features"] <= r["d_sae"] for r in sae)
    assert all((r["mmcs_larger"] is None) == (r["d_sae"] == 128) for r in sae)
    stored = cat.sql("SELECT * FROM dictionary_sweeps WHERE run_id = ? ORDER BY method, l1_coefficient, d_sae",
                     [run_id])
    assert len(stored) == 3 and stored.mmcs_truth.max() == pytest.approx(max(r["mmcs_truth"] for r in sae))
    assert cat.sql("SELECT status, kind FROM runs WHERE run_id = ?", [run_id]).values.tolist() == [["ok", "benchmark"]]


def test_cli_benchmark_toy_writes_heat_maps(tmp_path, capfd):
    out = tmp_path / "grid.png"
    r = run_cli("benchmark", "toy", "--d", "8", "--features", "12", "--l1", "1", "--size", "8", "--size", "16",
                "--steps", "200", "--out", str(out), "--format", "csv", catalog=tmp_path / "cat")
    assert r.returncode == 0, r.stderr
    # its output goes to a pipe here: no progress bar there, from this process or its pinned build process
    err = r.stderr + capfd.readouterr().err
    assert "\r" not in err and "it/s" not in err and "sae/s" not in err, err
    assert r.stdout.splitlines()[0].startswith("method,l1_coefficient,d_sae,mse") and len(r.stdout.splitlines()) == 4
    from PIL import Image

    assert Image.open(out).size[0] > 1000
    one_line_error(run_cli("benchmark", "toy", "--d", "1", catalog=tmp_path / "cat"), "--d", "x>=2")


def test_cli_trains_and_registers_a_transcoder(tmp_path):
    import io

    import pandas as pd

    cat = tmp_path / "cat"
    r = run_cli("dictionaries", "train", "--architecture", "transcoder", "--submodule", "mlp_0", "--steps", "300",
                "--expansion", "2", catalog=cat)
    assert r.returncode == 0, r.stderr[-2000:]
    df = pd.read_csv(io.StringIO(run_cli("dictionaries", "--format", "csv", catalog=cat).stdout))
    assert df.kind.tolist() == ["transcoder"] and df.architecture.tolist() == ["transcoder"]
    assert df.hook_name.tolist() == ["blocks.0.ln2.hook_normalized"] and df.d_sae.tolist() == [128]
    assert 0.5 < df.fve[0] <= 1 and df.loss_recovered[0] > 0.5
    import catalog

    out_hook = catalog.open(cat).sql("SELECT hook_name_out FROM dictionaries").hook_name_out[0]
    assert out_hook == "blocks.0.hook_mlp_out"
    busiest = catalog.open(cat).sql("SELECT feature_idx FROM features ORDER BY density DESC LIMIT 1").feature_idx[0]
    r = run_cli("feature", df.dictionary_id[0], str(busiest), catalog=cat)
    assert r.returncode == 0 and "[" in r.stdout.split("top activating examples:")[1], r.stdout
    one_line_error(run_cli("dictionaries", "train", "--architecture", "transcoder", "--submodule", "attn_0",
                                   catalog=cat), "no submodule attn_0")


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu", "transcoder"])
def test_training_forward_equals_the_dictionary(arch):
    """Training takes shortcuts (TopK decodes only its k rows, b_dec folded into the encoder bias);
    its reconstructions and L0 must still be the dictionary's own encode/decode."""
    from compute.dictionaries.training import _forward

    sae = _randomised(ARCHS[arch]() if arch != "transcoder" else Transcoder(16, 48, "i", d_out=16))
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(2))
    for p in sae.parameters():
        p.requires_grad_(True)
    y_hat, _, fired, l0, _ = _forward(sae, x, SAEConfig(architecture=arch))
    with torch.no_grad():
        f = sae.encode(x)
        assert torch.allclose(y_hat, sae.decode(f), atol=1e-5, rtol=0)
        assert torch.equal(fired, (f > 0).any(0)) and float(l0()) == pytest.approx(float((f > 0).sum(-1).float().mean()))
    # and the same gradients as autograd through the dictionary's own forward pass
    weights = [sae.W_enc, sae.b_enc, sae.b_dec, sae.W_dec]
    g = torch.randn(y_hat.shape, generator=torch.Generator().manual_seed(5))
    got = torch.autograd.grad(y_hat, weights, g)
    want = torch.autograd.grad(sae.decode(sae.encode(x)), weights, g)
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_jumprelu_threshold_gradient_is_the_window_estimator():
    """The threshold's gradient, by hand: d/dtheta_c = -(1/bandwidth) * sum over rows with
    |pre - theta_c| < bandwidth/2 of (theta_c * dL/df + dL/dL0); features pass dL/df where active."""
    from compute.dictionaries.training import _JumpReLU

    gen = torch.Generator().manual_seed(3)
    pre = torch.randn(200, 30, generator=gen, requires_grad=True)
    theta = (torch.rand(30, generator=gen) * 0.5).requires_grad_(True)
    g_f, g_l0 = torch.randn(200, 30, generator=gen), torch.randn(200, generator=gen)
    f, l0 = _JumpReLU.apply(pre, theta, 0.2)
    assert torch.equal(f, pre * (pre > theta)) and torch.equal(l0, (pre > theta).float().sum(-1))
    (f * g_f).sum().backward(retain_graph=True)
    (l0 * g_l0).sum().backward()
    want = torch.zeros(30)
    for r in range(200):
        for c in range(30):
            if abs(pre[r, c] - theta[c]) < 0.1:
                want[c] -= (theta[c] * g_f[r, c] + g_l0[r]) / 0.2
    assert torch.allclose(theta.grad, want, atol=1e-4)
    assert torch.equal(pre.grad, g_f * (pre > theta))


def test_auxk_loss_by_its_definition():
    """AuxK (Gao et al. 2024): the dead features' k_aux largest pre-activations (ReLU) decode the
    residual the live features missed; the loss is that reconstruction's error over the
    residual's variance, and only dead features' weights get its gradient."""
    from compute.dictionaries.training import _auxk_loss

    gen = torch.Generator().manual_seed(4)
    sae = _randomised(TopKSAE(16, 48, "h", k=4))
    for p in sae.parameters():
        p.requires_grad_(True)
    x, residual = torch.randn(40, 16, generator=gen), torch.randn(40, 16, generator=gen)
    dead = torch.zeros(48, dtype=torch.bool)
    dead[::3] = True
    with torch.no_grad():
        pre = sae.pre_activation(x)
        k_aux = min(16 // 2, int(dead.sum()))
        masked = pre.masked_fill(~dead, float("-inf"))
        top = masked.topk(k_aux, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
        want = (residual - f @ sae.W_dec).pow(2).sum(-1).mean() / (residual - residual.mean(0)).pow(2).sum(-1).mean()
    got = _auxk_loss(sae, x, pre, residual, dead)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    got.backward()
    assert sae.W_dec.grad[~dead].abs().max() == 0 and sae.W_dec.grad[dead].abs().max() > 0
    assert sae.W_enc.grad[:, ~dead].abs().max() == 0 and sae.W_enc.grad[:, dead].abs().max() > 0
    assert _auxk_loss(sae, x, pre, residual, torch.zeros(48, dtype=torch.bool)).item() == 0


def test_keep_freed_memory_sets_glibc_malloc():
    """The CLI's allocator setting takes effect where glibc is the C library (it is on the
    machines this project runs on) and is harmless to repeat."""
    import platform

    from compute.allocator import keep_freed_memory

    assert keep_freed_memory() is (platform.libc_ver()[0] == "glibc")
    assert keep_freed_memory() is (platform.libc_ver()[0] == "glibc")


def test_a_cross_layer_transcoder_learns_a_planted_one():
    """Outputs made by a planted 2-layer CLT of sparse ReLU features (layer 0's also write into output 1):
    the trained CLT's full reconstructions explain them, with raw inputs and outputs in different units
    (the scales are folded back in), and its later decoders carry what layer 0 writes into output 1."""
    from compute.dictionaries.clt_training import reconstructions, train_clt
    from compute.dictionaries.training import SAEConfig

    g = torch.Generator().manual_seed(0)
    n, d, k = 4096, 8, 16
    xs = [torch.randn(n, d, generator=g) * s for s in (1.0, 5.0)]
    enc = [torch.randn(d, k, generator=g) for _ in range(2)]
    f = [torch.relu(x @ e - 2.0 * scale) for x, e, scale in zip(xs, enc, (1.0, 5.0), strict=True)]  # ~3.4 active
    dec = {(0, 0): torch.randn(k, d, generator=g), (0, 1): torch.randn(k, d, generator=g),
           (1, 1): torch.randn(k, d, generator=g)}
    ys = [f[0] @ dec[0, 0] * 3.0, (f[0] @ dec[0, 1] + f[1] @ dec[1, 1]) * 0.2]
    layers = train_clt(xs, ys, SAEConfig(architecture="clt", expansion=4, steps=600, lr=1e-2, l1_coefficient=1e-3,
                                          batch_size=512), ["in0", "in1"], ["out0", "out1"], "planted", progress=False)
    assert [t.n_later for t in layers] == [1, 0] and layers[0].hook_name_out == "out0"
    for y, y_hat in zip(ys, reconstructions(layers, xs), strict=True):
        assert 1 - (y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum() > 0.99
    without_later = layers[1].decode(layers[1].encode(xs[1]))  # output 1 from layer 1 alone misses layer 0's part
    assert (ys[1] - without_later).pow(2).sum() > 2 * (ys[1] - reconstructions(layers, xs)[1]).pow(2).sum()
