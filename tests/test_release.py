"""The release: the trained default artefacts, loaded from release/, checked against its manifest,
and rebuilt by `cli.py zoo build`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from compute import release
from compute.rebuild import ARTEFACTS, compare, current_keys


@pytest.fixture
def copy(tmp_path, monkeypatch) -> Path:
    """A copy of the release that the commands read instead (CIRCUIT_RELEASE)."""
    root = tmp_path / "release"
    shutil.copytree(release.release_root(), root)
    monkeypatch.setenv("CIRCUIT_RELEASE", str(root))
    return root


def _file(root: Path, artefact: str, rel: str) -> Path:
    """A released file (the manifest read here, not through `release`, which keeps what it read)."""
    return root / json.loads((root / release.MANIFEST).read_text())["artefacts"][artefact]["folder"] / rel


def test_the_release_holds_every_default_artefact_under_its_current_key():
    m = release.manifest()
    assert list(m["artefacts"]) == list(ARTEFACTS)
    assert {n: (a["kind"], a["key"]) for n, a in m["artefacts"].items()} == current_keys()
    sizes = {n: sum(p.stat().st_size for p in (release.release_root() / a["folder"]).rglob("*") if p.is_file())
             for n, a in m["artefacts"].items()}
    assert sizes == {n: a["bytes"] for n, a in m["artefacts"].items()}
    assert m["bytes"] == sum(sizes.values()) < 8e6
    assert {"date", "processor", "kernel_path", "torch", "command", "version"} <= set(m)


def test_commands_and_fixtures_load_the_release(zoo, dicts):
    from compute.cache import cache_path

    root = release.release_root().resolve()
    assert zoo.path.resolve().is_relative_to(root) and zoo.model_id == f"zoo-{zoo.path.name}"
    assert all(d.path.resolve().is_relative_to(root) for d in dicts.values())
    a = release.manifest()["artefacts"]["toy/xor"]
    assert cache_path(a["kind"], a["key"]) == (root / a["folder"])
    # with the release switched off, the same key is a cache entry of this machine's kernel path
    from compute.cache import environment, kernel_path

    with environment(CIRCUIT_NO_RELEASE="1"):
        assert cache_path(a["kind"], a["key"]).name == f"{a['key']}-{kernel_path()}"


@pytest.mark.parametrize("damage, needle", [
    ("flip", "damaged (its sha256 is not the one"),
    ("truncate", "damaged (its sha256 is not the one"),
    ("remove", "missing from the release"),
    ("extra", "not part of the release"),
    ("manifest", "not a readable release manifest"),
    ("outside", "is not inside the release"),
])
def test_a_damaged_release_is_one_line_naming_the_file_and_nothing_is_written(copy, tmp_path, damage, needle):
    model = _file(copy, "zoo", "model.safetensors")
    named = model
    if damage == "flip":
        data = bytearray(model.read_bytes())
        data[len(data) // 2] ^= 0x01
        model.write_bytes(bytes(data))
    elif damage == "truncate":
        model.write_bytes(model.read_bytes()[:-10])
    elif damage == "remove":
        model.unlink()
    elif damage == "extra":
        named = model.with_name("notes.txt")
        named.write_text("hello")
    elif damage == "manifest":
        named = copy / "manifest.json"
        named.write_text(named.read_text()[:-20])
    else:
        named = copy / "manifest.json"
        m = json.loads(named.read_text())
        m["artefacts"]["toy/xor"]["folder"] = "../../etc"
        named.write_text(json.dumps(m))
    for args in (["demo"], ["discover", "--task", "sva_simple"], ["attribute", "--prompt", "the cat"],
                 ["benchmark", "parameters", "--out", str(tmp_path / "p.png")], ["zoo"]):
        cat = tmp_path / "catalog"
        r = run_cli(*args, catalog=cat)
        assert r.returncode == 1, (args, r.stderr[-2000:])
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0] and str(named) in lines[0], (args, r.stderr)
        assert not cat.exists() and not (tmp_path / "p.png").exists()


def test_zoo_build_rebuilds_an_artefact_bit_identically_and_tells_one_that_differs(copy, tmp_path):
    cache = tmp_path / "cache"
    r = run_cli("zoo", "build", "--only", "planted/handset", "--verify", "--cache", str(cache), "--format", "csv")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines()[1].startswith("planted/handset,yes,")
    assert "1 of 1 artefacts bit-identical" in r.stderr
    # the released weights changed (and the manifest with them): the rebuild now differs
    weights = _file(copy, "planted/handset", "model.safetensors")
    from safetensors.torch import load_file, save_file

    save_file({k: v * 1.5 for k, v in load_file(str(weights)).items()}, str(weights))
    m = json.loads((copy / "manifest.json").read_text())
    m["artefacts"]["planted/handset"]["files"]["model.safetensors"] = release.file_hash(weights)
    (copy / "manifest.json").write_text(json.dumps(m))
    r = run_cli("zoo", "build", "--only", "planted/handset", "--verify", "--cache", str(cache), "--format", "json")
    assert r.returncode == 0, r.stderr[-2000:]  # nothing of the hand-set model is held to a tolerance
    assert [(x["artefact"], x["identical"]) for x in json.loads(r.stdout)] == [("planted/handset", "no")]
    assert "0 of 1 artefacts bit-identical" in r.stderr
    r = run_cli("zoo", "build", "--only", "toy/xor", "--release")
    assert r.returncode == 1 and "leave out --only" in r.stderr


def _built(name: str, path: Path) -> dict:
    a = release.manifest()["artefacts"][name]
    return {name: {"path": str(path), "kind": a["kind"], "key": a["key"], "config": a["config"]}}


def test_a_rebuild_that_misses_the_released_accuracy_or_fve_fails_verify(tmp_path, monkeypatch):
    root = release.release_root()
    m = release.manifest()
    zoo = tmp_path / "zoo"
    shutil.copytree(root / m["artefacts"]["zoo"]["folder"], zoo)
    saes = tmp_path / "saes"
    shutil.copytree(root / m["artefacts"]["zoo/saes"]["folder"], saes)
    from safetensors.torch import load_file, save_file

    weights = load_file(str(zoo / "model.safetensors"))
    weights["unembed.W_U"] = torch.randn_like(weights["unembed.W_U"], generator=torch.Generator().manual_seed(0))
    save_file(weights, str(zoo / "model.safetensors"))
    metrics = json.loads((saes / "mlp_1" / "metrics.json").read_text())
    fve = metrics["fraction_variance_explained"]
    (saes / "mlp_1" / "metrics.json").write_text(json.dumps({**metrics, "fraction_variance_explained": fve - 0.02}))
    built = {**_built("zoo", zoo), **_built("zoo/saes", saes), **_built("toy/xor", root / m["artefacts"]["toy/xor"]["folder"])}
    rows = compare(built)
    assert {r.artefact: r.identical for r in rows} == {"zoo": "no", "zoo/saes": "no", "toy/xor": "yes"}
    accuracy = [r for r in rows if r.artefact == "zoo"]
    assert len(accuracy) == 6 and all(r.measure.startswith("accuracy ") and r.released == 1.0 for r in accuracy)
    assert any(r.ok is False for r in accuracy)
    assert [r.measure for r in rows if r.ok is False and r.artefact == "zoo/saes"] == ["FVE mlp_1"]

    import compute.rebuild

    monkeypatch.setattr(compute.rebuild, "build_all", lambda only, progress: built)
    r = run_cli("zoo", "build", "--verify")
    assert r.returncode == 1 and "the rebuild falls short of the release" in r.stderr and "FVE mlp_1" in r.stderr
    r = run_cli("zoo", "build")
    assert r.returncode == 0, r.stderr  # without --verify it reports and succeeds


def test_a_new_release_gets_the_next_version_and_its_own_manifest(tmp_path):
    root = release.release_root()
    m = release.manifest()
    built = {n: {"path": str(root / a["folder"]), "kind": a["kind"], "key": a["key"], "config": a["config"]}
             for n, a in m["artefacts"].items() if n.startswith("toy/")}
    target = tmp_path / "release"
    first = release.write(built, {"date": "d"}, target)
    second = release.write(built, {"date": "e"}, target)
    assert (first["version"], second["version"]) == (1, 2) and release.manifest(target) == second
    assert {n: a["files"] for n, a in second["artefacts"].items()} == {
        n: m["artefacts"][n]["files"] for n in built}
    release.check(root=target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release"]  # nothing left beside it


def test_an_old_default_catalogue_is_moved_to_the_new_default(tmp_path, monkeypatch):
    import catalog

    monkeypatch.delenv("CIRCUIT_CATALOG", raising=False)
    (tmp_path / "catalog").mkdir()
    (tmp_path / "catalog" / "notes.py").write_text("# not the catalogue's\n")
    catalog.init(tmp_path / "catalog")
    r = run_cli("circuits", "--format", "csv", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == ("moved the catalogue from ./catalog (the catalog package's folder) to ./circuits, "
                                "its new default")
    assert sorted(p.name for p in (tmp_path / "catalog").iterdir()) == ["notes.py"]
    assert catalog.open(tmp_path / "circuits").sql("SELECT count(*) AS n FROM circuits").n[0] == 0
    r = run_cli("circuits", cwd=tmp_path)
    assert r.returncode == 0 and "moved" not in r.stderr
