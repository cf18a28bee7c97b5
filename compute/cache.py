"""Content-addressed cache for built artefacts (zoo model, task files, dictionaries).

Every build runs in a child process whose numerical kernels are pinned, with PyTorch's
deterministic algorithms, so that one configuration gives bit-identical weights on every
machine of one kernel path, not only within one machine. PyTorch and MKL choose their
kernels by processor, and the same seeded training gives other weights on each: measured
here, every ATen capability (default, avx2, avx512), MKL code path, oneDNN instruction set,
and the step from one thread to several changed the weights; under the pin, forcing any
of them outside the build changes nothing.

Two kernel paths (`KERNEL_PATHS`): `avx2` on every x86-64 processor with AVX2 and FMA (Intel
since 2013, AMD since 2015), and `baseline` elsewhere. The baseline path (PyTorch's default
kernels, MKL's COMPATIBLE path, oneDNN's SSE4.1) would be the same everywhere, but it made
the zoo's build 1.8x and its dictionaries' 2.2x slower than the avx2 path, which costs
nothing against the processor's own kernels. The path is part of every cache key (and so of
the zoo's model id), so builds of the two paths never mix.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import torch

from catalog.shards import (
    file_hash,  # noqa: F401  (compute's builds hash files the way manifests do)
    try_lock,
)
from compute.release import released

# The environment of each kernel path's builds: set before PyTorch starts (it reads these once).
# Two threads: two or more threads give one result, one thread another.
KERNEL_PATHS = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"},
    "baseline": {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE,STRICT", "ONEDNN_MAX_CPU_ISA": "SSE41",
                 "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"},
}


_INSIDE = "CIRCUIT_PINNED_BUILD"  # set in a pinned build's process, to the kernel path it runs on


@cache
def kernel_path() -> str:
    """'avx2' where the processor has AVX2 and FMA, else 'baseline' (see the module docstring)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "baseline"
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx2" if {"avx2", "fma"} <= set(flags) else "baseline"


@cache
def processor() -> str:
    """The processor's model name, as the kernel path's results depend on its vendor (docs/reproducibility.md)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform

        return platform.processor() or platform.machine()
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                "unknown")


def cache_root() -> Path:
    """`$CIRCUIT_CACHE`, or `.cache` in the working directory."""
    return Path(os.environ.get("CIRCUIT_CACHE", ".cache")).resolve()


def config_hash(config: object) -> str:
    """A short stable hash of a dataclass or JSON-able configuration."""
    if dataclasses.is_dataclass(config):
        config = dataclasses.asdict(config)
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]




@contextmanager
def deterministic() -> Iterator[None]:
    """Run the body with deterministic PyTorch kernels, restoring the previous mode after."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def cached_dir(kind: str, key: str, build: Callable[..., None], *args, pin: bool = True) -> Path:
    """Return `<cache>/<kind>/<key>` (or the released artefact of that kind and key: `compute.release`),
    building it first if absent.

    `build(folder, *args)` (a module-level function: it runs in a child process, see
    `pinned`) fills a temporary directory that is renamed into place only when it
    returns, so an interrupted build never leaves a half-written entry. The key is suffixed
    with the kernel path. With `pin=False` the build runs in this process (a measurement of a
    model already loaded here, which no training makes processor-dependent).
    """
    final = cache_path(kind, key)
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _building(final):
        if final.exists():  # another process built it while this one waited
            return final
        return _build(final, build, args, pin)


@contextmanager
def _building(final: Path) -> Iterator[None]:
    """Hold the build lock of one cache entry: processes that want the same entry at once (test
    workers, a sweep's first jobs on a clean machine) wait for one build instead of each training it."""
    with open(final.parent / f".{final.name}.lock", "a") as f:
        if not try_lock(f):
            print(f"waiting for another process to build {final.parent.name}/{final.name} ...", file=sys.stderr)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build(final: Path, build: Callable[..., None], args: tuple, pin: bool) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        if pin:
            pinned(build, tmp, *args)
        else:
            build(tmp, *args)
        os.replace(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.exists():  # not a lost race with another builder
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def cache_path(kind: str, key: str) -> Path:
    """Where a build of this kind and key lives (built or not): the released artefact of that kind and
    key where the release holds one (checked against its manifest), else the cache's folder, the key
    suffixed with the kernel path."""
    return released(kind, key) or cache_root() / kind / f"{key}-{kernel_path()}"


@contextmanager
def environment(**values: str) -> Iterator[None]:
    """Set environment variables for the body (processes started in it inherit them)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def pinned(fn: Callable, *args):
    """Run `fn(*args)` in a fresh Python process on this machine's pinned kernel path and with
    PyTorch's deterministic algorithms; its exception, if any, is raised here. An interrupt here
    stops it."""
    if os.environ.get(_INSIDE) == kernel_path():  # already in a pinned build: nested builds run here
        with deterministic():
            return fn(*args)
    env = {**KERNEL_PATHS[kernel_path()], _INSIDE: kernel_path()}
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    with environment(**env):  # the child copies the environment when it starts
        child = ctx.Process(target=_run_pinned, args=(send, fn, args), name=f"build {fn.__module__}.{fn.__name__}")
        child.start()
    send.close()
    try:
        try:
            ok, value = receive.recv()
        except EOFError:
            child.join()
            raise RuntimeError(f"the build process ended without an answer (exit code {child.exitcode})") from None
        child.join()
    except BaseException:
        child.terminate()
        child.join()
        raise
    if not ok:
        raise value
    return value


def _run_pinned(send, fn: Callable, args: tuple) -> None:
    import threading

    from tqdm import tqdm

    # tqdm's default lock is a multiprocessing semaphore: a build interrupted or terminated before its
    # finalizers run would leave it behind ("leaked semaphore objects" at exit). One process needs none.
    tqdm.set_lock(threading.RLock())
    try:
        with deterministic():
            result = fn(*args)
        send.send((True, result))
    except BaseException as e:  # handed to the parent, which raises it
        try:
            send.send((False, e))
        except Exception:  # an exception that does not pickle: its text still does
            send.send((False, RuntimeError(f"{type(e).__name__}: {e}")))
    finally:
        send.close()
