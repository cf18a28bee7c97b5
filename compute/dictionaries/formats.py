"""Dictionaries on disk: the SAELens format (saved and loaded) and dictionary_learning (imported).

SAELens: a directory with `cfg.json` and `sae_weights.safetensors`, the layout
`sae_lens.SAE.load_from_disk` reads, for the standard, topk, jumprelu and
transcoder architectures (identity dictionaries use the same layout with
architecture "identity", which only this tool reads).

dictionary_learning (Marks et al.): a directory with `ae.pt` (a state dict) and
`config.json` whose "trainer" names the dict_class: AutoEncoder, AutoEncoderTopK,
JumpReluAutoEncoder or BatchTopKSAE. Its weights are converted to ours exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from catalog.errors import UserError, first_line
from compute.dictionaries.kinds import (
    ARCHITECTURES,
    SAE,
    CrossLayerTranscoder,
    IdentityDictionary,
    JumpReLUSAE,
    TopKSAE,
    Transcoder,
)
from schema.sites import guess_site


def save_dictionary(sae: SAE, path: Path, extra: dict | None = None) -> None:
    """Write `sae` as an SAELens directory (`extra` goes into cfg.json's metadata)."""
    path.mkdir(parents=True, exist_ok=True)
    meta = {"hook_name": sae.hook_name, "model_name": sae.model_name}
    if isinstance(sae, Transcoder):
        meta["hook_name_out"] = sae.hook_name_out
    cfg = {
        "architecture": sae.architecture, "d_in": sae.d_in, "d_sae": sae.d_sae, **sae.settings(),
        "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {**meta, **(extra or {})},
    }
    if isinstance(sae, TopKSAE):
        cfg["rescale_acts_by_decoder_norm"] = False
    (path / "cfg.json").write_text(json.dumps(cfg, indent=1))
    state = sae.state_dict()
    if getattr(sae, "later_file", None):  # a CLT read lazily: its later decoders, read once to be copied
        state["W_dec_later"] = sae.later_rows(torch.arange(sae.d_sae))
    save_file({k: v.detach().float().contiguous() for k, v in state.items()}, str(path / "sae_weights.safetensors"))


def load_dictionary(path: Path) -> SAE:
    """Load an SAELens directory of a supported architecture (weights frozen, float32)."""
    path = Path(path)
    cfg_file, weights = path / "cfg.json", path / "sae_weights.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise UserError(f"no dictionary at {path} (cfg.json and sae_weights.safetensors expected)")
    try:
        cfg = json.loads(cfg_file.read_text())
        d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
        arch = cfg.get("architecture", "standard")
        meta = cfg.get("metadata") or {}
        names = (meta.get("hook_name", cfg.get("hook_name", "")), meta.get("model_name", cfg.get("model_name", "")))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{cfg_file}: not an SAELens config ({e})") from None
    if arch not in ARCHITECTURES:
        raise UserError(f"{path}: architecture {arch!r} is not supported "
                        f"(supported: {', '.join(ARCHITECTURES)})")
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise UserError(f"{path}: normalize_activations={cfg['normalize_activations']!r} is not supported")
    lazy = ARCHITECTURES.get(arch) is CrossLayerTranscoder  # its later decoders stay on disk
    try:
        with safe_open(str(weights), framework="pt") as f:
            state = {k: f.get_tensor(k).float() for k in f.keys() if not (lazy and k == "W_dec_later")}
            later_shape = f.get_slice("W_dec_later").get_shape() if lazy and "W_dec_later" in f.keys() else None
    except Exception as e:  # safetensors raises its own error type for a damaged file
        raise UserError(f"{weights}: not a readable safetensors file ({first_line(e)})") from None
    w_enc = state.get("W_enc")
    if w_enc is None or tuple(w_enc.shape) != (d_in, d_sae):  # checked before anything is allocated
        have = "no W_enc" if w_enc is None else f"W_enc of shape {tuple(w_enc.shape)}"
        raise UserError(f"{weights}: weights do not fit cfg.json (d_in {d_in}, d_sae {d_sae}; {have})")
    check_finite(state, weights)
    cls = ARCHITECTURES[arch]
    try:
        if cls is IdentityDictionary:
            sae = IdentityDictionary(d_in, *names)
        elif cls is TopKSAE:
            sae = TopKSAE(d_in, d_sae, *names, k=int(cfg.get("k", 100)))
        elif issubclass(cls, Transcoder):
            later = {"n_later": int(cfg.get("n_later", 0))} if cls is CrossLayerTranscoder else {}
            sae = cls(d_in, d_sae, *names, d_out=int(cfg.get("d_out", d_in)),
                      hook_name_out=meta.get("hook_name_out", cfg.get("hook_name_out", "")), **later)
        else:
            sae = cls(d_in, d_sae, *names)
    except (ValueError, TypeError) as e:
        raise UserError(f"{cfg_file}: not an SAELens config ({e})") from None
    if not issubclass(cls, Transcoder | IdentityDictionary):
        sae.apply_b_dec_to_input = bool(cfg.get("apply_b_dec_to_input", True))
    if cls is TopKSAE and cfg.get("rescale_acts_by_decoder_norm"):
        raise UserError(f"{path}: topk with rescale_acts_by_decoder_norm is not supported; fold the decoder "
                        "norms first")
    if lazy:
        if later_shape != [d_sae, sae.n_later, sae.d_out]:
            raise UserError(f"{weights}: W_dec_later of shape {later_shape} does not fit cfg.json")
        sae.lazily(str(weights), "W_dec_later", 0)
        state["W_dec_later"] = sae.W_dec_later
        if not sae.later_finite():
            raise UserError(f"{weights}: W_dec_later holds NaN or infinite values")
    try:
        sae.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{weights}: weights do not fit cfg.json ({first_line(e)})") from None
    for p in sae.parameters():
        p.requires_grad_(False)
    return sae


def check_finite(state: dict[str, torch.Tensor], where: Path) -> None:
    """Refuse weights with NaN or infinite values: every number computed from them would be NaN."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise UserError(f"{where}: weights {', '.join(sorted(bad))} hold NaN or infinite values")



# ---- dictionary_learning ---------------------------------------------------------------------

DICTIONARY_LEARNING_CLASSES = ("AutoEncoder", "AutoEncoderTopK", "JumpReluAutoEncoder", "BatchTopKSAE")

def import_dictionary_learning(path: Path, hook_name: str | None = None, model_name: str = "") -> SAE:
    """Read a dictionary_learning directory (`ae.pt` + `config.json`) as one of our dictionaries.

    The hook is `hook_name`, or guessed from the trainer's submodule_name and layer
    (embed, resid, attn or mlp); decoder rows are made unit-norm with the scale
    moved into the encoder, which leaves every reconstruction unchanged.
    """
    path = Path(path)
    try:
        trainer = json.loads((path / "config.json").read_text())["trainer"]
        state = torch.load(path / "ae.pt", map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise UserError(f"{path}: not a dictionary_learning directory ({Path(e.filename).name} missing)") from None
    except Exception as e:  # torch.load's errors on a damaged file are of many types (pickle, zip, EOF)
        raise UserError(f"{path}: cannot read the dictionary_learning files ({first_line(e)})") from None
    if not isinstance(trainer, dict) or not isinstance(state, dict):
        raise UserError(f"{path}: config.json's trainer and ae.pt's state must both be dictionaries")
    cls = trainer.get("dict_class")
    if cls not in DICTIONARY_LEARNING_CLASSES:
        raise UserError(f"{path}: dict_class {cls!r} is not supported (supported: "
                        f"{', '.join(DICTIONARY_LEARNING_CLASSES)})")
    hook = hook_name or _guess_hook(trainer, path)
    model_name = model_name or str(trainer.get("lm_name", ""))
    state = {k: v.detach().float() for k, v in state.items() if isinstance(v, torch.Tensor)}
    check_finite(state, path / "ae.pt")
    try:
        if cls == "JumpReluAutoEncoder":
            W_enc, b_enc, W_dec, b_dec = state["W_enc"], state["b_enc"], state["W_dec"], state["b_dec"]
            threshold = state["threshold"]
        else:
            W_enc, b_enc = state["encoder.weight"].T, state["encoder.bias"]
            W_dec = state["decoder.weight"].T
            b_dec = state["bias"] if cls == "AutoEncoder" else state["b_dec"]
    except KeyError as e:
        raise UserError(f"{path / 'ae.pt'}: {cls} weight {e.args[0]!r} missing") from None
    d_in, d_sae = W_enc.shape
    if int(trainer.get("activation_dim", d_in)) != d_in or int(trainer.get("dict_size", d_sae)) != d_sae:
        raise UserError(f"{path}: config.json says {trainer.get('activation_dim')}x{trainer.get('dict_size')}, "
                        f"ae.pt holds {d_in}x{d_sae}")
    if cls == "AutoEncoderTopK":
        sae: SAE = TopKSAE(d_in, d_sae, hook, model_name, k=int(state.get("k", trainer.get("k"))))
    elif cls in ("JumpReluAutoEncoder", "BatchTopKSAE"):
        sae = JumpReLUSAE(d_in, d_sae, hook, model_name)
        sae.apply_b_dec_to_input = cls == "BatchTopKSAE"
    else:
        sae = SAE(d_in, d_sae, hook, model_name)
    if cls == "BatchTopKSAE":  # at inference: ReLU above one threshold shared by every feature
        if float(state["threshold"]) < 0:
            raise UserError(f"{path}: BatchTopKSAE has no inference threshold yet (threshold < 0)")
        threshold = torch.full((d_sae,), float(state["threshold"]))
    if cls != "AutoEncoderTopK":  # rescaling would change which k are largest, so TopK keeps its norms
        # unit decoder rows, the norm moved into the encoder: reconstructions are unchanged, and
        # feature values equal JumpReluAutoEncoder's own (its encode multiplies by the norm)
        norms = W_dec.norm(dim=1).clamp_min(1e-12)
        W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]
        if cls in ("JumpReluAutoEncoder", "BatchTopKSAE"):
            threshold = threshold * norms
    with torch.no_grad():
        for name, value in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec)):
            getattr(sae, name).copy_(value)
        if isinstance(sae, JumpReLUSAE):
            sae.threshold.copy_(threshold)
    for p in sae.parameters():
        p.requires_grad_(False)
    return sae


def _guess_hook(trainer: dict, path: Path) -> str:
    name, layer = str(trainer.get("submodule_name") or ""), trainer.get("layer")
    try:
        found = guess_site(name, layer)
    except (TypeError, ValueError):
        found = None
    if found is None:
        raise UserError(f"{path}: cannot tell which hook submodule {name!r} (layer {layer}) is; pass --hook")
    return found.hook_out
