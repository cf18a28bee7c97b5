"""Soak test of the commit protocol and the job runner: discovery runs killed at random, readers throughout.

    python -m bench.soak                  # 100 discovery jobs, 2 workers, a worker killed every 1-4 s
    python -m bench.soak --jobs 30 --kills 10

A job file of `--jobs` zoo discoveries (tasks x methods x example counts, 4-16 examples, no
evaluation) runs under `cli.py run --workers W`, while this script SIGKILLs one of the runner's
worker processes at random moments (`--kills` in all) and a reader process queries the catalogue
without pause. The reader checks, on every pass, that each visible circuit is whole (as many
in-circuit nodes and edges as its row says, a committed run behind it), that no circuit it saw
before has gone, and that no query fails. Then the job file runs again: it must complete every
job the kills stopped and skip the rest. Printed: jobs, kills, killed jobs, partial circuits ever
visible, committed circuits lost, reader queries and errors, killed jobs completed on the rerun,
stale staged runs left by the kills (cleaned by `cli.py staging --clean`).
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

TASKS = ["sva_simple", "sva_across_pp", "sva_across_rc", "sva_within_rc", "pronoun_gender", "ioi"]

WHOLE_SQL = """
SELECT c.circuit_id, c.n_nodes, c.n_edges,
       (SELECT count(*) FROM nodes n WHERE n.circuit_id = c.circuit_id AND n.in_circuit) AS nodes,
       (SELECT count(*) FROM edges e WHERE e.circuit_id = c.circuit_id) AS edges,
       (SELECT count(*) FROM runs r WHERE r.run_id = c.run_id AND r.status = 'ok') AS runs
FROM circuits c
"""


def job_file(path: Path, n: int) -> Path:
    combos = list(itertools.product(TASKS, ["atp", "ig"], [4, 6, 8, 10, 12, 14, 16, 5, 7]))[:n]
    lines = ["[defaults]", "no-eval = true", "steps = 4", ""]
    for task, method, examples in combos:
        lines += ["[[job]]", 'command = "discover"', f'task = "{task}"', f'method = "{method}"',
                  f"examples = {examples}", ""]
    path.write_text("\n".join(lines))
    return path


def reader(root: str, stop, out) -> None:
    """Query until told to stop; report (queries, errors, partial circuits seen, circuits lost)."""
    import catalog

    seen: set[str] = set()
    queries = errors = partial = lost = 0
    first_error = ""
    while not stop.is_set():
        try:
            df = catalog.open(root).sql(WHOLE_SQL)
            queries += 1
            bad = df[(df.nodes != df.n_nodes) | (df.edges != df.n_edges) | (df.runs != 1)]
            partial += len(bad)
            now = set(df.circuit_id)
            lost += len(seen - now)
            seen |= now
        except Exception as e:  # noqa: BLE001 - every failure is counted, the first one shown
            errors += 1
            first_error = first_error or f"{type(e).__name__}: {e}"
        time.sleep(0.05)
    out.put((queries, errors, partial, lost, len(seen), first_error))


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def workers_of(pid: int) -> list[int]:
    """The runner's worker processes: the children of its forkserver."""
    found = []
    for c in _children(pid):
        try:
            if b"forkserver" in Path(f"/proc/{c}/cmdline").read_bytes():
                found += _children(c)
        except OSError:
            continue
    return found


def cli(*args: str, catalog_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), "--catalog", str(catalog_path), *args],
                          capture_output=True, text=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=100)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--kills", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "catalog"
        jobs = job_file(Path(tmp) / "soak.toml", args.jobs)
        assert cli("init", catalog_path=root).returncode == 0
        stop, out = mp.Event(), mp.Queue()
        r = mp.Process(target=reader, args=(str(root), stop, out))
        r.start()
        t0 = time.perf_counter()
        runner = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "--catalog", str(root), "run", str(jobs),
                                   "--workers", str(args.workers), "--format", "csv"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        kills = 0
        while runner.poll() is None and kills < args.kills:
            time.sleep(rng.uniform(1.0, 4.0))
            pids = workers_of(runner.pid)
            if pids and runner.poll() is None:
                os.kill(rng.choice(pids), signal.SIGKILL)
                kills += 1
        first_out, first_err = runner.communicate()
        first_s = time.perf_counter() - t0
        import io

        import pandas as pd

        first = pd.read_csv(io.StringIO(first_out))
        killed = first[first.reason.fillna("").str.contains("worker running it died")]
        stale = cli("staging", "--format", "csv", catalog_path=root).stdout.count("\n") - 1
        again = cli("run", str(jobs), "--workers", str(args.workers), "--format", "csv", catalog_path=root)
        second = pd.read_csv(io.StringIO(again.stdout))
        stop.set()
        queries, errors, partial, lost, seen, first_error = out.get()
        r.join()
        clean = cli("staging", "--clean", "--discard", catalog_path=root)
        n_circuits = int(cli("query", "SELECT count(*) AS n FROM circuits", "--format", "csv",
                             catalog_path=root).stdout.split()[1])
        completed = second[second.job_key.isin(killed.job_key) & (second.status == "done")]
        rows = {"jobs": len(first), "kills": kills, "jobs killed": len(killed),
                "other failures": int((first.status == "failed").sum() - len(killed)),
                "partial circuits ever visible": partial, "committed circuits lost": lost,
                "reader queries": queries, "reader errors": errors,
                "killed jobs completed on rerun": f"{len(completed)} of {len(killed)}",
                "rerun: done / skipped / failed": "/".join(str(int((second.status == s).sum()))
                                                           for s in ("done", "skipped", "failed")),
                "circuits at the end": n_circuits, "stale staged runs after the kills": stale,
                "staging --clean": clean.stdout.strip().splitlines()[-1] if clean.stdout.strip() else "",
                "first pass": f"{first_s:.0f} s"}
        width = max(map(len, rows))
        print("\n".join(f"{k:{width}}  {v}" for k, v in rows.items()))
        if first_error:
            print(f"first reader error: {first_error}")
        ok = (partial == 0 and lost == 0 and errors == 0 and len(completed) == len(killed)
              and n_circuits == len(first) and (second.status == "failed").sum() == 0)
        print("all checks hold" if ok else "A CHECK FAILED")
        sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
