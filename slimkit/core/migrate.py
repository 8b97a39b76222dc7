"""Function-preserving channel transforms: an activation X read by a group of linears becomes (X - shift) / scale,
and the linears absorb the inverse (W diag(scale), b + W shift), so the full-precision model computes the same
function while the quantizer sees a tamer tensor. Used by Gamma Migration (Outlier Suppression), SmoothQuant
and OS+; where the transform folds is the group's `fold` (see families.py).
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import SlimkitError
from .families import Group
from .wrap import float_layer, input_affine, set_input_affine, weight_oi


@torch.no_grad()
def apply_transform(model: nn.Module, group: Group, scale: torch.Tensor, shift: torch.Tensor | None = None) -> None:
    """Replace the activation the group's linears read by (X - shift) / scale, keeping the model's function."""
    layers = [float_layer(model.get_submodule(n)) for n in group.layers]
    dtype = weight_oi(layers[0]).dtype
    exact = torch.float64 if dtype == torch.float64 else torch.float32      # the fold's own arithmetic
    scale = scale.to(weight_oi(layers[0]).device, exact)
    shift = None if shift is None or not torch.any(shift != 0) else shift.to(scale.device, exact)
    fold = fold_of(model, group)
    if shift is not None and not can_shift(model, group):  # checked first: never leave a half-applied transform
        where = {"norm": f"{group.prev} (a norm without bias, e.g. RMSNorm) or a bias-less linear",
                 "linear": f"{group.prev}'s non-linearity"}.get(fold, "a linear without bias")
        raise SlimkitError(f"{group.name}: a channel shift cannot fold into {where}; use scaling only")
    for layer in layers:
        w = weight_oi(layer)
        if shift is not None:
            layer.bias.add_((w.to(exact) @ shift).to(layer.bias.dtype))
        w.mul_(scale.to(dtype))
    if fold == "norm":
        norm = model.get_submodule(group.prev)
        if shift is not None:
            norm.bias.sub_(shift.to(norm.bias.dtype))
        norm.weight.div_(scale.to(norm.weight.dtype))
        if getattr(norm, "bias", None) is not None:
            norm.bias.div_(scale.to(norm.bias.dtype))
    elif fold == "linear":
        prev = float_layer(model.get_submodule(group.prev))
        weight_oi(prev).div_(scale.to(dtype)[:, None])
        if prev.bias is not None:
            prev.bias.div_(scale.to(prev.bias.dtype))
    elif fold == "input":
        for layer in layers:  # compose with an earlier transform: ((x - z0)/s0 - z)/s = (x - z0 - s0 z)/(s0 s)
            old = input_affine(layer)
            s0, z0 = old if old is not None else (torch.ones_like(scale), torch.zeros_like(scale))
            z = torch.zeros_like(scale) if shift is None else shift
            set_input_affine(layer, s0 * scale, z0 + s0 * z)
    else:
        raise SlimkitError(f"unknown fold {group.fold!r} for group {group.name}")


def fold_of(model: nn.Module, group: Group) -> str:
    """Where the group's transform folds: its family's `fold`, except that a norm without weight (LayerNorm with
    elementwise_affine=False) has no gamma to take a scale, so the transform stays at the linears' input."""
    if group.fold == "norm" and getattr(model.get_submodule(group.prev), "weight", None) is None:
        return "input"
    return group.fold


def can_shift(model: nn.Module, group: Group) -> bool:
    """Whether a channel shift folds for this group: a norm with bias, or consumers with biases."""
    fold = fold_of(model, group)
    if fold == "norm":
        return getattr(model.get_submodule(group.prev), "bias", None) is not None and all(
            float_layer(model.get_submodule(n)).bias is not None for n in group.layers)
    if fold == "input":
        return all(float_layer(model.get_submodule(n)).bias is not None for n in group.layers)
    return False


def weight_absmax_in(model: nn.Module, group: Group) -> torch.Tensor:
    """Per input channel, the largest |weight| over the group's linears."""
    return torch.stack([weight_oi(float_layer(model.get_submodule(n))).detach().abs().amax(0).float()
                        for n in group.layers]).amax(0)


def gamma_scale(model: nn.Module, group: Group, eps: float = 1e-5) -> torch.Tensor | None:
    """Gamma Migration's scale: the producing norm's weight (gamma), so the quantized activation is the
    non-scaling norm output x_hat + beta / gamma. Channels with |gamma| < eps keep scale 1."""
    if group.fold == "linear" or group.prev is None:
        return None
    weight = getattr(model.get_submodule(group.prev), "weight", None)
    if weight is None:             # a norm without affine parameters: no gamma to migrate
        return None
    gamma = weight.detach().float()
    return torch.where(gamma.abs() < eps, torch.ones_like(gamma), gamma)


def smoothquant_scale(act_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """SmoothQuant: s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), moving difficulty from activations to weights."""
    a = act_absmax.float().clamp(min=1e-5)
    w = w_absmax.float().clamp(min=1e-5)
    return (a.pow(alpha) / w.pow(1 - alpha)).clamp(min=1e-5)
