"""How good a dictionary is: reconstruction, sparsity, dead and dense features, and the language
model's loss with the dictionary spliced in (loss recovered)."""

from __future__ import annotations

import torch

from compute.dictionaries.kinds import SAE

# The metrics a catalogue stores per dictionary (dictionaries.metrics); per-feature ones go to features.
METRIC_KEYS = ("mse", "fraction_variance_explained", "l0", "dead_fraction", "dense_fraction", "n_tokens",
               "loss_clean", "loss_spliced", "loss_zero_ablated", "loss_recovered")


@torch.no_grad()
def collect_activations(model, hook_names: list[str], sentences: list[str], batch_size: int = 512) -> dict:
    """Activations at each hook for every real (non-padding) token of the sentences."""
    out: dict[str, list[torch.Tensor]] = {h: [] for h in hook_names}
    for i in range(0, len(sentences), batch_size):
        toks = model.to_tokens(sentences[i : i + batch_size], padding_side="right")
        mask = toks != model.tokenizer.pad_token_id
        _, cache = model.run_with_cache(toks, names_filter=lambda n: n in out)
        for h in hook_names:
            out[h].append(cache[h][mask])
    return {h: torch.cat(v) for h, v in out.items()}


@torch.no_grad()
def evaluate(sae: SAE, acts: torch.Tensor, targets: torch.Tensor | None = None) -> dict:
    """Quality on held-out activations (a transcoder's targets are its output hook's activations),
    and per-feature density and max activation."""
    y = acts if targets is None else targets
    f = sae.encode(acts)
    y_hat = sae.reconstruct(acts, f)
    mse = (y - y_hat).pow(2).sum(-1).mean().item()
    var = (y - y.mean(0)).pow(2).sum(-1).mean().item()
    fires = (f != 0).float()  # f > 0 for ReLU dictionaries; signed for the identity
    density = fires.mean(0)
    return {
        "mse": mse,
        "fraction_variance_explained": 1 - mse / var,
        "l0": fires.sum(-1).mean().item(),
        "dead_fraction": (density == 0).float().mean().item(),
        "dense_fraction": (density > 0.5).float().mean().item(),
        "n_tokens": len(acts),
        "density": density.tolist(),
        "max_activation": f.max(0).values.tolist(),
    }


@torch.no_grad()
def lm_loss(model, sentences: list[str], replace: dict | None = None, batch_size: int = 256) -> float:
    """Mean next-token cross-entropy over the real tokens of the sentences.

    `replace` maps an output hook to (input hook, fn): the output hook's activation
    is replaced by fn(activation at the input hook), e.g. a dictionary's reconstruction.
    """
    pad = model.tokenizer.pad_token_id
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for out_hook, (in_hook, fn) in (replace or {}).items():
        if in_hook != out_hook:
            hooks.append((in_hook, lambda x, hook: seen.__setitem__(hook.name, x)))
        hooks.append((out_hook, lambda x, hook, i_=in_hook, f_=fn: f_(seen.get(i_, x))))
    total, count = 0.0, 0
    for i in range(0, len(sentences), batch_size):
        toks = model.to_tokens(sentences[i : i + batch_size], padding_side="right")
        logits = model.run_with_hooks(toks, fwd_hooks=hooks)
        target = toks[:, 1:]
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1),
                                               ignore_index=pad, reduction="sum")
        total += ce.item()
        count += int((target != pad).sum())
    return total / count


def loss_recovered(model, sae: SAE, sentences: list[str], hook_in: str, hook_out: str | None = None,
                   clean: float | None = None) -> dict:
    """Clean loss (computed unless given: it is the same for every dictionary of a model), loss with
    the dictionary's reconstruction spliced in, loss with the hook zeroed, and the fraction of the
    zero-ablation gap the dictionary recovers: (L_zero - L_spliced) / (L_zero - L_clean)."""
    hook_out = hook_out or hook_in
    clean = lm_loss(model, sentences) if clean is None else clean
    spliced = lm_loss(model, sentences, {hook_out: (hook_in, lambda x: sae(x))})
    zero = lm_loss(model, sentences, {hook_out: (hook_out, torch.zeros_like)})
    gap = zero - clean
    return {"loss_clean": clean, "loss_spliced": spliced, "loss_zero_ablated": zero,
            "loss_recovered": (zero - spliced) / gap if gap > 0 else None}  # no gap: nothing to recover
