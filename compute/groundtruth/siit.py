"""Strict interchange intervention training (SIIT, the InterpBench recipe): a transformer trained so
that only chosen components carry the task.

The high-level causal model of `sva_planted` has two variables: S, the subject's number, and the
answer A = f(S). They are aligned with two components at the last position: S with attn_0's output
(the head that fetches the subject), A with mlp_1's output. Each step trains three losses on a
batch of base prompts b and source prompts s:

- behaviour: cross-entropy of b's answer;
- IIT: with an aligned component's output at the last position taken from s (the base run patched
  with the source's activation), the answer must become what the high-level model answers under
  the same intervention: s's answer (A follows S);
- strict (SIIT): with a non-aligned component's output (mlp_0, attn_1; every position) taken from
  s, the answer must stay b's.

After training, the interchange accuracies on every (base, source) pair are measured and saved with
the model (`siit.json`): how often an aligned patch gives the source's answer, and how often a
non-aligned patch leaves the base's.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from catalog.progress import hidden
from compute.groundtruth.planted import LAST, VOCABULARY, Component, Truth, prompts
from schema.sites import site

ALIGNED = {"S": site("attn", 0).hook_out, "A": site("mlp", 1).hook_out}  # patched at the last position
UNALIGNED = {"mlp_0": site("mlp", 0).hook_out, "attn_1": site("attn", 1).hook_out}  # patched at every position


@dataclass(frozen=True)
class SIITConfig:
    d_model: int = 32
    n_heads: int = 2
    d_mlp: int = 64
    steps: int = 200  # every interchange accuracy is 1.0 from 150 steps on
    batch_size: int = 64
    lr: float = 3e-3
    strict_weight: float = 1.0  # weight of the strict loss beside behaviour and IIT (each 1)
    seed: int = 0


def siit_truth() -> Truth:
    components = (
        Component("attn_0", "attn_0", True, "aligned with S: carries the subject's number to the last position"),
        Component("mlp_0", "mlp_0", False, "trained not to matter (strict loss)"),
        Component("attn_1", "attn_1", False, "trained not to matter (strict loss)"),
        Component("mlp_1", "mlp_1", True, "aligned with A: writes the answer at the last position"),
    )
    return Truth(components, circuit_sites=("embed", "attn_0", "resid_0", "mlp_1", "resid_1"))


def _config(cfg: SIITConfig, d_vocab: int):
    from transformer_lens import HookedTransformerConfig

    from compute.groundtruth.planted import N_CTX

    return HookedTransformerConfig(
        n_layers=2, d_model=cfg.d_model, n_heads=cfg.n_heads, d_head=cfg.d_model // cfg.n_heads, d_mlp=cfg.d_mlp,
        n_ctx=N_CTX, d_vocab=d_vocab, act_fn="gelu", normalization_type="LN", positional_embedding_type="standard",
        default_prepend_bos=True, seed=cfg.seed, model_name="planted-siit")


def _data(model) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [N, T] of every distinct prompt, the answer token of each [N])."""
    texts = prompts()
    subject_plural = torch.tensor([t.split()[1].endswith("s") for t in texts])
    tok = model.tokenizer.convert_tokens_to_ids
    answers = torch.where(subject_plural, tok("are"), tok("is"))
    return model.to_tokens(texts), answers


INTERVENTIONS = [(h, True) for h in ALIGNED.values()] + [(h, False) for h in UNALIGNED.values()]


def _patched_runs(model, tokens: torch.Tensor, source: dict[str, torch.Tensor]) -> torch.Tensor:
    """Last-position logits [1 + len(INTERVENTIONS), B, vocab] of one forward pass over the prompts repeated:
    block 0 unpatched, block k with intervention k (the hook's value taken from `source`, at the last
    position for an aligned component, everywhere for another)."""
    k, n = 1 + len(INTERVENTIONS), len(tokens)

    def put(x, hook):
        x = x.clone()
        for i, (h, last_only) in enumerate(INTERVENTIONS, start=1):
            if h == hook.name:
                rows = slice(i * n, (i + 1) * n)
                if last_only:
                    x[rows, LAST] = source[h][:, LAST]
                else:
                    x[rows] = source[h]
        return x

    hooks = [(h, put) for h in {h for h, _ in INTERVENTIONS}]
    return model.run_with_hooks(tokens.repeat(k, 1), fwd_hooks=hooks)[:, -1].view(k, n, -1)


def _source_cache(model, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    hooks = {*ALIGNED.values(), *UNALIGNED.values()}
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in hooks)
    return {h: cache[h] for h in hooks}


def train_siit(out: Path, cfg: SIITConfig = SIITConfig(), progress: bool = True) -> None:
    """Train the SIIT model and save it (with `siit.json`: the settings and the measured interchange
    accuracies) into `out`."""
    from transformer_lens import HookedTransformer

    from compute.models.zoo import build_tokenizer, save_model

    torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer(out / "tokenizer", VOCABULARY)
    model = HookedTransformer(_config(cfg, len(tokenizer)), tokenizer=tokenizer)
    tokens, answers = _data(model)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    ce = torch.nn.functional.cross_entropy
    model.train()
    bar = tqdm(range(cfg.steps), desc="training the SIIT model", disable=hidden(progress), unit="step")
    for _ in bar:
        b = torch.randint(len(tokens), (cfg.batch_size,), generator=gen)
        s = torch.randint(len(tokens), (cfg.batch_size,), generator=gen)
        logits = _patched_runs(model, tokens[b], _source_cache(model, tokens[s]))
        behaviour = ce(logits[0], answers[b])
        iit = sum(ce(logits[i], answers[s]) for i in range(1, 1 + len(ALIGNED)))
        strict = sum(ce(logits[i], answers[b]) for i in range(1 + len(ALIGNED), len(logits)))
        loss = behaviour + iit / len(ALIGNED) + cfg.strict_weight * strict / len(UNALIGNED)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    save_model(model, out)
    (out / "siit.json").write_text(json.dumps({"config": asdict(cfg), **interchange_accuracies(model)}, indent=1))


@torch.no_grad()
def interchange_accuracies(model) -> dict:
    """On every (base, source) pair of prompts: the accuracy, and for each aligned component how often
    patching it from the source gives the source's answer (interchange intervention accuracy), for each
    non-aligned one how often it leaves the base's answer."""
    tokens, answers = _data(model)
    n = len(tokens)
    b, s = torch.arange(n).repeat_interleave(n), torch.arange(n).repeat(n)
    logits = _patched_runs(model, tokens[b], _source_cache(model, tokens[s]))
    tok = model.tokenizer.convert_tokens_to_ids
    pair = torch.tensor([tok("is"), tok("are")])
    says = pair[logits[..., pair].argmax(-1)]  # the preferred verb's token [1 + interventions, pairs]
    out = {"accuracy": float((says[0] == answers[b]).float().mean())}
    for i, name in enumerate([*(f"iia_{a}" for a in ALIGNED), *(f"unchanged_{u}" for u in UNALIGNED)], start=1):
        expected = answers[s] if name.startswith("iia") else answers[b]
        out[name] = float((says[i] == expected).float().mean())
    return out
