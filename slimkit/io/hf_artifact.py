"""Hugging Face artifacts: one directory that transformers and slimkit both read.

- transformers' part: config.json, model.safetensors (every quantized weight dequantized to float, in the
  model's own basis, so `AutoModel*.from_pretrained(DIR)` gives the weight-quantized model) and the tokenizer;
- slimkit's part: slimkit.safetensors (bit-packed integer codes, weight scales and zero points, activation
  ranges, the biases and input affines of the quantized linears) and manifest.json.
`slimkit.load(DIR)` rebuilds the fake-quantized model, activation quantizers included, with outputs equal to
the in-memory one's.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from ..core.attention import ATTN_IMPL, attach, attention_quantizers, use_quantized_attention
from ..core.quantizer import QuantSpec
from ..core.wrap import LayerPlan, input_affine, quant_layers, set_input_affine, weight_oi, wrap_layers
from ..errors import SlimkitError

QUANT_PARTS = ("w_int", "w_mask", "w_quant.", "a_quant.", "layer.slimkit_in_")


def _export_weight(layer) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The quantized layer as a plain one: dequantized weight (the layer's own layout) and bias, with an input
    affine (x - z) / s folded in: W'' = Wq diag(1/s), b'' = b - W'' z."""
    w = layer.quantized_weight().detach().float()
    bias = None if layer.layer.bias is None else layer.layer.bias.detach().float()
    affine = input_affine(layer.layer)
    if affine is not None:
        scale, shift = affine[0].float(), affine[1].float()
        w = w / scale
        if bias is not None or bool(torch.any(shift != 0)):   # a scale alone leaves a bias-less layer bias-less
            bias = (torch.zeros(w.shape[0], device=w.device) if bias is None else bias) - w @ shift
    dtype = layer.layer.weight.dtype
    w = w.t() if layer.kind == "conv1d" else w
    return w.to(dtype).contiguous(), None if bias is None else bias.to(dtype)


def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state as the plain transformers architecture expects it."""
    qlayers = quant_layers(model)
    state = {}
    for key, value in model.state_dict().items():
        owner = next((n for n in qlayers if key.startswith(n + ".")), None)
        if ".slimkit_attn_quant." in key:
            continue  # slimkit's part
        if owner is None:
            state[key] = value
        elif not key[len(owner) + 1:].startswith(QUANT_PARTS + ("layer.weight", "layer.bias")):
            state[owner + "." + key[len(owner) + len(".layer."):]] = value
    for name, layer in qlayers.items():
        w, b = _export_weight(layer)
        state[f"{name}.weight"] = w
        if b is not None:
            state[f"{name}.bias"] = b
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def hf_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """slimkit's part: packed codes and quantizer state of every quantized linear, and its settings."""
    from .artifact import pack_codes

    tensors, layers = {}, {}
    for name, layer in quant_layers(model).items():
        if not layer.frozen:
            raise SlimkitError(f"layer {name} is not frozen: quantize with slimkit.quantize before saving")
        info = layer.settings()
        packed, extra = pack_codes(layer)      # a sparse layer: its kept weights' codes and a bitmask
        tensors.update({f"{name}.{k}": v for k, v in packed.items()})
        info.update(extra)
        for qname in ("w_quant", "a_quant"):
            q = getattr(layer, qname)
            if q is not None:
                tensors[f"{name}.{qname}.scale"] = q.scale.detach()
                tensors[f"{name}.{qname}.zero_point"] = q.zero_point.detach()
        if layer.layer.bias is not None:
            tensors[f"{name}.bias"] = layer.layer.bias.detach()
        affine = input_affine(layer.layer)
        if affine is not None:
            tensors[f"{name}.in_scale"], tensors[f"{name}.in_shift"] = affine
        info.update(w_shape=list(layer.w_int.shape), input_affine=affine is not None)
        layers[name] = info
    for name, quant in attention_quantizers(model).items():
        for part in ("q", "k", "v"):
            q = getattr(quant, part)
            tensors[f"{name}.{part}.scale"], tensors[f"{name}.{part}.zero_point"] = q.scale.detach(), q.zero_point.detach()
    return {k: v.cpu().contiguous() for k, v in tensors.items()}, layers


class _quiet_transformers:
    """transformers' own progress bars off for a moment (slimkit shows its own)."""

    def __enter__(self):
        from transformers.utils import logging

        self.was = logging.is_progress_bar_enabled()
        logging.disable_progress_bar()

    def __exit__(self, *exc):
        from transformers.utils import logging

        if self.was:
            logging.enable_progress_bar()


def write_hf(model: nn.Module, directory: Path) -> None:
    """transformers' part of the artifact, and the tokenizer when the model carries one."""
    impl = model.config._attn_implementation
    if impl == ATTN_IMPL:  # transformers alone reloads the directory with its own attention
        model.config._attn_implementation = "sdpa"
    try:
        with _quiet_transformers():
            type(model).save_pretrained(model, directory, state_dict=hf_state_dict(model))   # (not the refusal)
    finally:
        model.config._attn_implementation = impl
    tokenizer = getattr(model, "_slimkit_tokenizer", None)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def _spec(d: dict | None) -> QuantSpec | None:
    return None if d is None else QuantSpec(**d)


def buffer_dtypes(model: nn.Module) -> dict[str, str]:
    """The dtypes of the model's non-persistent floating buffers (rotary frequencies and the like), which no
    checkpoint stores: a model cast with .to(bfloat16) holds them in bf16, one rebuilt by transformers in fp32,
    and the outputs differ (up to 2e-2 in a bf16 Llama's logits)."""
    out = {}
    for prefix, module in model.named_modules():
        for name in getattr(module, "_non_persistent_buffers_set", ()):
            buf = module._buffers.get(name)
            if buf is not None and buf.is_floating_point():
                out[f"{prefix}.{name}" if prefix else name] = str(buf.dtype).removeprefix("torch.")
    return out


def restore_buffer_dtypes(model: nn.Module, dtypes: dict[str, str]) -> None:
    """Cast the non-persistent buffers back to the dtypes buffer_dtypes recorded (names the model lacks are
    skipped: a user's own instance may differ)."""
    for full, dtype in dtypes.items():
        prefix, _, name = full.rpartition(".")
        try:
            module = model.get_submodule(prefix) if prefix else model
        except AttributeError:
            continue
        buf = module._buffers.get(name)
        want = getattr(torch, dtype, None)
        if buf is not None and isinstance(want, torch.dtype) and buf.dtype != want:
            module._buffers[name] = buf.to(want)


def _load_float_state(model: nn.Module, path: Path) -> None:
    """Load transformers' part of the artifact (model.safetensors, or its shards) into `model`, in the saved dtypes;
    weights the files leave out must be tied to ones they hold."""
    from .artifact import _take_dtypes, read_weights, why

    index = path / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists()
             else ["model.safetensors"])
    state = {}
    for name in files:
        state.update(read_weights(path / name))
    _take_dtypes(model, state)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise SlimkitError(f"the artifact at {path} does not match the model= given: {why(e)}") from None
    held = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(held[k]) for k in state if k in held}
    missing = [k for k in missing if id(held.get(k)) not in loaded]
    if missing or unexpected:
        raise SlimkitError(f"the artifact at {path} does not match the model= given: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")


def load_hf_artifact(path: Path, manifest: dict, model: nn.Module | None = None) -> nn.Module:
    """Rebuild the fake-quantized transformer saved at `path`."""
    from .artifact import HF_QUANT, check_qparams, check_scales, read_weights, unpack_codes, why

    import transformers

    if model is None:
        try:
            config = transformers.AutoConfig.from_pretrained(path)
            arch = (config.architectures or [None])[0]
            cls = getattr(transformers, arch) if arch else transformers.AutoModel
            with _quiet_transformers():     # the dtype it was saved in (config.json)
                model, info = cls.from_pretrained(path, dtype="auto", output_loading_info=True)
        except (OSError, ValueError, AttributeError, TypeError, RuntimeError, KeyError, SafetensorError) as e:
            raise SlimkitError(f"transformers could not load the model directory {path} (its config.json or "
                               f"model.safetensors is damaged or does not match): {why(e)}") from None
        # transformers fills a weight the files lack with a fresh initialisation and carries on: in an artifact
        # slimkit wrote whole, that is damage (a tensor dropped, config.json asking for another shape)
        damage = {what: sorted(info.get(key) or ()) for key, what in (
            ("missing_keys", "missing from model.safetensors"), ("unexpected_keys", "not in the model config.json "
             "describes"), ("mismatched_keys", "of another shape than config.json describes"))
            if info.get(key)}
        if damage:
            raise SlimkitError(f"the artifact at {path} is corrupt: its model.safetensors does not match its "
                               "config.json (" + "; ".join(
                                   f"{len(keys)} weight(s) {what}: {', '.join(map(str, keys[:3]))}"
                                   f"{', ...' if len(keys) > 3 else ''}" for what, keys in damage.items())
                               + "); save the model again")
    else:   # the caller's instance stays as it is; its copy takes the saved float state (norms, embeddings) and dtypes
        model = copy.deepcopy(model)
        _load_float_state(model, path)
    model.eval()
    restore_buffer_dtypes(model, manifest.get("buffer_dtypes") or {})
    tensors = read_weights(path / HF_QUANT)
    check_scales(tensors, path)
    try:
        plans = {n: LayerPlan(_spec(s["weight"]), _spec(s["act"]), s.get("w_observer") or "minmax",
                              s.get("a_observer") or "minmax") for n, s in manifest["layers"].items()}
        wrapped = wrap_layers(model, plans, init_qparams=False)
        with torch.no_grad():
            for name, layer in wrapped.items():
                s = manifest["layers"][name]
                if s.get("input_affine"):
                    set_input_affine(layer.layer, tensors.pop(f"{name}.in_scale"), tensors.pop(f"{name}.in_shift"))
                for qname in ("w_quant", "a_quant"):
                    q = getattr(layer, qname)
                    if q is not None:
                        q.set_qparams(tensors.pop(f"{name}.{qname}.scale"), tensors.pop(f"{name}.{qname}.zero_point"))
                        check_qparams(q, f"{name}.{qname}", s["w_shape"] if qname == "w_quant" else None)
                unpack_codes(layer, tensors, name, s["w_shape"], bool(s.get("w_sparse")))
                if f"{name}.bias" in tensors:
                    layer.layer.bias.copy_(tensors.pop(f"{name}.bias"))
                weight_oi(layer.layer).copy_(layer.quantized_weight())
                if layer.a_quant is not None:
                    layer.a_quant.observer = None
        if manifest.get("attn_quant"):
            use_quantized_attention(model)
            for name, spec in manifest["attn_quant"].items():
                quant = attach(model.get_submodule(name.rpartition(".")[0]), QuantSpec(**spec))
                for part in ("q", "k", "v"):
                    q = getattr(quant, part)
                    q.set_qparams(tensors.pop(f"{name}.{part}.scale"), tensors.pop(f"{name}.{part}.zero_point"))
                    check_qparams(q, f"{name}.{part}")
                    q.observer = None
    except (AttributeError, KeyError, RuntimeError, TypeError, ValueError, IndexError) as e:
        raise SlimkitError(f"the artifact at {path} is corrupt or does not match its model: {why(e)}") from None
    if tensors:     # stored state the manifest does not account for: a layer dropped from it would run in float
        raise SlimkitError(f"the artifact at {path} is corrupt: {HF_QUANT} holds tensors its manifest does not name "
                           f"({', '.join(sorted(tensors)[:3])}{', ...' if len(tensors) > 3 else ''})")
    from ..models.hf import _has_tokenizer

    if _has_tokenizer(path):    # saved with its tokenizer: files that no longer read back are damage, not "none"
        try:
            model._slimkit_tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, TypeError) as e:
            raise SlimkitError(f"the artifact at {path} is corrupt: its tokenizer files do not read back ({why(e)}); "
                               "copy them from the model it was made from, or save the model again") from None
    model.slimkit_info = {k: v for k, v in manifest.items() if k not in ("format", "version")}
    return model
