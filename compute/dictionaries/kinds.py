"""Sparse dictionaries: the architectures a circuit can be built over, and where they splice in.

Every dictionary maps an activation x to features f = activation(pre(x)) with
pre(x) = (x - b_dec) W_enc + b_enc (a transcoder does not subtract b_dec) and
decodes affinely: x_hat = f W_dec + b_dec. Because decoding is affine, the
attribution methods need nothing but `encode`, `decode`, `W_dec` and `active`.

Architectures: standard (ReLU, L1), topk (the k largest pre-activations, ReLU),
jumprelu (ReLU gated by a learned per-feature threshold), transcoder (reads the
normalised MLP input, writes mlp_out; with a JumpReLU, and with a linear skip connection, whose
output adds x W_skip: `reconstruct(x, f)`) and identity (neurons as features).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from catalog.errors import UserError
from compute.cache import config_hash, file_hash
from schema.sites import Site, is_mlp_neurons


class SAE(torch.nn.Module):
    """Standard sparse autoencoder: ReLU features, trained with an L1 penalty."""

    architecture = "standard"
    kind = "sae"
    apply_b_dec_to_input = True

    def __init__(self, d_in: int, d_sae: int, hook_name: str = "", model_name: str = "", d_out: int | None = None):
        super().__init__()
        self.d_in, self.d_sae, self.d_out = d_in, d_sae, d_out or d_in
        self.hook_name, self.model_name = hook_name, model_name
        self.W_enc = torch.nn.Parameter(torch.empty(d_in, d_sae))
        self.W_dec = torch.nn.Parameter(torch.empty(d_sae, self.d_out))
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae))
        self.b_dec = torch.nn.Parameter(torch.zeros(self.d_out))
        torch.nn.init.kaiming_uniform_(self.W_dec)
        self.normalize_decoder()
        with torch.no_grad():
            if self.d_out == d_in:
                self.W_enc.copy_(self.W_dec.T)
            else:
                torch.nn.init.kaiming_uniform_(self.W_enc)

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.W_enc.dtype)  # TransformerLens normalises half-precision streams in float32
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.pre_activation(x))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def reconstruct(self, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """What the dictionary outputs for input x whose features are f (a skip transcoder adds its skip of x)."""
        return self.decode(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reconstruct(x, self.encode(x))

    def active(self, f: torch.Tensor) -> torch.Tensor:
        """Where a feature's value moves with its pre-activation (its local derivative is 1)."""
        return f > 0

    def settings(self) -> dict:
        """Architecture parameters that are not weights (saved in cfg.json)."""
        return {}

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))


class TopKSAE(SAE):
    """Keeps the k largest pre-activations of each token (ReLU applied), zeroes the rest."""

    architecture = "topk"

    def __init__(self, d_in: int, d_sae: int, hook_name: str = "", model_name: str = "", k: int = 8):
        super().__init__(d_in, d_sae, hook_name, model_name)
        self.k = int(k)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        values, idx = pre.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, idx, values.relu())

    def settings(self) -> dict:
        return {"k": self.k}


class JumpReLUSAE(SAE):
    """ReLU gated by a per-feature threshold: f = pre if pre > threshold, else 0."""

    architecture = "jumprelu"

    def __init__(self, d_in: int, d_sae: int, hook_name: str = "", model_name: str = ""):
        super().__init__(d_in, d_sae, hook_name, model_name)
        self.threshold = torch.nn.Parameter(torch.zeros(d_sae))

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre) * (pre > self.threshold)


class Transcoder(SAE):
    """MLP transcoder: features of the normalised MLP input that reconstruct the MLP's output."""

    architecture = "transcoder"
    kind = "transcoder"
    apply_b_dec_to_input = False

    def __init__(self, d_in: int, d_sae: int, hook_name: str = "", model_name: str = "",
                 d_out: int | None = None, hook_name_out: str = ""):
        super().__init__(d_in, d_sae, hook_name, model_name, d_out)
        self.hook_name_out = hook_name_out

    def settings(self) -> dict:
        return {"d_out": self.d_out}


class JumpReLUTranscoder(Transcoder):
    """A transcoder whose features are gated by a per-feature threshold (Gemma Scope's, circuit-tracer's
    JumpReLU per-layer transcoders): f = pre if pre > threshold, else 0."""

    architecture = "jumprelu_transcoder"

    def __init__(self, d_in: int, d_sae: int, hook_name: str = "", model_name: str = "",
                 d_out: int | None = None, hook_name_out: str = ""):
        super().__init__(d_in, d_sae, hook_name, model_name, d_out, hook_name_out)
        self.threshold = torch.nn.Parameter(torch.zeros(d_sae))

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre) * (pre > self.threshold)


class _Skip:
    """A transcoder's linear skip connection (Paulo et al. 2025, "Transcoders beat sparse autoencoders"):
    it outputs f W_dec + b_dec + x W_skip, W_skip [d_in, d_out] (SAELens's layout; circuit-tracer's
    is transposed)."""

    def __init__(self, *args, **kwargs):  # a transcoder's arguments
        super().__init__(*args, **kwargs)
        self.W_skip = torch.nn.Parameter(torch.zeros(self.d_in, self.d_out))

    def skip(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.W_skip.dtype) @ self.W_skip

    def reconstruct(self, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        return self.decode(f) + self.skip(x)


class SkipTranscoder(_Skip, Transcoder):
    """A ReLU transcoder with a skip connection (SAELens's `skip_transcoder`)."""

    architecture = "skip_transcoder"


class JumpReLUSkipTranscoder(_Skip, JumpReLUTranscoder):
    """A JumpReLU transcoder with a skip connection (circuit-tracer's files with both a threshold and W_skip)."""

    architecture = "jumprelu_skip_transcoder"


class CrossLayerTranscoder(JumpReLUTranscoder):
    """One layer of a cross-layer transcoder (CLT; Ameisen et al. 2025, circuit-tracer's CLTs): features
    of this layer's MLP input that write into this layer's MLP output (W_dec; b_dec is the bias of this
    layer's output) and into each of the `n_later` later layers' outputs (W_dec_later [d_sae, n_later,
    d_out]). A ReLU CLT's threshold is 0. `decode(f)` is this layer's own part: the reconstruction of
    a later layer's output also holds what the earlier layers' features write there. Read from a file,
    the later decoders stay there (`later_file`) and only the rows of active features are read.
    """

    architecture = "clt"

    def __init__(self, d_in: int, d_sae: int, hook_name: str = "", model_name: str = "",
                 d_out: int | None = None, hook_name_out: str = "", n_later: int = 0):
        super().__init__(d_in, d_sae, hook_name, model_name, d_out, hook_name_out)
        self.n_later = n_later
        self.W_dec_later = torch.nn.Parameter(torch.zeros(d_sae, n_later, self.d_out))

    later_file: tuple[str, str, int] | None = None  # (file, key, first column): later decoders read lazily from it

    def settings(self) -> dict:
        return {"d_out": self.d_out, "n_later": self.n_later}

    def later_rows(self, features: torch.Tensor) -> torch.Tensor:
        """The later decoders of some features, [n, n_later, d_out]; read from the file only at those rows when
        the CLT is read lazily (circuit-tracer's W_dec_{i}: its column 0 is this layer's own decoder)."""
        if self.later_file is None:
            return self.W_dec_later[features]
        from safetensors import safe_open

        path, key, first = self.later_file
        with safe_open(path, framework="pt") as f:
            rows = f.get_slice(key)[features.cpu().tolist()] if len(features) else torch.zeros(0, 0, 0)
        rows = rows[:, first:] if len(features) else torch.zeros(0, self.n_later, self.d_out)
        return rows.to(device=self.W_dec.device, dtype=self.W_dec.dtype)

    def later_finite(self, block: int = 1024) -> bool:
        """Whether every later decoder is finite, read a block of rows at a time."""
        return all(torch.isfinite(self.later_rows(torch.arange(i, min(i + block, self.d_sae)))).all()
                   for i in range(0, self.d_sae, block))

    def lazily(self, path: str, key: str, first: int) -> CrossLayerTranscoder:
        """This CLT with its later decoders left on disk (only the rows asked for are read)."""
        self.later_file = (path, key, first)
        self.W_dec_later = torch.nn.Parameter(torch.zeros(0), requires_grad=False)
        return self


def has_skip(sae: SAE) -> bool:
    """Whether a dictionary's output has a linear skip of its input besides its features."""
    return isinstance(sae, _Skip)


class IdentityDictionary(SAE):
    """Neurons as features: encode and decode are the identity (signed values, no ReLU).

    The baseline that shows what a learned dictionary buys: a circuit over the
    hook's own basis, with an error term that is always zero.
    """

    architecture = "identity"
    kind = "identity"

    def __init__(self, d_in: int, hook_name: str = "", model_name: str = ""):
        super().__init__(d_in, d_in, hook_name, model_name)
        with torch.no_grad():
            self.W_enc.copy_(torch.eye(d_in))
            self.W_dec.copy_(torch.eye(d_in))
        for p in self.parameters():
            p.requires_grad_(False)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return pre

    def active(self, f: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(f, dtype=torch.bool)


ARCHITECTURES: dict[str, type[SAE]] = {c.architecture: c for c in (SAE, TopKSAE, JumpReLUSAE, Transcoder,
                                                                     JumpReLUTranscoder, SkipTranscoder,
                                                                     JumpReLUSkipTranscoder, CrossLayerTranscoder,
                                                                     IdentityDictionary)}


def hook_width(model, hook_name: str) -> int:
    """Width of a TransformerLens hook's activation (d_model, or d_mlp for MLP neurons)."""
    return model.cfg.d_mlp if is_mlp_neurons(hook_name) else model.cfg.d_model


def check_fits(sae: SAE, model) -> None:
    """Refuse a dictionary whose width does not match its hook (or its output hook)."""
    hook = sae.hook_name
    if hook not in model.hook_dict:
        raise UserError(f"dictionary reads hook {hook!r}, which the model does not have")
    width = hook_width(model, hook)
    if sae.d_in != width:
        raise UserError(f"dictionary for {hook} has d_in={sae.d_in}, but the hook has width {width}")
    out = getattr(sae, "hook_name_out", "")
    if out and sae.d_out != hook_width(model, out):
        raise UserError(f"transcoder writing {out} has d_out={sae.d_out}, "
                        f"but the hook has width {hook_width(model, out)}")


@dataclass
class TrainedDictionary:
    """A dictionary at its site, with where its files are and its measured quality."""

    site: Site
    sae: SAE
    path: Path
    metrics: dict

    @property
    def hook_in(self) -> str:
        """The hook the dictionary reads (a transcoder's differs from its site's output)."""
        return self.sae.hook_name or self.site.reads

    @cached_property
    def dictionary_id(self) -> str:
        """<kind>-<hash> of the weights and the config (which names the hook); hashed once, as a
        GPT-2-sized set's files take seconds to read and every feature and node row names its id."""
        digest = config_hash([file_hash(self.path / "sae_weights.safetensors"), file_hash(self.path / "cfg.json")])
        return f"{self.sae.kind}-{digest}"
