"""Quantized twins of nn.Linear and nn.Conv2d, swapped in and out of any nn.Module.

A `QuantLayer` keeps the original layer (`.layer`, so its own forward, padding and subclass behaviour are
kept), a weight quantizer and an input-activation quantizer. After reconstruction `freeze()` stores the
weight as integer codes and the layer computes with their dequantized value, exactly what `slimkit.load`
rebuilds from the artifact.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parametrize

from ..errors import SlimkitError
from .observers import mse_search
from .quantizer import QuantSpec, Quantizer, dequantize, qparams_from_range, to_rows, from_rows

QUANTIZABLE = (nn.Linear, nn.Conv2d)


def float_layer(module: nn.Module) -> nn.Module:
    """The float Linear / Conv1D inside a quantized wrapper, or the module itself."""
    return getattr(module, "layer", module)


def is_conv1d(layer: nn.Module) -> bool:
    """Hugging Face's Conv1D (GPT-2): a linear layer whose weight is stored (in, out)."""
    return type(layer).__name__ == "Conv1D" and layer.weight.dim() == 2


def weight_oi(layer: nn.Module) -> torch.Tensor:
    """The weight as (out, in), a view of the parameter (in-place edits reach it)."""
    return layer.weight.t() if is_conv1d(layer) else layer.weight


def _input_affine_hook(module: nn.Module, args: tuple):
    x = args[0]        # in x's dtype, as QuantLayer applies it (fp32 buffers would promote a bf16 model's input)
    return ((x - module.slimkit_in_shift.to(x.dtype)) / module.slimkit_in_scale.to(x.dtype),) + args[1:]


def input_affine(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    scale = getattr(layer, "slimkit_in_scale", None)
    return None if scale is None else (scale, layer.slimkit_in_shift)


def set_input_affine(layer: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Make a float layer compute on (x - shift) / scale (buffers, so they are saved; a pre-hook applies them
    in the float model, and QuantLayer applies them before its activation quantizer)."""
    if input_affine(layer) is None:
        layer.register_buffer("slimkit_in_scale", scale.clone())
        layer.register_buffer("slimkit_in_shift", shift.clone())
        layer._slimkit_affine_hook = layer.register_forward_pre_hook(_input_affine_hook)
    else:
        layer.slimkit_in_scale.copy_(scale)
        layer.slimkit_in_shift.copy_(shift)


def quantizable(module: nn.Module) -> bool:
    return isinstance(module, QUANTIZABLE) or is_conv1d(module)


def weight_qparams(w: torch.Tensor, spec: QuantSpec, observer: str,
                   fused: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero point for a weight, from its own values (min-max, or MSE over all values; fused:
    see observers.mse_search)."""
    rows = to_rows(w.detach().float(), spec)
    lo, hi = rows.amin(1), rows.amax(1)
    if observer == "mse":
        return mse_search(rows, lo, hi, spec, fused=fused)
    if observer == "percentile":
        lo, hi = torch.quantile(rows, 1e-4, dim=1), torch.quantile(rows, 1 - 1e-4, dim=1)
    return qparams_from_range(lo, hi, spec)


def _no_fused_fast_path(module, args) -> None:
    """A forward pre-hook that does nothing: its presence turns off PyTorch's fused encoder-layer fast path."""


class QuantLayer(nn.Module):
    """A Linear or Conv2d whose weight and input activation are fake-quantized."""

    def __init__(self, layer: nn.Module, w_spec: QuantSpec | None, a_spec: QuantSpec | None,
                 w_observer: str = "mse", a_observer: str = "mse", init_qparams: bool = True):
        super().__init__()
        if not quantizable(layer):
            raise TypeError(f"cannot quantize {type(layer).__name__}: only nn.Linear, nn.Conv2d and Conv1D")
        self.layer = layer
        self.w_quant = Quantizer(w_spec, w_observer) if w_spec is not None else None
        self.a_quant = Quantizer(a_spec, a_observer) if a_spec is not None else None
        self.register_buffer("w_int", None)  # integer codes once frozen
        self.register_buffer("w_mask", None)  # a sparse layer's keep-mask (slimkit.sparsify), shaped as w_int
        # the block whose input this layer reads as it is, quantized once by the block (core.entry): set, the
        # layer's own input quantizer (if it kept one) runs there and not here
        self.entry_block: str | None = None
        self.to(layer.weight.device)
        self._fast_conv = isinstance(layer, nn.Conv2d) and type(layer).forward is nn.Conv2d.forward
        self._w_cache: torch.Tensor | None = None
        # nn.TransformerEncoderLayer's inference "fast path" computes its linears from their weights in one fused
        # kernel, which would bypass this wrapper (and fails on it: no .weight); it is never taken while any of
        # its submodules carries a forward hook, so every QuantLayer carries one that does nothing.
        self.register_forward_pre_hook(_no_fused_fast_path)
        if self.w_quant is not None and init_qparams:
            self.w_quant.set_qparams(*weight_qparams(weight_oi(layer), w_spec, w_observer))

    def __getattr__(self, name: str):
        """The wrapped layer's own attributes (weight, bias, stride, padding, kernel_size, in_features, ...),
        which model code may read from the module it holds (Hugging Face's MobileNetV2 pads by `conv.stride`,
        its ViT casts to `projection.weight.dtype`). They are the float layer's: the forward quantizes."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_"):
                raise
            layer = self.__dict__.get("_modules", {}).get("layer")    # (no recursion while being unpickled)
            if layer is None:
                raise
            try:
                return getattr(layer, name)
            except AttributeError:
                raise AttributeError(f"'{type(self).__name__}' object (wrapping {type(layer).__name__}) has no "
                                     f"attribute '{name}'") from None

    @property
    def kind(self) -> str:
        return "conv2d" if isinstance(self.layer, nn.Conv2d) else "conv1d" if is_conv1d(self.layer) else "linear"

    @property
    def frozen(self) -> bool:
        return self.w_int is not None

    def set_mask(self, keep: torch.Tensor | None) -> None:
        """Keep the pruned weights of a sparse layer at exactly zero through quantization (None: dense)."""
        self.w_mask = None if keep is None else keep.to(device=self.layer.weight.device, dtype=torch.bool)
        self._w_cache = None

    def _masked(self, w: torch.Tensor) -> torch.Tensor:
        return w if self.w_mask is None else torch.where(self.w_mask, w, torch.zeros((), dtype=w.dtype, device=w.device))

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight; (out, in) for linear layers, Conv1D included. A sparse layer's pruned
        weights stay zero (its mask is applied after quantization, so no grid point moves them)."""
        w = weight_oi(self.layer)
        if self.w_quant is None:
            return w
        if self.frozen:
            if self._w_cache is None or self._w_cache.device != self.w_int.device:
                rows = to_rows(self.w_int.float(), self.w_quant.spec)
                deq = dequantize(rows, self.w_quant.scale.reshape(-1, 1), self.w_quant.zero_point.reshape(-1, 1))
                # one layout whatever the codes' (a Conv1D's are a transposed view, a reloaded artifact's are not):
                # half-precision CPU matmuls round differently by layout, so a reload would not be bit-exact
                self._w_cache = self._masked(from_rows(deq, self.w_int, self.w_quant.spec).to(w.dtype)).contiguous()
            return self._w_cache
        return self._masked(self.w_quant(w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        affine = input_affine(layer)  # a channel transform kept at the input (post-LN blocks)
        if affine is not None:
            x = (x - affine[1].to(x.dtype)) / affine[0].to(x.dtype)
        if self.a_quant is not None and self.entry_block is None:
            x = self.a_quant(x)
        w = self.quantized_weight()
        if (isinstance(layer, nn.Linear) and type(layer).forward is nn.Linear.forward) or is_conv1d(layer):
            return F.linear(x, w, layer.bias)
        if self._fast_conv:
            return layer._conv_forward(x, w, layer.bias)
        return functional_call(layer, {"weight": w}, (x,))

    def freeze(self) -> None:
        """Fix the weight to its integer codes (hard rounding, learned steps become buffers)."""
        if self.w_quant is None:
            return
        self.w_int = self.w_quant.int_codes(weight_oi(self.layer))
        self.w_quant.drop_adaround()
        self.w_quant.freeze_scale()
        self._w_cache = None
        if self.a_quant is not None:
            self.a_quant.freeze_scale()
            self.a_quant.quant_prob = 1.0

    def _apply(self, fn, recurse=True):
        self._w_cache = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        """load_state_dict copies into w_int / w_mask / the scales in place: the dequantized weight cached from the
        old values must go, or the forward keeps computing with them."""
        self._w_cache = None
        return super()._load_from_state_dict(*args, **kwargs)

    def settings(self) -> dict:
        """The per-layer quantization settings recorded in the manifest ('act_at': the block whose input, quantized
        once, this layer reads; 'act' is then that shared quantizer, held by one of the block's entry layers)."""
        out = {
            "kind": self.kind,
            "weight": self.w_quant.spec.to_dict() if self.w_quant else None,
            "act": self.a_quant.spec.to_dict() if self.a_quant else None,
            "w_observer": self.w_quant.observer_name if self.w_quant else None,
            "a_observer": self.a_quant.observer_name if self.a_quant else None,
        }
        if self.entry_block is not None:
            out["act_at"] = self.entry_block
        return out


@dataclass
class LayerPlan:
    """What to do with one layer: its weight and activation specs (None leaves that part in float)."""

    w_spec: QuantSpec | None
    a_spec: QuantSpec | None
    w_observer: str = "mse"
    a_observer: str = "mse"


def layer_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every Linear/Conv2d of the model by path: the QuantLayer where one is wrapped, else the float layer."""
    found: dict[str, nn.Module] = {}
    wrapped = {name for name, m in model.named_modules() if isinstance(m, QuantLayer)}
    for name, module in model.named_modules():
        inside_wrapper = name.endswith(".layer") and name[: -len(".layer")] in wrapped
        if isinstance(module, QuantLayer) or (quantizable(module) and not inside_wrapper):
            found[name] = module
    return found


def working_copy(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The model compression works on: a deep copy (or `model` itself with inplace=True) whose parametrized
    weights (torch.nn.utils.parametrizations: weight_norm, spectral_norm, orthogonal ...) are baked into plain
    parameters, so that pruning and quantizing the weight change what the forward computes."""
    old_style = {"WeightNorm": "weight_norm", "SpectralNorm": "spectral_norm"}    # torch.nn.utils' forward hooks
    hooked = [(name, old_style[type(h).__name__]) for name, m in model.named_modules()
              for h in m._forward_pre_hooks.values() if type(h).__name__ in old_style]
    if hooked and not inplace:
        name, fn = hooked[0]
        where = f"layer {name!r}" if name else "the model"
        raise SlimkitError(f"{where} uses the old torch.nn.utils.{fn}, whose weight cannot be copied or "
                           f"compressed: call torch.nn.utils.remove_{fn}(layer) on the {len(hooked)} such layer(s) "
                           f"first, or build them with torch.nn.utils.parametrizations.{fn}")
    out = model if inplace else copy.deepcopy(model)
    for name, m in out.named_modules():
        for hook in list(m._forward_pre_hooks.values()):      # (inplace only) the old hooks: plain weights
            if type(hook).__name__ in old_style:
                getattr(torch.nn.utils, f"remove_{old_style[type(hook).__name__]}")(m, hook.name)
        if parametrize.is_parametrized(m):
            _bake_parametrizations(m)
    return out


def _bake_parametrizations(m: nn.Module) -> None:
    """Replace m's parametrized tensors by plain ones holding their current values. Not through
    parametrize.remove_parametrizations: that edits the generated Parametrized* class, which a deep copy shares
    with the original model, and would break the user's model."""
    values = {name: getattr(m, name).detach().clone() for name in m.parametrizations}
    trained = {name: [p.requires_grad for p in plist.parameters(recurse=False)]
               for name, plist in m.parametrizations.items()}     # the originals: parameters, or buffers if none
    m.__class__ = type(m).__bases__[0]
    del m._modules["parametrizations"]
    for name, value in values.items():
        if trained[name]:
            m.register_parameter(name, nn.Parameter(value, requires_grad=any(trained[name])))
        else:
            m.register_buffer(name, value)


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    if not name:        # setattr(model, "", new) would hang `new` under an empty name inside the model itself
        raise SlimkitError(f"cannot replace the model itself (a {type(model).__name__}) in place: hold it in a "
                           "module (e.g. nn.Sequential(layer)) and pass that")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def swap_modules(model: nn.Module, news: dict[str, nn.Module], olds: dict[str, nn.Module]) -> None:
    """Put news[name] wherever olds[name] is held: a module that two parents hold (weights shared across blocks)
    is listed once by named_modules, and every path to it must get the same new module."""
    paths: dict[int, list[str]] = {}
    for path, m in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), []).append(path)
    for name, new in news.items():
        for path in paths.get(id(olds[name]), [name]):
            set_submodule(model, path, new)


def mask_pruned(wrapped: dict[str, "QuantLayer"], sparsity: dict | None) -> None:
    """Give the QuantLayers of a sparsified model's counted layers (`sparsity`: its slimkit_info["sparsity"]
    report) their keep-masks, weight != 0: pruned weights stay zero through quantization, and the artifact stores
    only the kept weights' codes."""
    for name in (sparsity or {}).get("layers", {}):
        if name in wrapped:
            wrapped[name].set_mask(weight_oi(wrapped[name].layer) != 0)


class _SavePretrainedRefused:
    """Stands in for a quantized Hugging Face model's save_pretrained (an instance attribute: picklable, copied with
    the model). transformers would write the QuantLayers' state (w_int, layer.weight, a_quant.scale, ...) under names
    its architecture does not have, and from_pretrained would initialise those linears at random, with a warning."""

    def __call__(self, *args, **kwargs):
        raise SlimkitError("save_pretrained cannot write a slimkit-quantized model: transformers would store its "
                           "quantized layers under names from_pretrained does not know and initialise them at random; "
                           "save it with slimkit.save(model, DIR) and reload it with slimkit.load(DIR) (a quantized "
                           "transformer's folder also loads in from_pretrained, its weights dequantized)")


def wrap_layers(model: nn.Module, plans: dict[str, LayerPlan], init_qparams: bool = True) -> dict[str, QuantLayer]:
    """Replace each named layer by its QuantLayer twin, in place; returns the wrappers by name.
    `init_qparams=False` skips computing weight scales (when they are about to be loaded)."""
    wrapped, olds = {}, {}
    for name, plan in plans.items():
        olds[name] = layer = model.get_submodule(name)
        wrapped[name] = QuantLayer(layer, plan.w_spec, plan.a_spec, plan.w_observer, plan.a_observer, init_qparams)
    swap_modules(model, wrapped, olds)     # a layer held under two names (self.b = self.a) is wrapped at both
    if wrapped and callable(getattr(type(model), "save_pretrained", None)):    # a Hugging Face model
        model.save_pretrained = _SavePretrainedRefused()
    return wrapped


def unwrap_layers(model: nn.Module) -> nn.Module:
    """Put the original float layers back (the inverse of wrap_layers), in place, at every path that holds one."""
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if isinstance(module, QuantLayer):
            set_submodule(model, name, module.layer)
    return model


def quant_layers(model: nn.Module) -> dict[str, QuantLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLayer)}


def quantizers(model: nn.Module, kind: str = "all") -> Iterator[Quantizer]:
    """The activation ("act"), weight ("weight") or all quantizers of a model."""
    for layer in quant_layers(model).values():
        if kind in ("all", "weight") and layer.w_quant is not None:
            yield layer.w_quant
        if kind in ("all", "act") and layer.a_quant is not None:
            yield layer.a_quant
