"""Attribution cost on the zoo (or any loadable checkpoint), side by side in one run.

    python -m bench.attribution [--examples 32] [--repeat 5]
    python -m bench.attribution --model PATH --task-file FILE [--dictionaries DIR]

With --model, the checkpoint (a Hugging Face directory or a name in the local cache) runs with
its dictionary set (neurons where it has none) on the task file's longest batch. A model of GPT-2's
size has thousands of active nodes per submodule, so there edges are measured over the `--nodes`
most active nodes of each submodule (default 64 with --model; every active node on the zoo), and the
one-backward-per-node reference runs on `--looped` downstream nodes per edge type (default 8 with
--model), its time scaled to all of them (which scales its one forward pass too: an upper bound on its cost)
and its weights compared on those rows.

Node effects by AtP and IG (the default quadrature, and Sparse Feature Circuits' left
Riemann sum of the same steps, with the completeness error of each: how far a
submodule's effects are from the effect of patching it whole), each from the prompts' tokens (their forward passes
included), against the floor of one forward+backward pass of the spliced model on
the same batch: the dictionaries encode and decode in the forward pass (every error
term x - decode(f) is computed) and the backward pass ends at every feature's gradient.
AtP needs no decoder product: its error effects follow from dx . g and the features'
effects. Batched edges (one forward and backward per chunk of downstream nodes, over
the nonzero pieces of their cotangents) against one backward per downstream node,
for the headline edge type and for every edge type of the zoo model, with the largest
relative difference between the two; and the peak memory of each, measured in
a fresh child process: resident memory sampled every millisecond while the step
runs, above the resident memory just before it (after returning freed memory to
the system). Last, a whole discovery run (IG, as `cli.py discover` runs it) against its
evaluation: the default (mean ablation, one random draw) and the full sweep (`--full-eval`),
each as a multiple of discovery without evaluation (goal: the default <= 1x).
"""

from __future__ import annotations

import argparse
import ctypes
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from compute.attribution.atp import node_effects
from compute.attribution.discovery import DiscoveryParams
from compute.attribution.edges import edge_pairs, edge_weights, edge_weights_looped
from compute.attribution.ig import ig_grads
from compute.attribution.patching import joint_effects
from compute.attribution.spliced import (
    clean_and_patch,
    output_grads,
    spliced_pass,
    states,
)
from compute.dictionaries.building import build_dictionaries
from compute.models.zoo import build_zoo
from compute.tasks import encode
from schema.sites import ERROR, sites

STEPS = DiscoveryParams().ig_steps
RULE = DiscoveryParams().ig_rule
SFC = ("left", 10)  # Sparse Feature Circuits' IG: 10 steps of the left Riemann sum
PAIR = "resid_0->mlp_1"  # the edge type of the headline row
ARGS = None  # the command line, for the memory-measuring child processes


def setup(args):
    """(model, sites, dictionaries, the longest batch, its clean and patch states, the whole encoded task)."""
    if args.model:
        from compute.dictionaries.sets import identity_set, load_set
        from compute.models.checkpoints import load_checkpoint
        from compute.tasks import load_task_file

        if not args.task_file:
            sys.exit("--model needs --task-file")
        handle, task = load_checkpoint(args.model, progress=False), load_task_file(args.task_file)
        prompts = [e["clean_prefix"] for e in task.examples]
        found = load_set(args.dictionaries, handle, prompts, progress=False)[0] if args.dictionaries \
            else identity_set(handle, prompts)
        model, saes = handle.model, {k: d.sae for k, d in found.items()}
    else:
        zoo = build_zoo(progress=False)
        model, task = zoo.model, zoo.tasks["sva_across_pp"]
        saes = {k: d.sae for k, d in build_dictionaries(zoo, progress=False).items()}
    subs = sites(model.cfg.n_layers)
    data = encode(model, task, "train", args.examples)
    batch = max(data.batches, key=len)
    clean = states(model, subs, saes, batch.clean)
    patch = states(model, subs, saes, batch.patch)
    return model, subs, saes, batch, clean, patch, data


def evaluation_cost(model, subs, saes, data) -> list[tuple[str, float]]:
    """Seconds of discovery without evaluation, with the default evaluation, and with the full sweep."""
    from compute.attribution.discovery import FULL_EVALUATION, discover

    out = []
    for name, params in (("discovery", DiscoveryParams(ablations=())), ("default", DiscoveryParams()),
                         ("full", DiscoveryParams(**FULL_EVALUATION))):
        t = time.perf_counter()
        discover(model, subs, saes, data, params, progress=False)
        out.append((name, time.perf_counter() - t))
    return out


def timed(fns: dict, repeat: int) -> dict[str, float]:
    """Median seconds of each step, timed round-robin (one call of each step per round) so
    that the machine's slow spells fall on every step alike."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def sampled_peak_mb(fn) -> float:
    """Peak resident memory above the starting level while `fn` runs (sampled every ms)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base, peak, done = _rss_mb(), [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.001)

    t = threading.Thread(target=sample)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    return max(peak[0], _rss_mb()) - base


def peak_mb(step: str, examples: int) -> float:
    """Peak resident memory (MiB) that one step adds, measured in a fresh process."""
    given = [a for k in ("model", "task_file", "dictionaries", "nodes", "looped") if getattr(ARGS, k)
             for a in (f"--{k.replace('_', '-')}", str(getattr(ARGS, k)))]
    r = subprocess.run([sys.executable, "-m", "bench.attribution", "--examples", str(examples), "--measure", step,
                        *given], capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    return float(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else float("nan")


def _max_rel_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    """The largest difference relative to the largest reference weight (absolute where every
    reference weight is 0, as a sample of downstream nodes that no upstream node reaches)."""
    scale = want.abs().max()
    return ((got - want).abs().max() / (scale if scale > 0 else 1)).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--model", help="a checkpoint directory or a name in the local Hugging Face cache")
    ap.add_argument("--task-file", help="with --model: its task (JSONL)")
    ap.add_argument("--dictionaries", help="with --model: its dictionary set (default: neurons)")
    ap.add_argument("--nodes", type=int, help="edges over this many most active nodes per submodule "
                    "(default: all on the zoo, 64 with --model)")
    ap.add_argument("--looped", type=int, help="the one-backward-per-node reference on this many downstream nodes "
                    "per edge type, its time scaled to all (default: all on the zoo, 8 with --model)")
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # internal: peak memory of one step
    args = ap.parse_args()
    if args.model:
        args.nodes = args.nodes or 64
        args.looped = args.looped or 8
    global ARGS, PAIR
    ARGS = args
    torch.set_grad_enabled(False)
    model, subs, saes, batch, clean, patch, data = setup(args)

    def plain():
        output_grads(model, subs, batch)

    def floor():  # every feature's gradient and every error term (x - decode(f))
        p = spliced_pass(model, subs, saes, batch.clean, batch, grads=True)
        return [(p.grads[s.name] @ saes[s.name].W_dec.T, p.states[s.name].err) for s in subs]

    def forward():
        p = spliced_pass(model, subs, saes, batch.patch, batch)
        return [p.states[s.name].err for s in subs]

    def atp():  # as discovery runs it
        on_clean, on_patch = clean_and_patch(model, subs, saes, batch, grads=True)
        return [node_effects(saes[s.name], on_clean.states[s.name], on_patch.states[s.name], on_clean.grads[s.name])
                for s in subs]

    def ig(rule: str = RULE, steps: int = STEPS):
        on_clean, on_patch = clean_and_patch(model, subs, saes, batch)
        c, p = on_clean.states, on_patch.states
        g = ig_grads(model, subs, saes, batch, c, p, steps, rule)
        return [node_effects(saes[s.name], c[s.name], p[s.name], g[s.name]) for s in subs]

    joint = joint_effects(model, subs, batch, clean, patch)

    def completeness_error(rule: str, steps: int) -> float:  # the largest |sum - joint| / |joint| of a submodule
        sums = [(fe.sum() + ee.sum()).item() for fe, ee in ig(rule, steps)]
        return max(abs(v - joint[s.name]) / abs(joint[s.name]) for v, s in zip(sums, subs, strict=True))

    grads = output_grads(model, subs, batch)[1]

    def nodes(name: str) -> torch.Tensor:  # the features active on the batch (the --nodes most active), and the error
        strength = clean[name].f.abs().sum((0, 1))
        active = strength.nonzero().flatten()
        if args.nodes and len(active) > args.nodes:
            active = active[strength[active].topk(args.nodes).indices].sort().values
        return torch.tensor(active.tolist() + [ERROR])

    def looped_share(pair: str) -> float:  # the share of a pair's downstream nodes the looped reference runs on
        n = len(edge_args[pair][8])
        return min(args.looped or n, n) / n

    pairs = {f"{p.up.name}->{p.down.name}": p for p in edge_pairs(subs, model.cfg.parallel_attn_mlp)}
    PAIR = PAIR if PAIR in pairs else next(iter(pairs))
    edge_args = {k: (model, p, saes, batch, clean, patch, grads[p.down.name], nodes(p.up.name), nodes(p.down.name))
                 for k, p in pairs.items()}

    def edges(pair: str, batched: bool) -> torch.Tensor:
        if batched:
            return torch.cat([w for _, w in edge_weights(*edge_args[pair], chunk=DiscoveryParams().edge_chunk)])
        given = edge_args[pair]
        down = given[8][: round(looped_share(pair) * len(given[8]))]
        return edge_weights_looped(*given[:8], down)

    steps = {"plain": plain, "floor": floor, "forward": forward, "atp": atp, "ig": ig, "ig_sfc": lambda: ig(*SFC),
             "batched": lambda: edges(PAIR, True), "single": lambda: edges(PAIR, False),
             "batched_all": lambda: [edges(k, True) for k in pairs],
             "single_all": lambda: [edges(k, False) for k in pairs]}
    if args.measure:
        print(sampled_peak_mb(steps[args.measure]))
        return
    t = timed({k: steps[k] for k in ("plain", "floor", "forward", "atp", "ig", "ig_sfc")}, args.repeat)
    per_pair = timed({(k, b): (lambda k=k, b=b: edges(k, b)) for k in pairs for b in (True, False)}, args.repeat)
    per_pair.update({(k, False): per_pair[(k, False)] / looped_share(k) for k in pairs})  # scaled to every node
    t_plain, t_forward, t_floor, t_atp, t_ig, t_sfc = (t[k] for k in ("plain", "forward", "floor", "atp", "ig", "ig_sfc"))
    t_batched, t_single = per_pair[(PAIR, True)], per_pair[(PAIR, False)]
    t_batched_all = sum(v for (_, b), v in per_pair.items() if b)
    t_single_all = sum(v for (_, b), v in per_pair.items() if not b)
    rel = {}
    for k in pairs:
        looped = edges(k, False)
        rel[k] = _max_rel_diff(edges(k, True)[: len(looped)], looped)

    print(f"{ARGS.model or 'zoo model'}, {len(batch)} examples of length {batch.clean.shape[1]}, {len(subs)} submodules, "
          f"{sum(s.d_sae for s in saes.values())} features; median of {args.repeat}")
    n_up, n_down = len(edge_args[PAIR][7]), len(edge_args[PAIR][8])
    if args.looped:
        print(f"edges over at most {args.nodes or 'every active'} nodes per submodule; the one-backward-per-node "
              f"reference on {args.looped} downstream nodes per edge type, its times scaled to every node (an upper bound)")
    rows = [
        ("forward+backward of the spliced model (floor)", t_floor, 1.0, "", peak_mb("floor", args.examples)),
        ("forward+backward of the model alone", t_plain, t_plain / t_floor, "", peak_mb("plain", args.examples)),
        ("forward of the spliced model (encode and decode)", t_forward, t_forward / t_floor, "",
         peak_mb("forward", args.examples)),
        ("AtP node effects", t_atp, t_atp / t_floor, "<= 1.5x floor", peak_mb("atp", args.examples)),
        (f"IG node effects ({STEPS} steps, {RULE}: the default)", t_ig, t_ig / t_floor, f"<= {1.5 * STEPS:g}x floor",
         peak_mb("ig", args.examples)),
        (f"IG node effects ({SFC[1]} steps, {SFC[0]}: SFC's)", t_sfc, t_sfc / t_floor, "",
         peak_mb("ig_sfc", args.examples)),
        (f"edges {PAIR}, batched ({n_down} down x {n_up} up)", t_batched, t_batched / t_floor, "",
         peak_mb("batched", args.examples)),
        ("edges, one backward per down node", t_single, t_single / t_floor, "", peak_mb("single", args.examples)),
        (f"edges of all {len(pairs)} types, batched", t_batched_all, t_batched_all / t_floor, "",
         peak_mb("batched_all", args.examples)),
        ("edges of all types, one backward per down node", t_single_all, t_single_all / t_floor, "",
         peak_mb("single_all", args.examples)),
    ]
    print(f"{'':58s} {'seconds':>9s} {'x floor':>8s} {'goal':>14s} {'peak MiB':>9s}")
    for name, t, ratio, goal, mem in rows:
        print(f"{name:58s} {t:9.4f} {ratio:8.2f} {goal:>14s} {mem:9.1f}")
    ours, sfc = completeness_error(RULE, STEPS), completeness_error(*SFC)
    print(f"IG completeness (largest |sum of a submodule's effects - its joint effect| / |joint effect| on this "
          f"batch): {STEPS} {RULE} steps {ours:.2e} (goal <= 1e-2), SFC's {SFC[1]} {SFC[0]} steps {sfc:.2e}; "
          f"the default costs {t_ig / t_sfc:.2f}x SFC's")
    print(f"\n{'edge type':18s} {'down x up':>10s} {'batched ms':>11s} {'per node ms':>12s} {'speed-up':>9s} "
          f"{'max rel diff':>13s}")
    for k in pairs:
        b, o = per_pair[(k, True)], per_pair[(k, False)]
        shape = f"{len(edge_args[k][8])} x {len(edge_args[k][7])}"
        print(f"{k:18s} {shape:>10s} {1e3 * b:11.2f} {1e3 * o:12.2f} {o / b:9.1f} {rel[k]:13.2e}")
    print(f"batched edges are {t_single / t_batched:.1f}x faster than one backward per node on {PAIR}, "
          f"{t_single_all / t_batched_all:.1f}x over all {len(pairs)} edge types (goal >= 10x); "
          f"max relative difference {max(rel.values()):.2e} (must be <= 1e-5)")
    cost = dict(evaluation_cost(model, subs, saes, data))
    print(f"\nwhole discovery (IG, {data.n_examples} examples): {cost['discovery']:.2f} s without evaluation; "
          f"default evaluation adds {cost['default'] - cost['discovery']:.2f} s = "
          f"{(cost['default'] - cost['discovery']) / cost['discovery']:.2f}x discovery (goal <= 1x); the full sweep "
          f"(--full-eval) adds {cost['full'] - cost['discovery']:.2f} s = "
          f"{(cost['full'] - cost['discovery']) / cost['discovery']:.2f}x")
    if max(rel.values()) > 1e-5:
        sys.exit("batched and single-node edge weights differ")


if __name__ == "__main__":
    main()
