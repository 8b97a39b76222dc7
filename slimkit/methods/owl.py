"""One-shot LLM pruning baselines: Wanda's importance score and OWL's outlier-weighted layer-wise rates.

Wanda (Sun et al., 2023): a weight's importance is |W_ij| * ||X_j||_2, its magnitude times the L2 norm of its
input channel over the calibration tokens; each output row drops its least important weights (rows are the
comparison groups), no weight is updated.
OWL (Yin et al., 2023): layers holding more activation outliers keep more weights. A block's outlier ratio D is
the share of its Wanda scores above M times the mean of all its linears' scores taken together (M = 5; the
public code's check_outlier_mean over the block's concatenated scores); the ratios are min-max normalised
to [0, 2*lambda] (lambda = 0.08) and centred, and density_b = (1 - target) + (that centred ratio); every linear
of block b gets that rate, then slimkit.core.sparsity.exact_counts makes the global total exact.
"""
from __future__ import annotations

import torch
from torch import nn

from ..core.sparsity import feed_inputs
from ..core.wrap import is_conv1d, weight_oi


def input_norms(model: nn.Module, layers: dict[str, nn.Module], data: torch.Tensor, device: torch.device,
                batch_size: int = 8, progress: bool = False) -> dict[str, torch.Tensor]:
    """Per layer, the L2 norm of each input channel over every calibration token (fp32, on the CPU)."""
    sums: dict[str, torch.Tensor] = {}

    def add(name, x):
        sums[name] = sums.get(name, 0) + x.pow(2).sum(0)
    model.eval().to(device)
    with torch.no_grad():
        feed_inputs(model, layers, data, device, add, "wanda / owl", batch_size, progress=progress)
    return {k: v.sqrt().cpu() for k, v in sums.items()}


def wanda_scores(layer: nn.Module, norm: torch.Tensor) -> torch.Tensor:
    """|W| * ||X_j|| as (out, in)."""
    return weight_oi(layer).detach().abs().float().cpu() * norm[None, :]


def wanda_mask(layer: nn.Module, norm: torch.Tensor, pruned: int) -> torch.Tensor:
    """Keep-mask (shaped as the weight parameter) dropping `pruned` weights, spread evenly over the output rows,
    each row dropping its lowest Wanda scores."""
    scores = wanda_scores(layer, norm)
    out, _ = scores.shape
    per_row = torch.full((out,), pruned // out, dtype=torch.long)
    per_row[: pruned % out] += 1
    order = torch.argsort(scores, dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(scores.shape[1]).expand(out, -1))
    keep = ranks >= per_row[:, None]
    keep = keep.to(layer.weight.device)
    return keep.t().contiguous() if is_conv1d(layer) else keep


def owl_rates(layers: dict[str, nn.Module], norms: dict[str, torch.Tensor], blocks: list[str], target: float,
              m: float = 5.0, lam: float = 0.08) -> dict[str, float]:
    """Per-layer sparsity rates from each block's outlier ratio (see the module docstring)."""
    block_of = {k: next((b for b in blocks if k.startswith(b + ".")), k) for k in layers}
    members: dict[str, list[str]] = {}
    for name in layers:
        members.setdefault(block_of[name], []).append(name)
    names = list(members)
    ratio = []
    for b in names:     # one block's scores at a time: outliers are those above M times their mean, taken together
        scores = torch.cat([wanda_scores(layers[k], norms[k]).flatten() for k in members[b]])
        ratio.append(float((scores > m * scores.mean()).sum()) / scores.numel())
    ratio = torch.tensor(ratio, dtype=torch.float64)
    spread = ratio.max() - ratio.min()
    norm = (ratio - ratio.min()) / spread * (2 * lam) if spread > 0 else torch.zeros_like(ratio)
    density = (1 - target) + (norm - norm.mean())
    rate = {b: float((1 - d).clamp(0.0, 1.0)) for b, d in zip(names, density)}
    return {k: rate[block_of[k]] for k in layers}
