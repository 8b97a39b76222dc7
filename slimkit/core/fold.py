"""BatchNorm folding: merge each BatchNorm2d into the convolution that feeds it, before quantization.

Pairs are found by running the model once with hooks: a BatchNorm whose input is the very tensor a
Conv2d just produced belongs to that conv. Folding  W' = W * g / sqrt(v + eps),
b' = (b - m) * g / sqrt(v + eps) + beta  and replacing the BatchNorm by nn.Identity keeps the function;
`fold_bn` checks that on the example input and leaves unfolded (with a warning) any pair for which it does not
hold.
"""
from __future__ import annotations

import contextlib
import weakref
from collections.abc import Mapping

import torch
from torch import nn

from ..errors import warn
from .adapters import run_hooked
from .wrap import set_submodule


def _foldable(bn: nn.BatchNorm2d) -> bool:
    """A BatchNorm with running statistics (track_running_stats=False normalises by each batch's own)."""
    return bn.running_mean is not None and bn.running_var is not None


def remainder(bn: nn.BatchNorm2d) -> nn.Module | None:
    """What takes a folded BatchNorm's place: nn.Identity for a plain one; its dropout and activation for a
    subclass whose forward applies them after normalising (timm's BatchNormAct2d: .drop, then .act); None for
    another subclass with a forward of its own, which is not folded."""
    if type(bn).forward is nn.modules.batchnorm._BatchNorm.forward:
        return nn.Identity()
    parts = [getattr(bn, name, None) for name in ("drop", "act")]
    return nn.Sequential(*parts) if all(isinstance(p, nn.Module) for p in parts) else None


def find_conv_bn_pairs(model: nn.Module, example: torch.Tensor, shared: list | None = None) -> list[tuple[str, str]]:
    """(conv name, bn name) pairs where the BN consumes the conv's output directly: the very tensor, unchanged
    in place since (a conv -> ReLU(inplace) -> BN chain is no pair), each conv and BN called once in the forward
    (a module shared by two places cannot take the other's fold) and the BN keeping running statistics. `shared`,
    if given, receives the pairs left out for running more than once."""
    names = {m: n for n, m in model.named_modules()}
    last_outputs: dict[int, tuple[str, weakref.ref, int]] = {}
    candidates: list[tuple[str, str]] = []
    calls: dict[str, int] = {}

    def conv_hook(module, inputs, output):
        calls[names[module]] = calls.get(names[module], 0) + 1
        last_outputs[id(output)] = (names[module], weakref.ref(output), output._version)

    def bn_pre_hook(module, inputs):
        calls[names[module]] = calls.get(names[module], 0) + 1
        conv, ref, version = last_outputs.get(id(inputs[0]), (None, None, None))
        # ids are reused once a tensor is freed: the pair holds only if the very conv output is still alive here
        if conv is not None and ref() is inputs[0] and inputs[0]._version == version and _foldable(module):
            candidates.append((conv, names[module]))

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.BatchNorm2d):
            handles.append(m.register_forward_pre_hook(bn_pre_hook))
    run_hooked(model, example, handles)
    if shared is not None:
        shared.extend(dict.fromkeys((c, b) for c, b in candidates if calls[c] != 1 or calls[b] != 1))
    return [(c, b) for c, b in candidates if calls[c] == 1 and calls[b] == 1]


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


def _flat(out) -> torch.Tensor:
    """Every floating-point tensor of a model's output (a tensor, a tuple / list / dict / ModelOutput of them,
    nested) as one flat float64 vector, for comparing two outputs."""
    if isinstance(out, torch.Tensor):
        return out.detach().double().flatten() if out.is_floating_point() else out.new_zeros(0, dtype=torch.float64)
    values = out.values() if isinstance(out, Mapping) else out if isinstance(out, (tuple, list)) else ()
    parts = [_flat(v) for v in values]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def _rel_change(model: nn.Module, example: torch.Tensor, before: torch.Tensor) -> float:
    with torch.no_grad(), full_precision_math():
        after = _flat(model(example))
    if after.shape != before.shape:
        return float("inf")
    return ((after - before).norm() / before.norm().clamp_min(1e-12)).item()


def fold_bn(model: nn.Module, example: torch.Tensor, check: bool = True, rtol: float = 1e-5) -> list[tuple[str, str]]:
    """Fold every Conv2d→BatchNorm2d pair of `model` in place; returns the pairs folded.

    With `check`, the model's outputs on `example` must stay the same (relative error under 10 * rtol). When
    folding all pairs at once changes them (a conv output that also feeds a residual or a concatenation beside
    its BatchNorm), the pairs are folded one at a time, each kept only if the outputs hold, and a warning names
    those left unfolded (they run as float BatchNorms; quantization goes on). Any error restores the model."""
    was_training = model.training
    model.eval()
    shared: list = []
    pairs = find_conv_bn_pairs(model, example, shared)
    if shared:
        warn(f"BatchNorm folding: {len(shared)} conv -> BatchNorm pair(s) left unfolded ("
                      f"{', '.join(f'{c} -> {b}' for c, b in shared[:5])}{' ...' if len(shared) > 5 else ''}): they run "
                      "more than once in the forward pass (a shared module), so one fold cannot serve every call. "
                      "They stay float BatchNorms after their quantized convs.")
    odd = [(c, b) for c, b in pairs if remainder(model.get_submodule(b)) is None]
    if odd:
        kinds = sorted({type(model.get_submodule(b)).__name__ for _, b in odd})
        warn(f"BatchNorm folding: {len(odd)} BatchNorm(s) of class {', '.join(kinds)} left unfolded "
                      f"({', '.join(b for _, b in odd[:5])}{' ...' if len(odd) > 5 else ''}): a BatchNorm2d subclass "
                      "with a forward of its own may do more than normalise. They stay float BatchNorms after their "
                      "quantized convs.")
        pairs = [p for p in pairs if p not in odd]
    if not pairs:
        model.train(was_training)
        return pairs
    with torch.no_grad(), full_precision_math():
        before = _flat(model(example)) if check else None
    done: list[tuple] = []

    def fold(conv_name: str, bn_name: str) -> None:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        done.append((conv, conv.weight.detach().clone(), conv.bias, bn_name, bn))
        fold_conv_bn(conv, bn)
        set_submodule(model, bn_name, remainder(bn))

    def undo(upto: int = 0) -> None:
        while len(done) > upto:
            conv, weight, bias, bn_name, bn = done.pop()
            with torch.no_grad():
                conv.weight.copy_(weight)
            conv.bias = bias
            set_submodule(model, bn_name, bn)

    try:
        for conv_name, bn_name in pairs:
            fold(conv_name, bn_name)
        if check and _rel_change(model, example, before) > rtol * 10:
            undo()
            kept, refused = [], []
            for pair in pairs:       # one at a time: keep those that leave the outputs as they were
                fold(*pair)
                if _rel_change(model, example, before) > rtol * 10:
                    undo(len(done) - 1)
                    refused.append(pair)
                else:
                    kept.append(pair)
            listed = ", ".join(f"{c} -> {b}" for c, b in refused[:5]) + (" ..." if len(refused) > 5 else "")
            warn(f"BatchNorm folding: {len(refused)} conv -> BatchNorm pair(s) left unfolded ({listed}): "
                          "folding them changes the model's output, so the conv's output is also used elsewhere. "
                          "They stay float BatchNorms after their quantized convs.")
            pairs = kept
    except BaseException:
        undo()
        model.train(was_training)
        raise
    model.train(was_training)
    return pairs
