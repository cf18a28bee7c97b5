"""Local circuits' cost, side by side in one run, on the zoo and on a random model 8x+ larger.

    python -m bench.local_circuits [--repeat 3] [--targets 64]

For each model: a per-prompt attribution graph (the replacement model frozen on the prompt,
influences, edges between the kept nodes, OV split and QK decompositions, as `cli.py attribute`
computes it) as a multiple of one forward+backward pass of the model on the prompt (the floor);
the direct contributions into `--targets` features, all at once, from reading vectors (no backward
pass: what graphs use) and from one backward pass of the replacement model vectorised over the
targets, against one backward pass per target over one shared forward pass, with the largest
relative difference; the peak memory a graph adds (resident
memory sampled every millisecond), beside the dense float32 nodes x nodes adjacency the graph
never builds. Goals on the larger model: batched >= 10x per-target, peak <= 1/4 of the dense matrix.

The larger model is random (d_model 256, 4 layers, 8 heads, d_mlp 1024), with random transcoders and
attention SAEs 4096 wide of which about 1% fire, on a prompt of 64 random tokens.
"""

from __future__ import annotations

import argparse

import torch

from bench.attribution import sampled_peak_mb, timed
from compute.local.contributions import (
    _node_scores,
    _values,
    attribute,
    feature_target,
    logit_target,
)
from compute.local.prompt_graph import GraphParams, prompt_graph
from compute.local.replacement import Replacement
from schema.sites import block_input
from tests.checkpoints import random_local_dictionaries

ACTIVE = 0.01  # the larger model's dictionaries: about 41 of 4096 features fire per token (GPT-2-small SAEs: 20-100)
ZOO_PROMPT = "when kate and mary went to the school , kate gave the letter to"


def zoo_case():
    from compute.jobs.local import zoo_local_set
    from compute.models.zoo import build_zoo, zoo_config

    zoo = build_zoo(zoo_config("default"), progress=False)
    transcoders, attention = zoo_local_set(zoo, progress=False)
    return "zoo (d_model 64, 2 layers, 512-wide dictionaries, 15 tokens)", zoo.model, transcoders, attention, \
        zoo.model.to_tokens(ZOO_PROMPT)


def large_case():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=4, d_model=256, n_heads=8, d_head=32, d_mlp=1024, n_ctx=128, d_vocab=512,
                                  act_fn="gelu", normalization_type="LN", seed=0)
    model = HookedTransformer(cfg)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tokens = torch.randint(0, cfg.d_vocab, (1, 64), generator=torch.Generator().manual_seed(0))
    transcoders, attention = random_local_dictionaries(model, d_sae=4096, seed=0, active=ACTIVE, tokens=tokens)
    return "random (d_model 256, 4 layers, 4096-wide dictionaries, 64 tokens)", model, transcoders, attention, tokens


def floor(model, tokens) -> None:
    """One forward and backward pass of the model on the prompt (to its embeddings)."""
    def leaf(x, hook):
        return x.detach().requires_grad_(True)

    with torch.enable_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=[(block_input(0), leaf)])
        logits[0, -1].max().backward()


def run(name, model, transcoders, attention, tokens, args) -> None:
    rep = Replacement(model, transcoders, attention, tokens)
    root = logit_target(rep, int(rep.logits[0, -1].argmax()))
    params = GraphParams()
    active = [(n, p, f) for n in rep.order for p, f in rep.active[n].tolist()]
    picks = torch.linspace(0, len(active) - 1, args.targets).long().tolist()
    targets = [feature_target(rep, name, f, p) for name, p, f in (active[i] for i in picks)]

    def graph():
        prompt_graph(Replacement(model, transcoders, attention, tokens), root, params)

    def batched():  # reading vectors, all targets at once (what graphs use)
        return attribute(rep, targets, batch_size=args.targets).scores

    def vectorised():  # the replacement model's backward pass, vectorised over the targets
        return attribute(rep, targets, batch_size=args.targets, engine="autograd").scores

    def per_target():  # one backward pass per target, over one shared forward pass
        t = rep.trace(1, "direct")
        leaves = [t.embed, *(t.outputs[n] for n in rep.order)]
        rows = []
        row = torch.zeros(1, dtype=torch.long)
        for tg in targets:
            grads = torch.autograd.grad(_values(rep, t, [tg], row)[0], leaves, retain_graph=True, allow_unused=True)
            rows.append(_node_scores(rep, [None if g is None else g[:1] for g in grads], {}, True, 1))
        return torch.cat(rows)

    t = timed({"floor": lambda: floor(model, tokens), "graph": graph, "batched": batched,
               "vectorised": vectorised, "per_target": per_target}, args.repeat)
    want = per_target()
    diff = max(((f() - want).abs().max() / want.abs().max()).item() for f in (batched, vectorised))
    peak = sampled_peak_mb(graph)
    dense = len(rep.nodes) ** 2 * 4 / 2**20
    print(f"\n{name}: {len(rep.nodes)} nodes ({sum(len(a) for a in rep.active.values())} active features)")
    print(f"  one forward+backward (floor)       {t['floor'] * 1e3:9.1f} ms")
    print(f"  per-prompt graph                   {t['graph'] * 1e3:9.1f} ms   {t['graph'] / t['floor']:7.1f}x the floor")
    print(f"  {args.targets} targets, one backward each   {t['per_target'] * 1e3:9.1f} ms")
    print(f"  {args.targets} targets, one vectorised backward {t['vectorised'] * 1e3:6.1f} ms   "
          f"{t['per_target'] / t['vectorised']:7.1f}x faster")
    print(f"  {args.targets} targets, reading vectors      {t['batched'] * 1e3:9.1f} ms   "
          f"{t['per_target'] / t['batched']:7.1f}x faster (goal >= 10x); max rel diff of both {diff:.1e}")
    print(f"  peak memory of a graph             {peak:9.1f} MiB  dense nodes x nodes float32 {dense:.1f} MiB "
          f"({peak / dense:.3f} of it; goal <= 0.25)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--targets", type=int, default=64)
    ap.add_argument("--only", choices=("zoo", "large"), help="run one model only")
    args = ap.parse_args()
    torch.manual_seed(0)
    for case in (zoo_case, large_case):
        if args.only and not case.__name__.startswith(args.only):
            continue
        run(*case(), args)


if __name__ == "__main__":
    main()
