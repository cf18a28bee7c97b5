"""Dictionary training throughput against the floor of its own matrix products, side by side.

    python -m bench.dictionaries [--steps 300] [--d-in 64] [--expansion 8] [--batch 1024]

For every trainable architecture, training tokens per second (steps x batch over
wall time of `train_sae`, optimiser, resampling checks and progress bookkeeping
included) beside the floor: the five matrix products one training step cannot
avoid (x W_enc and f W_dec forward; dL/df, dL/dW_dec and dL/dW_enc backward),
timed alone on the same shapes in the same run. Training and floor alternate, three rounds
each, and the medians are compared, so that the machine's slow spells fall on both alike.
The ratio is ours / floor (goal >= 0.5).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from compute.allocator import keep_freed_memory
from compute.dictionaries.training import TRAINABLE, SAEConfig, train_sae


def floor_tokens_per_s(batch: int, d_in: int, d_sae: int, d_out: int, steps: int) -> float:
    x, g_out = torch.randn(batch, d_in), torch.randn(batch, d_out)
    w_enc, w_dec = torch.randn(d_in, d_sae), torch.randn(d_sae, d_out)
    f = torch.randn(batch, d_sae)

    def step():
        pre = x @ w_enc
        out = f @ w_dec
        df = g_out @ w_dec.T
        dw_dec = f.T @ g_out
        dw_enc = x.T @ df
        return pre, out, dw_dec, dw_enc

    for _ in range(10):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--d-in", type=int, default=64)
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    keep_freed_memory()  # as the CLI does: per-step temporaries reuse memory instead of page-faulting it in
    d_in, d_sae = args.d_in, args.d_in * args.expansion
    acts = torch.randn(50_000, d_in)
    print(f"{torch.get_num_threads()} threads, d_in {d_in}, d_sae {d_sae}, batch {args.batch}, {args.steps} steps, "
          f"median of {args.rounds} rounds")
    print(f"{'architecture':<12} {'ours tok/s':>12} {'floor tok/s':>12} {'ours/floor':>10}")
    for arch in TRAINABLE:
        cfg = SAEConfig(architecture=arch, expansion=args.expansion, steps=args.steps, batch_size=args.batch,
                        resample_every=0)
        targets = acts @ torch.randn(d_in, d_in) if arch == "transcoder" else None
        train_sae(acts, SAEConfig(architecture=arch, expansion=args.expansion, steps=10, batch_size=args.batch),
                  "h", "m", progress=False, targets=targets)  # warm-up
        ours_runs, floor_runs = [], []
        for _ in range(args.rounds):
            t = time.perf_counter()
            train_sae(acts, cfg, "h", "m", progress=False, targets=targets)
            ours_runs.append(args.steps * args.batch / (time.perf_counter() - t))
            floor_runs.append(floor_tokens_per_s(args.batch, d_in, d_sae, d_in, args.steps))
        ours, floor = statistics.median(ours_runs), statistics.median(floor_runs)
        print(f"{arch:<12} {ours:>12,.0f} {floor:>12,.0f} {ours / floor:>10.2f}", flush=True)


if __name__ == "__main__":
    main()
