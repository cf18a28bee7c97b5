"""`--device cuda|mps` on a machine with neither, and `--dtype` half precision: the pipelines run under
a virtual accelerator (`tests/virtual_device.py`) that computes on the CPU and refuses every device
mix-up the real one would, and give the CPU's results; half precision gives float32's up to its own."""

from __future__ import annotations

import pytest
import torch
from checkpoints import write_checkpoint, write_sfc_set, write_task
from conftest import run_cli
from virtual_device import virtual_device

import catalog


def test_the_virtual_device_refuses_what_an_accelerator_refuses():
    with virtual_device("cuda"):
        x = torch.ones(2, 3, device="cuda")
        assert x.device == torch.device("cuda", 0) and torch.ones(3).device.type == "cpu"
        with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device"):
            x + torch.ones(3)
        with pytest.raises(RuntimeError, match="same device"):
            torch.zeros(3, dtype=torch.float64).add_(x[0])  # an accumulator left on the CPU
        assert (x * torch.tensor(2.0)).device.type == "cuda"  # a 0-d CPU tensor is a scalar
        assert x[torch.tensor([1])].device.type == "cuda"  # a CPU index is allowed
        with pytest.raises(TypeError, match="numpy"):
            x.numpy()
        assert x.cpu().numpy().sum() == 6 and x.to(torch.float64).device.type == "cuda"
        layer = torch.nn.Linear(3, 2).to("cuda")
        y = layer(torch.zeros(4, 3, device="cuda", requires_grad=True))
        y.sum().backward()
        assert layer.weight.grad.device.type == "cuda"
        with pytest.raises(RuntimeError, match="expected device cuda:0 but got cpu"):  # the engine checks roots
            torch.autograd.grad(layer(torch.zeros(4, 3, device="cuda", requires_grad=True)), layer.weight,
                                grad_outputs=torch.ones(4, 2))
        out = layer(torch.zeros(4, 3, device="cuda", requires_grad=True))
        with pytest.raises(RuntimeError, match="expected device cuda:0 but got cpu"):
            torch.autograd.grad(out, layer.weight, torch.ones(4, 2), retain_graph=True)  # given by position
        assert torch.autograd.grad(out, layer.weight, torch.ones(4, 2, device="cuda"))[0].device.type == "cuda"
        with pytest.raises(RuntimeError, match="same device"):
            layer(torch.zeros(4, 3))
    with virtual_device("mps"):
        with pytest.raises(TypeError, match="float64"):
            torch.ones(2, device="mps").double()
    assert torch.ones(2).device.type == "cpu" and not hasattr(torch.ones(2), "_virtual_device")


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    root = tmp_path_factory.mktemp("disk")
    write_checkpoint(root / "gpt2", "gpt2")
    write_task(root / "task.jsonl")
    write_sfc_set(root / "sfc")
    return root


def _nodes(path) -> list[tuple]:
    return [tuple(r) for r in catalog.open(path).sql(
        "SELECT component, layer, feature_idx, position, effect, in_circuit FROM nodes ORDER BY ALL").itertuples(index=False)]


@pytest.mark.parametrize("device, options", [
    ("cuda", []),  # IG, mean ablation, the faithfulness sweep
    ("cuda", ["--method", "exact", "--max-memory", "200K"]),  # batches recomputed under a budget
    ("mps", ["--method", "atp", "--aggregation", "none"]),  # per position; MPS has no float64
])
def test_discovery_on_an_accelerator_gives_the_cpus_circuit(disk, tmp_path, device, options):
    from compute.models.checkpoints import load_checkpoint

    given = ["discover", "--model", str(disk / "gpt2"), "--dictionaries", str(disk / "sfc"), "--task-file",
             str(disk / "task.jsonl"), "--ablation", "mean", "--examples", "8", *options]
    on_cpu = run_cli(*given, catalog=tmp_path / "cpu")
    assert on_cpu.returncode == 0, on_cpu.stderr[-2000:]
    with virtual_device(device):
        model = load_checkpoint(str(disk / "gpt2"), device=device, progress=False).model
        assert {p.device.type for p in model.parameters()} == {device}
        r = run_cli(*given, "--device", device, catalog=tmp_path / device)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _nodes(tmp_path / device) == _nodes(tmp_path / "cpu")
    sweep = "SELECT n_nodes, value FROM evaluations ORDER BY ALL"
    assert catalog.open(tmp_path / device).sql(sweep).equals(catalog.open(tmp_path / "cpu").sql(sweep))


@pytest.fixture(scope="module")
def local_disk(tmp_path_factory):
    """A GPT-NeoX checkpoint (parallel attention, rotary) and a set of transcoders and attention SAEs."""
    from checkpoints import write_local_set

    from compute.models.checkpoints import load_checkpoint

    root = tmp_path_factory.mktemp("local")
    write_checkpoint(root / "neox", "neox")
    write_local_set(root / "set", load_checkpoint(str(root / "neox"), progress=False).model, PROMPT)
    return root


PROMPT = "the cat near the dogs runs"


@pytest.mark.parametrize("device, command", [
    ("cuda", ["attribute"]),  # direct contributions, OV and QK edges
    ("mps", ["attribute", "--target", "attn_1/top@5", "--threshold", "0.01"]),  # hierarchical: backward hooks
    ("cuda", ["explain", "attn_1", "top"]),
])
def test_local_circuits_on_an_accelerator_give_the_cpus_graph(local_disk, tmp_path, device, command):
    given = [*command, "--model", str(local_disk / "neox"), "--dictionaries", str(local_disk / "set"),
             "--prompt", PROMPT, "--format", "csv"]
    on_cpu = run_cli(*given, catalog=tmp_path / "cpu")
    assert on_cpu.returncode == 0, on_cpu.stderr[-2000:]
    with virtual_device(device):
        r = run_cli(*given, "--device", device, catalog=tmp_path / device)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout == on_cpu.stdout
    if command[0] == "attribute":
        assert _nodes(tmp_path / device) == _nodes(tmp_path / "cpu")
        edges = "SELECT src_idx, dst_idx, kind, head, weight FROM edges ORDER BY ALL"
        assert catalog.open(tmp_path / device).sql(edges).equals(catalog.open(tmp_path / "cpu").sql(edges))


def test_the_autograd_engine_of_local_attribution_on_an_accelerator_gives_the_cpus_scores(local_disk):
    """The frozen replacement model's vectorised backward pass (`is_grads_batched`: what a transcoder
    read through another hook falls back to) under a virtual cuda: the CPU's direct contributions and
    OV edges exactly, handed back on the CPU. (Computing `grad_outputs` on the CPU fails here, as on a GPU.)"""
    from compute.jobs.local import local_model
    from compute.local.contributions import attribute
    from compute.local.replacement import Replacement
    from tests.checkpoints import some_targets

    def run(device):
        handle, _, transcoders, attention = local_model("default", str(local_disk / "neox"), local_disk / "set",
                                                         None, device, "float32", [PROMPT])
        rep = Replacement(handle.model, transcoders, attention, handle.model.to_tokens(PROMPT))
        assert rep.device.type == device
        return attribute(rep, some_targets(rep), ov=True, engine="autograd")

    on_cpu = run("cpu")
    with virtual_device("cuda"):
        on_gpu = run("cuda")
    assert on_gpu.scores.device.type == "cpu"
    assert torch.equal(on_gpu.scores, on_cpu.scores) and torch.equal(on_gpu.ov, on_cpu.ov)
    assert torch.equal(on_gpu.values, on_cpu.values)


def _effects(path) -> dict:
    df = catalog.open(path).sql("SELECT component, layer, feature_idx, is_error, position, effect FROM nodes")
    return {tuple(r[:-1]): r[-1] for r in df.itertuples(index=False)}


@pytest.mark.parametrize("dtype, r_min", [("bfloat16", 0.99), ("float16", 0.999)])
def test_half_precision_gives_the_float32_circuit_up_to_its_precision(disk, local_disk, tmp_path, dtype, r_min):
    """TransformerLens keeps a half-precision model's norms and softmaxes in float32: dictionaries read
    those activations, and the local replacement model freezes them, in the model's dtype. Measured on the
    tiny GPT-2: node effects r 0.9997 (bfloat16) and 0.999997 (float16) against float32."""
    import numpy as np

    given = ["discover", "--model", str(disk / "gpt2"), "--dictionaries", str(disk / "sfc"), "--task-file",
             str(disk / "task.jsonl"), "--examples", "8", "--no-eval"]
    for d in ("float32", dtype):
        r = run_cli(*given, "--dtype", d, catalog=tmp_path / d)
        assert r.returncode == 0, r.stderr[-2000:]
    full, half = _effects(tmp_path / "float32"), _effects(tmp_path / dtype)
    keys = sorted(set(full) | set(half), key=str)
    assert np.corrcoef([full.get(k, 0.0) for k in keys], [half.get(k, 0.0) for k in keys])[0, 1] >= r_min
    local = ["attribute", "--model", str(local_disk / "neox"), "--dictionaries", str(local_disk / "set"),
             "--prompt", PROMPT, "--format", "csv"]
    for d in ("float32", dtype):
        r = run_cli(*local, "--dtype", d, catalog=tmp_path / f"local-{d}")
        assert r.returncode == 0, r.stderr[-2000:]
    root = "SELECT effect FROM nodes WHERE node_idx = 0"
    assert catalog.open(tmp_path / f"local-{dtype}").sql(root).effect[0] == pytest.approx(
        catalog.open(tmp_path / "local-float32").sql(root).effect[0], rel=0.05)


def test_half_precision_keeps_a_trained_models_circuit_and_curves(zoo, dicts):
    """The zoo model and its SAEs cast to bfloat16 find float32's circuit: node effects r 0.999997,
    faithfulness and completeness within 0.004 at every point, one node of 175 swapped at the threshold
    (measured on ioi, 32 examples). The bounds leave room for other processors' last bits."""
    import copy

    import numpy as np

    from compute.attribution.discovery import DiscoveryParams, discover
    from compute.tasks import encode
    from schema.sites import sites

    subs = sites(zoo.model.cfg.n_layers)
    found = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = copy.deepcopy(zoo.model).to(dtype)
        saes = {k: copy.deepcopy(d.sae).to(dtype=dtype) for k, d in dicts.items()}
        c = discover(model, subs, saes, encode(model, zoo.tasks["ioi"], "train", limit=32),
                     DiscoveryParams(n_examples=32, edge_threshold=0.05), progress=False)
        found[dtype] = c
    full, half = found[torch.float32], found[torch.bfloat16]
    assert all(np.isfinite(n.effect) for n in half.nodes)
    key = lambda n: (n.site and n.site.name, n.feature, n.position)  # noqa: E731
    a, b = {key(n): n.effect for n in full.nodes}, {key(n): n.effect for n in half.nodes}
    keys = sorted(set(a) | set(b), key=str)
    assert np.corrcoef([a.get(k, 0.0) for k in keys], [b.get(k, 0.0) for k in keys])[0, 1] >= 0.9999
    inside = [{key(n) for n in c.nodes if n.in_circuit} for c in (full, half)]
    assert len(inside[0] ^ inside[1]) <= 6 and len(inside[0]) > 100
    (f32,), (bf16,) = full.curves, half.curves
    assert np.allclose(f32.faithfulness, bf16.faithfulness, atol=0.02)
    assert np.allclose(f32.completeness, bf16.completeness, atol=0.02)
