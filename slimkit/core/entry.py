"""Block inputs quantized once: what flows between reconstruction blocks is one quantized tensor.

QDrop's (and BRECQ's) quantized CNNs quantize activations where they leave a module: every block ends in its
own output quantizer, so a residual block's identity shortcut, its first layer and its downsample layer all
read the same quantized tensor (wimh966/QDrop, quant/quant_block.py). slimkit quantizes layer inputs; left at
that, the shortcut of a residual block would carry the float input and the first layer and the downsample
would each quantize it with a step of their own. So, for every multi-layer block, the layers that read the
block's input tensor as it is (its *entry* layers) give up their input quantizers for one shared quantizer
applied to the block's input by a forward pre-hook: the first entry layer's (its `entry_block` names the
block); the others keep none. Everything downstream of the block input then sees one quantized tensor.

One difference from QDrop remains by construction: the shared quantizer belongs to the block that reads the
tensor, so its step is learned in that block's reconstruction, where QDrop learns it in the block that writes
it. The quantized model computes the same function form (each block boundary quantized once).
"""
from __future__ import annotations

import torch
from torch import nn

from .adapters import run_hooked
from .wrap import QuantLayer, quantizable


def _entry_hook(block: nn.Module, args: tuple):
    owner = block.__dict__.get("_slimkit_entry")
    if owner is None or owner.a_quant is None or block.__dict__.get("_slimkit_entry_off", False):
        return None
    return (owner.a_quant(args[0]),) + tuple(args[1:])


def attach_entry(model: nn.Module, block_name: str, layer_names: list[str]) -> None:
    """Quantize `block_name`'s input once, with the first of `layer_names`' input quantizer; those layers no
    longer quantize their inputs themselves (the others lose their quantizers)."""
    block = model.get_submodule(block_name)
    layers = [model.get_submodule(n) for n in layer_names]
    owner = next(l for l in layers if l.a_quant is not None)
    for layer in layers:
        layer.entry_block = block_name
        if layer is not owner:
            layer.a_quant = None
    object.__setattr__(block, "_slimkit_entry", owner)        # not a submodule: the owner is saved where it is
    if not getattr(block, "_slimkit_entry_hooked", False):
        block.register_forward_pre_hook(_entry_hook)
        object.__setattr__(block, "_slimkit_entry_hooked", True)


def entry_of(block: nn.Module) -> QuantLayer | None:
    """The layer whose input quantizer quantizes this block's input, if any."""
    return block.__dict__.get("_slimkit_entry")


def set_entry_enabled(block: nn.Module, on: bool) -> None:
    """Turn the block-input hook off while reconstruction quantizes the input itself (and mixes it, QDrop)."""
    object.__setattr__(block, "_slimkit_entry_off", not on)


def find_entries(model: nn.Module, block_names: list[str], example: torch.Tensor) -> dict[str, list[str]]:
    """For each named block, the quantized layers inside it that receive the block's input tensor itself, in
    call order; a block is left out when any of them (or a float quantizable layer reading that input) has no
    input quantizer, or when their quantizers differ."""
    modules = dict(model.named_modules())
    seen_in: dict[str, object] = {}
    reads: dict[str, list[str]] = {b: [] for b in block_names}
    handles = []

    def block_hook(name):
        def pre(module, args):
            if args and isinstance(args[0], torch.Tensor):
                seen_in[name] = args[0]
        return pre

    def layer_hook(name, owners):
        def pre(module, args):
            if not args:
                return
            for b in owners:
                if seen_in.get(b) is args[0] and name not in reads[b]:
                    reads[b].append(name)
        return pre

    for b in block_names:
        handles.append(modules[b].register_forward_pre_hook(block_hook(b)))
    for name, m in modules.items():
        parent, _, leaf = name.rpartition(".")
        inside_wrapper = leaf == "layer" and isinstance(modules.get(parent), QuantLayer)   # a wrapper's float layer
        if not (isinstance(m, QuantLayer) or quantizable(m)) or inside_wrapper:
            continue
        owners = [b for b in block_names if name.startswith(b + ".")]
        if owners:
            handles.append(m.register_forward_pre_hook(layer_hook(name, owners)))
    run_hooked(model, example, handles)
    found = {}
    for b, names in reads.items():
        layers = [modules[n] for n in names]
        if not layers or not all(isinstance(l, QuantLayer) and l.a_quant is not None for l in layers):
            continue
        if len({repr(l.a_quant.spec) for l in layers}) != 1:
            continue
        found[b] = names
    return found


def attach_entries(model: nn.Module, blocks: list, example: torch.Tensor) -> dict[str, list[str]]:
    """Give every multi-layer block (adapters.Block) of the quantized model one shared input quantizer; returns
    the entries made, block name -> entry layers."""
    multi = [b.name for b in blocks if len(b.layers) > 1]
    qs = [q for l in model.modules() if isinstance(l, QuantLayer) for q in (l.w_quant, l.a_quant) if q is not None]
    was = [q.enabled for q in qs]
    for q in qs:            # the trace only follows tensors: no fake quantization with uncalibrated steps
        q.enabled = False
    try:
        found = find_entries(model, multi, example) if multi else {}
    finally:
        for q, on in zip(qs, was):
            q.enabled = on
    for block_name, names in found.items():
        attach_entry(model, block_name, names)
    return found


def reattach_entries(model: nn.Module, layer_settings: dict[str, dict]) -> None:
    """Rebuild the shared block-input quantizers of a loaded model from its manifest's per-layer 'act_at'."""
    by_block: dict[str, list[str]] = {}
    for name, s in layer_settings.items():
        if s.get("act_at"):
            by_block.setdefault(s["act_at"], []).append(name)
    for block_name, names in by_block.items():
        # the layer that holds the quantizer first (it is the one the hook calls)
        names.sort(key=lambda n: layer_settings[n].get("act") is None)
        attach_entry(model, block_name, names)
