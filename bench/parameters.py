"""What one batched curvature evaluation costs, against one gradient pass over the same batch.

    python -m bench.parameters [--batches 64 256] [--directions 8] [--repeats 5]

On one head's W_K of the zoo (layer 0, head 0: 1024 parameters) and zoo corpus sentences, it times
side by side (round-robin, median of the repeats): one gradient pass of the summed divergence
(forward + backward), the curvature of every token along K directions by one JVP per direction
(`jvp`, the default) and by a JVP of a JVP (`nested`), and one optimisation step's curvature and
backward. It prints each as a multiple of the gradient pass, in total and per direction, and the
peak memory each adds (resident set, measured in a fresh process per cell).
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

OPS = ("gradient", "curvature (jvp)", "curvature (nested)", "training step (jvp)")


def setup(batch: int, k: int):
    import torch

    from compute.models import grammar
    from compute.models.zoo import build_zoo, zoo_config
    from compute.parameters.targets import lm_target

    torch.manual_seed(0)
    model = build_zoo(zoo_config("default")).model
    target = lm_target(model, ["blocks.0.attn.W_K[0]"])
    toks = model.to_tokens(grammar.corpus(batch, 11), padding_side="right")
    u = torch.randn(k, target.w0.numel())
    u = u / u.norm(dim=1, keepdim=True)
    fn = target.divergence_fn(toks)

    def gradient():
        w = (target.w0 + 1e-3 * u[0]).requires_grad_(True)  # off w0, where the gradient is not zero
        fn(w).sum().backward()

    def training_step():
        v = u.clone().requires_grad_(True)
        target.curvature(toks, v).pow(2).sum().backward()

    return {"gradient": gradient,
            "curvature (jvp)": lambda: target.curvature(toks, u),
            "curvature (nested)": lambda: target.curvature(toks, u, method="nested"),
            "training step (jvp)": training_step}


def _status_kib(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def _peak(op: str, batch: int, k: int, out) -> None:
    """The resident set's peak during one call above what it was before (Linux: writing 5 to
    /proc/self/clear_refs resets the peak, VmHWM, to the current size)."""
    ops = setup(batch, k)
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    ops[op]()
    out.put((_status_kib("VmHWM") - before) / 1024)


def peak_mib(op: str, batch: int, k: int) -> float:
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_peak, args=(op, batch, k, q))
    p.start()
    value = q.get()
    p.join()
    return value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--directions", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    k = args.directions
    print(f"zoo blocks.0.attn.W_K[0] (1024 parameters), {k} directions; times: median of {args.repeats}")
    print(f"{'batch':>5} {'operation':<22} {'ms':>8} {'x gradient':>10} {'x grad/dir':>10} {'peak MiB':>9}")
    for batch in args.batches:
        ops = setup(batch, k)
        for f in ops.values():  # warm up (vmap and forward-mode set-up)
            f()
        times = {name: [] for name in ops}
        for _ in range(args.repeats):
            for name, f in ops.items():
                t = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t)
        med = {name: statistics.median(v) for name, v in times.items()}
        for name in OPS:
            ratio = med[name] / med["gradient"]
            per = ratio / k if name != "gradient" else 1.0
            print(f"{batch:>5} {name:<22} {1000 * med[name]:>8.1f} {ratio:>10.2f} {per:>10.2f} "
                  f"{peak_mib(name, batch, k):>9.1f}")


if __name__ == "__main__":
    main()
