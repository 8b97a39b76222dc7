"""Model adapters for CNNs: which modules form the blocks that reconstruction optimises one at a time.

A block is a sub-module called once per forward with one tensor in and one tensor out. Known residual
block classes are recognised by name (ResNet BasicBlock / Bottleneck, MobileNetV2 InvertedResidual,
EfficientNet(-Lite) MBConvBlock, timm's variants); `register_block_type` adds a user's own. Every
quantizable layer outside a block becomes a block of its own, so an unknown CNN still quantizes (the
fallback). Execution order is read from one traced forward, so models with any control flow work.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import SlimkitError, warn
from .wrap import layer_modules

BLOCK_TYPES: set[str] = {
    "BasicBlock", "Bottleneck",  # ResNet (torchvision, timm, ours)
    "InvertedResidual",  # MobileNetV2 / V3 (torchvision, timm)
    "MBConvBlock", "MBConv", "FusedMBConv",  # EfficientNet(-Lite), EfficientNetV2
    "DepthwiseSeparableConv", "EdgeResidual",  # timm's EfficientNet family
    "ResBottleneckBlock",  # RegNet (torchvision)
    "ResNetBasicLayer", "ResNetBottleNeckLayer",  # Hugging Face ResNet
    "MobileNetV2InvertedResidual",  # Hugging Face MobileNetV2
    "RegNetXLayer", "RegNetYLayer",  # Hugging Face RegNet
}


def register_block_type(cls_or_name: type | str) -> None:
    """Treat modules of this class as reconstruction blocks (for a model family slimkit does not know)."""
    BLOCK_TYPES.add(cls_or_name if isinstance(cls_or_name, str) else cls_or_name.__name__)


@dataclass
class Block:
    """One unit of reconstruction: a module path and the quantizable layers (full paths) inside it."""

    name: str
    layers: list[str]
    order: int  # position of its first call in the forward pass


def run_hooked(model: nn.Module, example: torch.Tensor, handles: list) -> None:
    """One no-grad forward of `model` on `example`, then the tracing hooks in `handles` removed (even on error)."""
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()


def trace_calls(model: nn.Module, example: torch.Tensor, modules: dict[str, nn.Module]) -> dict[str, dict]:
    """Run the model once; for each named module record first-call order, call count, and whether its
    call had exactly one tensor argument and returned one tensor (what a block must do)."""
    info: dict[str, dict] = {}
    counter = [0]
    handles = []

    def make_hooks(name):
        def pre(module, args, kwargs):
            rec = info.setdefault(name, {"order": counter[0], "calls": 0, "simple": True})
            counter[0] += 1
            rec["calls"] += 1
            tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
            if len(tensors) != 1 or not isinstance(args[0] if args else None, torch.Tensor):
                rec["simple"] = False

        def post(module, args, kwargs, output):
            if not isinstance(output, torch.Tensor):
                info[name]["simple"] = False
        return pre, post

    for name, m in modules.items():
        pre, post = make_hooks(name)
        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(m.register_forward_hook(post, with_kwargs=True))
    run_hooked(model, example, handles)
    return info


def find_blocks(model: nn.Module, example: torch.Tensor, granularity: str = "block",
                block_names: list[str] | None = None) -> tuple[list[Block], list[str]]:
    """Blocks in execution order, and the quantizable layers that cannot be reconstructed (never called,
    or called more than once, e.g. shared weights).

    granularity="layer" makes every quantizable layer its own block (AdaRound); "block" groups layers into
    the adapter's blocks (BRECQ, QDrop). `block_names` overrides the detected blocks with given module paths.
    """
    layers = layer_modules(model)
    candidates: dict[str, nn.Module] = {}
    if granularity == "block":
        if block_names is not None:
            missing = [n for n in block_names if n not in dict(model.named_modules())]
            if missing:
                raise SlimkitError(f"blocks names {missing[0]!r}, which is no module of the model: give module paths "
                                   "as named_modules() lists them")
            if "" in block_names:
                raise SlimkitError("blocks names '' (the whole model): name its residual blocks, each a module path")
            nested = [(a, b) for a in block_names for b in block_names if a != b and (a == "" or b.startswith(a + "."))]
            if nested:
                raise SlimkitError(f"blocks {nested[0][0]!r} and {nested[0][1]!r} overlap (one holds the other): name "
                                   "each block once, none inside another")
            candidates = {n: model.get_submodule(n) for n in block_names}
        else:
            for name, m in model.named_modules():
                if name and type(m).__name__ in BLOCK_TYPES and not any(name.startswith(c + ".") for c in candidates):
                    candidates[name] = m
    info = trace_calls(model, example, {**candidates, **layers})

    def usable(name):
        rec = info.get(name)
        return rec is not None and rec["calls"] == 1 and rec["simple"]

    blocks, claimed = [], set()
    for name in candidates:
        inner = [n for n in layers if n == name or n.startswith(name + ".")]      # a layer may be its own block
        if block_names is not None and not (inner and usable(name)):
            rec = info.get(name)
            why = ("holds no quantizable layer" if not inner else
                   "is not called exactly once in the forward pass (a block used twice, or never, cannot be "
                   "reconstructed against one output)" if rec is None or rec["calls"] != 1 else
                   "does not take one tensor and return one tensor (its output is what reconstruction matches)")
            raise SlimkitError(f"blocks names {name!r}, which {why}: name residual blocks that each run once on "
                               "one tensor")
        if inner and usable(name):
            blocks.append(Block(name, inner, info[name]["order"]))
            claimed.update(inner)
    skipped = []
    for name in layers:
        if name in claimed:
            continue
        if usable(name):
            blocks.append(Block(name, [name], info[name]["order"]))
        else:
            skipped.append(name)
    blocks.sort(key=lambda b: b.order)
    return blocks, skipped


def warn_skipped(skipped: list[str], method: str, model: nn.Module) -> None:
    """Quantized layers reconstruction cannot take (called more than once, e.g. shared, or never): they keep their
    round-to-nearest codes; say which. A float layer of `model` (one never called, such as nn.MultiheadAttention's
    out_proj, or one kept float by `skip`) has no codes and is not listed."""
    from .wrap import QuantLayer

    skipped = [n for n in skipped if isinstance(model.get_submodule(n), QuantLayer)]
    if skipped:
        warn(f"{method}: {len(skipped)} layer(s) run more than once (shared) or never in the forward pass, "
             f"so they cannot be reconstructed against one output and keep round-to-nearest codes: "
             f"{', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}")


def warn_if_layerwise(blocks: list[Block], method: str) -> None:
    """Block reconstruction on a model none of whose blocks was recognised runs layer by layer (AdaRound's
    granularity, not the method's): say so, and how to name the blocks."""
    if len(blocks) > 1 and all(len(b.layers) == 1 for b in blocks):
        warn(f"{method}: no residual block of this model was recognised (or each runs more than once), "
             "so it is reconstructed layer by "
             "layer; name its blocks (blocks=[module paths], or a recipe's blocks:) or register their class "
             "(slimkit.core.adapters.register_block_type)")


def layer_order(model: nn.Module, example: torch.Tensor, called_only: bool = False) -> list[str]:
    """Quantizable layers in the order the forward pass first calls them (uncalled ones last, or left out with
    called_only=True: a layer whose forward never runs, such as nn.MultiheadAttention's out_proj, whose weight
    the attention reads directly, cannot have its input quantized nor be replaced by a wrapper)."""
    layers = layer_modules(model)
    info = trace_calls(model, example, layers)
    if called_only:
        layers = {n: m for n, m in layers.items() if n in info}
    return sorted(layers, key=lambda n: info[n]["order"] if n in info else float("inf"))
