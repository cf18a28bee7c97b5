"""Real checkpoints: a Hugging Face model directory (or a name in the local Hugging Face cache)
loaded as a TransformerLens model, with no network access.

The configuration and the weights are converted by TransformerLens's own code
(`get_pretrained_model_config`, `get_pretrained_state_dict`), for every family it
converts (GPT-2, GPT-NeoX/Pythia, Llama, Gemma, Qwen, Mistral, ...). Weights are kept
as Hugging Face computes with them (no LayerNorm folding, no centring), so hooks hold the
activations dictionaries trained on the Hugging Face model (Sparse Feature Circuits') read.
The model's id comes from its config and weights, so the same checkpoint is one model
wherever it lies.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from catalog.errors import UserError, first_line
from compute.cache import config_hash, file_hash
from compute.models.handle import ModelHandle, jsonable

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("cpu", "cuda", "mps")
WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def resolve(name_or_path: str) -> Path:
    """The checkpoint directory of a path, or of a TransformerLens official name (or alias) in the
    local Hugging Face cache."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{path}: not a Hugging Face checkpoint (no config.json)")
        return path
    if path.exists():
        raise UserError(f"{path}: a checkpoint is a directory (config.json, weights, tokenizer files)")
    from huggingface_hub import snapshot_download
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        official = get_official_model_name(name_or_path)
    except ValueError:
        raise UserError(f"no checkpoint directory {name_or_path!r}, and no TransformerLens model of that "
                        "name") from None
    try:
        return Path(snapshot_download(official, local_files_only=True, cache_dir=hf_cache()))
    except Exception:  # huggingface_hub raises several types for "not in the cache"
        raise UserError(f"{official} is not in the local Hugging Face cache ({hf_cache()}); download it on a "
                        "machine with network access, or pass its directory") from None


def hf_cache() -> str:
    """The Hugging Face hub cache, as the environment names it now ($HF_HUB_CACHE, $HF_HOME/hub)."""
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.environ.get("HF_HUB_CACHE") or os.path.join(home, "hub")


def weights_hash(path: Path) -> str:
    """A hash of the checkpoint's weight files (their names and sha256s), 12 hex digits."""
    files = sorted({f for pattern in WEIGHT_FILES for f in path.glob(pattern)})
    if not files:
        raise UserError(f"{path}: no weights (model.safetensors or pytorch_model.bin)")
    return config_hash([(f.name, file_hash(f)) for f in files])


def load_checkpoint(name_or_path: str, device: str = "cpu", dtype: str = "float32",
                    progress: bool = True) -> ModelHandle:
    """Load a checkpoint as a `ModelHandle` (weights frozen, eval mode). Everything that can be wrong
    with it (no tokenizer, damaged weights, a family TransformerLens cannot convert) is one UserError."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if device not in DEVICES:
        raise UserError(f"unknown device {device!r}; choose from {', '.join(DEVICES)}")
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device on this machine")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: no MPS device on this machine")
    path = resolve(name_or_path)
    try:
        hf_config = json.loads((path / "config.json").read_text())
        architecture = hf_config["architectures"][0]
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise UserError(f"{path / 'config.json'}: not a Hugging Face model config ({first_line(e)})") from None
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(f"{path}: no tokenizer ({', '.join(TOKENIZER_FILES)} expected)")
    w_hash = weights_hash(path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # tokenizers fail in many ways on a damaged or partial set of files
        raise UserError(f"{path}: cannot read its tokenizer ({first_line(e)})") from None
    try:
        cfg = _tl_config(path, device, DTYPES[dtype])
        hf_model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=DTYPES[dtype])
        model = _tl_model(path, cfg, hf_model, tokenizer, DTYPES[dtype])
    except NotImplementedError as e:
        raise UserError(f"{path}: model family {architecture} cannot be converted by TransformerLens "
                        f"({first_line(e)})") from None
    except (OSError, ValueError, RuntimeError, KeyError, AttributeError) as e:
        raise UserError(f"{path}: cannot load the checkpoint ({first_line(e)})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    family = str(hf_config.get("model_type") or architecture).lower().replace("_", "")
    model_id = f"{family}-{config_hash([w_hash, hf_config])}"
    config = {"architecture": architecture, "hf_config": hf_config, "dtype": dtype,
              "tl_config": {k: v for k, v in model.cfg.to_dict().items() if jsonable(v)}}
    return ModelHandle(model, model_id, path.name if path.name not in ("", ".") else family, str(path.resolve()),
                       config, w_hash)


def _tl_config(path: Path, device: str, dtype: torch.dtype):
    """TransformerLens's configuration for the checkpoint, read through a neutrally named link: its
    converter guesses the family from the name when it holds 'llama' or 'gemma'."""
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config

    with tempfile.TemporaryDirectory() as tmp:
        link = Path(tmp, "checkpoint")
        link.mkdir()
        (link / "config.json").symlink_to((path / "config.json").resolve())
        return get_pretrained_model_config(str(link), device=device, dtype=dtype, fold_ln=False,
                                           local_files_only=True)


def _tl_model(path: Path, cfg, hf_model, tokenizer, dtype: torch.dtype):
    """The HookedTransformer with the checkpoint's weights, converted by TransformerLens."""
    from transformer_lens import HookedTransformer
    from transformer_lens.loading_from_pretrained import get_pretrained_state_dict

    state = get_pretrained_state_dict(str(path), cfg, hf_model, dtype=dtype)
    del hf_model
    model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    model.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False, center_unembed=False,
                                      fold_value_biases=False, refactor_factored_attn_matrices=False)
    model.move_model_modules_to_device()
    return model

