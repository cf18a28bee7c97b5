"""Tiny random checkpoints, dictionary sets and a task file, written as a user would have them on
disk (a test and bench fixture, not part of the package).

Checkpoints are Hugging Face directories made by `transformers` itself (GPT-2, GPT-NeoX and Llama
configurations, 2 layers, d_model 32) with a saved word-level tokenizer; dictionary sets hold
random dictionaries in the SAELens layout or in the Sparse Feature Circuits Pythia layout
(dictionary_learning files under `embed`, `attn_out_layer{i}`, `mlp_out_layer{i}`, `resid_out_layer{i}`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = "the a cat cats dog dogs near by is are runs run".split()
FAMILIES = ("gpt2", "neox", "llama")
D_MODEL, N_LAYERS = 32, 2


def write_checkpoint(out: Path, family: str, seed: int = 0, d_model: int = D_MODEL, n_layers: int = N_LAYERS,
                     tokenizer: bool = True) -> Path:
    """A random checkpoint of a family in `out` (config.json, model.safetensors and tokenizer files)."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    from compute.models.zoo import SPECIAL_TOKENS, build_tokenizer

    vocab = len(SPECIAL_TOKENS) + len(WORDS)
    heads = 4
    if family == "gpt2":
        cfg, cls = GPT2Config(vocab_size=vocab, n_positions=32, n_ctx=32, n_embd=d_model, n_layer=n_layers,
                              n_head=heads, bos_token_id=1, eos_token_id=1), GPT2LMHeadModel
    elif family == "neox":  # parallel attention and MLP, rotary on a quarter of each head, as Pythia
        cfg, cls = GPTNeoXConfig(vocab_size=vocab, max_position_embeddings=32, hidden_size=d_model,
                                 num_hidden_layers=n_layers, num_attention_heads=heads, intermediate_size=4 * d_model,
                                 rotary_pct=0.25, bos_token_id=1, eos_token_id=1), GPTNeoXForCausalLM
    elif family == "llama":  # RMSNorm, gated MLP, rotary, grouped-query attention
        cfg, cls = LlamaConfig(vocab_size=vocab, max_position_embeddings=32, hidden_size=d_model,
                               num_hidden_layers=n_layers, num_attention_heads=heads, num_key_value_heads=2,
                               intermediate_size=3 * d_model, bos_token_id=1, eos_token_id=1), LlamaForCausalLM
    elif family == "qwen3":  # Llama's with RMSNorm on each head's queries and keys (QK-norm)
        from transformers import Qwen3Config, Qwen3ForCausalLM

        cfg, cls = Qwen3Config(vocab_size=vocab, max_position_embeddings=32, hidden_size=d_model,
                               num_hidden_layers=n_layers, num_attention_heads=heads, num_key_value_heads=2,
                               head_dim=d_model // heads, intermediate_size=3 * d_model, bos_token_id=1,
                               eos_token_id=1), Qwen3ForCausalLM
    elif family == "gemma2":  # post-attention and post-MLP norms, soft-capping, tied embeddings
        from transformers import Gemma2Config, Gemma2ForCausalLM

        cfg, cls = Gemma2Config(vocab_size=vocab, max_position_embeddings=32, hidden_size=d_model,
                                num_hidden_layers=n_layers, num_attention_heads=heads, num_key_value_heads=2,
                                head_dim=d_model // heads, intermediate_size=3 * d_model, sliding_window=16,
                                bos_token_id=1, eos_token_id=1, pad_token_id=0), Gemma2ForCausalLM
    else:
        raise ValueError(family)
    cfg.initializer_range = 0.2  # larger than the 0.02 of real training, so that a patch moves the metric
    torch.manual_seed(seed)
    model = cls(cfg)
    model.save_pretrained(str(out))
    if tokenizer:
        build_tokenizer(out, WORDS)
    return out


def write_task(path: Path, n: int = 12) -> Path:
    """A subject-verb agreement task in the Sparse Feature Circuits format (answers with their space),
    with one example whose answer is two tokens and one whose prompts differ in length."""
    rows = []
    nouns = [("cat", "cats"), ("dog", "dogs")]
    for i in range(n):
        (s, p), (o, _) = nouns[i % 2], nouns[(i // 2) % 2]
        prep = ("near", "by")[(i // 4) % 2]
        rows.append({"clean_prefix": f"the {s} {prep} the {o}", "patch_prefix": f"the {p} {prep} the {o}",
                     "clean_answer": " is", "patch_answer": " are", "case": "pp"})
    rows.append({"clean_prefix": "the cat near the dog", "patch_prefix": "the cats near the dog",
                 "clean_answer": " runs is", "patch_answer": " are", "case": "two-token answer"})
    rows.append({"clean_prefix": "the cat near the dog", "patch_prefix": "a the cats near the dog",
                 "clean_answer": " is", "patch_answer": " are", "case": "unequal lengths"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _random_weights(d: int, d_sae: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_sae, d, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    return W_dec.T.clone(), torch.randn(d_sae, generator=g) * 0.1, W_dec, torch.randn(d, generator=g) * 0.1


def write_sfc_set(root: Path, n_layers: int = N_LAYERS, d: int = D_MODEL, d_sae: int = 64,
                  skip: tuple[str, ...] = ()) -> Path:
    """Random dictionary_learning AutoEncoders in the Sparse Feature Circuits Pythia layout."""
    folders = ["embed"] + [f"{c}_out_layer{i}" for i in range(n_layers) for c in ("attn", "mlp", "resid")]
    for k, name in enumerate(f for f in folders if f not in skip):
        out = root / name / f"10_{d_sae}"
        out.mkdir(parents=True)
        W_enc, b_enc, W_dec, b_dec = _random_weights(d, d_sae, k)
        torch.save({"encoder.weight": W_enc.T.contiguous(), "encoder.bias": b_enc,
                    "decoder.weight": W_dec.T.contiguous(), "bias": b_dec}, out / "ae.pt")
        (out / "config.json").write_text(json.dumps({"trainer": {
            "dict_class": "AutoEncoder", "activation_dim": d, "dict_size": d_sae, "lm_name": "tiny"}}))
    return root


def write_saelens_set(root: Path, hooks: dict[str, str], d: int = D_MODEL, d_sae: int = 64) -> Path:
    """Random standard SAEs in the SAELens layout, one folder per entry (folder -> hook name)."""
    from compute.dictionaries.formats import save_dictionary
    from compute.dictionaries.kinds import SAE

    for k, (folder, hook) in enumerate(hooks.items()):
        sae = SAE(d, d_sae, hook, "tiny")
        with torch.no_grad():
            for name, value in zip(("W_enc", "b_enc", "W_dec", "b_dec"), _random_weights(d, d_sae, 100 + k),
                                   strict=True):
                getattr(sae, name).copy_(value)
        save_dictionary(sae, root / folder)
    return root


def random_local_dictionaries(model, d_sae: int, seed: int = 0, active: float = 0.3,
                              tokens: torch.Tensor | None = None) -> tuple[dict, dict]:
    """Random MLP transcoders and attention-output SAEs for every layer of a model (the local
    replacement model's dictionaries), with encoder biases set so that about `active` of the
    features fire (exactly that fraction on `tokens`, when given): ({layer: transcoder},
    {layer: attention SAE})."""
    from compute.dictionaries.kinds import SAE, TrainedDictionary, Transcoder
    from schema.sites import site, transcoder_site

    g = torch.Generator().manual_seed(seed)
    d = model.cfg.d_model

    def randomised(sae):
        with torch.no_grad():
            sae.W_enc.copy_(torch.randn(sae.W_enc.shape, generator=g) / d ** 0.5)
            sae.W_dec.copy_(torch.randn(sae.W_dec.shape, generator=g) / d ** 0.5)
            sae.b_dec.copy_(0.1 * torch.randn(sae.b_dec.shape, generator=g))
            # pre-activations are about N(0, |x|^2 / d): shift them so that a fraction `active` is positive
            sae.b_enc.fill_(-torch.distributions.Normal(0, 1).icdf(torch.tensor(1 - active)).item() * 0.5)
        return sae

    transcoders = {i: TrainedDictionary(transcoder_site(i), randomised(Transcoder(
        d, d_sae, transcoder_site(i).reads, "random", d_out=d, hook_name_out=transcoder_site(i).hook_out)), None, {})
        for i in range(model.cfg.n_layers)}
    attention = {i: TrainedDictionary(site("attn", i), randomised(SAE(d, d_sae, site("attn", i).hook_out, "random")),
                                      None, {}) for i in range(model.cfg.n_layers)}
    if tokens is not None:  # shift each encoder so that the fraction `active` of its pre-activations is positive
        every = [*transcoders.values(), *attention.values()]
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in {t.sae.hook_name for t in every})
        with torch.no_grad():
            for t in every:
                pre = t.sae.pre_activation(cache[t.sae.hook_name]).flatten()
                t.sae.b_enc -= pre.kthvalue(int(len(pre) * (1 - active))).values
    return transcoders, attention


def write_local_set(root: Path, model, prompt: str, d_sae: int = 64, seed: int = 2) -> tuple[dict, dict]:
    """Random transcoders and attention SAEs of `model` (`random_local_dictionaries`, fitted to fire on
    `prompt`) saved in the SAELens layout under `root`, one folder each, whose names say nothing (their
    configs place them); returned as well."""
    from compute.dictionaries.formats import save_dictionary

    transcoders, attention = random_local_dictionaries(model, d_sae=d_sae, seed=seed, tokens=model.to_tokens(prompt))
    for i, d in enumerate([*transcoders.values(), *attention.values()]):
        save_dictionary(d.sae, root / f"dictionary{i}")
    return transcoders, attention


def some_targets(rep, per_site: int = 4) -> list:
    """Some active features of every site (spread over positions) and a logit difference."""
    from compute.local.contributions import feature_target, logit_target

    found = []
    for name in rep.order:
        active = rep.active[name]
        for i in torch.linspace(0, len(active) - 1, per_site).long().tolist():
            found.append(feature_target(rep, name, int(active[i, 1]), int(active[i, 0])))
    return found + [logit_target(rep, 5, minus=7)]
