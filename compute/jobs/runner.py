"""Running a job file's jobs on many workers: a process pool on this machine, or Ray.

Each job is one `cli.py` command run inside a worker process (the worker imports PyTorch once,
then runs job after job), so it commits its runs exactly as the command line does: all or
nothing, many workers at once without collisions (the catalogue's commit protocol). When a job
ends, the runner commits a run of kind `job` (params: job_key, command; status ok or failed with
the one-line reason), which is how a rerun knows what is done: jobs with an ok `job` run are
skipped, failed and interrupted ones run again. A worker that dies (killed, out of memory)
fails only the job it held; a new worker takes its place.

With a mirror (`push`), a job's last step is pushing the runs it committed there (a job whose push
fails has failed, and runs again on a rerun: its runs keep their ids, so its commit changes nothing
and the push completes), and the runner pushes its `job` runs too, so that the mirror holds the
whole sweep even when the workers share no filesystem.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

from tqdm.auto import tqdm

from catalog.errors import UserError
from catalog.progress import hidden
from catalog.remote import push as push_runs
from catalog.store import Catalog, open_catalog
from compute.jobs.command import entry_module, executor
from compute.jobs.jobfile import Job
from compute.jobs.lifecycle import job_of, job_runs, record_end, run_row

BACKENDS = ("local", "ray")

# execute(catalog_path, command, argv, job_key, threads) -> (exit status, one-line reason): runs one
# command of the CLI in this process (`compute.jobs.command.executor` of the entry point the CLI names).
Execute = Callable[[str, list, list, str, int], tuple[int, str]]


@dataclass
class Outcome:
    job: Job
    status: str  # done, skipped or failed
    seconds: float = 0.0
    reason: str = ""


def committed_jobs(cat: Catalog) -> set[str]:
    """The keys of the jobs whose last run ended well."""
    df = cat.sql("SELECT params->>'job_key' AS key FROM runs WHERE kind = 'job' AND status = 'ok'")
    return set(df.key.dropna())


def run_jobs(cat: Catalog, jobs: list[Job], entry: str, workers: int = 1, backend: str = "local",
             address: str | None = None, progress: bool = True, push: str | None = None) -> list[Outcome]:
    """Run the jobs not yet done; returns one outcome per job, in the file's order. With `push` (a
    mirror's URL), each job pushes the runs it committed, and the runner the jobs' `job` runs. `entry`
    names the CLI's click group ("module:group"), whose commands the jobs are."""
    execute = executor(entry)
    if push:
        push_records(cat, jobs, push)  # what an interrupted sweep recorded and did not push yet
    done = committed_jobs(cat)
    outcomes = {j.key: Outcome(j, "skipped") for j in jobs if j.key in done}
    todo = [j for j in jobs if j.key not in done]
    bar = tqdm(total=len(jobs), initial=len(outcomes), desc="jobs", unit="job", disable=hidden(progress))

    def finished(job: Job, status: int, reason: str, seconds: float) -> None:
        ok = status == 0
        record(cat, job, ok, seconds, reason)
        outcomes[job.key] = Outcome(job, "done" if ok else "failed", seconds, "" if ok else reason)
        bar.update(1)
        bar.set_postfix(failed=sum(o.status == "failed" for o in outcomes.values()))

    threads = max(1, (os.cpu_count() or 1) // max(workers, 1))
    try:
        if todo and backend == "ray":
            _run_ray(str(cat.root), todo, execute, workers, threads, address, push, finished)
        elif todo:
            _run_local(str(cat.root), todo, execute, workers, threads, push, finished, entry_module(entry))
    finally:
        bar.close()
    if push:
        push_records(cat, jobs, push)
    return [outcomes.get(j.key, Outcome(j, "failed", reason="not run (interrupted)")) for j in jobs]


def run_job(execute: Execute, root: str, command: list, argv: list, key: str, threads: int,
            push: str | None) -> tuple[int, str]:
    """Run one job in this worker and, with a mirror, push the runs it committed (all named by its key)."""
    status, reason = execute(root, command, argv, key, threads)
    if status != 0 or not push:
        return status, reason
    try:
        pushed = push_runs(open_catalog(root), push, progress=False, only=lambda run_id: run_id.startswith(job_runs(key)))
    except UserError as e:
        return 1, f"its runs are committed but not pushed: {e}"
    refused = [t for t in pushed if t.status == "refused"]
    if refused:
        return 1, f"its run {refused[0].run_id} was not pushed: {refused[0].reason}"
    return 0, ""


def push_records(cat: Catalog, jobs: list[Job], url: str) -> None:
    """Push what the mirror lacks of these jobs: their `job` runs, and the runs of every job that ended
    well (those of a sweep run before without --push too), so the mirror holds the sweep; one line if
    the mirror refuses one."""
    keys = {j.key for j in jobs}
    df = cat.sql("SELECT run_id, params->>'job_key' AS key, status FROM runs WHERE kind = 'job'")
    ids = set(df.run_id[df.key.isin(keys)])
    ok = set(df.key[df.key.isin(keys) & (df.status == "ok")])

    def wanted(run_id: str) -> bool:
        return run_id in ids or job_of(run_id) in ok

    refused = [t for t in push_runs(cat, url, progress=False, only=wanted) if t.status == "refused"]
    if refused:
        raise UserError(f"job run {refused[0].run_id} was not pushed to {url}: {refused[0].reason}")


def record(cat: Catalog, job: Job, ok: bool, seconds: float, reason: str) -> None:
    """Commit the run that says how a job ended."""
    row = run_row("job", {"job_key": job.key, "command": job.name, "seconds": round(seconds, 3)})
    record_end(cat, row, "ok" if ok else "failed", None if ok else reason)


# ---- the local backend: worker processes that take jobs from a queue --------------------------

def _worker(root: str, execute: Execute, threads: int, push: str | None, jobs: mp.Queue, results: mp.Queue) -> None:
    # Ctrl-C reaches every process of the terminal's group: the runner alone answers it, by stopping the
    # workers with SIGTERM (a running job then removes what it staged)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        item = jobs.get()
        if item is None:
            return
        key, command, argv = item
        results.put(("start", key, os.getpid()))
        t = time.perf_counter()
        try:
            status, reason = run_job(execute, root, command, argv, key, threads, push)
        except BaseException as e:  # noqa: BLE001 - reported as the job's failure, the worker goes on
            status, reason = 1, f"{type(e).__name__}: {e}"
        results.put(("end", key, status, reason, time.perf_counter() - t))
        if status in (130, 143):  # interrupted or terminated: this worker takes no more jobs
            return


def _run_local(root: str, todo: list[Job], execute: Execute, workers: int, threads: int, push: str | None,
               finished, preload: str) -> None:
    # forkserver: workers start from a clean process that has imported the heavy modules once
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "transformer_lens", preload])
    jobs, results = ctx.Queue(), ctx.Queue()
    by_key = {j.key: j for j in todo}
    for j in todo:
        jobs.put((j.key, list(j.command), list(j.argv)))
    procs: dict[int, mp.Process] = {}
    held: dict[int, tuple[str, float]] = {}  # pid -> (job key, start)

    restarts = 0

    def start() -> None:
        p = ctx.Process(target=_worker, args=(root, execute, threads, push, jobs, results), daemon=True)
        p.start()
        procs[p.pid] = p

    for _ in range(min(workers, len(todo))):
        start()
    left = len(todo)
    ended = False
    try:
        while left:
            try:
                msg = results.get(timeout=0.5)
            except queue.Empty:
                for pid, p in list(procs.items()):
                    if p.is_alive():
                        continue
                    procs.pop(pid)  # died; if it held a job, that job failed; a new worker goes on
                    code = p.exitcode
                    if pid in held:
                        key, t = held.pop(pid)
                        why = f"killed by signal {-code}" if code and code < 0 else f"exit status {code}"
                        finished(by_key[key], 1, f"the worker running it died ({why})", time.perf_counter() - t)
                        left -= 1
                    restarts += 1
                    if restarts > len(todo) + workers:  # workers that die without finishing anything
                        raise UserError(f"the workers keep dying (the last with exit status {code}); "
                                        f"{left} jobs not run") from None
                    if left:
                        start()
                continue
            if msg[0] == "start":
                held[msg[2]] = (msg[1], time.perf_counter())
            else:
                _, key, status, reason, seconds = msg
                held.pop(next((pid for pid, (k, _) in held.items() if k == key), None), None)
                finished(by_key[key], status, reason, seconds)
                left -= 1
        ended = True
    finally:
        if ended:  # every job ran: the workers leave when told
            for _ in procs:
                jobs.put(None)
        for p in procs.values():
            p.join(timeout=5 if ended else 0)
            if p.is_alive():
                p.terminate()  # SIGTERM: a job still running removes what it staged, commits nothing
        for p in procs.values():
            p.join(timeout=10)
            if p.is_alive():  # stuck (a worker can hang in its interpreter's exit): what it staged, staging cleans
                p.kill()
                p.join()


# ---- the Ray backend -----------------------------------------------------------------------------

def _run_ray(root: str, todo: list[Job], execute: Execute, workers: int, threads: int, address: str | None,
             push: str | None, finished) -> None:
    try:
        import ray
    except ImportError:
        raise UserError("the ray backend needs Ray: pip install ray (make test installs it)") from None
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, num_cpus=None if address else workers, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    task = ray.remote(num_cpus=1, max_retries=0)(_timed)
    pending = {task.remote(execute, root, list(j.command), list(j.argv), j.key, threads, push): j for j in todo}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(ready[0])
            try:
                status, reason, seconds = ray.get(ready[0])
            except ray.exceptions.RayError as e:  # the worker died, or Ray could not run the task
                status, reason, seconds = 1, f"{type(e).__name__}: {str(e).strip().splitlines()[0]}", 0.0
            finished(job, status, reason, seconds)
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
        if started_here:
            ray.shutdown()


def _timed(execute: Execute, root: str, command: list, argv: list, key: str, threads: int,
           push: str | None) -> tuple[int, str, float]:
    t = time.perf_counter()
    status, reason = run_job(execute, root, command, argv, key, threads, push)
    return status, reason, time.perf_counter() - t
