"""Training sparse dictionaries: standard (L1), TopK (AuxK), JumpReLU (L0 by straight-through
estimation) and MLP transcoders, each with a guard against dead features.

Inputs (and a transcoder's targets) are scaled so that E||x||^2 = d_in while
training; the scales are folded into the weights afterwards, so a saved
dictionary takes raw activations, keeps unit-norm decoder rows and reports
features in raw units. Dead features are resampled towards badly reconstructed
inputs (standard, JumpReLU, transcoder) or pulled back by the auxiliary TopK
loss on the residual (TopK), as in Gao et al. 2024.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from catalog.progress import hidden
from compute.dictionaries.kinds import SAE, JumpReLUSAE, TopKSAE, Transcoder

TRAINABLE = ("standard", "topk", "jumprelu", "transcoder", "clt")  # clt: compute.dictionaries.clt_training


@dataclass(frozen=True)
class SAEConfig:
    architecture: str = "standard"  # standard | topk | jumprelu | transcoder | clt (all MLPs at once)
    expansion: int = 8
    l1_coefficient: float = 1.0  # standard, transcoder and clt
    k: int = 8  # topk
    l0_coefficient: float = 0.3  # jumprelu: penalty per active feature (inputs scaled to E||x||^2 = d_in)
    bandwidth: float = 0.2  # jumprelu: width of the straight-through window
    auxk_coefficient: float = 1 / 32  # topk: weight of the dead-feature loss
    steps: int = 2000
    batch_size: int = 1024
    lr: float = 2e-3
    resample_every: int = 500
    seed: int = 0
    corpus_sentences: int = 12_000
    version: int = 3  # 3: TopK's k rows by _EncodeRows/_DecodeRows, AuxK as a dense product over the dead columns


class _JumpReLU(torch.autograd.Function):
    """Features pre * 1[pre > threshold] and each row's L0 (the count of active features).

    The step has no gradient; the threshold gets one from a rectangular window of
    width `bandwidth` around it (straight-through estimation, Rajamanoharan et al. 2024),
    through both the features and the L0 penalty.
    """

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        above = pre - threshold
        mask = torch.gt(above, 0, out=torch.empty_like(pre))  # 1.0 / 0.0, written in one pass
        ctx.save_for_backward(above, threshold, mask)
        ctx.bandwidth = bandwidth
        return pre * mask, mask.sum(-1)

    @staticmethod
    def backward(ctx, g_f, g_l0):
        above, threshold, mask = ctx.saved_tensors
        window = torch.abs(above)
        torch.lt(window, ctx.bandwidth / 2, out=window)  # 1.0 inside the window
        # sum over rows of window * (threshold * g_f + g_l0): a matrix-vector product, then one
        # in-place product and a column sum
        from_l0 = g_l0 @ window
        g_threshold = (threshold * window.mul_(g_f).sum(0) + from_l0) / -ctx.bandwidth
        return g_f * mask, g_threshold, None


def _forward(sae: SAE, x: torch.Tensor, cfg: SAEConfig):
    """One training forward pass: (reconstruction, sparsity penalty, features that fired [d_sae],
    a function giving the mean L0 (computed only when the progress bar shows it), TopK's dense
    pre-activations without gradient, else None). TopK computes its dense pre-activations only to
    choose its k features; their values, gradients and decoding touch k rows per token."""
    bias = _encoder_bias(sae)
    if isinstance(sae, TopKSAE):
        with torch.no_grad():
            pre = torch.addmm(bias, x, sae.W_enc)
            idx = pre.topk(sae.k, dim=-1, sorted=False).indices  # [B, k]
        values = _EncodeRows.apply(x, sae.W_enc, bias, pre, idx).relu()
        y_hat = _decode_rows(sae, values, idx) + sae.b_dec
        on = values.detach() > 0
        fired = torch.zeros(sae.d_sae, dtype=torch.bool)
        fired[idx[on]] = True
        return y_hat, 0.0, fired, lambda: on.sum(-1).float().mean(), pre
    pre = torch.addmm(bias, x, sae.W_enc)
    if isinstance(sae, JumpReLUSAE):
        f, l0 = _JumpReLU.apply(pre, sae.threshold, cfg.bandwidth)
        penalty = cfg.l0_coefficient * l0.mean()
    else:
        f = torch.relu(pre)
        penalty = cfg.l1_coefficient * f.sum(-1).mean()
        l0 = None
    y_hat = torch.addmm(sae.b_dec, f, sae.W_dec)
    fired = f.detach().amax(0) > 0
    if l0 is not None:
        return y_hat, penalty, fired, lambda: l0.detach().mean(), None
    return y_hat, penalty, fired, lambda: torch.count_nonzero(f.detach(), -1).float().mean(), None


def _encoder_bias(sae: SAE) -> torch.Tensor:
    """The bias of x W_enc + bias = (x - b_dec) W_enc + b_enc: b_dec folded in, so that its
    gradient costs a vector-matrix product instead of a [batch x d_sae x d_in] one."""
    return sae.b_enc - sae.b_dec @ sae.W_enc if sae.apply_b_dec_to_input else sae.b_enc


class _EncodeRows(torch.autograd.Function):
    """Pre-activations (x W_enc + bias)[b, idx[b, j]] of k chosen features per row, read from the
    dense pre-activations that chose them; the backward adds into only those k columns of W_enc
    and the bias (index_add_), instead of a dense [batch x d_sae] gradient and its product."""

    @staticmethod
    def forward(ctx, x, w_enc, bias, pre, idx):
        ctx.save_for_backward(x, idx)
        ctx.d_sae = w_enc.shape[1]
        return pre.gather(1, idx)

    @staticmethod
    def backward(ctx, g):
        x, idx = ctx.saved_tensors
        g_bias = g.new_zeros(ctx.d_sae).index_add_(0, idx.flatten(), g.flatten())
        return None, _add_rows(ctx.d_sae, idx, g, x).T, g_bias, None, None


def _decode_rows(sae: SAE, values: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """sum_j values[:, j] * W_dec[idx[:, j]]: the decoder's weights applied to k features per row."""
    return _DecodeRows.apply(values, idx, sae.W_dec)


class _DecodeRows(torch.autograd.Function):
    """Forward by `embedding_bag` with the values as per-row weights; backward touches only the
    k rows per token (index_add_ for W_dec, gathered rows for the values), about twice as fast on
    CPU as embedding_bag's own backward, which sorts the indices."""

    @staticmethod
    def forward(ctx, values, idx, w):
        ctx.save_for_backward(values, idx, w)
        return torch.nn.functional.embedding_bag(idx, w, per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx, g):
        values, idx, w = ctx.saved_tensors
        g_values = (w[idx] * g[:, None, :]).sum(-1)
        return g_values, None, _add_rows(w.shape[0], idx, values, g)


def _add_rows(n: int, idx: torch.Tensor, scale: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """[n, d] gradient of a weight read at k rows per batch item: out[idx[b, j]] += scale[b, j] * rows[b]."""
    return rows.new_zeros(n, rows.shape[1]).index_add_(0, idx.flatten(), (scale[..., None] * rows[:, None, :]).flatten(0, 1))


def new_dictionary(cfg: SAEConfig, d_in: int, hook_name: str, model_name: str, d_out: int | None = None,
                   hook_name_out: str = "", d_sae: int | None = None) -> SAE:
    d_sae = d_sae or d_in * cfg.expansion
    if cfg.architecture == "topk":
        return TopKSAE(d_in, d_sae, hook_name, model_name, k=cfg.k)
    if cfg.architecture == "jumprelu":
        sae = JumpReLUSAE(d_in, d_sae, hook_name, model_name)
        with torch.no_grad():
            sae.threshold.fill_(cfg.bandwidth)
        return sae
    if cfg.architecture == "transcoder":
        return Transcoder(d_in, d_sae, hook_name, model_name, d_out=d_out, hook_name_out=hook_name_out)
    if cfg.architecture == "standard":
        return SAE(d_in, d_sae, hook_name, model_name)
    raise ValueError(f"cannot train architecture {cfg.architecture!r} (trainable: {', '.join(TRAINABLE)})")


def train_sae(acts: torch.Tensor, cfg: SAEConfig, hook_name: str, model_name: str, progress: bool = True,
              targets: torch.Tensor | None = None, hook_name_out: str = "", d_sae: int | None = None) -> SAE:
    """Train one dictionary on a [N, d_in] activation matrix (a transcoder also on [N, d_out] targets)."""
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    n, d_in = acts.shape
    s_in = (d_in / acts.pow(2).sum(1).mean()).sqrt().item()
    x_all = acts * s_in
    if targets is None:
        s_out, y_all = s_in, x_all
    else:
        s_out = (targets.shape[1] / targets.pow(2).sum(1).mean()).sqrt().item()
        y_all = targets * s_out
    sae = new_dictionary(cfg, d_in, hook_name, model_name, y_all.shape[1], hook_name_out, d_sae)
    with torch.no_grad():
        sae.b_dec.copy_(y_all.median(0).values)
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr)
    fired = torch.zeros(sae.d_sae, dtype=torch.bool)
    steps_since_fired = torch.zeros(sae.d_sae, dtype=torch.long)
    bar = tqdm(range(cfg.steps), desc=f"{cfg.architecture} {hook_name}", disable=hidden(progress), unit="step",
               leave=False)
    for step in bar:
        rows = torch.randint(0, n, (cfg.batch_size,), generator=g)
        x = x_all.index_select(0, rows)
        y = x if y_all is x_all else y_all.index_select(0, rows)
        y_hat, penalty, fired_now, l0, pre = _forward(sae, x, cfg)
        mse = (y - y_hat).pow(2).sum(-1).mean()
        loss = mse + min(1.0, (step + 1) / max(1, cfg.steps // 10)) * penalty
        if isinstance(sae, TopKSAE):
            steps_since_fired += 1
            steps_since_fired[fired_now] = 0
            loss = loss + cfg.auxk_coefficient * _auxk_loss(sae, x, pre, y - y_hat.detach(), steps_since_fired >= 100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():  # keep the gradient tangent to the unit-norm constraint
            d = sae.W_dec
            d.grad -= (d.grad * d).sum(1, keepdim=True) * d
        opt.step()
        sae.normalize_decoder()
        if isinstance(sae, JumpReLUSAE):
            with torch.no_grad():
                sae.threshold.clamp_(min=0.0)
        fired |= fired_now
        if (cfg.resample_every and not isinstance(sae, TopKSAE) and (step + 1) % cfg.resample_every == 0
                and step + 1 < cfg.steps * 0.8):
            _resample(sae, x_all, y_all, ~fired, g, cfg.bandwidth)
            fired.zero_()
        if step % 50 == 0:
            bar.set_postfix(mse=f"{mse.item():.3f}", l0=f"{l0().item():.1f}", refresh=False)
    with torch.no_grad():  # fold the scales back in: raw inputs, raw outputs, features in output units
        sae.W_enc.mul_(s_in / s_out)
        sae.b_enc.div_(s_out)
        sae.b_dec.div_(s_out)
        if isinstance(sae, JumpReLUSAE):
            sae.threshold.div_(s_out)
    for p in sae.parameters():
        p.requires_grad_(False)
    return sae


def _auxk_loss(sae: TopKSAE, x: torch.Tensor, pre: torch.Tensor, residual: torch.Tensor,
               dead: torch.Tensor) -> torch.Tensor:
    """How well the dead features' k_aux largest pre-activations (ReLU; chosen from `pre`, the
    forward pass's, without gradient) reconstruct what the live ones missed, relative to the
    residual's variance (Gao et al. 2024); zero while no feature is dead. Only the dead features'
    encoder columns take part, as one dense product."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return x.new_zeros(())
    cols = dead.nonzero().flatten()
    with torch.no_grad():
        idx = pre[:, cols].topk(min(sae.d_in // 2, n_dead), dim=-1, sorted=False).indices  # into cols
    pre_dead = torch.addmm(_encoder_bias(sae)[cols], x, sae.W_enc[:, cols])
    err = (residual - _decode_rows(sae, pre_dead.gather(1, idx).relu(), cols[idx])).pow(2).sum(-1).mean()
    return (err / (residual - residual.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)).nan_to_num(0.0)


@torch.no_grad()
def _resample(sae: SAE, x_all: torch.Tensor, y_all: torch.Tensor, dead: torch.Tensor, g: torch.Generator,
              threshold: float) -> None:
    """Point dead features at inputs the dictionary reconstructs worst (Anthropic's resampling);
    a JumpReLU feature's threshold starts again low enough for it to fire."""
    idx = dead.nonzero().flatten()
    if len(idx) == 0:
        return
    rows = torch.randint(0, len(x_all), (8192,), generator=g)
    x, y = x_all[rows], y_all[rows]
    err = (y - sae(x)).pow(2).sum(-1)
    pick = torch.multinomial(err, len(idx), replacement=len(idx) > len(x), generator=g)
    alive_norm = sae.W_enc[:, ~dead].norm(dim=0).mean() if (~dead).any() else 1.0
    out_dir = _unit(y[pick] - sae.b_dec)
    in_dir = out_dir if y_all is x_all else _unit(x[pick])
    sae.W_dec[idx] = out_dir
    sae.W_enc[:, idx] = in_dir.T * alive_norm * 0.2
    sae.b_enc[idx] = 0.0
    if isinstance(sae, JumpReLUSAE):
        sae.threshold[idx] = threshold


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=1, keepdim=True).clamp_min(1e-8)
