"""Training a cross-layer transcoder (CLT; Ameisen et al. 2025) on a model's MLP inputs and outputs.

Layer i's features read its MLP input, f_i = relu(x_i W_enc_i + b_enc_i), and write into its own MLP
output and every later one's: the reconstruction of output m is sum_{i <= m} f_i W_dec[i -> m] +
b_dec_m. All layers train together on the summed squared error of every output, with an L1 penalty
on each feature's value times the norm of all its decoder rows (a feature cannot dodge it by
shrinking one decoder and growing another). Inputs and outputs are scaled per layer to mean squared
norm d during training, and the scales are folded back in at the end, so the result reads and
writes raw activations. Each layer is returned as a `CrossLayerTranscoder`.

`clt_metrics` measures what a CLT is for: each output's variance explained by its full
reconstruction (this layer's features and every earlier layer's), each layer's L0, and the loss
with every MLP replaced by the CLT at once.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from catalog.progress import hidden
from compute.dictionaries.kinds import CrossLayerTranscoder
from compute.dictionaries.metrics import lm_loss


def train_clt(inputs: list[torch.Tensor], outputs: list[torch.Tensor], cfg, hooks_in: list[str], hooks_out: list[str],
              model_name: str, progress: bool = True) -> list[CrossLayerTranscoder]:
    """Train a CLT on per-layer [N, d_in] MLP inputs and [N, d_out] outputs (rows aligned across layers)."""
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    n_layers, (n, d_in), d_out = len(inputs), inputs[0].shape, outputs[0].shape[1]
    d_sae = d_in * cfg.expansion
    s_in = [(d_in / x.pow(2).sum(1).mean()).sqrt().item() for x in inputs]
    s_out = [(d_out / y.pow(2).sum(1).mean()).sqrt().item() for y in outputs]
    xs = [x * s for x, s in zip(inputs, s_in, strict=True)]
    ys = [y * s for y, s in zip(outputs, s_out, strict=True)]
    W_enc = [torch.nn.Parameter(torch.randn(d_in, d_sae, generator=g) / d_in ** 0.5) for _ in range(n_layers)]
    b_enc = [torch.nn.Parameter(torch.zeros(d_sae)) for _ in range(n_layers)]
    # W_dec[i][m - i]: layer i's features into output m
    W_dec = [[torch.nn.Parameter(torch.randn(d_sae, d_out, generator=g) / d_sae ** 0.5 / (n_layers - i))
              for _ in range(i, n_layers)] for i in range(n_layers)]
    b_dec = [torch.nn.Parameter(y.median(0).values.clone()) for y in ys]
    params = [*W_enc, *b_enc, *(w for ws in W_dec for w in ws), *b_dec]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    bar = tqdm(range(cfg.steps), desc="clt", disable=hidden(progress), unit="step", leave=False)
    for step in bar:
        rows = torch.randint(0, n, (cfg.batch_size,), generator=g)
        f = [torch.relu(x[rows] @ w + b) for x, w, b in zip(xs, W_enc, b_enc, strict=True)]
        mse = sum((ys[m][rows] - (b_dec[m] + sum(f[i] @ W_dec[i][m - i] for i in range(m + 1)))).pow(2).sum(-1).mean()
                  for m in range(n_layers))
        norms = [torch.cat(W_dec[i], 1).norm(dim=1) for i in range(n_layers)]
        penalty = cfg.l1_coefficient * sum((f[i] * norms[i]).sum(-1).mean() for i in range(n_layers))
        loss = mse + min(1.0, (step + 1) / max(1, cfg.steps // 10)) * penalty
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            l0 = sum(float((x > 0).sum(-1).float().mean()) for x in f) / n_layers
            bar.set_postfix(mse=f"{mse.item():.3f}", l0=f"{l0:.1f}", refresh=False)
    layers = []
    with torch.no_grad():  # fold the scales back in: raw inputs, raw outputs (features stay in training units)
        for i in range(n_layers):
            t = CrossLayerTranscoder(d_in, d_sae, hooks_in[i], model_name, d_out, hooks_out[i], n_later=n_layers - 1 - i)
            t.W_enc.copy_(W_enc[i] * s_in[i])
            t.b_enc.copy_(b_enc[i])
            t.W_dec.copy_(W_dec[i][0] / s_out[i])
            for k in range(1, n_layers - i):
                t.W_dec_later[:, k - 1].copy_(W_dec[i][k] / s_out[i + k])
            t.b_dec.copy_(b_dec[i] / s_out[i])
            layers.append(t.requires_grad_(False))
    return layers


def written(layers: list[CrossLayerTranscoder], features: dict | list, m: int) -> torch.Tensor:
    """Output m's reconstruction from the features of layers 0..m: its own layer's and every earlier one's."""
    return layers[m].decode(features[m]) + sum((features[i] @ layers[i].W_dec_later[:, m - i - 1] for i in range(m)),
                                               0.0)


def reconstructions(layers: list[CrossLayerTranscoder], inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each output's full reconstruction: its own layer's features and every earlier layer's."""
    f = [t.encode(x) for t, x in zip(layers, inputs, strict=True)]
    return [written(layers, f, m) for m in range(len(layers))]


@torch.no_grad()
def clt_metrics(model, layers: list[CrossLayerTranscoder], inputs: list[torch.Tensor], outputs: list[torch.Tensor],
                sentences: list[str], clean: float) -> list[dict]:
    """Per layer: the variance of its MLP output explained by the full reconstruction, its L0, and the
    loss with every MLP replaced by the CLT at once (the same for every layer), on held-out data."""
    recon = reconstructions(layers, inputs)
    features: dict[int, torch.Tensor] = {}

    def splice(m):
        def fn(x):  # layers run in order: the earlier layers' features of this batch are already here
            features[m] = layers[m].encode(x)
            return written(layers, features, m)
        return fn

    spliced = lm_loss(model, sentences, {t.hook_name_out: (t.hook_name, splice(m)) for m, t in enumerate(layers)})
    zero = lm_loss(model, sentences, {t.hook_name_out: (t.hook_name_out, torch.zeros_like) for t in layers})
    out = []
    for m, (t, y, y_hat, x) in enumerate(zip(layers, outputs, recon, inputs, strict=True)):
        fires = (t.encode(x) != 0).float()
        density = fires.mean(0)
        out.append({"fraction_variance_explained": 1 - (y - y_hat).pow(2).sum(-1).mean().item()
                    / (y - y.mean(0)).pow(2).sum(-1).mean().item(),
                    "mse": (y - y_hat).pow(2).sum(-1).mean().item(), "l0": fires.sum(-1).mean().item(),
                    "dead_fraction": (density == 0).float().mean().item(),
                    "dense_fraction": (density > 0.5).float().mean().item(), "n_tokens": len(x),
                    "density": density.tolist(), "max_activation": t.encode(x).max(0).values.tolist(),
                    "loss_clean": clean, "loss_spliced": spliced, "loss_zero_ablated": zero,
                    "loss_recovered": (zero - spliced) / (zero - clean) if zero > clean else None,
                    "loss_recovered_of": "every MLP replaced by the CLT at once", "layer": m})
    return out
