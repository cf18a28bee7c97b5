"""The CPU against an accelerator, side by side in one run: the check a machine with a GPU runs once.

    python -m bench.devices                               # cuda (or mps), float32, tiny checkpoints
    python -m bench.devices --dtype bfloat16              # the device in half precision, against float32 on the CPU
    python -m bench.devices --d-model 768 --layers 12     # a GPT-2-small-shaped checkpoint (random weights)
    python -m bench.devices --zoo                         # also the trained zoo model and its SAEs
    python -m bench.devices --virtual cuda                # on this CPU, under tests/virtual_device.py
                                                          # (against the CPU in the same dtype: all equal)

Nothing is downloaded: the checkpoints, dictionary sets and task file are random ones written
here the way the tests write them (GPT-2 with a Sparse Feature Circuits layout set; GPT-NeoX with
transcoders and attention SAEs). Each case runs as a user runs it (`cli.py ...` in this process),
once with `--device cpu --dtype float32` and once on the device, each into its own catalogue:
- discover: IG with the default evaluation; exact patching under a memory budget; AtP per position
- attribute: direct contributions with OV and QK edges; hierarchical to a feature; explain
- with --zoo: discovery on the zoo model and its SAEs (a trained model, where effects mean something),
  through the library (the CLI's --device goes with --model)
For each: seconds on each side (the first device case includes starting the device), the device's
peak memory (CUDA), node effects' Pearson r and largest difference relative to the largest effect,
and the largest difference of the faithfulness curves. On a real device expect r >= 0.9999 in float32
(other kernels, other rounding) and the bounds of tests/test_devices.py in half precision; under
--virtual every number must be equal (the simulator computes on the CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import catalog

PROMPT = "the cat near the dogs runs"


def write_inputs(root: Path, d_model: int, layers: int, d_sae: int) -> dict[str, Path]:
    """The tests' kind of checkpoints and sets, at the size asked for."""
    from compute.models.checkpoints import load_checkpoint
    from tests.checkpoints import write_checkpoint, write_local_set, write_sfc_set, write_task

    paths = {"gpt2": write_checkpoint(root / "gpt2", "gpt2", d_model=d_model, n_layers=layers),
             "sfc": write_sfc_set(root / "sfc", layers, d_model, d_sae), "task": write_task(root / "task.jsonl"),
             "neox": write_checkpoint(root / "neox", "neox", d_model=d_model, n_layers=layers), "set": root / "set"}
    write_local_set(paths["set"], load_checkpoint(str(paths["neox"]), progress=False).model, PROMPT, d_sae)
    return paths


def cases(p: dict[str, Path], layers: int) -> dict[str, list[str]]:
    given = ["--model", str(p["gpt2"]), "--dictionaries", str(p["sfc"]), "--task-file", str(p["task"]),
             "--examples", "8"]
    local = ["--model", str(p["neox"]), "--dictionaries", str(p["set"]), "--prompt", PROMPT, "--format", "csv"]
    last = f"attn_{layers - 1}"  # the last layer's attention SAE: the root of the hierarchical case and of explain
    return {"discover: IG, default evaluation": ["discover", *given],
            "discover: exact, 200K memory budget": ["discover", *given, "--method", "exact", "--max-memory", "200K"],
            "discover: AtP per position": ["discover", *given, "--method", "atp", "--aggregation", "none"],
            "attribute: direct, OV and QK": ["attribute", *local],
            "attribute: hierarchical": ["attribute", *local, "--target", f"{last}/top@5", "--threshold", "0.01"],
            "explain": ["explain", last, "top", *local]}


def run(argv: list[str], where: Path) -> str:
    """`cli.py --catalog WHERE ARGV` in this process (as the tests run it); its stdout, or exit with its error."""
    from conftest import run_cli

    r = run_cli(*argv, catalog=where)
    if r.returncode != 0:
        sys.exit(f"cli.py {' '.join(argv)}: {r.stderr.strip()}")
    return r.stdout


def measured(fn, device: str) -> tuple[float, float | None, object]:
    """(seconds, peak device MiB or None, result) of one call, the device's queue drained at both ends."""
    sync = None if VIRTUAL or device == "cpu" else {"cuda": torch.cuda.synchronize, "mps": torch.mps.synchronize}[device]
    cuda = device == "cuda" and not VIRTUAL
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if sync:
        sync()
    t = time.perf_counter()
    out = fn()
    if sync:
        sync()
    return time.perf_counter() - t, torch.cuda.max_memory_allocated() / 2**20 if cuda else None, out


def node_effects(path: Path) -> pd.Series:
    df = catalog.open(path).sql("SELECT component, layer, feature_idx, is_error, position, effect FROM nodes")
    return df.set_index(["component", "layer", "feature_idx", "is_error", "position"]).effect


def curves(path: Path) -> pd.Series:
    df = catalog.open(path).sql("SELECT kind, ablation, n_nodes, value FROM evaluations WHERE kind <> 'random'")
    return df.set_index(["kind", "ablation", "n_nodes"]).value


def agreement(ref: pd.Series, got: pd.Series) -> tuple[float, float]:
    """(Pearson r, largest |difference| / largest |reference|) over the union of keys (absent = 0)."""
    both = pd.concat([ref.rename("a"), got.rename("b")], axis=1).fillna(0.0)
    if len(both) < 2 or both.a.std() == 0:
        return float("nan"), float("nan")
    return float(np.corrcoef(both.a, both.b)[0, 1]), float((both.a - both.b).abs().max() / both.a.abs().max())


def curve_gap(ref: pd.Series, got: pd.Series) -> float | None:
    both = pd.concat([ref.rename("a"), got.rename("b")], axis=1)
    return float((both.a - both.b).abs().max()) if len(both) else None


def zoo_case(device: str, dtype: str, reference: str) -> tuple[dict, dict]:
    """Discovery on the trained zoo model and its SAEs (ioi, 32 examples) on the CPU and on the device."""
    from compute.attribution.discovery import DiscoveryParams, discover
    from compute.dictionaries.building import zoo_with_dictionaries
    from compute.models.zoo import ZooConfig
    from compute.tasks import encode
    from schema.sites import sites

    zoo, dicts = zoo_with_dictionaries(ZooConfig(), progress=True)[:2]
    subs = sites(zoo.model.cfg.n_layers)
    out = {}
    for on, dt in (("cpu", getattr(torch, reference)), (device, getattr(torch, dtype))):
        with VIRTUAL_MODE() if on != "cpu" else contextlib.nullcontext():
            model = copy.deepcopy(zoo.model).to(on).to(dt)
            saes = {k: copy.deepcopy(d.sae).to(device=on, dtype=dt) for k, d in dicts.items()}
            data = encode(model, zoo.tasks["ioi"], "train", limit=32)
            out[on] = measured(lambda m=model, s=saes, d=data: discover(m, subs, s, d, DiscoveryParams(n_examples=32),
                                                                        progress=False), on)
    summary = {}
    for on, (_, _, c) in out.items():
        summary[on] = (pd.Series({(n.site and n.site.name, n.feature, n.position): n.effect for n in c.nodes}),
                       pd.Series(dict(zip(c.curves[0].n_nodes, c.curves[0].faithfulness, strict=True))))
    return out, summary


VIRTUAL = False
VIRTUAL_MODE = contextlib.nullcontext


def main() -> None:
    global VIRTUAL, VIRTUAL_MODE
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "mps"), help="default: cuda if present, else mps")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    ap.add_argument("--d-model", type=int, default=32)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--d-sae", type=int, default=64)
    ap.add_argument("--zoo", action="store_true", help="also discovery on the trained zoo model (builds it if needed)")
    ap.add_argument("--virtual", choices=("cuda", "mps"), help="simulate the device on this CPU (a check of the "
                    "device paths: every result must equal the CPU's)")
    args = ap.parse_args()
    if args.virtual:
        from tests.virtual_device import virtual_device

        VIRTUAL, args.device = True, args.virtual
        VIRTUAL_MODE = lambda: virtual_device(args.virtual)  # noqa: E731
    elif args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else None
    if args.device is None:
        sys.exit("no accelerator here (torch sees neither cuda nor mps); --virtual cuda checks the paths on the CPU")
    if args.device == "cuda" and not VIRTUAL:
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    reference = args.dtype if VIRTUAL else "float32"  # simulated, the same dtype must give the same numbers
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = write_inputs(root, args.d_model, args.layers, args.d_sae)
        for i, (name, argv) in enumerate(cases(paths, args.layers).items()):
            cpu_s, _, cpu_out = measured(lambda a=argv, k=i: run(
                [*a, "--device", "cpu", "--dtype", reference], root / f"cpu{k}"), "cpu")
            with VIRTUAL_MODE():
                dev_s, peak, dev_out = measured(lambda a=argv, k=i: run(
                    [*a, "--device", args.device, "--dtype", args.dtype], root / f"dev{k}"), args.device)
            r, gap = agreement(node_effects(root / f"cpu{i}"), node_effects(root / f"dev{i}"))
            rows.append({"case": name, "cpu_s": round(cpu_s, 2), f"{args.device}_s": round(dev_s, 2),
                         "speedup": round(cpu_s / dev_s, 2), "peak_MiB": None if peak is None else round(peak),
                         "node_r": round(r, 7), "max_rel_diff": f"{gap:.2e}",
                         "curve_gap": curve_gap(curves(root / f"cpu{i}"), curves(root / f"dev{i}")),
                         "same_stdout": cpu_out == dev_out})
            print(pd.DataFrame([rows[-1]]).to_string(index=False, header=i == 0), flush=True)
    if args.zoo:
        times, summary = zoo_case(args.device, args.dtype, reference)
        (cpu_s, _, _), (dev_s, peak, _) = times["cpu"], times[args.device]
        r, gap = agreement(summary["cpu"][0], summary[args.device][0])
        rows.append({"case": "zoo: IG on ioi, library", "cpu_s": round(cpu_s, 2), f"{args.device}_s": round(dev_s, 2),
                     "speedup": round(cpu_s / dev_s, 2), "peak_MiB": None if peak is None else round(peak),
                     "node_r": round(r, 7), "max_rel_diff": f"{gap:.2e}",
                     "curve_gap": curve_gap(summary["cpu"][1], summary[args.device][1]), "same_stdout": None})
    df = pd.DataFrame(rows)
    print(f"\n{args.device}{' (virtual)' if VIRTUAL else ''}, {args.dtype} against the CPU in {reference}; checkpoints "
          f"d_model {args.d_model}, {args.layers} layers, dictionaries of {args.d_sae}:")
    print(df.to_string(index=False))
    if VIRTUAL and args.device == "mps" and args.dtype != "float32":
        print("(on MPS TransformerLens computes attention outputs as a product and a sum instead of one F.linear, "
              "pytorch#161640: in half precision that rounds otherwise, so equality is not expected here)")
    elif VIRTUAL:  # the simulator computes on the CPU: anything but equality is a bug in a device path
        assert (df.node_r.dropna() == 1).all() and df.max_rel_diff.astype(float).max() == 0, "virtual run differs"
        assert (df.curve_gap.dropna() == 0).all() and df.same_stdout.dropna().all(), "virtual run differs"


if __name__ == "__main__":
    main()
