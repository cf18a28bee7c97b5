"""The benchmark job: the ground-truth dictionary benchmark, its rows in `dictionary_sweeps`."""

from __future__ import annotations

from dataclasses import asdict

from catalog.store import Catalog
from compute.cache import pinned
from compute.dictionaries.toy_benchmark import ToyData, ToySweep, run_sweep
from compute.jobs.lifecycle import run, run_row


def toy_benchmark_job(cat: Catalog, data: ToyData, sweep: ToySweep, progress: bool = True) -> tuple[str, list[dict]]:
    """Run the ground-truth dictionary benchmark and commit its rows (dictionary_sweeps) as one run.
    The sweep trains on the pinned kernels that cached builds use, so its numbers are the same on
    every machine of one kernel path (`compute.cache`)."""
    row = run_row("benchmark", {"benchmark": "toy", "data": asdict(data), "sweep": asdict(sweep)})
    with run(cat, row) as writer:
        rows = pinned(run_sweep, data, sweep, progress)
        writer.write("dictionary_sweeps", [{**r, "run_id": row["run_id"], "benchmark": "toy"} for r in rows])
    return row["run_id"], rows
