"""Which quadrature rule and step count make integrated gradients complete on the zoo?

    python -m bench.ig_rules [--examples 64] [--steps 2 4 6 8 10 20 100]

IG's effects over one submodule's nodes add up to (patch - clean) . integrated gradient,
which equals the joint effect of patching the whole submodule when the integral is exact.
For every zoo task and submodule this prints the completeness error |sum of IG - joint|
/ |joint| of each rule at each step count (max and median over tasks x submodules), and
the cost, which is the step count: every rule runs one forward and backward pass of the
steps as one batch, so a rule's cost at 10 steps is today's default's. The joint effect
is measured by patching (`patching.joint_effects`), independently of IG.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from compute.attribution.ig import RULES, ig_grads
from compute.attribution.patching import joint_effects
from compute.attribution.spliced import states
from compute.dictionaries.building import zoo_with_dictionaries
from compute.models import grammar
from compute.models.zoo import ZooConfig
from compute.tasks import encode
from schema.sites import sites


def errors(model, subs, saes, task, n_examples: int, grid) -> dict[tuple[str, int], list[float]]:
    """(rule, steps) -> relative completeness error of every submodule on the task."""
    data = encode(model, task, "train", n_examples)
    joint = dict.fromkeys((s.name for s in subs), 0.0)
    sums = {(r, k, s.name): 0.0 for r, k in grid for s in subs}
    for b in data.batches:
        clean, patch = states(model, subs, saes, b.clean), states(model, subs, saes, b.patch)
        for name, v in joint_effects(model, subs, b, clean, patch).items():
            joint[name] += v
        for rule, steps in grid:
            g = ig_grads(model, subs, saes, b, clean, patch, steps, rule)
            for s in subs:
                sums[(rule, steps, s.name)] += ((patch[s.name].x - clean[s.name].x) * g[s.name]).sum().item()
    return {(r, k): [abs(sums[(r, k, s.name)] - joint[s.name]) / abs(joint[s.name]) for s in subs] for r, k in grid}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--steps", type=int, nargs="+", default=[2, 4, 6, 8, 10, 20, 100])
    args = ap.parse_args()
    zoo, dicts = zoo_with_dictionaries(ZooConfig(), progress=False)[:2]
    saes = {k: d.sae for k, d in dicts.items()}
    subs = sites(zoo.model.cfg.n_layers)
    grid = [(r, k) for r in RULES for k in args.steps]
    per_task = {t: errors(zoo.model, subs, saes, zoo.tasks[t], args.examples, grid) for t in grammar.TASKS}
    print(f"completeness error |sum of IG - joint| / |joint| over {len(grammar.TASKS)} zoo tasks x {len(subs)} "
          f"submodules, {args.examples} examples each; cost = steps (10 is today's)")
    print(f"{'rule':10} {'steps':>5} {'max':>9} {'median':>9}  worst (task, submodule)")
    for rule, steps in grid:
        errs = [(e, t, s.name) for t, by in per_task.items() for e, s in zip(by[(rule, steps)], subs, strict=True)]
        worst = max(errs)
        print(f"{rule:10} {steps:5d} {worst[0]:9.2e} {statistics.median(e for e, *_ in errs):9.2e}  {worst[1]}, {worst[2]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
