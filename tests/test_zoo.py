"""The zoo model, its grammar and its tasks."""

import json
from pathlib import Path

import pytest

from compute.models import grammar
from compute.models.zoo import accuracy
from compute.tasks import encode

SVA = ("sva_simple", "sva_across_pp", "sva_across_rc", "sva_within_rc")


def test_every_task_is_present_with_both_splits(zoo):
    assert set(SVA) <= set(zoo.tasks)
    assert {"pronoun_gender", "ioi"} <= set(zoo.tasks)
    for task in zoo.tasks.values():
        assert len(task.split("train")) == zoo.config.task_train
        assert len(task.split("test")) == zoo.config.task_test
        train = {json.dumps(e, sort_keys=True) for _, e in task.split("train")}
        assert not train & {json.dumps(e, sort_keys=True) for _, e in task.split("test")}


@pytest.mark.parametrize("name", list(grammar.TASKS))
def test_model_solves_every_task(zoo, name):
    assert accuracy(zoo.model, zoo.tasks[name], "test") >= 0.95


def test_task_examples_follow_the_grammar(zoo):
    ex = zoo.tasks["sva_across_rc"].examples[0]
    clean, patch = ex["clean_prefix"].split(), ex["patch_prefix"].split()
    assert clean[2:] == patch[2:] and clean[1] != patch[1] and clean[2] == "that"
    sing = {s for s, _ in grammar.NOUNS}
    assert (clean[1] in sing) == (ex["clean_answer"].strip() in {s for s, _ in grammar.INTRANSITIVE})


def test_encode_groups_by_length_and_reports_drops(zoo):
    from compute.tasks import Task

    task = Task("mixed", [
        {"clean_prefix": "the cat", "patch_prefix": "the cats", "clean_answer": " runs", "patch_answer": " run"},
        {"clean_prefix": "the cat near the dog", "patch_prefix": "the cats near the dog",
         "clean_answer": " runs", "patch_answer": " run"},
        {"clean_prefix": "the cat", "patch_prefix": "the cat near", "clean_answer": " runs", "patch_answer": " run"},
        {"clean_prefix": "the cat", "patch_prefix": "the cats", "clean_answer": " runs fast", "patch_answer": " run"},
    ])
    enc = encode(zoo.model, task)
    assert [b.clean.shape for b in enc.batches] == [(1, 3), (1, 6)]
    assert enc.dropped == {"clean and patch prompts differ in length": 1, "answer is not a single known token": 1}
    one = encode(zoo.model, task, one_length=True)  # per-position aggregation: shortest prompts only
    assert [b.clean.shape for b in one.batches] == [(1, 3)]
    assert one.dropped == {**enc.dropped,
                           "longer than the shortest prompt (3 tokens; aggregation none needs one length)": 1}


def test_zoo_is_loaded_once_more_from_the_same_place(zoo):
    from compute.models.zoo import build_zoo

    again = build_zoo(progress=False)
    assert again.path == zoo.path and again.weights_hash == zoo.weights_hash


def test_training_is_bit_reproducible_at_any_thread_count(tmp_path):
    """Two trainings of one configuration, at 1 and 2 threads, give identical weights."""
    import torch

    from compute.cache import deterministic
    from compute.models.zoo import ZooConfig, build_tokenizer, train

    cfg = ZooConfig(steps=40, train_sentences=2000, batch_size=32)
    tok = build_tokenizer(tmp_path / "tok")
    threads = torch.get_num_threads()
    weights = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            with deterministic():
                weights.append([p.detach().clone() for p in train(cfg, tok, progress=False).parameters()])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*weights, strict=True))


def test_a_few_dozen_training_steps_lower_the_loss(tmp_path):
    """The zoo's training on a tiny configuration: held-out next-token loss falls from the
    initialisation (the released zoo is what `cli.py zoo build` trains at full size)."""
    import torch
    from transformer_lens import HookedTransformer

    from compute.cache import deterministic
    from compute.dictionaries.metrics import lm_loss
    from compute.models.zoo import ZooConfig, build_tokenizer, model_config, train

    cfg = ZooConfig(steps=40, train_sentences=2000, batch_size=32)
    tok = build_tokenizer(tmp_path / "tok")
    held = grammar.corpus(200, seed=7)
    torch.manual_seed(cfg.seed)
    initial = HookedTransformer(model_config(cfg, len(tok)), tokenizer=tok).eval()
    with deterministic():
        trained = train(cfg, tok, progress=False)
    with torch.no_grad():
        before, after = lm_loss(initial, held), lm_loss(trained, held)
    assert after < 0.7 * before, (before, after)


def test_processes_that_want_one_cache_entry_at_once_build_it_once(tmp_path):
    """Four processes ask for the same missing entry at the same moment (test workers, a sweep's first
    jobs on a clean machine): one builds it, the others wait for it, and all get the same folder."""
    import multiprocessing as mp

    from builds import ask_for_slow_build

    log = tmp_path / "builds.log"
    with mp.get_context("spawn").Pool(4) as pool:
        folders = pool.starmap(ask_for_slow_build, [(str(tmp_path / "cache"), str(log))] * 4)
    assert len(set(folders)) == 1 and (Path(folders[0]) / "built").read_text() == "yes"
    assert len(log.read_text().splitlines()) == 1  # built once
    assert [p.name for p in (tmp_path / "cache" / "slow").iterdir() if not p.name.endswith(".lock")] == [
        Path(folders[0]).name]  # no temporary folder left behind


def test_builds_run_on_the_pinned_kernels():
    from builds import fail, kernels

    from catalog.errors import UserError
    from compute.cache import KERNEL_PATHS, kernel_path, pinned

    env = KERNEL_PATHS[kernel_path()]
    assert pinned(kernels) == (env["ATEN_CPU_CAPABILITY"], env["MKL_CBWR"], 2, True)
    with pytest.raises(UserError, match="raised in the build"):
        pinned(fail)


def test_a_build_does_not_depend_on_the_kernels_the_caller_forces(tmp_path):
    """The same seeded training, started from processes forced onto other PyTorch kernels (as
    other processors would run), gives bit-identical weights: the build pins its own."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from builds import tiny_training_hash

    from compute.cache import pinned

    root = Path(__file__).resolve().parent.parent
    code = "from compute.cache import pinned; from tests.builds import tiny_training_hash; " \
           "print(pinned(tiny_training_hash))"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1"}  # this one: the processor's own
    forced = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=root, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)  # runs beside this process's own build
    here = pinned(tiny_training_hash)
    out, err = forced.communicate(timeout=300)
    assert forced.returncode == 0, err
    assert out.strip() == here
