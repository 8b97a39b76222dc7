"""Outlier Suppression+ (Wei et al., 2023): channel-wise shifting and scaling of each group's input activation.

Shift: z_j = (max X_j + min X_j) / 2 centres every channel (asymmetry removed), where a bias can absorb it
(LayerNorm with bias, or consumers with biases; RMSNorm families get scaling only, as the paper's LLaMA code).
Unlike the paper, the shift is kept only where it lowers the searched error (see `search_group`): measured on
MiniLM at W4A8, the midpoint shift alone cut the embedding cosine from 0.942 (min-max) to 0.836.
Scale: for a clipping threshold t, s_j = max(1, max(X_j - z_j) / t, min(X_j - z_j) / -t) squeezes the channels
that exceed [-t, t]; t is searched on a grid from the largest |X - z| down (at least `search_steps` points,
every 0.5 of range as in the public code, at most 4 x search_steps) to minimise the squared error, with quantized
input and quantized weights, of what the consumers feed, as the public code's migration functions: for q/k/v the
attention output before its output projection (softmax(q k^T) v), for LLaMA's gate/up act(gate) * up (the input
of down_proj), otherwise the consumers' own output (or a post-LN encoder's FFN activation); a family's Group
names the module whose input is compared (`compare`). The error is taken on one recorded calibration batch,
while the channel extremes that set z and s come from every calibration token. Both fold into the norm /
producing linear and the consumers' weights and biases (core/migrate.py).
Where this still differs from the public code (ModelTC/Outlier_Suppression_Plus): the grid is capped; the
extremes come from every calibration token, not the one batch of the loss; and the search observes weights by
the configured w_observer (the public code: min-max).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.migrate import apply_transform, can_shift
from ..core.quantizer import dynamic_fake_quant, fake_quant_tensor, qparams_from_range
from ..core.wrap import float_layer, weight_oi, weight_qparams
from ..errors import SlimkitError
from ..transformer import specs
from . import outlier_suppression
from .transformer_common import TransformerMethod


def channel_scale(cmax: torch.Tensor, cmin: torch.Tensor, t: float) -> torch.Tensor:
    """OS+'s scale for threshold t: channels whose range exceeds [-t, t] are divided down into it."""
    one = torch.ones_like(cmax)
    return torch.maximum(torch.maximum(one, cmax / t), cmin / -t)


def _quantized_forward(layer, shift, scale, t, w_spec, a_spec, w_observer):
    """A stand-in forward for one consumer: quantized (x - shift) / scale against quantized W diag(scale)."""
    w = weight_oi(layer).detach().float()
    w_s = w * scale
    wq = fake_quant_tensor(w_s, w_spec, *weight_qparams(w_s, w_spec, w_observer, fused=True))   # once per candidate
    bias = layer.bias.detach().float() if layer.bias is not None else None
    if bias is not None:
        bias = bias + w @ shift
    if a_spec is not None and a_spec.granularity != "token":
        lo = torch.tensor([-t], device=w.device)
        a_scale, a_zp = qparams_from_range(lo, -lo, a_spec)

    def forward(x):
        xs = (x.float() - shift) / scale
        if a_spec is not None:
            xs = dynamic_fake_quant(xs, a_spec) if a_spec.granularity == "token" else fake_quant_tensor(xs, a_spec, a_scale, a_zp)
        return F.linear(xs, wq, bias).to(x.dtype)

    return forward


@torch.no_grad()
def search_group(ctx, group) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """The best (scale, shift, threshold) for one group, by the scope-output error of quantized candidates.

    The threshold grid is searched with the paper's midpoint shift and, where a shift folds at all, without
    it: a shift moves every token by -z, so the next layer's weight error becomes (Wq - W)(x - z), which
    grows where the bulk of a channel sits far from its midpoint (a rare outlier on one side). At 8-bit
    weights that term is negligible and the shift wins; at 4-bit weights it can lose (MiniLM W4A8)."""
    stats = ctx.stats[group.name]
    mid = (stats.cmax + stats.cmin) / 2 if can_shift(ctx.model, group) else None
    scope = ctx.model.get_submodule(group.scope)
    args, kwargs = ctx.scope_calls[group.name]
    layers = [float_layer(ctx.model.get_submodule(n)) for n in group.layers]
    compare = ctx.model.get_submodule(group.compare) if group.compare else None
    run = lambda: compared_value(scope, compare, args, kwargs)   # noqa: E731
    ref = run()
    best = None
    for shift in ([mid, torch.zeros_like(stats.cmax)] if mid is not None else [torch.zeros_like(stats.cmax)]):
        loss, t = _search_threshold(ctx, stats, shift, run, layers, ref)
        if best is None or loss < best[0]:
            best = (loss, t, shift)
    _, t, shift = best
    cmax, cmin = stats.cmax - shift, stats.cmin - shift
    return channel_scale(cmax, cmin, t), (shift if torch.any(shift != 0) else None), t


def compared_value(scope, compare, args, kwargs) -> torch.Tensor:
    """What the search compares, as float: the input of `compare` during one call of `scope` where the group
    names one (the attention's output projection, LLaMA's down_proj), else the scope's output."""
    if compare is None:
        return _out(scope(*args, **kwargs)).float()
    seen = []
    handle = compare.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        scope(*args, **kwargs)
    finally:
        handle.remove()
    if len(seen) != 1:
        raise SlimkitError(f"OS+ search: {type(compare).__name__} ran {len(seen)} times in one call of "
                           f"{type(scope).__name__}; a family's Group.compare must name a module its scope calls once")
    return seen[0].float()


def _search_threshold(ctx, stats, shift, run, layers, ref) -> tuple[float, float]:
    """(least scope-output error, its threshold) over the grid, for one shift."""
    w_spec, a_spec = specs(ctx.cfg)
    cmax, cmin = stats.cmax - shift, stats.cmin - shift
    top = max(cmax.max().item(), -cmin.min().item(), 1e-6)
    lower = min(0.1 if ctx.family_norm == "rms" else 1.0, top)
    steps = int(min(max(ctx.cfg.search_steps, top / 0.5), 4 * ctx.cfg.search_steps))
    best = (float("inf"), top)
    for t in torch.linspace(top, lower, steps).tolist():
        scale = channel_scale(cmax, cmin, t)
        for layer in layers:
            layer.forward = _quantized_forward(layer, shift, scale, t, w_spec, a_spec, ctx.cfg.w_observer)
        try:
            out = run()
        finally:
            for layer in layers:
                del layer.forward  # back to the class's forward
        loss = (out - ref).pow(2).sum(-1).mean().item()
        if loss < best[0]:
            best = (loss, t)
    return best


def _out(y):
    return y[0] if isinstance(y, (tuple, list)) else y


def after_calibration(ctx) -> None:
    """With `token_clipping`, the activation ranges come from Outlier Suppression's token-wise clipping (coarse
    quantile search, then LSQ+ fine stage), as the OS+ public code offers (its AvgTokenQuantileObserver path);
    otherwise they stay as calibrated (min-max / the configured observer)."""
    if ctx.cfg.token_clipping:
        outlier_suppression.after_calibration(ctx)


def transform(ctx) -> None:
    for group in ctx.groups:
        scale, shift, t = search_group(ctx, group)
        apply_transform(ctx.model, group, scale, shift)
        ctx.notes.setdefault("os_plus", {})[group.name] = {
            "threshold": round(t, 5), "scaled_channels": int((scale > 1).sum()), "shifted": shift is not None}


METHOD = TransformerMethod("OS+: channel-wise shift and searched scale, folded into the neighbouring modules "
                           "(token_clipping: ranges by token-wise clipping)", transform, after_calibration)
