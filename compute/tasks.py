"""Tasks: contrastive prompt datasets in the Sparse Feature Circuits JSONL format.

Each line is `{"clean_prefix", "patch_prefix", "clean_answer", "patch_answer",
"case"}` (an optional `"split"`: train or test; default train). Files from the
Sparse Feature Circuits repository load as they are.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from catalog.errors import UserError

REQUIRED = ("clean_prefix", "clean_answer")
PATCH = ("patch_prefix", "patch_answer")  # optional, together: without them the patch is zero ablation
SPLITS = ("train", "test")


@dataclass
class Task:
    """A named list of contrastive examples."""

    name: str
    examples: list[dict[str, str]]
    source: str = ""
    description: str = ""

    @property
    def content_hash(self) -> str:
        blob = "\n".join(json.dumps(e, sort_keys=True) for e in self.examples).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def has_patch(self) -> bool:
        """Whether examples come with patch prompts (else the patch state is zero ablation)."""
        return all("patch_prefix" in e for e in self.examples)

    def split(self, split: str) -> list[tuple[int, dict[str, str]]]:
        """(example_idx, example) pairs of one split."""
        return [(i, e) for i, e in enumerate(self.examples) if e.get("split", "train") == split]


def load_task_file(path: str | Path, name: str | None = None) -> Task:
    """Read and validate a task file; a bad line raises UserError naming the line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"task file not found: {path}")
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            examples.append(parse_example(line, f"{path}:{lineno}"))
            if ("patch_prefix" in examples[-1]) != ("patch_prefix" in examples[0]):
                raise UserError(f"{path}:{lineno}: mixes examples with and without a patch prompt")
    if not examples:
        raise UserError(f"task file {path} has no examples")
    return Task(name=name or path.stem, examples=examples, source=str(path))


def parse_example(line: str, where: str) -> dict[str, str]:
    """One JSONL line -> example dict, or UserError saying what is wrong and where."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object")
    missing = [k for k in REQUIRED if k not in obj]
    if missing:
        raise UserError(f"{where}: missing field(s) {', '.join(missing)}")
    if sum(k in obj for k in PATCH) == 1:
        raise UserError(f"{where}: patch_prefix and patch_answer come together (or both are left out)")
    for k in (*REQUIRED, *PATCH, "case", "split"):
        if k in obj and not isinstance(obj[k], str):
            raise UserError(f"{where}: field {k} must be a string")
    if obj.get("split", "train") not in SPLITS:
        raise UserError(f"{where}: split must be one of {', '.join(SPLITS)}")
    return {k: obj[k] for k in (*REQUIRED, *PATCH, "case", "split") if k in obj}


def write_task_file(task: Task, path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for e in task.examples:
            f.write(json.dumps(e) + "\n")


@dataclass
class Batch:
    """Tokenised examples of one length: clean and patch prompts and answer token ids."""

    example_idx: torch.Tensor  # [B]
    clean: torch.Tensor  # [B, T]
    patch: torch.Tensor | None  # [B, T]; None for a task without patch prompts
    clean_answer: torch.Tensor  # [B]
    patch_answer: torch.Tensor | None  # [B]

    def __len__(self) -> int:
        return len(self.example_idx)


@dataclass
class Encoded:
    """A task split ready for the model: batches by length, and what was dropped and why."""

    batches: list[Batch]
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def n_examples(self) -> int:
        return sum(len(b) for b in self.batches)


def encode(model, task: Task, split: str = "train", limit: int | None = None,
           one_length: bool = False) -> Encoded:
    """Tokenise a split, dropping examples the methods cannot use (as SFC does).

    An example is dropped when an answer is not a single token, or the clean and
    patch prompts differ in length. Kept examples are grouped by length so that
    the metric reads the last position of every row. With `one_length` (what
    per-position aggregation needs) only the shortest prompts are kept, as SFC's
    loader does; longer ones are dropped and counted. `limit` caps the examples kept.
    """
    rows: list[tuple[int, list[int], list[int], int, int]] = []
    dropped: dict[str, int] = {}
    for idx, ex in task.split(split):
        clean = model.to_tokens(ex["clean_prefix"])[0].tolist()
        patch = model.to_tokens(ex["patch_prefix"])[0].tolist() if "patch_prefix" in ex else clean
        answers = [_single_token(model, ex[k]) for k in ("clean_answer", "patch_answer") if k in ex]
        if None in answers:
            reason = "answer is not a single token"
        elif len(clean) != len(patch):
            reason = "clean and patch prompts differ in length"
        elif len(clean) > model.cfg.n_ctx:
            reason = "prompt longer than the model's context"
        else:
            rows.append((idx, clean, patch, *answers))
            continue
        dropped[reason] = dropped.get(reason, 0) + 1
    if one_length and rows:
        shortest = min(len(r[1]) for r in rows)
        longer = sum(len(r[1]) > shortest for r in rows)
        if longer:
            dropped[f"longer than the shortest prompt ({shortest} tokens; aggregation none needs one length)"] = longer
        rows = [r for r in rows if len(r[1]) == shortest]
    groups: dict[int, list] = {}
    for r in rows[:limit]:
        groups.setdefault(len(r[1]), []).append(r)
    batches = []
    for _, group in sorted(groups.items()):
        if task.has_patch:
            idx, clean, patch, ca, pa = zip(*group, strict=True)
            batches.append(Batch(torch.tensor(idx), torch.tensor(clean), torch.tensor(patch),
                                 torch.tensor(ca), torch.tensor(pa)))
        else:
            idx, clean, _, ca = zip(*group, strict=True)
            batches.append(Batch(torch.tensor(idx), torch.tensor(clean), None, torch.tensor(ca), None))
    return Encoded(batches, dropped)


def _single_token(model, answer: str) -> int | None:
    ids = model.to_tokens(answer, prepend_bos=False)[0].tolist()
    return ids[0] if len(ids) == 1 else None
