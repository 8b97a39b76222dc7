"""SmoothQuant (Xiao et al., 2023), the usual baseline for the outlier methods: per input channel
s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) divides the activation and multiplies the weights, folded into the
preceding norm (or linear), so activation outliers move into the weights. alpha = 0.5 by default."""
from ..core.migrate import apply_transform, smoothquant_scale, weight_absmax_in
from .transformer_common import TransformerMethod


def transform(ctx) -> None:
    for group in ctx.groups:
        stats = ctx.stats[group.name]
        scale = smoothquant_scale(stats.absmax, weight_absmax_in(ctx.model, group), ctx.cfg.alpha)
        apply_transform(ctx.model, group, scale)


METHOD = TransformerMethod("SmoothQuant: per-channel migration of activation range into the weights (alpha)",
                           transform)
