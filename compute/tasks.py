"""Tasks: contrastive prompt datasets in the Sparse Feature Circuits JSONL format.

Each line is `{"clean_prefix", "patch_prefix", "clean_answer", "patch_answer",
"case"}` (an optional `"split"`: train or test; default train). Files from the
Sparse Feature Circuits repository load as they are.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import partial
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
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read task file {path}: {e.strerror}") from None
    examples = []
    for lineno, raw in enumerate(data.splitlines(), start=1):
        try:
            line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a byte-order mark is no error
        except UnicodeDecodeError as e:
            raise UserError(f"{path}:{lineno}: not UTF-8 text (byte {e.start + 1} of the line)") from None
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

    def rebatched(self, size_of) -> Encoded:
        """The same examples in batches of at most `size_of(length)` examples each."""
        out = []
        for b in self.batches:
            k = max(1, int(size_of(b.clean.shape[1])))
            for i in range(0, len(b), k):
                out.append(Batch(*(None if t is None else t[i : i + k] for t in
                                   (b.example_idx, b.clean, b.patch, b.clean_answer, b.patch_answer))))
        return Encoded(out, self.dropped)


def tokenize(model, text: str, bos: bool = True) -> list[int]:
    """Token ids of a text, never cut to the model's context (TransformerLens cuts by default)."""
    return model.to_tokens(text, prepend_bos=bos, truncate=False)[0].tolist()


def str_tokens(model, text: str) -> list[str]:
    """The prompt's tokens as strings, BOS first, as TransformerLens spells them (not cut)."""
    return model.tokenizer.batch_decode([[i] for i in tokenize(model, text)], clean_up_tokenization_spaces=False)


def unknown_token(model) -> int | None:
    """The id words the tokenizer does not know become, or None where it has none of its own.

    GPT-2's `unk_token` is its end-of-text token, which byte-level BPE never produces
    for text, so a tokenizer whose unknown token is its BOS, EOS or padding token has none."""
    tok = model.tokenizer
    unk = getattr(tok, "unk_token_id", None)
    special = {getattr(tok, f"{k}_token_id", None) for k in ("bos", "eos", "pad")}
    return None if unk is None or unk in special else unk


def encode(model, task: Task, split: str = "train", limit: int | None = None,
           one_length: bool = False) -> Encoded:
    """Tokenise a split, dropping (and counting, by reason) the examples the methods cannot use.

    An example is dropped when a prompt has a word the tokenizer does not know (it would
    become the unknown token), an answer is not a single known token, both answers are the
    same token, the clean and patch prompts differ in length (as SFC does), or a prompt is
    longer than the model's context. Kept examples are grouped by length so that the metric
    reads the last position of every row. With `one_length` (what per-position aggregation
    needs) only the shortest prompts are kept, as SFC's loader does; longer ones are dropped
    and counted. `limit` caps the examples kept.
    """
    if limit is not None and limit < 1:
        raise UserError(f"the number of examples must be at least 1, not {limit}")
    unk = unknown_token(model)
    rows: list[tuple[int, list[int], list[int], int, int]] = []
    dropped: dict[str, int] = {}
    for idx, ex in task.split(split):
        clean = tokenize(model, ex["clean_prefix"])
        patch = tokenize(model, ex["patch_prefix"]) if "patch_prefix" in ex else clean
        answers = [_single_token(model, ex[k], unk) for k in ("clean_answer", "patch_answer") if k in ex]
        if unk is not None and (unk in clean[1:] or unk in patch[1:]):
            reason = "prompt has words the tokenizer does not know"
        elif None in answers:
            reason = "answer is not a single known token"
        elif len(answers) == 2 and answers[0] == answers[1]:
            reason = "clean and patch answers are the same token"
        elif len(clean) != len(patch):
            reason = "clean and patch prompts differ in length"
        elif len(clean) > model.cfg.n_ctx:
            reason = f"prompt longer than the model's context ({model.cfg.n_ctx} tokens)"
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
    on = partial(torch.tensor, device=model_device(model))  # tokens and answers where the model is
    for _, group in sorted(groups.items()):
        if task.has_patch:
            idx, clean, patch, ca, pa = zip(*group, strict=True)
            batches.append(Batch(torch.tensor(idx), on(clean), on(patch), on(ca), on(pa)))
        else:
            idx, clean, _, ca = zip(*group, strict=True)
            batches.append(Batch(torch.tensor(idx), on(clean), None, on(ca), None))
    return Encoded(batches, dropped)


def model_device(model) -> torch.device:
    """The device a model's weights are on (where its inputs and accumulators belong)."""
    return next(model.parameters()).device


def _single_token(model, answer: str, unk: int | None) -> int | None:
    ids = tokenize(model, answer, bos=False)
    return ids[0] if len(ids) == 1 and ids[0] != unk else None
