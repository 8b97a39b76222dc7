"""Sparsity masks and layer-wise sparsity allocations: the parts every pruning method shares.

A method decides how many weights each layer loses (its *allocation*: uniform, global magnitude, ERK, or FCPTS's
learned rates); the masks then keep each layer's largest-magnitude weights (unstructured), or the n largest of
every m consecutive weights along the reduction dimension (N:M, e.g. 2:4, what sparse tensor cores run).

Exactness: `exact_counts` turns any per-layer rates into integer counts whose sum is round(target * total), so the
achieved global sparsity over the counted layers equals the target to within one weight, whatever the rates.
Ties in magnitude are broken by position (a stable sort), so masks are deterministic.
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from torch import nn

from ..errors import SlimkitError


def check_target(sparsity: float) -> float:
    """The target as a float: any real number in [0, 1) (NumPy and 0-d torch scalars too; not a bool)."""
    if isinstance(sparsity, torch.Tensor) and sparsity.numel() == 1 and sparsity.is_floating_point():
        sparsity = sparsity.item()
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real) or not 0.0 <= float(sparsity) < 1.0:
        raise SlimkitError(f"sparsity must be in [0, 1) (the share of weights set to zero), got {sparsity!r}")
    return float(sparsity)


def check_nm(n: int, m: int) -> None:
    if not (isinstance(n, int) and isinstance(m, int)) or m < 2 or not 0 < n < m:
        raise SlimkitError(f"N:M sparsity needs integers 0 < N < M (e.g. 2:4), got {n}:{m}")


def weight_2d(layer: nn.Module) -> torch.Tensor:
    """The weight as (out, reduction): Linear (out, in); Conv (out, in/groups * kernel); GPT-2's Conv1D, stored
    (in, out), transposed (a view, no copy)."""
    from .wrap import is_conv1d

    w = layer.weight.t() if is_conv1d(layer) else layer.weight
    return w.reshape(w.shape[0], -1)


def nm_groups(layer: nn.Module) -> torch.Tensor:
    """The weight as (rows, input channels), rows of which N:M takes groups of M consecutive entries: the layout
    sparse tensor cores run (cuSPARSELt, TensorRT, apex ASP), whose groups run along the input channels. A Linear:
    (out, in); a convolution (K, C, *kernel): one row per output channel and kernel position, (K * R * S, C); GPT-2's
    Conv1D, stored (in, out): transposed."""
    from .wrap import is_conv1d

    w = layer.weight
    if is_conv1d(layer):
        return w.t()
    if w.dim() > 2:
        return w.movedim(1, -1).reshape(-1, w.shape[1])
    return w


def nm_inputs(layer: nn.Module) -> int:
    """The length of the rows N:M groups (input channels per group of a convolution)."""
    return nm_groups(layer).shape[1]


def nm_keep(layer: nn.Module, n: int, m: int) -> torch.Tensor:
    """The N:M keep-mask of a layer, shaped as its weight parameter: at most n of every m consecutive input
    channels kept, per output channel (and kernel position)."""
    from .wrap import is_conv1d

    w = layer.weight
    keep = nm_mask(nm_groups(layer), n, m)
    if is_conv1d(layer):
        return keep.t().contiguous()
    if w.dim() > 2:
        return keep.reshape(w.shape[0], *w.shape[2:], w.shape[1]).movedim(-1, 1).contiguous()
    return keep


# ---------- allocations: how many weights each layer loses ----------

def exact_counts(rates: dict[str, float], sizes: dict[str, int], target: float) -> dict[str, int]:
    """Integer pruned counts k_i in [0, n_i], summing to round(target * sum n_i), following `rates` as closely as
    that allows: the rates are shifted by one common amount in logit space until their expected total is the
    target (bisection; their order is kept), then rounded by largest remainder."""
    target = check_target(target)
    names = list(sizes)
    n = np.array([sizes[k] for k in names], dtype=np.float64)
    total = int(round(target * n.sum()))
    r = np.clip(np.array([rates[k] for k in names], dtype=np.float64), 1e-12, 1 - 1e-12)
    logit = np.log(r) - np.log1p(-r)
    expit = lambda c: 1.0 / (1.0 + np.exp(-(logit + c)))   # noqa: E731
    lo, hi = -80.0, 80.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if (expit(mid) * n).sum() < total else (lo, mid)
    want = np.clip(expit((lo + hi) / 2) * n, 0, n)
    k = np.floor(want).astype(np.int64)
    short = total - int(k.sum())
    order = np.argsort(-(want - k), kind="stable")          # largest remainder first
    for i in (order if short > 0 else order[::-1]):
        if short == 0:
            break
        if short > 0 and k[i] < n[i]:
            k[i], short = k[i] + 1, short - 1
        elif short < 0 and k[i] > 0:
            k[i], short = k[i] - 1, short + 1
    assert short == 0 and k.sum() == total, "exact_counts: rounding failed"   # cannot happen: 0 <= total <= sum n
    return {name: int(v) for name, v in zip(names, k)}


def uniform_rates(sizes: dict[str, int], target: float) -> dict[str, float]:
    """Every layer at the target rate."""
    target = check_target(target)
    return {k: target for k in sizes}


def erk_rates(shapes: dict[str, tuple[int, ...]], target: float) -> dict[str, float]:
    """Erdos-Renyi-Kernel (Evci et al., RigL): a layer's density is proportional to sum(shape) / prod(shape),
    scaled to meet the target; layers whose density would exceed 1 stay dense and the rest are rescaled."""
    target = check_target(target)
    sizes = {k: math.prod(s) for k, s in shapes.items()}
    raw = {k: sum(s) / math.prod(s) for k, s in shapes.items()}
    dense: set[str] = set()
    while True:
        budget = (1 - target) * sum(sizes.values()) - sum(sizes[k] for k in dense)
        scale = budget / sum(raw[k] * sizes[k] for k in raw if k not in dense)
        over = {k for k in raw if k not in dense and raw[k] * scale > 1}
        if not over:
            return {k: 0.0 if k in dense else 1 - raw[k] * scale for k in raw}
        dense |= over


def global_magnitude_counts(weights: dict[str, torch.Tensor], target: float) -> dict[str, int]:
    """Pruned counts from one magnitude threshold over all layers: the round(target * total) smallest |w| of the
    whole model, ties broken by position (layer order, then index)."""
    target = check_target(target)
    names = list(weights)
    flat = torch.cat([weights[k].detach().abs().flatten().float().cpu() for k in names])
    total = int(round(target * flat.numel()))
    owner = torch.repeat_interleave(torch.arange(len(names)), torch.tensor([weights[k].numel() for k in names]))
    gone = owner[torch.argsort(flat, stable=True)[:total]]
    counts = torch.bincount(gone, minlength=len(names))
    return {k: int(c) for k, c in zip(names, counts)}


# ---------- masks ----------

def magnitude_mask(w: torch.Tensor, pruned: int) -> torch.Tensor:
    """Boolean keep-mask of w's shape with exactly `pruned` zeros at the smallest |w| (ties: lower index first)."""
    if not 0 <= pruned <= w.numel():
        raise SlimkitError(f"cannot prune {pruned} of {w.numel()} weights")
    keep = torch.ones(w.numel(), dtype=torch.bool, device=w.device)
    keep[torch.argsort(w.detach().abs().flatten(), stable=True)[:pruned]] = False
    return keep.view(w.shape)


def nm_mask(w2d: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean keep-mask of a (out, reduction) weight keeping the n largest |w| of every m consecutive weights
    along the reduction dimension (ties: lower index first)."""
    check_nm(n, m)
    out, red = w2d.shape
    if red % m:
        raise SlimkitError(f"N:M needs the input channels to divide by M: {red} is not a multiple of {m}; leave "
                           "this layer dense or use unstructured sparsity")
    groups = w2d.detach().abs().reshape(out, red // m, m)
    order = torch.argsort(groups, dim=-1, stable=True, descending=True)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order[..., :n], True)
    return keep.reshape(out, red)


def is_nm(keep2d: torch.Tensor, n: int, m: int) -> bool:
    """Whether every group of m consecutive reduction entries keeps at most n weights."""
    out, red = keep2d.shape
    return red % m == 0 and bool((keep2d.reshape(out, red // m, m).sum(-1) <= n).all())


def apply_mask(w: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """w with the pruned entries set to +0.0 (not w * keep, which leaves -0.0 where w was negative)."""
    return torch.where(keep, w, torch.zeros((), dtype=w.dtype, device=w.device))


# ---------- calibration statistics of layer inputs ----------

class _Stop(Exception):
    pass


@torch.no_grad()
def record_inputs(layers: dict[str, nn.Module], on_input, method: str, run) -> None:
    """Call run() with a hook on every layer that passes on_input(name, x) each input as fp32 (tokens, in); then
    check every layer saw one. Convolutions are refused: `method` scores weights by their input channels."""
    for name, layer in layers.items():
        if isinstance(layer, nn.modules.conv._ConvNd):
            raise SlimkitError(f"{method} scores linear layers by their inputs; {name} is a convolution: use fcpts, "
                               "uniform, global_magnitude or erk for CNNs")
    seen = set()

    def hook(name):
        def record(module, args):
            seen.add(name)
            on_input(name, args[0].detach().float().reshape(-1, args[0].shape[-1]))
        return record

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    missing = [k for k in layers if k not in seen]
    if missing:
        raise SlimkitError(f"{method} scores a layer by the inputs its forward receives, and {missing[0]}"
                           f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''} never ran its forward "
                           "on the calibration data (nn.MultiheadAttention, for one, uses its out_proj's weight "
                           "directly): leave such layers dense with exclude=[...] (e.g. '*out_proj'), or use fcpts, "
                           "uniform, global_magnitude or erk")


def feed_inputs(model: nn.Module, layers: dict[str, nn.Module], data: torch.Tensor, device: torch.device,
                on_input, method: str, batch_size: int = 8, stop_at: nn.Module | None = None,
                progress: bool = False) -> None:
    """Run the calibration data through `model` in batches and call on_input(name, x) with each counted linear
    layer's input as fp32 (tokens, in) (record_inputs); the forward stops after `stop_at` when given."""
    from tqdm.auto import tqdm

    def stop(module, args, out):
        raise _Stop

    def run():
        starts = range(0, data.shape[0], batch_size)
        for i in tqdm(starts, desc=f"{method}: calibration inputs", disable=not progress, leave=False):
            try:
                model(data[i:i + batch_size].to(device))
            except _Stop:
                pass
    handle = stop_at.register_forward_hook(stop) if stop_at is not None else None
    try:
        record_inputs(layers, on_input, method, run)
    finally:
        if handle is not None:
            handle.remove()


# ---------- compact storage: values + bitmask ----------

def stored_bytes(w: torch.Tensor) -> tuple[int, bool]:
    """(bytes, packed): what slimkit.save stores for a sparse layer's float weight `w`: its non-zero values and a
    one-bit mask (packed), or the weight as it is where that is no larger (a layer that holds few zeros, such as one
    fine-tuned after sparsify)."""
    dense = w.numel() * w.element_size()
    packed = int((w != 0).sum()) * w.element_size() + (w.numel() + 7) // 8
    return (packed, True) if packed < dense else (dense, False)


def pack_sparse(w: torch.Tensor, keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """A masked weight as its kept values (in order) and a little-endian bitmask (uint8): exact, and about
    (1 - sparsity) * bits + 1 bits a weight."""
    flat = keep.flatten().cpu().numpy()
    bits = np.packbits(flat, bitorder="little")
    return {"values": w.detach().flatten()[keep.flatten()].cpu().contiguous(),
            "bitmask": torch.from_numpy(bits)}


def unpack_sparse(values: torch.Tensor, bitmask: torch.Tensor, shape: tuple[int, ...],
                  check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, keep-mask) from pack_sparse's tensors: the same values at the same places, zeros elsewhere.
    check=False reads the mask alone (values stored elsewhere, e.g. as quantization codes)."""
    count = math.prod(shape)
    keep = torch.from_numpy(np.unpackbits(bitmask.numpy(), bitorder="little")[:count].astype(bool))
    if not check:
        return torch.zeros(0), keep.view(shape)
    if int(keep.sum()) != values.numel():
        raise SlimkitError(f"corrupt sparse tensor: the bitmask keeps {int(keep.sum())} weights but "
                           f"{values.numel()} values are stored")
    w = torch.zeros(count, dtype=values.dtype)
    w[keep] = values
    return w.view(shape), keep.view(shape)
