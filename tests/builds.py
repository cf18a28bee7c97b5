"""Functions the build tests run in a pinned child process (`compute.cache.pinned`); the child
imports this module, so it imports nothing heavy at its top."""

from __future__ import annotations


def kernels() -> tuple:
    """What a pinned build sees: PyTorch's CPU capability, MKL's path, threads, determinism."""
    import os

    import torch

    return (torch.backends.cpu.get_cpu_capability().lower(), os.environ.get("MKL_CBWR"), torch.get_num_threads(),
            torch.are_deterministic_algorithms_enabled())


def tiny_training_hash() -> str:
    """sha256 of the weights of a 30-step zoo training."""
    import hashlib
    import tempfile
    from pathlib import Path

    from compute.models.zoo import ZooConfig, build_tokenizer, train

    with tempfile.TemporaryDirectory() as tmp:
        model = train(ZooConfig(steps=30, train_sentences=1000, batch_size=32), build_tokenizer(Path(tmp)), False)
    return hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()


def fail():
    from catalog.errors import UserError

    raise UserError("raised in the build")


def slow_build(folder, log: str) -> None:
    """A cache build that takes a second and notes each time it runs (one line per run in `log`)."""
    import os
    import time
    from pathlib import Path

    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(1.0)
    (Path(folder) / "built").write_text("yes")


def ask_for_slow_build(cache: str, log: str) -> str:
    """What one process does: ask the cache for the entry `slow_build` makes."""
    import os

    os.environ["CIRCUIT_CACHE"] = cache
    from compute.cache import cached_dir

    return str(cached_dir("slow", "one-key", slow_build, log, pin=False))


def slow_bar() -> None:
    """A build that shows a progress bar (tqdm's lock) for a minute, to be interrupted."""
    import time

    from tqdm import tqdm

    for _ in tqdm(range(600), desc="slow"):
        time.sleep(0.1)
