"""Outlier Suppression (Wei et al., 2022): Gamma Migration + Token-Wise Clipping.

Gamma Migration: the norm's gamma amplifies outlier channels; the quantized activation becomes the non-scaling
norm output x_hat + beta / gamma, gamma moving into the following linears (or, for post-LN encoders, into the
linears' input affine so the residual keeps the float value).
Token-Wise Clipping, coarse stage: outliers live in few tokens, so for each activation quantizer the clipping
range is set by a quantile of the per-token maxima (and minima): tokens whose extreme lies beyond the
alpha-quantile are clipped, the range is the largest extreme among the rest; alpha is searched from 1.0
down (step 0.01; to 0.9 / 0.7 / 0.1 at 8 / 6 / 4 bits, as the public code) for the lowest block-output
error. Fine stage: the activation steps and zero points are learned (LSQ+, Adam at lr_act, 1e-5 by default as
the public code's, with cosine decay over twc_iters steps) against the float block output.
The paper measures both stages on the model's final output; slimkit measures on each block's output so one
block is in memory at a time.
"""
from __future__ import annotations

import torch

from ..core.migrate import apply_transform, gamma_scale
from ..core.quantizer import qparams_from_range
from ..core.wrap import quant_layers
from ..transformer import block_output, run_block
from .transformer_common import TransformerMethod

LOWEST_RATIO = {8: 0.9, 7: 0.8, 6: 0.7, 5: 0.5, 4: 0.1, 3: 0.1, 2: 0.1}


def migrated_range(stats, gamma: torch.Tensor) -> tuple[float, float]:
    """Per-tensor range (max - min) of the group's input before and after dividing each channel by gamma."""
    lo, hi = torch.minimum(stats.cmin / gamma, stats.cmax / gamma), torch.maximum(stats.cmin / gamma, stats.cmax / gamma)
    return (stats.cmax.max() - stats.cmin.min()).item(), (hi.max() - lo.min()).item()


def transform(ctx) -> None:
    """Gamma Migration on every group fed by a norm, where it shrinks the range the quantizer must cover (the
    paper's reason for it: gamma amplifies the outlier channels); where gamma does not line up with the
    outliers, migrating it would widen the range, and the group is left as it is. Weight-only quantization
    (a_bits None) has no activation range to shrink, and moving gamma into the weights only widens theirs (W4:
    worse than min-max on OPT and GPT-2), so nothing migrates there."""
    kept = []
    if ctx.cfg.a_bits is None:
        ctx.notes["gamma_migrated"] = kept
        return
    for group in ctx.groups:
        scale = gamma_scale(ctx.model, group)
        if scale is None:
            continue
        before, after = migrated_range(ctx.stats[group.name], scale)
        if after < before:
            apply_transform(ctx.model, group, scale)
            kept.append(group.name)
    ctx.notes["gamma_migrated"] = kept


def token_extremes(ctx) -> tuple[dict, dict]:
    """Per-token max and min of every static activation quantizer's input on the quantized stream, and those
    layers by name."""
    found, handles = {}, []
    layers = {n: l for n, l in quant_layers(ctx.block).items() if l.a_quant is not None and not l.a_quant.dynamic}
    for name, layer in layers.items():
        def hook(module, args, name=name):
            rows = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            hi, lo = found.setdefault(name, ([], []))
            hi.append(rows.amax(1))
            lo.append(rows.amin(1))

        handles.append(layer.a_quant.register_forward_pre_hook(hook))
    enabled = {n: l.a_quant.enabled for n, l in layers.items()}
    for layer in layers.values():
        layer.a_quant.enabled = False
    try:
        _outputs(ctx)
    finally:
        for h in handles:
            h.remove()
        for n, layer in layers.items():
            layer.a_quant.enabled = enabled[n]
    return {n: (torch.cat(hi), torch.cat(lo)) for n, (hi, lo) in found.items()}, layers


def clip_range(token_max: torch.Tensor, token_min: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The coarse stage's range: the largest token extreme among tokens within the ratio-quantile."""
    upper_q = torch.quantile(token_max.abs(), ratio)
    lower_q = -torch.quantile(token_min.abs(), ratio)
    kept_hi = token_max[token_max <= upper_q]
    kept_lo = token_min[token_min >= lower_q]
    hi = kept_hi.max() if kept_hi.numel() else upper_q
    lo = kept_lo.min() if kept_lo.numel() else lower_q
    return lo.reshape(1), hi.reshape(1)


def _outputs(ctx) -> list[torch.Tensor]:
    return run_block(ctx.block, ctx.inputs, ctx.device)


def _loss(ctx) -> float:
    return sum(((q - f) ** 2).mean().item() for q, f in zip(_outputs(ctx), ctx.targets)) / max(1, len(ctx.targets))


def after_calibration(ctx) -> None:
    if ctx.cfg.a_bits is None:
        return
    extremes, layers = token_extremes(ctx)
    if not layers:
        return
    lowest = LOWEST_RATIO[ctx.cfg.a_bits]
    best = (float("inf"), 1.0)
    ratio = 1.0
    while ratio >= lowest - 1e-9:
        for name, layer in layers.items():
            layer.a_quant.set_qparams(*qparams_from_range(*clip_range(*extremes[name], ratio), layer.a_quant.spec))
        loss = _loss(ctx)
        if loss < best[0]:
            best = (loss, ratio)
        ratio = round(ratio - 0.01, 4)
    for name, layer in layers.items():
        layer.a_quant.set_qparams(*qparams_from_range(*clip_range(*extremes[name], best[1]), layer.a_quant.spec))
    ctx.notes["twc_ratio"] = best[1]
    ctx.notes["twc_coarse_mse"] = best[0]
    if ctx.cfg.twc_iters > 0:
        _learn_ranges(ctx, list(layers.values()))


def _learn_ranges(ctx, layers) -> None:
    """Fine stage: LSQ+ on the activation steps and zero points against the float block output."""
    coarse = [(layer.a_quant.scale.detach().clone(), layer.a_quant.zero_point.detach().clone()) for layer in layers]
    frozen = [p for p in ctx.block.parameters() if p.requires_grad]
    for p in frozen:  # only the activation ranges learn
        p.requires_grad_(False)
    params = []
    for layer in layers:
        q = layer.a_quant
        q.make_learnable()
        q.zero_point = torch.nn.Parameter(q.zero_point.detach().clone())
        params += [q.scale, q.zero_point]
    opt = torch.optim.Adam(params, lr=ctx.cfg.lr_act)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=ctx.cfg.twc_iters, eta_min=0.0)
    g = torch.Generator().manual_seed(ctx.cfg.seed + ctx.index)
    before = _loss(ctx)
    for _ in range(ctx.cfg.twc_iters):
        j = int(torch.randint(len(ctx.inputs), (1,), generator=g))
        hidden, args, kwargs = ctx.inputs[j]
        out = block_output(ctx.block(hidden.to(ctx.device), *args, **kwargs))
        loss = (out.float() - ctx.targets[j].float()).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            for layer in layers:
                q = layer.a_quant
                q.zero_point.clamp_(q.spec.qmin, q.spec.qmax)
    for layer in layers:
        q = layer.a_quant
        zp = q.zero_point.detach().round().clone()
        del q.zero_point
        q.register_buffer("zero_point", zp)
        q.freeze_scale()
    for p in frozen:
        p.requires_grad_(True)
    after = _loss(ctx)
    ctx.notes["twc_fine_mse"] = after
    if after > before:  # learning made it worse on the calibration set: keep the coarse ranges
        for layer, (scale, zp) in zip(layers, coarse):
            layer.a_quant.set_qparams(scale, zp)
        ctx.notes["twc_fine_kept"] = False


METHOD = TransformerMethod("Outlier Suppression: Gamma Migration + Token-Wise Clipping (coarse quantile search, "
                           "fine LSQ+ range learning)", transform, after_calibration)
