"""Sparse dictionaries: a standard SAE (ReLU, L1, unit-norm decoder rows) in the SAELens format.

An SAE maps an activation x to features f = ReLU((x - b_dec) W_enc + b_enc) and
reconstructs x_hat = f W_dec + b_dec. `save_dictionary` writes `cfg.json` and
`sae_weights.safetensors` so that `sae_lens.SAE.load_from_disk` loads it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from catalog.errors import UserError
from compute.cache import cached_dir, config_hash, file_hash


@dataclass(frozen=True)
class Submodule:
    """A place in the model where a dictionary is spliced in."""

    component: str  # embed | attn | mlp | resid
    layer: int  # -1 for the embedding
    hook_name: str

    @property
    def name(self) -> str:
        return "embed" if self.component == "embed" else f"{self.component}_{self.layer}"


def submodules(model) -> list[Submodule]:
    """The embedding and attn_out, mlp_out, resid_post of every layer, in forward order."""
    subs = [Submodule("embed", -1, "blocks.0.hook_resid_pre")]
    for layer in range(model.cfg.n_layers):
        subs += [Submodule("attn", layer, f"blocks.{layer}.hook_attn_out"),
                 Submodule("mlp", layer, f"blocks.{layer}.hook_mlp_out"),
                 Submodule("resid", layer, f"blocks.{layer}.hook_resid_post")]
    return subs


class SAE(torch.nn.Module):
    """Standard ReLU sparse autoencoder."""

    architecture = "standard"

    def __init__(self, d_in: int, d_sae: int, hook_name: str = "", model_name: str = ""):
        super().__init__()
        self.d_in, self.d_sae = d_in, d_sae
        self.hook_name, self.model_name = hook_name, model_name
        self.W_enc = torch.nn.Parameter(torch.empty(d_in, d_sae))
        self.W_dec = torch.nn.Parameter(torch.empty(d_sae, d_in))
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae))
        self.b_dec = torch.nn.Parameter(torch.zeros(d_in))
        torch.nn.init.kaiming_uniform_(self.W_dec)
        self.normalize_decoder()
        with torch.no_grad():
            self.W_enc.copy_(self.W_dec.T)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))


class IdentityDictionary(SAE):
    """Neurons as features: encode and decode are the identity (signed values, no ReLU).

    The baseline that shows what a learned dictionary buys: a circuit over the
    hook's own basis, with an error term that is always zero.
    """

    architecture = "identity"

    def __init__(self, d_in: int, hook_name: str = "", model_name: str = ""):
        super().__init__(d_in, d_in, hook_name, model_name)
        with torch.no_grad():
            self.W_enc.copy_(torch.eye(d_in))
            self.W_dec.copy_(torch.eye(d_in))
        for p in self.parameters():
            p.requires_grad_(False)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc


# ---- SAELens on-disk format ---------------------------------------------------------------

def save_dictionary(sae: SAE, path: Path, extra: dict | None = None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    cfg = {
        "architecture": sae.architecture, "d_in": sae.d_in, "d_sae": sae.d_sae,
        "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
        "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {"hook_name": sae.hook_name, "model_name": sae.model_name, **(extra or {})},
    }
    (path / "cfg.json").write_text(json.dumps(cfg, indent=1))
    save_file({k: v.detach().contiguous() for k, v in sae.state_dict().items()},
              str(path / "sae_weights.safetensors"))


def load_dictionary(path: Path) -> SAE:
    """Load a standard SAE saved in the SAELens format (or an identity dictionary, same layout)."""
    cfg_file = path / "cfg.json"
    if not cfg_file.is_file():
        raise UserError(f"no dictionary at {path} (cfg.json missing)")
    cfg = json.loads(cfg_file.read_text())
    arch = cfg.get("architecture", "standard")
    if arch not in ("standard", "identity"):
        raise UserError(f"{path}: architecture {arch!r} is not supported yet")
    meta = cfg.get("metadata", {})
    names = (meta.get("hook_name", cfg.get("hook_name", "")), meta.get("model_name", cfg.get("model_name", "")))
    sae = IdentityDictionary(cfg["d_in"], *names) if arch == "identity" else SAE(cfg["d_in"], cfg["d_sae"], *names)
    sae.load_state_dict(load_file(str(path / "sae_weights.safetensors")))
    for p in sae.parameters():
        p.requires_grad_(False)
    return sae


def check_fits(sae: SAE, model, sub: Submodule) -> None:
    """Refuse a dictionary whose input width does not match its hook."""
    width = model.cfg.d_model
    if sae.d_in != width:
        raise UserError(f"dictionary for {sub.hook_name} has d_in={sae.d_in}, "
                        f"but the hook has width {width}")


# ---- training ------------------------------------------------------------------------------

@dataclass(frozen=True)
class SAEConfig:
    expansion: int = 8
    l1_coefficient: float = 1.0
    steps: int = 2000
    batch_size: int = 1024
    lr: float = 2e-3
    resample_every: int = 500
    seed: int = 0
    corpus_sentences: int = 12_000
    version: int = 1


def train_sae(acts: torch.Tensor, cfg: SAEConfig, hook_name: str, model_name: str,
              progress: bool = True) -> SAE:
    """Train one SAE on a [N, d_in] activation matrix.

    Inputs are scaled so that E||x||^2 = d_in while training; the scale is folded
    back into the biases afterwards, so the saved SAE takes raw activations,
    keeps unit-norm decoder rows, and reports features in raw units.
    Features that have not fired since the last check are re-initialised
    towards badly reconstructed inputs (dead-feature resampling).
    """
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    n, d_in = acts.shape
    scale = (d_in / acts.pow(2).sum(1).mean()).sqrt().item()
    x_all = acts * scale
    sae = SAE(d_in, d_in * cfg.expansion, hook_name, model_name)
    with torch.no_grad():
        sae.b_dec.copy_(x_all.median(0).values)
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr)
    fired = torch.zeros(sae.d_sae, dtype=torch.bool)
    bar = tqdm(range(cfg.steps), desc=f"SAE {hook_name}", disable=not progress, unit="step", leave=False)
    for step in bar:
        x = x_all[torch.randint(0, n, (cfg.batch_size,), generator=g)]
        f = sae.encode(x)
        x_hat = sae.decode(f)
        mse = (x - x_hat).pow(2).sum(-1).mean()
        l1 = f.sum(-1).mean()
        warm = min(1.0, (step + 1) / (cfg.steps // 10))
        loss = mse + warm * cfg.l1_coefficient * l1
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():  # keep the gradient tangent to the unit-norm constraint
            d = sae.W_dec
            d.grad -= (d.grad * d).sum(1, keepdim=True) * d
        opt.step()
        sae.normalize_decoder()
        fired |= (f > 0).any(0)
        if cfg.resample_every and (step + 1) % cfg.resample_every == 0 and step + 1 < cfg.steps * 0.8:
            _resample(sae, x_all, ~fired, g)
            fired.zero_()
        if step % 50 == 0:
            bar.set_postfix(mse=f"{mse.item():.3f}", l0=f"{(f > 0).float().sum(-1).mean().item():.1f}",
                            refresh=False)
    with torch.no_grad():
        sae.b_enc.div_(scale)
        sae.b_dec.div_(scale)
    for p in sae.parameters():
        p.requires_grad_(False)
    return sae


@torch.no_grad()
def _resample(sae: SAE, x_all: torch.Tensor, dead: torch.Tensor, g: torch.Generator) -> None:
    idx = dead.nonzero().flatten()
    if len(idx) == 0:
        return
    sample = x_all[torch.randint(0, len(x_all), (8192,), generator=g)]
    err = (sample - sae(sample)).pow(2).sum(-1)
    pick = sample[torch.multinomial(err, len(idx), replacement=len(idx) > len(sample), generator=g)]
    direction = pick - sae.b_dec
    direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-8)
    alive_norm = sae.W_enc[:, ~dead].norm(dim=0).mean() if (~dead).any() else 1.0
    sae.W_dec[idx] = direction
    sae.W_enc[:, idx] = direction.T * alive_norm * 0.2
    sae.b_enc[idx] = 0.0


@torch.no_grad()
def evaluate(sae: SAE, acts: torch.Tensor) -> dict:
    """Quality metrics on held-out activations, and per-feature density and max activation."""
    f = sae.encode(acts)
    x_hat = sae.decode(f)
    mse = (acts - x_hat).pow(2).sum(-1).mean().item()
    var = (acts - acts.mean(0)).pow(2).sum(-1).mean().item()
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


@dataclass
class TrainedDictionary:
    sub: Submodule
    sae: SAE
    path: Path
    metrics: dict

    @property
    def dictionary_id(self) -> str:
        """sae-<hash> or identity-<hash> of the weights and the config (which names the hook)."""
        digest = config_hash([file_hash(self.path / "sae_weights.safetensors"), file_hash(self.path / "cfg.json")])
        return f"{'identity' if self.sae.architecture == 'identity' else 'sae'}-{digest}"


def build_dictionaries(zoo, cfg: SAEConfig | None = None, progress: bool = True) -> dict[str, TrainedDictionary]:
    """Train (or load from the cache) one SAE per submodule of the zoo model."""
    from compute import grammar

    cfg = cfg or SAEConfig()
    model = zoo.model
    subs = submodules(model)
    key = config_hash({"sae": asdict(cfg), "model": zoo.path.name})

    def build(out: Path) -> None:
        sentences = grammar.corpus(cfg.corpus_sentences, seed=cfg.seed + 1)
        acts = collect_activations(model, [s.hook_name for s in subs], sentences)
        for sub in tqdm(subs, desc="training dictionaries", disable=not progress, unit="sae"):
            a = acts[sub.hook_name]
            perm = torch.randperm(len(a), generator=torch.Generator().manual_seed(cfg.seed))
            held = max(1, len(a) // 10)
            sae = train_sae(a[perm[held:]], cfg, sub.hook_name, zoo.model_id, progress)
            metrics = evaluate(sae, a[perm[:held]])
            save_dictionary(sae, out / sub.name, {"component": sub.component, "layer": sub.layer})
            (out / sub.name / "metrics.json").write_text(json.dumps(metrics))

    return _load_all(model, subs, cached_dir("dictionaries", key, build))


def identity_dictionaries(zoo, progress: bool = True) -> dict[str, TrainedDictionary]:
    """Identity dictionaries (neurons as features) for every submodule, with their metrics."""
    from compute import grammar

    model = zoo.model
    subs = submodules(model)

    def build(out: Path) -> None:
        acts = collect_activations(model, [s.hook_name for s in subs], grammar.corpus(2000, seed=1))
        for sub in tqdm(subs, desc="identity dictionaries", disable=not progress, unit="hook"):
            d = IdentityDictionary(model.cfg.d_model, sub.hook_name, zoo.model_id)
            save_dictionary(d, out / sub.name, {"component": sub.component, "layer": sub.layer})
            (out / sub.name / "metrics.json").write_text(json.dumps(evaluate(d, acts[sub.hook_name])))

    return _load_all(model, subs, cached_dir("identity", zoo.path.name, build))


def _load_all(model, subs: list[Submodule], path: Path) -> dict[str, TrainedDictionary]:
    result = {}
    for sub in subs:
        sae = load_dictionary(path / sub.name)
        check_fits(sae, model, sub)
        metrics = json.loads((path / sub.name / "metrics.json").read_text())
        result[sub.name] = TrainedDictionary(sub, sae, path / sub.name, metrics)
    return result
