"""BatchNorm folding: merge each BatchNorm2d into the convolution that feeds it, before quantization.

Pairs are found by running the model once with hooks: a BatchNorm whose input is the very tensor a
Conv2d just produced belongs to that conv. Folding  W' = W * g / sqrt(v + eps),
b' = (b - m) * g / sqrt(v + eps) + beta  and replacing the BatchNorm by nn.Identity keeps the function;
`fold_bn` checks that on the example input and refuses (with the error) if it does not hold.
"""
from __future__ import annotations

import contextlib
import weakref

import torch
from torch import nn

from ..errors import SlimkitError
from .wrap import set_submodule


def find_conv_bn_pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """(conv name, bn name) pairs where the BN consumes the conv's output directly."""
    names = {m: n for n, m in model.named_modules()}
    last_outputs: dict[int, tuple[str, weakref.ref]] = {}
    pairs: list[tuple[str, str]] = []
    used: set[str] = set()

    def conv_hook(module, inputs, output):
        last_outputs[id(output)] = (names[module], weakref.ref(output))

    def bn_pre_hook(module, inputs):
        conv, ref = last_outputs.get(id(inputs[0]), (None, None))
        # ids are reused once a tensor is freed: the pair holds only if the very conv output is still alive here
        if conv is not None and ref() is inputs[0] and conv not in used:
            pairs.append((conv, names[module]))
            used.add(conv)

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.BatchNorm2d):
            handles.append(m.register_forward_pre_hook(bn_pre_hook))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return pairs


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold bn's affine normalisation into conv's weight and bias, in place."""
    with torch.no_grad():
        std = torch.sqrt(bn.running_var + bn.eps)
        gamma = bn.weight if bn.weight is not None else torch.ones_like(std)
        beta = bn.bias if bn.bias is not None else torch.zeros_like(std)
        factor = gamma / std
        conv.weight.mul_(factor.reshape(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        new_bias = (bias - bn.running_mean) * factor + beta
        conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype))


@contextlib.contextmanager
def full_precision_math():
    """Turn TF32 off for a check that compares float outputs at 1e-5 (TF32 alone is off by ~1e-3)."""
    matmul, conv = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, conv


def fold_bn(model: nn.Module, example: torch.Tensor, check: bool = True, rtol: float = 1e-5) -> list[tuple[str, str]]:
    """Fold every Conv2d→BatchNorm2d pair of `model` in place; returns the pairs folded."""
    was_training = model.training
    model.eval()
    pairs = find_conv_bn_pairs(model, example)
    if not pairs:
        return pairs
    with torch.no_grad(), full_precision_math():
        before = model(example) if check else None
    undo = []
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        undo.append((conv, conv.weight.detach().clone(), conv.bias, bn_name, bn))
        fold_conv_bn(conv, bn)
        set_submodule(model, bn_name, nn.Identity())
    if check:
        with torch.no_grad(), full_precision_math():
            after = model(example)
        err = ((after - before).norm() / before.norm().clamp_min(1e-12)).item()
        if err > rtol * 10:
            for conv, weight, bias, bn_name, bn in undo:  # leave the model as it was
                with torch.no_grad():
                    conv.weight.copy_(weight)
                conv.bias = bias
                set_submodule(model, bn_name, bn)
            model.train(was_training)
            raise SlimkitError(
                f"folding BatchNorm into the preceding convolutions changed the model's output (relative error {err:.2e}); "
                "a convolution's output is probably used elsewhere too. Pass fold_bn=False to quantize without folding.")
    model.train(was_training)
    return pairs
