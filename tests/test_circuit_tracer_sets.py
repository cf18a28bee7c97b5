"""circuit-tracer's transcoder sets on disk (its layer_{i}.safetensors and Gemma Scope's params.npz, with
config.yaml): written here in each format, read to the same numbers, used for local circuits, and
refused in one line when they cannot be used."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import run_cli
from safetensors.torch import save_file

from compute.dictionaries.circuit_tracer import read_config, read_transcoder
from compute.dictionaries.formats import load_dictionary, save_dictionary
from compute.dictionaries.kinds import (
    JumpReLUSkipTranscoder,
    JumpReLUTranscoder,
    SkipTranscoder,
    Transcoder,
)

PROMPT = "the cat near the dogs runs"
CONFIG = "model_kind: transcoder_set\nfeature_input_hook: {i}\nfeature_output_hook: {o}\nscan: test-set\n"


def _config(folder, hook_in="ln2.hook_normalized", hook_out="hook_mlp_out", kind="transcoder_set"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(CONFIG.format(i=hook_in, o=hook_out).replace("transcoder_set", kind))


def write_safetensors(folder, layer: int, sae, threshold=None, **extra):
    """One layer as circuit-tracer's SingleLayerTranscoder.to_safetensors writes it."""
    state = {"W_enc": sae.W_enc.T.contiguous(), "W_dec": sae.W_dec, "b_enc": sae.b_enc, "b_dec": sae.b_dec, **extra}
    if threshold is not None:
        state["activation_function.threshold"] = threshold
    save_file({k: v.detach().float().contiguous() for k, v in state.items()}, str(folder / f"layer_{layer}.safetensors"))


def write_gemma_scope(folder, layer: int, sae, threshold):
    """One layer as Gemma Scope's params.npz (W_enc as [d_model, d_transcoder])."""
    where = folder / f"layer_{layer}" / "width_16k" / "average_l0_8"
    where.mkdir(parents=True)
    np.savez(where / "params.npz", W_enc=sae.W_enc.detach().numpy(), W_dec=sae.W_dec.detach().numpy(),
             b_enc=sae.b_enc.detach().numpy(), b_dec=sae.b_dec.detach().numpy(), threshold=threshold.numpy())


@pytest.fixture(scope="module")
def neox(tmp_path_factory):
    """A GPT-NeoX checkpoint with a SAELens set (transcoders and attention SAEs) that fire on the prompt."""
    from checkpoints import write_checkpoint, write_local_set

    from compute.models.checkpoints import load_checkpoint

    root = tmp_path_factory.mktemp("ct")
    checkpoint = write_checkpoint(root / "neox", "neox")
    model = load_checkpoint(str(checkpoint), progress=False).model
    transcoders, attention = write_local_set(root / "set", model, PROMPT)
    return root, checkpoint, model, transcoders, attention


def test_each_format_reads_to_the_same_numbers(neox, tmp_path):
    _, _, model, transcoders, _ = neox
    sae = transcoders[0].sae
    threshold = torch.rand(sae.d_sae) * 0.2
    _config(tmp_path)
    write_safetensors(tmp_path, 0, sae)
    write_safetensors(tmp_path, 1, sae, threshold)
    write_gemma_scope(tmp_path / "gs", 1, sae, threshold)
    cfg = read_config(tmp_path)
    relu = read_transcoder(tmp_path / "layer_0.safetensors", 0, cfg)
    jump = read_transcoder(tmp_path / "layer_1.safetensors", 1, cfg)
    gemma = read_transcoder(next((tmp_path / "gs").rglob("params.npz")), 1, cfg)
    assert type(relu) is Transcoder and type(jump) is type(gemma) is JumpReLUTranscoder
    assert (relu.hook_name, relu.hook_name_out) == ("blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out")
    x = torch.randn(5, sae.d_in)
    pre = x @ sae.W_enc + sae.b_enc  # circuit-tracer's F.linear(x, W_enc, b_enc) with its [d_sae, d_model] W_enc
    assert torch.equal(relu.encode(x), sae.encode(x)) and torch.equal(relu.decode(relu.encode(x)), sae(x))
    for t in (jump, gemma):
        assert torch.allclose(t.encode(x), pre * (pre > threshold), atol=1e-6)  # circuit-tracer's JumpReLU
        assert torch.equal(t.threshold, threshold)
    # a skip transcoder: circuit-tracer adds x @ W_skip.T to the decoded features
    w_skip = torch.randn(sae.d_out, sae.d_in)
    write_safetensors(tmp_path, 0, sae, W_skip=w_skip)
    write_safetensors(tmp_path, 1, sae, threshold, W_skip=w_skip)
    skip, jump_skip = (read_transcoder(tmp_path / f"layer_{i}.safetensors", i, cfg) for i in (0, 1))
    assert type(skip) is SkipTranscoder and type(jump_skip) is JumpReLUSkipTranscoder
    assert torch.allclose(skip(x), sae(x) + x @ w_skip.T, atol=1e-5)
    assert torch.allclose(jump_skip(x), jump(x) + x @ w_skip.T, atol=1e-5)
    for i, t in enumerate((skip, jump_skip)):
        save_dictionary(t, tmp_path / f"saelens{i}")
        back = load_dictionary(tmp_path / f"saelens{i}")
        assert type(back) is type(t) and torch.equal(back(x), t(x))


def test_a_circuit_tracer_set_gives_the_local_circuit_of_the_same_transcoders(neox, tmp_path):
    """The checkpoint's transcoders written in circuit-tracer's format beside its attention SAEs: `attribute`
    prints the same nodes, with the same effects, as with the SAELens copies."""
    import shutil

    root, checkpoint, _, transcoders, _ = neox
    mixed = tmp_path / "mixed"
    shutil.copytree(root / "set", mixed)
    _config(mixed / "transcoders")
    for i, d in transcoders.items():
        shutil.rmtree(mixed / f"dictionary{i}")  # write_local_set saves the transcoders first
        write_safetensors(mixed / "transcoders", i, d.sae)
    given = ["attribute", "--model", str(checkpoint), "--prompt", PROMPT, "--format", "csv"]
    saelens = run_cli(*given, "--dictionaries", str(root / "set"), catalog=tmp_path / "a")
    ct = run_cli(*given, "--dictionaries", str(mixed), catalog=tmp_path / "b")
    assert saelens.returncode == 0 and ct.returncode == 0, ct.stderr[-2000:]
    assert ct.stdout == saelens.stdout and len(ct.stdout.splitlines()) > 10


def _set_with(tmp_path, neox, **change):
    """The checkpoint's SAELens set with its layer-0 transcoder replaced by a circuit-tracer set's file."""
    import shutil

    root, _, _, transcoders, _ = neox
    folder = tmp_path / "set"
    shutil.copytree(root / "set", folder)
    shutil.rmtree(folder / "dictionary0")
    _config(folder / "ct", **{k: v for k, v in change.items() if k in ("hook_in", "hook_out", "kind")})
    sae = transcoders[0].sae
    extra = {k: v for k, v in change.items() if k not in ("hook_in", "hook_out", "kind", "layer", "b_dec")}
    if "b_dec" in change:
        sae = type("Bad", (), {"W_enc": sae.W_enc, "W_dec": sae.W_dec, "b_enc": sae.b_enc, "b_dec": change["b_dec"]})
    write_safetensors(folder / "ct", change.get("layer", 0), sae, **extra)
    return folder


@pytest.mark.parametrize("change, message", [
    ({"W_skip": torch.zeros(7, 7)}, "shapes that do not fit"),
    ({"W_skip": None}, "skip transcoders (W_skip) go with attention as a frozen path"),
    ({"log_thresholds": torch.zeros(64)}, "unknown weights log_thresholds"),
    ({"b_dec": torch.zeros(7)}, "shapes that do not fit"),
    ({"b_enc_extra": torch.zeros(1)}, "unknown weights"),
    ({"kind": "cross_layer_transcoder"}, "names a cross-layer transcoder, but no W_enc_N.safetensors is there"),
    ({"hook_in": "hook_nowhere"}, "is not a hook of the model"),
    ({"hook_out": "hook_attn_out"}, "an MLP output"),
    ({"layer": 9}, "the model has 2 layers"),
    ({"activation_function.threshold": torch.full((64,), float("nan"))}, "NaN or infinite"),
])
def test_what_cannot_be_used_is_one_line(neox, tmp_path, change, message):
    _, checkpoint, model, _, _ = neox
    if change.get("W_skip", 0) is None:  # a skip that fits, beside the set's attention SAEs
        change = {"W_skip": torch.zeros(model.cfg.d_model, model.cfg.d_model)}
    folder = _set_with(tmp_path, neox, **change)
    r = run_cli("attribute", "--model", str(checkpoint), "--dictionaries", str(folder), "--prompt", PROMPT,
                catalog=tmp_path / "c")
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 1 and len(errors) == 1 and message in errors[0] and "Traceback" not in r.stderr, r.stderr


def test_a_cross_layer_transcoder_with_nan_later_decoders_is_one_line(neox, tmp_path):
    from safetensors.torch import load_file

    _, checkpoint, model, transcoders, _ = neox
    write_clt(tmp_path / "clt", transcoders, model.cfg.n_layers)
    w = load_file(str(tmp_path / "clt" / "W_dec_0.safetensors"))["W_dec_0"]
    w[5, 1, 2] = float("nan")
    save_file({"W_dec_0": w.contiguous()}, str(tmp_path / "clt" / "W_dec_0.safetensors"))
    r = run_cli("attribute", "--model", str(checkpoint), "--dictionaries", str(tmp_path / "clt"), "--prompt", PROMPT,
                catalog=tmp_path / "c")
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 1 and len(errors) == 1 and "W_dec_0 hold NaN" in errors[0], r.stderr


def write_clt(folder, transcoders, n_layers, seed=0, threshold=None):
    """The checkpoint's transcoders as a cross-layer transcoder in circuit-tracer's files, each layer's
    features also writing random vectors into every later MLP output."""
    g = torch.Generator().manual_seed(seed)
    _config(folder, kind="cross_layer_transcoder")
    for i, d in transcoders.items():
        sae = d.sae
        later = torch.randn(sae.d_sae, n_layers - 1 - i, sae.d_out, generator=g) * 0.3
        enc = {f"W_enc_{i}": sae.W_enc.T, f"b_enc_{i}": sae.b_enc, f"b_dec_{i}": sae.b_dec}
        if threshold is not None:
            enc[f"threshold_{i}"] = threshold
        save_file({k: v.detach().float().contiguous() for k, v in enc.items()}, str(folder / f"W_enc_{i}.safetensors"))
        save_file({f"W_dec_{i}": torch.cat([sae.W_dec.detach()[:, None], later], 1).contiguous()},
                  str(folder / f"W_dec_{i}.safetensors"))


def test_a_cross_layer_transcoder_reads_and_gives_exact_local_circuits(neox, tmp_path):
    """circuit-tracer's CLT files read to per-layer CrossLayerTranscoders with the same numbers; its local
    circuit (attention a frozen path) adds up for every active feature and the logit; `attribute` commits it;
    beside attention SAEs, reading vectors agree with the backward pass, and OV and QK add up."""
    from checkpoints import some_targets

    from compute.dictionaries.kinds import CrossLayerTranscoder, TrainedDictionary
    from compute.local.contributions import attribute, feature_target, logit_target
    from compute.local.qk import qk
    from compute.local.replacement import Replacement
    from schema.sites import transcoder_site

    _, checkpoint, model, transcoders, _ = neox
    n = model.cfg.n_layers
    write_clt(tmp_path / "clt", transcoders, n)
    cfg = read_config(tmp_path / "clt")
    layers = {i: read_transcoder(tmp_path / "clt" / f"W_enc_{i}.safetensors", i, cfg) for i in range(n)}
    assert all(type(t) is CrossLayerTranscoder and t.n_later == n - 1 - i for i, t in layers.items())
    x = torch.randn(5, model.cfg.d_model)
    assert torch.equal(layers[0].encode(x), transcoders[0].sae.encode(x))
    # the later decoders stay in their file (column 0 of W_dec_0 is layer 0's own decoder, read whole)
    assert layers[0].later_file == (str(tmp_path / "clt" / "W_dec_0.safetensors"), "W_dec_0", 1)
    assert layers[0].W_dec_later.numel() == 0 and torch.equal(layers[0].W_dec, transcoders[0].sae.W_dec)
    save_dictionary(layers[0], tmp_path / "copy")  # its SAELens copy holds them, and is read lazily too
    copy = load_dictionary(tmp_path / "copy")
    assert copy.later_file[0].endswith("sae_weights.safetensors") and copy.W_dec_later.numel() == 0
    some = torch.tensor([3, 0, 17])
    assert torch.equal(copy.later_rows(some), layers[0].later_rows(some)) and copy.later_rows(some).shape == (3, n - 1, model.cfg.d_model)
    clt = {i: TrainedDictionary(transcoder_site(i), t, tmp_path, {}) for i, t in layers.items()}
    asked, read = [], layers[0].later_rows
    layers[0].later_rows = lambda idx: asked.append(len(idx)) or read(idx)
    rep = Replacement(model, clt, {}, model.to_tokens(PROMPT))
    assert asked == [len(rep.active["mlp_0"][:, 1].unique())] and asked[0] < layers[0].d_sae  # active rows only
    del layers[0].later_rows
    targets = [feature_target(rep, name, f, pos) for name in rep.order for pos, f in rep.active[name].tolist()]
    targets.append(logit_target(rep, 3))  # every active feature, and a logit
    a = attribute(rep, targets)
    assert ((a.scores.sum(1) + a.bias - a.values).abs() / a.values.abs().clamp_min(1e-3)).max() <= 1e-4
    r = run_cli("attribute", "--model", str(checkpoint), "--dictionaries", str(tmp_path / "clt"), "--prompt", PROMPT,
                catalog=tmp_path / "c")
    assert r.returncode == 0, r.stderr[-2000:]
    # beside the attention SAEs: reading vectors see each CLT write that lands before the target, OV and QK add up
    rep = Replacement(model, clt, neox[4], model.to_tokens(PROMPT))
    targets = some_targets(rep, per_site=4) + [logit_target(rep, 3)]
    readers, autograd = attribute(rep, targets, ov=True), attribute(rep, targets, ov=True, engine="autograd")
    assert ((readers.scores - autograd.scores).abs().max() / autograd.scores.abs().max()).item() <= 1e-5
    assert ((readers.scores.sum(1) + readers.bias - readers.values).abs() / readers.values.abs().clamp_min(1e-3)
            ).max() <= 1e-4
    attn = [i for i, t in enumerate(targets) if t.site.startswith("attn")]
    assert ((readers.ov[attn].sum(-1) - readers.scores[attn]).abs().max() / readers.scores[attn].abs().max()) <= 1e-4
    for head in range(model.cfg.n_heads):
        q = qk(rep, 1, head, -1, 2)
        assert abs(q.pairs.sum().item() - q.score) <= 1e-4 * max(1.0, abs(q.score))
