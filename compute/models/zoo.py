"""The zoo: the embedded default model, a small transformer trained here on the zoo grammar.

`build_zoo()` returns the model, its tokenizer and the zoo task files, all cached
under a hash of their configuration and rebuilt only when it changes. Training is
seeded and runs on pinned, deterministic kernels (`compute.cache.pinned`), so a given
configuration gives the same weights on every machine.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from catalog.progress import hidden
from compute.cache import cache_path, cached_dir, config_hash, file_hash
from compute.models import grammar
from compute.models.handle import ModelHandle, jsonable
from compute.tasks import Task, load_task_file, write_task_file

SPECIAL_TOKENS = ["<pad>", "<bos>", "<unk>"]


@dataclass(frozen=True)
class ZooConfig:
    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    d_mlp: int = 256
    n_ctx: int = 24
    train_sentences: int = 120_000
    steps: int = 1500  # 1000 already gets every test prompt right, but IG then agrees less with single-node
    # patching (pooled r 0.888 on sva_simple, under the test's 0.9)
    batch_size: int = 128
    lr: float = 3e-3
    seed: int = 0
    spurious_cue: bool = False  # the cued zoo: prepositions give away the subject's number
    dictionary_steps: int = 2000  # how its own dictionaries (the demo's SAEs) train
    dictionary_lr: float = 2e-3
    task_train: int = 100
    task_test: int = 60
    version: int = 4  # bump when the grammar or training changes (3: deterministic kernels; 4: pinned kernels)


def zoo_config(name: str = "default") -> ZooConfig:
    """The named zoo models: `default`, and `cued` (trained on a corpus whose prepositions give
    away the subject's number: the spurious cue of the editing demo, task sva_pp_cue)."""
    if name not in ZOOS:
        raise ValueError(f"unknown zoo {name!r}; choose from {', '.join(ZOOS)}")
    return ZOOS[name]


# The cued zoo and its dictionaries train for fewer steps: the editing demo needs a model that leans
# on the cue, not a polished one (and the test suite builds both zoos on every clean machine).
ZOOS = {"default": ZooConfig(),
        "cued": ZooConfig(spurious_cue=True, steps=800, dictionary_steps=1000, dictionary_lr=4e-3)}


@dataclass
class Zoo:
    """A built zoo: model, where it lives, and its tasks by name."""

    model: object  # HookedTransformer
    path: Path
    config: ZooConfig
    tasks: dict[str, Task]

    @property
    def name(self) -> str:
        return "zoo-cued" if self.config.spurious_cue else "zoo"

    @property
    def model_id(self) -> str:
        return f"zoo-{self.path.name}"

    @property
    def weights_hash(self) -> str:
        return file_hash(self.path / "model.safetensors")[:16]

    @cached_property
    def handle(self) -> ModelHandle:
        """The zoo model as jobs take any model (see `compute.models.handle`)."""
        return ModelHandle(self.model, self.model_id, self.name, str(self.path),
                           json.loads((self.path / "config.json").read_text()), self.weights_hash)


def build_tokenizer(out_dir: Path, vocabulary: list[str] | None = None):
    """A word-level tokenizer over a vocabulary (default: the grammar's), saved and loaded back.

    TransformerLens wants a Hugging Face tokenizer with a `name_or_path`, which a
    `save_pretrained` round trip provides.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIAL_TOKENS + (vocabulary or grammar.vocabulary())
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<bos>",
                                   pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(str(out_dir))
    return load_tokenizer(out_dir)


def load_tokenizer(path: Path):
    """A tokenizer saved by `build_tokenizer`, from its folder only (never a hub: without
    local_files_only, transformers records the environment's HF_HUB_OFFLINE in the folder it saves
    next, so two builds of one model would differ in a byte)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def model_config(cfg: ZooConfig, d_vocab: int):
    from transformer_lens import HookedTransformerConfig

    return HookedTransformerConfig(
        n_layers=cfg.n_layers, d_model=cfg.d_model, n_heads=cfg.n_heads,
        d_head=cfg.d_model // cfg.n_heads, d_mlp=cfg.d_mlp, n_ctx=cfg.n_ctx, d_vocab=d_vocab,
        act_fn="gelu", normalization_type="LN", positional_embedding_type="standard",
        default_prepend_bos=True, seed=cfg.seed, model_name="zoo",
    )


def save_model(model, out_dir: Path) -> None:
    """Model directory: config.json, model.safetensors, tokenizer files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = {k: v for k, v in model.cfg.to_dict().items() if jsonable(v)}
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=1, sort_keys=True))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / "model.safetensors"))
    model.tokenizer.save_pretrained(str(out_dir / "tokenizer"))


def load_model(path: Path):
    """Load a model directory written by `save_model`."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = json.loads((path / "config.json").read_text())
    keep = HookedTransformerConfig.__dataclass_fields__
    model = HookedTransformer(HookedTransformerConfig(**{k: v for k, v in cfg.items() if k in keep}),
                              tokenizer=load_tokenizer(path / "tokenizer"))
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model



def train(cfg: ZooConfig, tokenizer, progress: bool = True):
    """Train the zoo transformer on the grammar corpus (next-token loss, padding masked)."""
    from transformer_lens import HookedTransformer

    torch.manual_seed(cfg.seed)
    model = HookedTransformer(model_config(cfg, len(tokenizer)), tokenizer=tokenizer)
    sentences = grammar.corpus(cfg.train_sentences, cfg.seed, cue=cfg.spurious_cue)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(sentences), cfg.n_ctx), pad, dtype=torch.long)
    for i, toks in enumerate(tokenizer(sentences)["input_ids"]):  # one batched call: half the time
        toks = [tokenizer.bos_token_id, *toks]
        ids[i, : len(toks)] = torch.tensor(toks[: cfg.n_ctx])
    width = int((ids != pad).sum(1).max())
    ids = ids[:, :width]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, cfg.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    bar = tqdm(range(cfg.steps), desc="training zoo model", disable=hidden(progress), unit="step")
    for _ in bar:
        batch = ids[torch.randint(0, len(ids), (cfg.batch_size,), generator=gen)]
        logits = model(batch[:, :-1])
        target = batch[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=pad)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    return model


def make_tasks(cfg: ZooConfig) -> dict[str, Task]:
    """Every zoo task with train and test splits."""
    tasks = {}
    for name in [*grammar.TASKS, *(grammar.CUE_TASKS if cfg.spurious_cue else ())]:
        rows = list(grammar.task_examples(name, cfg.task_train + cfg.task_test, cfg.seed))
        for i, r in enumerate(rows):
            r["split"] = "train" if i < cfg.task_train else "test"
        tasks[name] = Task(name=name, examples=rows, source=f"zoo grammar v{cfg.version}",
                           description=grammar.TASK_DESCRIPTIONS[name])
    return tasks


def build_zoo(cfg: ZooConfig | None = None, progress: bool = True) -> Zoo:
    """Build (or load from the cache) the zoo model and its task files."""
    cfg = cfg or ZooConfig()
    path = cached_dir("zoo", config_hash(cfg), _build, cfg, progress)
    tasks = {}
    for f in sorted((path / "tasks").glob("*.jsonl")):
        t = load_task_file(f)
        t.source = f"zoo:{f.name}"
        t.description = grammar.TASK_DESCRIPTIONS.get(t.name, "")
        tasks[t.name] = t
    return Zoo(load_model(path), path, cfg, tasks)


def zoo_path(cfg: ZooConfig) -> Path:
    """Where the zoo of this configuration is cached (built or not)."""
    return cache_path("zoo", config_hash(cfg))


def _build(out: Path, cfg: ZooConfig, progress: bool) -> None:
    """Train the zoo model and write its folder: model, tokenizer, configuration, task files."""
    tokenizer = build_tokenizer(out / "tokenizer")
    model = train(cfg, tokenizer, progress)
    save_model(model, out)
    (out / "zoo.json").write_text(json.dumps(asdict(cfg), indent=1))
    (out / "tasks").mkdir()
    for name, task in make_tasks(cfg).items():
        write_task_file(task, out / "tasks" / f"{name}.jsonl")


@torch.no_grad()
def accuracy(model, task: Task, split: str = "test") -> float | None:
    """Fraction of prompts (clean and patch) whose own answer outscores the contrast answer
    (for a task without patch prompts: whose answer is the top prediction); None when the split
    has no usable example."""
    from compute.attribution.spliced import prompts_right
    from compute.tasks import encode

    right = total = 0
    for b in encode(model, task, split).batches:
        tokens = b.clean if b.patch is None else torch.cat([b.clean, b.patch])
        right += int(prompts_right(model(tokens)[:, -1], b).sum())
        total += len(tokens)
    return right / total if total else None
