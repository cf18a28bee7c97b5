"""Do the demo's numbers (and, with --rebuild, the zoo and its dictionaries) depend on the
processor's kernels?

    python -m bench.reproducibility [--capabilities default avx2 avx512] [--rebuild] [--suite]

For each of PyTorch's CPU capabilities (forced with ATEN_CPU_CAPABILITY, as a machine without
the wider instructions would run), this runs `cli.py demo` into a catalogue and a cache of its
own, on the released zoo (with --rebuild: on a zoo and dictionaries built from scratch, ignoring
the release), and prints side by side: the zoo's model id and weights hash, the dictionaries' ids,
and the demo's features-vs-neurons table. With --suite it also runs the test suite under each
capability. It exits 1 when the models or the table differ. A capability the processor lacks is
skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def supported(capability: str) -> bool:
    """Whether PyTorch runs this capability here (it falls back to a lower one when it cannot)."""
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "ATEN_CPU_CAPABILITY": capability},
                         capture_output=True, text=True, check=True).stdout.strip()
    return out.lower() == capability.lower()


def environment(capability: str, work: Path, rebuild: bool) -> dict:
    return {**os.environ, "ATEN_CPU_CAPABILITY": capability, "CIRCUIT_CACHE": str(work / "cache"),
            **({"CIRCUIT_NO_RELEASE": "1"} if rebuild else {})}


def run_demo(capability: str, work: Path, rebuild: bool) -> dict:
    env = environment(capability, work, rebuild)
    start = time.monotonic()
    subprocess.run([sys.executable, str(ROOT / "cli.py"), "--catalog", str(work / "catalog"), "demo"], env=env,
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    probe = f"""
import json, catalog, torch
cat = catalog.open({str(work / 'catalog')!r})
t = cat.sql("SELECT * FROM nodes_for_faithfulness(0.8)")
m = cat.sql("SELECT model_id, weights_hash FROM models").iloc[0]
d = sorted(cat.sql("SELECT dictionary_id FROM dictionaries").dictionary_id)
print(json.dumps({{"capability": torch.backends.cpu.get_cpu_capability(), "model_id": m.model_id,
                  "weights_hash": m.weights_hash, "dictionaries": d,
                  "table": t.astype(str).values.tolist()}}))
"""
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    return {**json.loads(out.stdout), "demo_s": round(time.monotonic() - start)}


def run_suite(capability: str, work: Path, rebuild: bool) -> str:
    env = environment(capability, work, rebuild)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], env=env, cwd=ROOT,
                       capture_output=True, text=True)
    return r.stdout.strip().splitlines()[-1] if r.stdout.strip() else f"exit {r.returncode}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--capabilities", nargs="+", default=["default", "avx2", "avx512"])
    ap.add_argument("--rebuild", action="store_true", help="build the zoo and its dictionaries from scratch "
                    "under each capability instead of loading the release")
    ap.add_argument("--suite", action="store_true", help="also run the test suite under each capability")
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="repro-") as tmp:
        for cap in args.capabilities:
            if not supported(cap):
                print(f"{cap}: not supported by this processor, skipped")
                continue
            work = Path(tmp) / cap
            results[cap] = run_demo(cap, work, args.rebuild)
            if args.suite:
                results[cap]["suite"] = run_suite(cap, work, args.rebuild)
            print(f"{cap}: done in {results[cap]['demo_s']} s", flush=True)
    if not results:
        return 1
    first = next(iter(results.values()))
    print(f"\n{'capability':12} {'model_id':28} {'weights':18} {'dictionaries':14} table (task, features, neurons)")
    for cap, r in results.items():
        table = "; ".join(" ".join(row) for row in r["table"])
        print(f"{cap:12} {r['model_id']:28} {r['weights_hash']:18} {'same' if r['dictionaries'] == first['dictionaries'] else 'DIFFERENT':14} {table}")
        if "suite" in r:
            print(f"{'':12} suite: {r['suite']}")
    same = all((r["model_id"], r["weights_hash"], r["dictionaries"], r["table"]) ==
               (first["model_id"], first["weights_hash"], first["dictionaries"], first["table"]) for r in results.values())
    print("\nmodels and table identical under every capability" if same else "\nDIFFERENCES: see above")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
