"""Parameter-space features (seed 002): curvature against the explicit Hessian and finite differences,
the losses by hand, the toys' checks, and decompositions in the catalogue."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from compute.jobs.decompose import top_inputs_hold
from compute.parameters.decomposition import DecompositionConfig, decompose, losses
from compute.parameters.targets import lm_target, toy_target
from compute.parameters.toys import CONFIGS, Toy, blank_params


def _untrained(name: str, seed: int = 0, dtype=torch.float32) -> Toy:
    """A toy with seeded random parameters: the identities below hold at any weights, and no build
    process has to start for them."""
    g = torch.Generator().manual_seed(seed)
    params = {k: torch.randn(v.shape, generator=g, dtype=dtype) for k, v in blank_params(name).items()}
    return Toy(CONFIGS[name], params, Path("untrained"), float("nan"))


def _unit(k: int, p: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    u = torch.randn(k, p, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return u / u.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("name, params", [("xor", ["W", "b"]), ("tms", ["W", "b"])])
def test_curvature_is_the_explicit_hessians_quadratic_form(name, params):
    """On models small enough to form every sample's Hessian (torch.func.hessian), uᵀH(x)u equals both
    ways of computing the curvature (a JVP of a JVP; one JVP and D's Hessian in the outputs), at
    random weights (the output-Hessian form needs only D's zero gradient at the reference, not a
    trained model)."""
    toy = _untrained(name, dtype=torch.float64)
    target = toy_target(toy, params)
    x = toy.examples(n_sampled=20).double()
    u = _unit(4, target.w0.numel())
    hessians = torch.func.hessian(target.divergence_fn(x))(target.w0)  # [N, P, P]
    explicit = torch.einsum("kp,npq,kq->nk", u, hessians, u)
    assert explicit.abs().max() > 1e-3  # not a vacuous comparison
    for method in ("jvp", "nested"):
        got = target.curvature(x, u, method=method)
        assert torch.allclose(got, explicit, rtol=1e-9, atol=1e-12), method


def test_curvature_matches_a_finite_difference_on_a_zoo_head(zoo):
    """The second difference (D(w0+hu) - 2D(w0) + D(w0-hu)) / h² of every token's KL, on one head's W_K
    of the zoo in float64, agrees with both methods to a relative error under 1e-3."""
    model = copy.deepcopy(zoo.model).to(torch.float64)
    target = lm_target(model, ["blocks.0.attn.W_K[1]"])
    toks = model.to_tokens(["the dog runs", "when anna and tom went to the park , tom gave the ball to"],
                           padding_side="right")
    u = _unit(2, target.w0.numel(), seed=1)
    fn, h = target.divergence_fn(toks), 1e-3
    with torch.no_grad():
        fd = torch.stack([(fn(target.w0 + h * v) - 2 * fn(target.w0) + fn(target.w0 - h * v)) / h**2 for v in u], -1)
    assert fd.abs().max() > 1e-3
    for method in ("jvp", "nested"):
        got = target.curvature(toks, u, method=method)
        assert ((got - fd).abs().max() / fd.abs().max()).item() < 1e-3, method


def test_losses_by_hand():
    """Two orthogonal directions do not interfere; one direction twice interferes by 2·E[c1·c2]."""
    c = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    high, interference = losses(c, torch.eye(2))
    assert high.item() == pytest.approx((1 + 4 + 9) / 2) and interference.item() == 0
    same = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    _, interference = losses(c, same)
    assert interference.item() == pytest.approx(2 * (1 * 2 + 3 * 0) / 2)


def test_decomposition_is_seeded_and_canonical():
    toy = _untrained("xor")
    target = toy_target(toy, ["W", "b"])
    cfg = DecompositionConfig(n_features=3, steps=40, restarts=2)
    a = decompose(target, toy.training_inputs(), cfg, progress=False)
    b = decompose(target, toy.training_inputs(), cfg, progress=False)
    assert torch.equal(a.directions, b.directions)
    assert torch.allclose(a.directions.norm(dim=1), torch.ones(3))
    assert (a.directions @ target.w0 >= 0).all()
    c = decompose(target, toy.training_inputs(), replace(cfg, seed=1), progress=False)
    assert not torch.equal(a.directions, c.directions)


def test_the_top_input_checks_can_fail():
    assert top_inputs_hold("xor", [2, 1, 3]) and top_inputs_hold("tms", [3, 1, 2, 0, 4])
    assert not top_inputs_hold("xor", [0, 1, 2])  # (0, 0) on top
    assert not top_inputs_hold("xor", [1, 1, 3])  # two directions share a top input
    assert not top_inputs_hold("tms", [0, 0, 1, 2, 3])


def test_benchmark_parameters_checks_xor_and_tms(tmp_path):
    """`cli.py benchmark parameters`: XOR's three directions top on three different non-zero inputs, TMS's
    five on the five features; TMS's directions are its true per-feature components (measured MMCS
    0.986, ML2R 1.005); the decompositions are dictionaries whose feature dashboards show their inputs."""
    cat = tmp_path / "catalog"
    r = run_cli("benchmark", "parameters", "--format", "json", "--out", str(tmp_path / "parameters.png"), catalog=cat)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "parameters.png").stat().st_size > 10_000
    rows = {row["toy"]: row for row in json.loads(r.stdout)}
    assert rows["xor"]["passed"] and rows["tms"]["passed"]
    xor_inputs = rows["xor"]["top_inputs"].split("; ")
    assert sorted(xor_inputs) == ["(0, 1)", "(1, 0)", "(1, 1)"]
    assert rows["tms"]["mmcs"] >= 0.98 and 0.95 <= rows["tms"]["ml2r"] <= 1.05
    stored = json.loads(run_cli("query", "SELECT toy, passed, mmcs, n_parameters FROM parameter_benchmarks ORDER BY toy",
                                "--format", "json", catalog=cat).stdout)
    assert [(s["toy"], s["passed"], s["n_parameters"]) for s in stored] == [("tms", True, 10), ("xor", True, 6)]
    dicts = json.loads(run_cli("query", "SELECT dictionary_id, kind, architecture, d_in, d_sae FROM dictionaries "
                               "ORDER BY d_sae", "--format", "json", catalog=cat).stdout)
    assert [(d["kind"], d["architecture"], d["d_in"], d["d_sae"]) for d in dicts] == [
        ("parameter", "hessian", 6, 3), ("parameter", "hessian", 10, 5)]
    for k, top in enumerate(xor_inputs):
        shown = run_cli("feature", rows["xor"]["dictionary_id"], str(k), catalog=cat)
        assert shown.returncode == 0, shown.stderr
        first = shown.stdout.split("top activating examples:")[1].splitlines()[1]
        assert first.split(None, 1)[1] == f"[{top}]"
        assert "max curvature" in shown.stdout and "promoted tokens" not in shown.stdout


def test_zoo_decomposition_compares_tasks(tmp_path, zoo):
    """A zoo head's W_K: directions with dashboards on the corpus (the token marked), and one circuit per
    task (method curvature, basis parameters) that compare and diff set side by side."""
    cat = tmp_path / "catalog"
    r = run_cli("decompose", "--model", "zoo", "--params", "blocks.0.attn.W_K[0]", "--features", "3", "--steps", "15",
                "--task", "ioi", "--task", "sva_simple", "--format", "json", catalog=cat)
    assert r.returncode == 0, r.stderr[-2000:]
    top = json.loads(r.stdout)
    assert {t["feature_idx"] for t in top} == {0, 1, 2} and all("[" in t["text"] for t in top)
    circuits = json.loads(run_cli("circuits", "--format", "json", catalog=cat).stdout)
    assert sorted((c["task_id"], c["method"], c["basis"]) for c in circuits) == [
        ("ioi", "curvature", "parameters"), ("sva_simple", "curvature", "parameters")]
    nodes = json.loads(run_cli("query", "SELECT count(*) AS n, count(DISTINCT feature_idx) AS k, min(effect) AS low "
                               "FROM nodes", "--format", "json", catalog=cat).stdout)[0]
    assert nodes["n"] == 6 and nodes["k"] == 3 and nodes["low"] >= 0
    assert run_cli("compare", "--method", "curvature", "--top-k", "2", catalog=cat).returncode == 0
    a, b = (c["circuit_id"] for c in circuits)
    d = run_cli("diff", a, b, "--format", "json", catalog=cat)
    assert d.returncode == 0, d.stderr[-2000:]


@pytest.mark.parametrize("args, needle", [
    (["--model", "zoo", "--params", "blocks.9.attn.W_K"], "no parameter 'blocks.9.attn.W_K'"),
    (["--model", "xor", "--params", "W[5]"], "index out of range"),
    (["--model", "xor", "--params", "W", "--params", "W[0]"], "parameters named twice"),
    (["--model", "xor", "--task", "ioi"], "--task needs --model zoo"),
])
def test_bad_decompositions_fail_in_one_line(tmp_path, args, needle):
    r = run_cli("decompose", *args, catalog=tmp_path / "catalog")
    assert r.returncode == 1 and needle in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
