"""Our local circuits against circuit-tracer's, edge by edge and in time, on the zoo with its
transcoders only (no attention SAEs: attention is a frozen linear path in both).

    python -m bench.ct_parity [--runs 20] [--venv .cache/circuit-tracer-venv]     (make bench-ct)

circuit-tracer pins other transformers/TransformerLens versions, so it runs in its own virtual
environment, created here on first use (pip: circuit-tracer 0.5.0 beside this machine's CPU
torch; about a minute), through `bench/circuit_tracer_side.py`. Both halves read the same files:
the zoo's weights, its tokenizer, its transcoders written in circuit-tracer's own layouts (read by
circuit-tracer's `load_transcoder_set` and `load_clt`, and by our reader) and the prompts. Three
sets: the zoo's transcoders; the same with a random skip connection; the same as a cross-layer
transcoder whose features also write random vectors into every later MLP output.

For prompts of 6, 15 and 24 tokens it prints
- the largest difference between circuit-tracer's dense adjacency and our direct contributions, as
  a fraction of the largest |value|, over every edge both graphs have: into each active
  transcoder feature (rows) and into the logit (the logit row), from features, error terms and
  token embeddings (circuit-tracer's token node is W_E alone, ours adds the positional
  embedding: the bench compares the W_E part of ours; circuit-tracer leaves the BOS position's
  features and error out, so those columns are not compared). Goal: <= 1e-5.
- the time of circuit-tracer's `attribute` (the full adjacency) beside ours computing the same
  adjacency, beside our pruned per-prompt graph (`cli.py attribute --attention frozen`: the
  influences, the edges between the kept nodes), and beside that graph with the zoo's attention
  SAEs as nodes (the default, with OV and QK edges); ratios are circuit-tracer's time / ours; one
  thread, the min of `--runs` runs each.
Then circuit-tracer's own graph JSON of two prompts (`create_graph_files`) goes through
`cli.py import-graph` into a scratch catalogue, and `cli.py diff` compares the two; and the same
graphs' `.pt` files (`Graph.to_pt`), read and pruned here, are compared with circuit-tracer's JSON
of them (pruned by circuit-tracer): the same nodes and links, influences and weights within 1e-6.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bench.local_circuits import large_case
from compute.local.contributions import attribute, feature_target, logit_target
from compute.local.prompt_graph import GraphParams, prompt_graph
from compute.local.replacement import Node, Replacement
from schema.sites import ERROR, site_name

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ["torch==2.13.0", "circuit-tracer==0.5.0", "transformers==4.57.3", "transformer-lens==3.2.1",
                "nnsight==0.8.1"]
PROMPTS = ["the dogs near the cat",  # 6 tokens with BOS
           "when kate and mary went to the school , kate gave the letter to",  # 15
           "when kate and mary went to the school , kate gave the letter to mary and the dogs near the cat run and"]  # 24
SETS = ("transcoders", "skip_transcoders", "cross_layer_transcoder")  # the zoo's; with a random skip connection;
# as a cross-layer transcoder whose features also write random vectors into the later MLP outputs
CONFIG_KEYS = ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "n_ctx", "d_vocab", "act_fn", "normalization_type",
               "positional_embedding_type", "default_prepend_bos", "eps", "original_architecture")


def ensure_venv(venv: Path) -> Path:
    """circuit-tracer's virtual environment, created once."""
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"creating {venv} with {', '.join(REQUIREMENTS)} ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        wheels = ["--find-links", "/opt/wheels"] if Path("/opt/wheels").is_dir() else []  # the CPU torch, as `make`
        subprocess.run([str(python), "-m", "pip", "install", "-q", *wheels, *REQUIREMENTS], check=True)
    return python


def _config(folder: Path, kind: str, transcoders: dict) -> None:
    """A new folder with circuit-tracer's config.yaml naming the hooks (within a block) the transcoders read and write."""
    import yaml

    folder.mkdir()
    hook_in, hook_out = (transcoders[0].hook_in.split(".", 2)[2], transcoders[0].site.hook_out.split(".", 2)[2])
    (folder / "config.yaml").write_text(yaml.safe_dump({"model_kind": kind, "feature_input_hook": hook_in,
                                                        "feature_output_hook": hook_out}))


def write_set(folder: Path, transcoders: dict, skips: dict | None = None) -> None:
    """Transcoders in circuit-tracer's layout (config.yaml, layer_{i}.safetensors; W_skip [d_out, d_in])."""
    _config(folder, "transcoder_set", transcoders)
    for i, d in transcoders.items():
        sae = d.sae
        state = {"W_enc": sae.W_enc.detach().T, "W_dec": sae.W_dec.detach(), "b_enc": sae.b_enc.detach(),
                 "b_dec": sae.b_dec.detach(), **({"W_skip": skips[i]} if skips else {})}
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / f"layer_{i}.safetensors"))


def write_clt(folder: Path, transcoders: dict, later: dict) -> None:
    """The transcoders as a cross-layer transcoder in circuit-tracer's files (W_enc_{i}, W_dec_{i}), each
    layer's features also writing `later[i]` [d_sae, n_layers - 1 - i, d_model] into the later MLP outputs."""
    _config(folder, "cross_layer_transcoder", transcoders)
    for i, d in transcoders.items():
        sae = d.sae
        save_file({f"W_enc_{i}": sae.W_enc.detach().T.contiguous(), f"b_enc_{i}": sae.b_enc.detach().contiguous(),
                   f"b_dec_{i}": sae.b_dec.detach().contiguous()}, str(folder / f"W_enc_{i}.safetensors"))
        save_file({f"W_dec_{i}": torch.cat([sae.W_dec.detach()[:, None], later[i]], 1).contiguous()},
                  str(folder / f"W_dec_{i}.safetensors"))


def read_set(folder: Path, model) -> dict:
    """A set written by `write_set` or `write_clt`, read back by our circuit-tracer reader."""
    from compute.dictionaries.circuit_tracer import layer_files, read_config, read_transcoder
    from compute.dictionaries.kinds import TrainedDictionary
    from schema.sites import transcoder_site

    cfg = read_config(folder)
    return {i: TrainedDictionary(transcoder_site(i), read_transcoder(f, i, cfg), folder, {})
            for i, f in layer_files(folder, cfg).items()}


def write_inputs(work: Path, model, tokenizer, transcoders: dict, prompts: list[list[int]], sets: tuple) -> list[dict]:
    """The files both halves read: weights, config, tokenizer, the transcoder sets named in `sets` (of
    SETS), and the prompts (token ids, each with the model's top next token as the logit to explain)."""
    work.mkdir()
    save_file({k: v.detach().float().contiguous() for k, v in model.named_parameters()}, str(work / "model.safetensors"))
    cfg = model.cfg
    (work / "model.json").write_text(json.dumps({k: getattr(cfg, k) for k in CONFIG_KEYS}))
    (work / "tokenizer").mkdir()
    tokenizer.backend_tokenizer.save(str(work / "tokenizer" / "tokenizer.json"))
    (work / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "unk_token": "<unk>"}))
    d, n = cfg.d_model, cfg.n_layers
    rng = torch.Generator().manual_seed(0)
    write_set(work / "transcoders", transcoders)
    if "skip_transcoders" in sets:
        write_set(work / "skip_transcoders", transcoders, {i: torch.randn(d, d, generator=rng) * 0.5 / d ** 0.5
                                                           for i in transcoders})
    if "cross_layer_transcoder" in sets:
        write_clt(work / "cross_layer_transcoder", transcoders,
                  {i: torch.randn(t.sae.d_sae, n - 1 - i, d, generator=rng) * 0.3 for i, t in transcoders.items()})
    written = []
    with torch.no_grad():
        for tokens in prompts:
            top = int(model(torch.tensor([tokens]))[0, -1].argmax())
            written.append({"tokens": tokens, "target": top, "target_str": str(top)})
    (work / "prompts.json").write_text(json.dumps(written))
    return written


def ours_in_their_layout(model, transcoders: dict, tokens: torch.Tensor, target: int, ct: dict) -> torch.Tensor:
    """Our direct contributions into circuit-tracer's rows (its active features, then the logit) from its
    columns (features, error terms per layer and position, token embeddings), NaN where ours has no node."""
    rep = Replacement(model, transcoders, {}, tokens[None])
    n_layers, n_pos = model.cfg.n_layers, len(tokens)
    features = [Node(site_name("mlp", int(layer)), int(f), int(p)) for layer, p, f in ct["active_features"].tolist()]
    targets = [feature_target(rep, n.site, n.feature, n.position) for n in features] + [logit_target(rep, target)]
    scores = attribute(rep, targets, batch_size=256).scores
    rep.embed_value = model.W_E[tokens].detach()  # circuit-tracer's token node: W_E alone (the gradient is unchanged)
    tokens_part = attribute(rep, targets, batch_size=256).scores
    columns = [rep.index[n] for n in features] + \
              [rep.index[Node(site_name("mlp", layer), ERROR, p)] for layer in range(n_layers) for p in range(n_pos)]
    out = torch.cat([scores[:, columns], tokens_part[:, [rep.index[Node("embed", 0, p)] for p in range(n_pos)]]], 1)
    error_columns = len(features) + torch.arange(n_layers)[:, None] * n_pos  # each layer's error at position 0
    out[:, error_columns.flatten()] = torch.nan  # circuit-tracer zeroes the BOS position's error
    return out


def compare(work: Path, case: str, name: str, model, transcoders: dict, attention: dict, prompts: list[dict],
            runs: int) -> float:
    """Print one set's table (differences and times); return its largest relative difference."""
    ct_times = json.loads((work / f"{name}_times.json").read_text())
    print(f"\ncircuit-tracer {ct_times['version']} vs ours, {case}: {name.replace('_', ' ')} (attention a frozen "
          f"path), one thread, min of {runs} runs")
    skips = name != "transcoders"
    print(f"{'tokens':>6} {'features':>8} {'feature rows':>13} {'logit row':>10}   {'ct attribute':>12} "
          f"{'ours, same':>10} {'ratio':>6}   {'ours, graph':>11} {'ratio':>6}" +
          ("" if skips else f"   {'with SAEs':>11} {'ratio':>6}"))
    worst = 0.0
    for k, p in enumerate(prompts):
        ct = load_file(str(work / f"{name}_{k}.safetensors"))
        tokens = torch.tensor(p["tokens"])
        assert ct["input_tokens"].tolist() == p["tokens"], "circuit-tracer read other tokens"
        n_feat = len(ct["active_features"])
        theirs = ct["adjacency"][list(range(n_feat)) + [-1], :-1]  # feature rows and the logit row, no logit column
        ours = ours_in_their_layout(model, transcoders, tokens, p["target"], ct)
        seen = ~ours.isnan()
        diff = (ours - theirs).abs().where(seen, torch.zeros(()))
        rel_features = (diff[:-1].max() / theirs[:-1][seen[:-1]].abs().max()).item() if n_feat else 0.0
        rel_logit = (diff[-1].max() / theirs[-1][seen[-1]].abs().max()).item()
        worst = max(worst, rel_features, rel_logit)

        def same(tokens=tokens, target=p["target"], ct=ct):
            ours_in_their_layout(model, transcoders, tokens, target, ct)

        def graph(saes: dict, tokens=tokens, target=p["target"]):
            rep = Replacement(model, transcoders, saes, tokens[None])
            prompt_graph(rep, logit_target(rep, target), GraphParams())

        t_ct, t_same = ct_times["seconds"][k], best_of(same, runs)
        t_graph = best_of(lambda: graph({}), runs)
        line = (f"{len(tokens):>6} {n_feat:>8} {rel_features:>13.1e} {rel_logit:>10.1e}   {t_ct * 1e3:>9.1f} ms "
                f"{t_same * 1e3:>7.1f} ms {t_ct / t_same:>5.1f}x   {t_graph * 1e3:>8.1f} ms {t_ct / t_graph:>5.1f}x")
        if not skips:
            t_saes = best_of(lambda: graph(attention), runs)
            line += f"   {t_saes * 1e3:>8.1f} ms {t_ct / t_saes:>5.1f}x"
        print(line)
    return worst


def best_of(fn, runs: int) -> float:
    fn()
    spent = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        spent.append(time.perf_counter() - start)
    return min(spent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--venv", type=Path, default=ROOT / ".cache" / "circuit-tracer-venv")
    args = parser.parse_args()
    from compute.jobs.local import zoo_local_set
    from compute.models.zoo import build_zoo, zoo_config

    torch.set_num_threads(1)
    python = ensure_venv(args.venv)
    zoo = build_zoo(zoo_config("default"), progress=False)
    model = zoo.model
    transcoders, attention = zoo_local_set(zoo, progress=False)  # ours; the bench reads back what it writes
    _, big, big_transcoders, big_attention, big_tokens = large_case()
    big_tokens[0, 0] = 1  # a special token first (circuit-tracer would prepend one otherwise)
    cases = [("zoo", model, transcoders, attention, [model.to_tokens(t)[0].tolist() for t in PROMPTS], SETS, args.runs),
             ("random d_model 256, 4 layers, 4096-wide", big, big_transcoders, big_attention, [big_tokens[0].tolist()],
              SETS[:1], min(args.runs, 3))]
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for k, (case, m, tc, att, prompts, sets, runs) in enumerate(cases):
            work = Path(tmp) / f"case{k}"
            written = write_inputs(work, m, model.tokenizer, tc, prompts, sets)
            for name in sets:
                subprocess.run([str(python), str(ROOT / "bench" / "circuit_tracer_side.py"), str(work), name,
                                str(runs)], check=True)
                worst = max(worst, compare(work, case, name, m, read_set(work / name, m), att, written, runs))
            if k == 0:
                plain, *others = [load_file(str(work / f"{name}_1.safetensors"))["adjacency"] for name in SETS]
                print("\nhow far each set moves circuit-tracer's adjacency from the plain transcoders' (15 tokens): " +
                      ", ".join(f"{name.replace('_', ' ')} {(a - plain).abs().max() / plain.abs().max():.2f} of its "
                                "largest |value|" for name, a in zip(SETS[1:], others, strict=True)))
                import_and_diff(work)
                print()
                pruned_alike = pt_against_json(work)
        print(f"\nlargest difference {worst:.1e} of the largest |value| (goal <= 1e-5): {'ok' if worst <= 1e-5 else 'FAIL'}")
    if worst > 1e-5 or not pruned_alike:
        raise SystemExit(1)


def pt_against_json(work: Path) -> bool:
    """Each graph's .pt (read and pruned here) against circuit-tracer's own JSON of it (pruned by
    circuit-tracer): the same nodes with the same influences, the same links with the same weights."""
    from compute.jobs.import_graph import KEY, read_graph

    same = True
    for pt in sorted((work / "graphs").glob("ct-prompt-*.pt")):
        graphs = [read_graph(pt.with_suffix(".json")), read_graph(pt)]
        nodes = [{tuple(n[k] for k in KEY): n["effect"] for n in g.nodes} for g in graphs]
        edges = [{(tuple(g.nodes[e["src_idx"]][k] for k in KEY), tuple(g.nodes[e["dst_idx"]][k] for k in KEY)):
                  e["weight"] for e in g.edges} for g in graphs]
        agree = nodes[0].keys() == nodes[1].keys() and edges[0].keys() == edges[1].keys()
        worst = max([abs(nodes[0][k] - nodes[1][k]) for k in nodes[0] if k in nodes[1]] +
                    [abs(edges[0][k] - edges[1][k]) for k in edges[0] if k in edges[1]])
        print(f"{pt.name} read and pruned here vs circuit-tracer's {pt.with_suffix('.json').name}: "
              f"{len(nodes[1])} / {len(nodes[0])} nodes, {len(edges[1])} / {len(edges[0])} links, "
              f"{'the same' if agree else 'DIFFERENT'}; largest difference of an influence or weight {worst:.1e}")
        same &= agree and worst <= 1e-6
    return same


def import_and_diff(work: Path) -> None:
    """circuit-tracer's own graph JSON through import-graph and diff, in a scratch catalogue."""
    files = sorted((work / "graphs").glob("ct-prompt-*.json"))
    cli = [sys.executable, str(ROOT / "cli.py"), "--catalog", str(work / "catalogue")]
    done = subprocess.run([*cli, "import-graph", *map(str, files)], capture_output=True, text=True)
    print(f"\nimport-graph of circuit-tracer's {', '.join(f.name for f in files)}: exit {done.returncode}")
    print("  " + (done.stdout + done.stderr).strip().replace("\n", "\n  "))
    ids = subprocess.run([*cli, "query", "SELECT circuit_id FROM circuits ORDER BY task_id", "--format", "csv"],
                         capture_output=True, text=True).stdout.split()[1:]
    if len(ids) == 2:
        done = subprocess.run([*cli, "diff", *ids], capture_output=True, text=True)
        lines = (done.stdout + done.stderr).strip().splitlines()
        print(f"diff of the two: exit {done.returncode}, {len(lines)} lines; first ones:")
        print("  " + "\n  ".join(lines[:8]))


if __name__ == "__main__":
    main()
