"""Attribution cost on the zoo, side by side in one run.

    python bench/attribution.py [--examples 32] [--repeat 5]

Node effects by AtP and IG, each from the prompts' tokens (their forward passes
included), against the floor of one forward+backward pass of the spliced model on
the same batch: the dictionaries encode and decode in the forward pass (every error
term x - decode(f) is computed) and the backward pass ends at every feature's gradient.
AtP needs no decoder product: its error effects follow from dx . g and the features'
effects. Batched edges (one backward per chunk of downstream nodes, their sparse
cotangents packed into shared slots) against one backward per downstream node, with the largest
relative difference between the two; and the peak memory of each, measured in
a fresh child process: resident memory sampled every millisecond while the step
runs, above the resident memory just before it (after returning freed memory to
the system).
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from compute.dictionaries import submodules  # noqa: E402
from compute.edges import ERROR, EdgePair, edge_weights, edge_weights_looped  # noqa: E402
from compute.ig import ig_grads  # noqa: E402
from compute.spliced import clean_and_patch, node_effects, output_grads, spliced_pass, states  # noqa: E402
from compute.tasks import encode  # noqa: E402
from compute.zoo import build_zoo  # noqa: E402
from compute.zoo_dictionaries import build_dictionaries  # noqa: E402

STEPS = 10


def setup(n_examples: int):
    zoo = build_zoo(progress=False)
    saes = {k: d.sae for k, d in build_dictionaries(zoo, progress=False).items()}
    subs = submodules(zoo.model)
    batch = max(encode(zoo.model, zoo.tasks["sva_across_pp"], "train", n_examples).batches, key=len)
    clean = states(zoo.model, subs, saes, batch.clean)
    patch = states(zoo.model, subs, saes, batch.patch)
    return zoo.model, subs, saes, batch, clean, patch


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
    r = subprocess.run([sys.executable, __file__, "--examples", str(examples), "--measure", step],
                       capture_output=True, text=True)
    return float(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # internal: peak memory of one step
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    model, subs, saes, batch, clean, patch = setup(args.examples)

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

    def ig():
        on_clean, on_patch = clean_and_patch(model, subs, saes, batch)
        c, p = on_clean.states, on_patch.states
        g = ig_grads(model, subs, saes, batch, c, p, STEPS)
        return [node_effects(saes[s.name], c[s.name], p[s.name], g[s.name]) for s in subs]

    by = {s.name: s for s in subs}
    pair = EdgePair(by["resid_0"], by["mlp_1"], (by["attn_1"],))
    grads = output_grads(model, subs, batch)[1]
    up = torch.tensor(clean["resid_0"].f.abs().sum((0, 1)).nonzero().flatten().tolist() + [ERROR])
    down = torch.tensor(clean["mlp_1"].f.abs().sum((0, 1)).nonzero().flatten().tolist() + [ERROR])

    edge_args = (model, pair, saes, batch, clean, patch, grads["mlp_1"], up, down)

    def edges(chunk: int):
        if chunk == 1:
            return edge_weights_looped(*edge_args)
        return torch.cat([w for _, w in edge_weights(*edge_args, chunk=chunk)])

    steps = {"plain": plain, "floor": floor, "forward": forward, "atp": atp, "ig": ig, "batched": lambda: edges(64), "single": lambda: edges(1)}
    if args.measure:
        print(sampled_peak_mb(steps[args.measure]))
        return
    t = timed(steps, args.repeat)
    t_plain, t_forward, t_floor, t_atp, t_ig = t["plain"], t["forward"], t["floor"], t["atp"], t["ig"]
    t_batched, t_single = t["batched"], t["single"]
    batched, single = edges(64), edges(1)
    rel = ((batched - single).abs().max() / single.abs().max()).item()

    print(f"zoo model, {len(batch)} examples of length {batch.clean.shape[1]}, {len(subs)} submodules, "
          f"{sum(s.d_sae for s in saes.values())} features; median of {args.repeat}")
    rows = [
        ("forward+backward of the spliced model (floor)", t_floor, 1.0, "", peak_mb("floor", args.examples)),
        ("forward+backward of the model alone", t_plain, t_plain / t_floor, "", peak_mb("plain", args.examples)),
        ("forward of the spliced model (encode and decode)", t_forward, t_forward / t_floor, "",
         peak_mb("forward", args.examples)),
        ("AtP node effects", t_atp, t_atp / t_floor, "<= 1.5x floor", peak_mb("atp", args.examples)),
        (f"IG node effects ({STEPS} steps)", t_ig, t_ig / t_floor, f"<= {1.5 * STEPS:g}x floor",
         peak_mb("ig", args.examples)),
        (f"edges resid_0->mlp_1, batched ({len(down)} down x {len(up)} up)", t_batched, t_batched / t_floor, "",
         peak_mb("batched", args.examples)),
        ("edges, one backward per down node", t_single, t_single / t_floor, "", peak_mb("single", args.examples)),
    ]
    print(f"{'':58s} {'seconds':>9s} {'x floor':>8s} {'goal':>14s} {'peak MiB':>9s}")
    for name, t, ratio, goal, mem in rows:
        print(f"{name:58s} {t:9.4f} {ratio:8.2f} {goal:>14s} {mem:9.1f}")
    print(f"batched edges are {t_single / t_batched:.1f}x faster than one backward per node (goal >= 10x); "
          f"max relative difference {rel:.2e} (must be <= 1e-5)")
    if rel > 1e-5:
        sys.exit("batched and single-node edge weights differ")


if __name__ == "__main__":
    main()
