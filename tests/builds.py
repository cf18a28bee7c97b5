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
