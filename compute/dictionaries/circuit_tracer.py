"""circuit-tracer's transcoder sets from a local directory (what `circuit_tracer.utils.hf_utils`
downloads, read here without a hub).

A set is a folder with circuit-tracer's `config.yaml` (`model_kind: transcoder_set`;
`feature_input_hook` and `feature_output_hook`, the hooks within a block that the transcoders read,
the normalised MLP input or the residual stream before it, and write, the MLP output) and one
transcoder per layer:

- `layer_{i}.safetensors` (circuit-tracer's own `SingleLayerTranscoder.to_safetensors`): `W_enc` and
  `W_dec` [d_transcoder, d_model], `b_enc` [d_transcoder], `b_dec` [d_model], for a JumpReLU
  transcoder `activation_function.threshold` [d_transcoder], and for a skip transcoder `W_skip`
  [d_model, d_model] (applied as x W_skip^T);
- Gemma Scope's `params.npz` under a folder naming its layer (`layer_{i}/...`): `W_enc` [d_model,
  d_transcoder], `W_dec`, `b_enc`, `b_dec`, `threshold`.

Each becomes a transcoder of this catalogue (ReLU, or JumpReLU with the threshold, each with its
skip connection if it has one), reading `blocks.{i}.{feature_input_hook}` and writing
`blocks.{i}.{feature_output_hook}`, with the same numbers (the encoder and skip transposed where the
layouts differ). A cross-layer transcoder (`model_kind: cross_layer_transcoder`: per layer i,
`W_enc_{i}.safetensors` with `W_enc_{i}`, `b_enc_{i}`, `b_dec_{i}` and `threshold_{i}` for a JumpReLU
one, and `W_dec_{i}.safetensors` with `W_dec_{i}` [d_transcoder, n_layers - i, d_model]) becomes one
`CrossLayerTranscoder` per layer, whose features also write into every later MLP output. Any other
key, a shape that does not fit, or NaN weights are refused naming the file.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from catalog.errors import UserError, first_line
from compute.dictionaries.kinds import (
    CrossLayerTranscoder,
    JumpReLUSkipTranscoder,
    JumpReLUTranscoder,
    SkipTranscoder,
    Transcoder,
)

CONFIG = "config.yaml"
SAFETENSORS_KEYS = {"W_enc", "W_dec", "b_enc", "b_dec", "activation_function.threshold", "W_skip"}
GEMMA_SCOPE_KEYS = {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"}
_LAYER_FILE = re.compile(r"layer_(\d+)\.safetensors")
_LAYER_FOLDER = re.compile(r"layer_(\d+)")
_CLT_FILE = re.compile(r"W_enc_(\d+)\.safetensors")


def read_config(folder: Path) -> dict | None:
    """The set's config.yaml, checked; None when the folder holds no circuit-tracer set."""
    import yaml

    path = folder / CONFIG
    if not path.is_file():
        return None
    try:
        cfg = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UserError(f"{path}: not a readable circuit-tracer config ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, dict) or "model_kind" not in cfg:
        return None  # some other tool's config.yaml
    if cfg["model_kind"] not in ("transcoder_set", "cross_layer_transcoder"):
        raise UserError(f"{path}: model_kind {cfg['model_kind']!r} is not a circuit-tracer transcoder set")
    for key in ("feature_input_hook", "feature_output_hook"):
        if not isinstance(cfg.get(key), str) or not re.fullmatch(r"[A-Za-z0-9_.]+", cfg[key]):
            raise UserError(f"{path}: {key} must name a hook within a block (as circuit-tracer's configs do)")
    return cfg


def layer_files(folder: Path, cfg: dict) -> dict[int, Path]:
    """The set's transcoder file per layer: layer_{i}.safetensors, or a params.npz under layer_{i}/; a
    cross-layer transcoder's W_enc_{i}.safetensors (beside it, W_dec_{i}.safetensors)."""
    if cfg["model_kind"] == "cross_layer_transcoder":
        found = {int(m.group(1)): f for f in folder.glob("W_enc_*.safetensors") if (m := _CLT_FILE.fullmatch(f.name))}
        if not found:
            raise UserError(f"{folder}: {CONFIG} names a cross-layer transcoder, but no W_enc_N.safetensors is there")
        return found
    found = {}
    for f in sorted([*folder.glob("layer_*.safetensors"), *folder.rglob("params.npz")]):
        m = _LAYER_FILE.fullmatch(f.name) if f.suffix == ".safetensors" else next(
            (m for part in reversed(f.relative_to(folder).parts[:-1]) if (m := _LAYER_FOLDER.fullmatch(part))), None)
        if m is None:
            raise UserError(f"{f}: cannot tell which layer this transcoder is for (a layer_N folder or file name)")
        if int(m.group(1)) in found:
            raise UserError(f"two transcoders for layer {m.group(1)}: {found[int(m.group(1))]} and {f}")
        found[int(m.group(1))] = f
    if not found:
        raise UserError(f"{folder}: {CONFIG} names a transcoder set, but no layer_N.safetensors or params.npz is there")
    return found


def decoder_file(path: Path) -> Path:
    """A cross-layer transcoder's decoder file beside its encoder file W_enc_{i}.safetensors."""
    return path.with_name(path.name.replace("W_enc_", "W_dec_"))


def read_transcoder(path: Path, layer: int, cfg: dict, model_name: str = "") -> Transcoder:
    """One layer's transcoder file as a transcoder of this catalogue, with the same numbers."""
    if cfg["model_kind"] == "cross_layer_transcoder":
        return _read_clt_layer(path, layer, cfg, model_name)
    state = _read_state(path)
    keys = GEMMA_SCOPE_KEYS if path.suffix == ".npz" else SAFETENSORS_KEYS
    unknown = sorted(set(state) - keys)
    if unknown or not {"W_enc", "W_dec", "b_enc", "b_dec"} <= set(state):
        what = f"unknown weights {', '.join(unknown)}" if unknown else "missing weights"
        raise UserError(f"{path}: {what} (a transcoder holds {', '.join(sorted(keys))})")
    if path.suffix != ".npz":  # circuit-tracer keeps W_enc as [d_transcoder, d_model], W_skip as [d_out, d_in]
        state["W_enc"] = state["W_enc"].T
        if "W_skip" in state:
            state["W_skip"] = state["W_skip"].T
    threshold = state.pop("threshold", state.pop("activation_function.threshold", None))
    d_in, d_sae = state["W_enc"].shape if state["W_enc"].dim() == 2 else (0, 0)
    d_out = state["b_dec"].shape[0] if state["b_dec"].dim() == 1 else 0
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_out), "b_enc": (d_sae,), "b_dec": (d_out,)}
    if threshold is not None:
        state["threshold"], shapes["threshold"] = threshold, (d_sae,)
    if "W_skip" in state:
        shapes["W_skip"] = (d_in, d_out)
    wrong = [f"{k} {tuple(state[k].shape)}" for k, shape in shapes.items() if tuple(state[k].shape) != shape]
    if wrong or not d_in * d_sae * d_out:
        raise UserError(f"{path}: weights of shapes that do not fit one transcoder ({', '.join(wrong) or 'empty'})")
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        raise UserError(f"{path}: {', '.join(bad)} hold NaN or infinite values")
    cls = {(False, False): Transcoder, (True, False): JumpReLUTranscoder, (False, True): SkipTranscoder,
           (True, True): JumpReLUSkipTranscoder}[(threshold is not None, "W_skip" in state)]
    sae = cls(d_in, d_sae, f"blocks.{layer}.{cfg['feature_input_hook']}", model_name, d_out,
              f"blocks.{layer}.{cfg['feature_output_hook']}")
    sae.load_state_dict(state)
    return sae.requires_grad_(False)


def _read_clt_layer(path: Path, layer: int, cfg: dict, model_name: str) -> CrossLayerTranscoder:
    """Layer i of circuit-tracer's cross-layer transcoder: W_enc_{i} [d_transcoder, d_model], b_enc_{i},
    b_dec_{i} (the bias of layer i's output), threshold_{i} for a JumpReLU one, and in W_dec_{i}.safetensors
    W_dec_{i} [d_transcoder, n_layers - i, d_model] (what it writes into layer i's output and each later
    one's). Only the decoder into layer i is read; the later ones stay in the file, read by rows as
    needed (checked finite a block at a time)."""
    i, decoders = layer, decoder_file(path)
    state = _read_state(path)
    keys = {f"W_enc_{i}", f"b_enc_{i}", f"b_dec_{i}", f"threshold_{i}"}
    unknown, missing = sorted(set(state) - keys), sorted(keys - {f"threshold_{i}"} - set(state))
    if unknown or missing:
        raise UserError(f"{path}: {'unknown weights ' + ', '.join(unknown) if unknown else 'missing ' + ', '.join(missing)}"
                        f" (layer {i} of a cross-layer transcoder holds {', '.join(sorted(keys))})")
    try:
        from safetensors import safe_open

        with safe_open(str(decoders), framework="pt") as f:
            if list(f.keys()) != [f"W_dec_{i}"]:
                raise UserError(f"{decoders}: holds {', '.join(f.keys()) or 'nothing'}; W_dec_{i} alone expected")
            shape = f.get_slice(f"W_dec_{i}").get_shape()
            own = f.get_slice(f"W_dec_{i}")[:, 0].float() if len(shape) == 3 and shape[1] >= 1 else None
    except UserError:
        raise
    except Exception as e:  # safetensors raises its own types for a missing or damaged file
        raise UserError(f"{decoders}: not a readable transcoder file ({first_line(e)})") from None
    w_enc = state[f"W_enc_{i}"]
    d_sae, d_in = w_enc.shape if w_enc.dim() == 2 else (0, 0)
    d_out = state[f"b_dec_{i}"].shape[0] if state[f"b_dec_{i}"].dim() == 1 else 0
    threshold = state.get(f"threshold_{i}", torch.zeros(d_sae))
    if own is None or shape[0] != d_sae or shape[2] != d_out or tuple(state[f"b_enc_{i}"].shape) != (d_sae,) \
            or tuple(threshold.shape) != (d_sae,) or not d_sae * d_in * d_out:
        raise UserError(f"{path}: weights of shapes that do not fit one layer of a cross-layer transcoder "
                        f"(W_enc {tuple(w_enc.shape)}, W_dec {tuple(shape)})")
    bad = [k for k, v in {**state, f"W_dec_{i}": own}.items() if not torch.isfinite(v).all()]
    sae = CrossLayerTranscoder(d_in, d_sae, f"blocks.{layer}.{cfg['feature_input_hook']}", model_name, d_out,
                               f"blocks.{layer}.{cfg['feature_output_hook']}", n_later=shape[1] - 1)
    sae.lazily(str(decoders), f"W_dec_{i}", 1)
    if bad or not sae.later_finite():
        raise UserError(f"{path}: {', '.join(bad) or f'W_dec_{i}'} hold NaN or infinite values")
    sae.load_state_dict({"W_enc": w_enc.T, "W_dec": own, "W_dec_later": sae.W_dec_later, "b_enc": state[f"b_enc_{i}"],
                         "b_dec": state[f"b_dec_{i}"], "threshold": threshold})
    return sae.requires_grad_(False)


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                return {k: torch.from_numpy(np.asarray(npz[k], dtype=np.float32)) for k in npz.files}
        from safetensors.torch import load_file

        return {k: v.float() for k, v in load_file(str(path)).items()}
    except Exception as e:  # numpy and safetensors raise their own types for damaged files
        raise UserError(f"{path}: not a readable transcoder file ({first_line(e)})") from None
