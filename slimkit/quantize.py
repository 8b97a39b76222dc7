"""`slimkit.quantize`: the one verb for post-training quantization.

model + calibration data -> fold BatchNorm -> wrap Linear/Conv2d in quantized twins (first and last layer at
8 bits) -> calibrate activation ranges -> the method's optimisation (nothing for RTN, reconstruction for
AdaRound / BRECQ / QDrop) -> freeze to integer weights. The input model is left untouched.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from tqdm.auto import tqdm

from .config import QuantConfig
from .core.adapters import find_blocks, layer_order
from .core.entry import attach_entries
from .core.data import calibration_tensor, input_dtype
from .core.fingerprint import reference_digest
from .core.fold import fold_bn
from .core.quantizer import QuantSpec
from .core.wrap import (LayerPlan, layer_modules, mask_pruned, quant_layers, quantizable, quantizers, weight_oi,
                        working_copy, wrap_layers)
from .errors import SlimkitError, warn


def pick_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SlimkitError(f"unknown device {name!r}: use 'cpu' or 'cuda'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SlimkitError("device 'cuda' was asked for but no CUDA GPU is available: use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise SlimkitError(f"device {name!r}: slimkit runs on 'cpu' or 'cuda'")
    return device


def check_unread(cfg: QuantConfig, transformer: bool, strict: bool = False) -> None:
    """Settings the method never reads on this model (they change nothing and are recorded nowhere): a warning
    (one options bundle may serve a sweep over methods, one recipe several methods), or with `strict` (the
    command line's own flags) an error for those given as options."""
    unread = cfg.unread(transformer)
    where = f"{cfg.method} on a {'transformer' if transformer else 'CNN'}"
    if strict and unread["options"]:
        flags = ", ".join("--" + k.replace("_", "-") for k in unread["options"])
        raise SlimkitError(f"{where} does not read {flags}"
                           f"{' (--w-group-size: only with --w-granularity group)' if 'w_group_size' in unread['options'] else ''}"
                           ": drop them, or choose a method that reads them")
    for source, names in (("option", unread["options"]), ("the recipe's setting", unread["recipe"])):
        if names:
            one = len(names) == 1
            warn(f"{source}{'' if one else 's'} {', '.join(names)} {'is' if one else 'are'} not read by "
                 f"{where}: ignored")


def check_runs(model: nn.Module, example: torch.Tensor, what: str = "calibration inputs"):
    """The model's output on `example` (moved to the model's device; the forward runs in eval mode, so BatchNorm
    learns nothing from it); a clear message when the calibration (or evaluation) data does not fit."""
    p = next(model.parameters(), None)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if p is not None:   # float64 data (NumPy's default) in the model's own precision, as predict runs it
                example = example.to(p.device, input_dtype(model, example))
            return model(example)
    except Exception as e:
        raise SlimkitError(f"the model does not accept {what} of shape {tuple(example.shape[1:])} "
                           f"(per sample): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    finally:
        model.train(was_training)


def check_groups(layers: dict[str, nn.Module], plans: dict[str, LayerPlan]) -> None:
    """Per-group weight quantization needs each output channel's weights (a Linear's inputs, a convolution's
    in_channels x kernel) to split into whole groups: name the first layer where they do not."""
    for name, plan in plans.items():
        spec = plan.w_spec
        if spec is None or spec.granularity != "group" or name not in layers:
            continue
        row = weight_oi(layers[name])[0].numel()
        if row % spec.group_size:
            raise SlimkitError(f"w_group_size {spec.group_size} does not divide layer {name}'s {row} weights per output "
                               f"channel: pick a group size that divides every layer's (a power of two such as 32 "
                               f"often does; --w-group-size, w_group_size=), or keep {name} in float (--skip {name}, skip=[...])")


def _finite_where_float_is(q_model: nn.Module, fp_model: nn.Module, x: torch.Tensor) -> bool:
    """Whether the quantized model's outputs on x are finite wherever the float model's are (a -inf class mask is
    the model's own); outputs that are not logits-like (a dict of several tensors) are not checked."""
    from .eval import model_output

    with torch.no_grad():
        try:
            q, f = model_output(q_model(x))[0], model_output(fp_model(x))[0]
        except SlimkitError:
            return True
    return q.shape != f.shape or bool((torch.isfinite(q) | ~torch.isfinite(f)).all())


def layer_plans(order: list[str], cfg: QuantConfig, modules: dict[str, nn.Module]) -> dict[str, LayerPlan]:
    """Bits and granularity for each layer; the first and last layer get `first_last_bits`. The first layer's
    input, the model's own input (already 8-bit pixels for images), is not quantized, as in QDrop's and BRECQ's
    code (with first_last_bits None it takes a_bits like the rest). Per-channel activations are a conv input's
    axis 1 (N, C, H, W) and a linear layer's last axis, its in_features (N, ..., D): axis 1 of a ViT's (N, L, D)
    tokens would be the token positions."""
    plans = {}
    kept = [n for n in order if n not in cfg.skip]
    for name in kept:     # the model's own first and last layer: skipping one promotes no other to 8 bits
        edge = cfg.first_last_bits is not None and name in (order[0], order[-1])
        w_bits = cfg.first_last_bits if edge else cfg.w_bits
        a_bits = None if cfg.a_bits is None else (cfg.first_last_bits if edge else cfg.a_bits)
        if cfg.first_last_bits is not None and name == order[0]:
            a_bits = None
        w_spec = QuantSpec(w_bits, cfg.w_symmetric, cfg.w_granularity, cfg.w_group_size, ch_axis=0)
        a_axis = -1 if cfg.a_granularity == "channel" and not isinstance(modules.get(name), nn.Conv2d) else 1
        a_spec = None if a_bits is None else QuantSpec(a_bits, cfg.a_symmetric, cfg.a_granularity, cfg.w_group_size,
                                                       ch_axis=a_axis)
        plans[name] = LayerPlan(w_spec, a_spec, cfg.w_observer, cfg.a_observer)
    return plans


def calibrate_activations(model: nn.Module, data: torch.Tensor, device: torch.device, batch_size: int = 64,
                          progress: bool = True) -> None:
    """Run data through the float-weight model with every activation quantizer observing, then set ranges."""
    acts = list(quantizers(model, "act"))
    if not acts:
        return
    weights = list(quantizers(model, "weight"))
    for q in weights:
        q.enabled = False
    for q in acts:
        q.observing = True
    try:
        with torch.no_grad():
            for i in tqdm(range(0, len(data), batch_size), desc="calibrating activations", disable=not progress, leave=False):
                model(data[i : i + batch_size].to(device))
    finally:
        for q in acts:
            q.observing = False
        for q in weights:
            q.enabled = True
    for q in acts:
        if not q.dynamic:
            q.compute_qparams()
            q.observer = None  # statistics are no longer needed; free their memory


MATMULS = (F.linear, F.bilinear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
           F.conv_transpose3d, torch.matmul, torch.mm, torch.bmm, torch.addmm, torch.baddbmm, torch.einsum,
           torch.Tensor.matmul, torch.Tensor.mm, torch.Tensor.bmm, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__)


class _MatmulOperands(TorchFunctionMode):
    """Records which of `watched` (id -> name) tensors, or views of them, reach a matmul or convolution."""

    def __init__(self, watched: dict[int, str]):
        super().__init__()
        self.watched, self.used = watched, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in MATMULS:
            for a in (*args, *kwargs.values()):
                for t in (a, getattr(a, "_base", None)) if isinstance(a, torch.Tensor) else ():
                    name = self.watched.get(id(t))
                    if name is not None and name not in self.used:
                        self.used.append(name)
        return func(*args, **kwargs)


def _loose_weights(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Parameters held directly by modules that are not layers slimkit quantizes (nor embeddings /
    normalisations / the convolutions it already warns about) that a forward on `example` passes to a matmul or
    convolution itself (F.linear, F.conv2d, torch.matmul, ...): weights that stay float. Additive ones (a ViT's
    class token and position embedding) are not listed."""
    known = (nn.Embedding, nn.EmbeddingBag, nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.LayerNorm,
             nn.GroupNorm, nn.MultiheadAttention)
    watched = {}
    for name, module in model.named_modules():
        if quantizable(module) or isinstance(module, known):
            continue
        watched.update({id(t): f"{name}.{p}" if name else p for p, t in module.named_parameters(recurse=False)
                        if t.dim() >= 2 and t.is_floating_point()})
    if not watched:
        return []
    spy = _MatmulOperands(watched)
    with torch.no_grad(), spy:
        model(example)
    return spy.used


def prepare(model: nn.Module, data: torch.Tensor, cfg: QuantConfig, device: torch.device
            ) -> tuple[nn.Module, nn.Module, list]:
    """The float model with BatchNorm folded, its quantized twin with calibrated activation ranges, and the
    folded (conv, bn) pairs. The input model is not modified."""
    fp_model = working_copy(model).eval().to(device)
    example = data[:2].to(device)
    check_runs(fp_model, example)
    folded = fold_bn(fp_model, example) if cfg.fold_bn else []
    with torch.no_grad():
        bad = [(c, b) for c, b in folded if not all(bool(torch.isfinite(t).all()) for t in
                                                    (fp_model.get_submodule(c).weight, fp_model.get_submodule(c).bias))]
    if bad:
        raise SlimkitError(f"BatchNorm {bad[0][1]} has running statistics that are not finite (or a negative "
                           f"running_var): folded into {bad[0][0]}, they give it NaN or inf weights, which a "
                           "quantization grid cannot hold; fix the model's BatchNorm statistics first")
    modules = layer_modules(fp_model)
    other = sorted({type(m).__name__ for m in fp_model.modules()
                    if isinstance(m, (nn.Conv1d, nn.Conv3d, nn.modules.conv._ConvTransposeNd))})
    if other:
        warn(f"the model's {', '.join(other)} layers stay float: slimkit quantizes nn.Linear and nn.Conv2d "
             "layers")
    loose = _loose_weights(fp_model, example)
    if loose:
        warn(f"{len(loose)} weight tensor(s) outside nn.Linear / nn.Conv2d modules stay float ("
             f"{', '.join(loose[:4])}{', ...' if len(loose) > 4 else ''}): slimkit quantizes layers, not "
             "weights a forward passes to F.linear / F.conv2d itself")
    unknown = [s for s in cfg.skip if s not in modules]
    if unknown:
        raise SlimkitError(f"skip names {unknown[0]!r}, which is not a Linear/Conv2d of the model: give the module "
                           f"path of a quantized layer (as `print(model)` names it, e.g. 'fc' or 'layer1.0.conv1')")
    order = layer_order(fp_model, example, called_only=True)     # a layer never called stays float
    uncalled = [n for n in modules if n not in order and n not in cfg.skip]
    if uncalled:
        mha = any(isinstance(m, nn.MultiheadAttention) for m in fp_model.modules())
        warn(f"{len(uncalled)} Linear/Conv2d layer(s) never run their forward on the calibration inputs and stay "
             f"float ({', '.join(uncalled[:4])}{', ...' if len(uncalled) > 4 else ''})"
             + ("; nn.MultiheadAttention reads its projections' weights itself (in_proj_weight, out_proj): they stay "
                "float" if mha else ""))
    plans = layer_plans(order, cfg, modules)
    check_groups(modules, plans)
    convs = [n for n, p in plans.items() if p.a_spec is not None and p.a_spec.granularity == "token"
             and isinstance(modules[n], nn.Conv2d)]
    if convs:
        raise SlimkitError(f"a_granularity 'token' quantizes each row of a layer's input along its last axis; a "
                           f"conv's input (N, C, H, W) has no tokens there (rows would be image rows), as in "
                           f"{convs[0]}: use tensor or channel for a CNN's activations")
    if not plans:
        raise SlimkitError("the model has no quantizable layers (nn.Linear or nn.Conv2d) left to quantize")
    q_model = copy.deepcopy(fp_model)
    wrapped = wrap_layers(q_model, plans)
    if cfg.a_bits is not None:      # block inputs quantized once, shared by every reader (core.entry)
        attach_entries(q_model, find_blocks(q_model, example, block_names=cfg.blocks)[0], example)
    mask_pruned(wrapped, (getattr(model, "slimkit_info", None) or {}).get("sparsity"))   # a sparsified model
    calibrate_activations(q_model, data[: cfg.act_calib_samples], device, progress=cfg.progress)
    bad = [n for n, layer in wrapped.items() if layer.a_quant is not None
           and not bool((torch.isfinite(layer.a_quant.scale) & (layer.a_quant.scale > 0)).all())]
    if bad:     # (slimkit.load refuses such steps: the artifact could be saved but never loaded)
        raise SlimkitError(f"the input of layer {bad[0]} is not finite on the calibration data (NaN or inf"
                           f"{f', and in {len(bad) - 1} more layer(s)' if len(bad) > 1 else ''}): the float model "
                           "computes it there (a BatchNorm with NaN or negative running_var, a log or division by "
                           "zero ...); fix the model first")
    return fp_model, q_model, folded


class _Default:
    """The default of an argument for which None means something (a_bits=None: weight-only)."""

    def __repr__(self) -> str:
        return "<default>"


DEFAULT = _Default()


def quantize(model: nn.Module, calib_data, method: str | None = None, w_bits: int | None = None,
             a_bits: int | None | _Default = DEFAULT, recipe=None, tokenizer=None, inplace: bool = False,
             **options) -> nn.Module:
    """Quantize a copy of `model` with `method` ("rtn", "adaround", "brecq", "qdrop"; default qdrop W4A4).

    `calib_data`: inputs as a tensor, array, (inputs, labels), list, Dataset/DataLoader, file or shipped name.
    `recipe`: a YAML path, a shipped recipe name or a dict of QuantConfig fields; keyword options override it.
    Hugging Face transformers take "minmax", "smoothquant", "outlier_suppression" or "os_plus" and calibration
    token ids (N, L), a dict of input_ids / attention_mask (no padding), or text (a file, folder or list of strings) with
    `tokenizer` (see slimkit.transformer). `inplace=True` quantizes a transformer without copying it first
    (for models that fill most of memory).
    `a_bits=None` (here or in a recipe) quantizes weights only; leaving a_bits out takes the recipe's or the
    default 4. The result carries `slimkit_info` (the manifest: method, config, per-layer settings, per-block
    losses, timings) used by `slimkit.save`. The caller's random state is left as it was (the run seeds its own
    from the config's seed).
    """
    # a call made under torch.no_grad() / inference_mode() still learns (AdaRound, LSQ) and returns ordinary tensors
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else ()), \
            torch.inference_mode(False), torch.enable_grad():
        return _quantize(model, calib_data, method, w_bits, a_bits, recipe, tokenizer, inplace, **options)


def _quantize(model, calib_data, method, w_bits, a_bits, recipe, tokenizer, inplace, **options) -> nn.Module:
    t0 = time.perf_counter()
    named = {k: v for k, v in (("method", method), ("w_bits", w_bits)) if v is not None}
    if a_bits is not DEFAULT:
        named["a_bits"] = a_bits
    cfg = QuantConfig.build(recipe, **named, **options)
    if not isinstance(model, nn.Module):
        raise SlimkitError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(getattr(model, "_orig_mod", None), nn.Module) and type(model).__name__ == "OptimizedModule":
        model = model._orig_mod         # torch.compile's wrapper: its graph hides the layers' calls; the model's own
    device = pick_device(cfg.device)
    if quant_layers(model):
        raise SlimkitError("this model is already quantized (it holds slimkit's quantized layers): quantize the "
                           "float model (a sparse one from slimkit.sparsify included) instead")
    from .methods import TRANSFORMER_METHODS
    from .transformer import is_transformer, lm_calibration, quantize_transformer

    if is_transformer(model):
        if cfg.method not in TRANSFORMER_METHODS:
            raise SlimkitError(f"method {cfg.method!r} is for CNNs; for a transformer choose one of "
                               f"{', '.join(TRANSFORMER_METHODS)}")
        check_unread(cfg, transformer=True)
        calib = lm_calibration(model, calib_data, cfg, tokenizer)
        if cfg.seq_len is not None and isinstance(calib_data, (torch.Tensor, Mapping)):
            cfg = copy.copy(cfg)            # token ids keep their own length: the manifest says so (lm_calibration
            cfg.seq_len = None              # has warned)
        if inplace and any(p.is_inference() for p in model.parameters()):
            raise SlimkitError("inplace=True cannot change this model's weights: they are inference tensors (the "
                               "model was built or loaded under torch.inference_mode()); quantize a copy "
                               "(inplace=False) or build the model outside inference_mode")
        return quantize_transformer(model, calib, cfg, device, inplace)
    if cfg.method in TRANSFORMER_METHODS:
        raise SlimkitError(f"method {cfg.method!r} is for Hugging Face transformers; this model "
                           f"({type(model).__name__}) is not one: use rtn, adaround, brecq or qdrop")
    check_unread(cfg, transformer=False)
    for name, given in (("inplace", inplace), ("tokenizer", tokenizer is not None)):
        if given:
            warn(f"{name}= is for transformers: this {type(model).__name__} is quantized on a copy, "
                 "without a tokenizer; it is ignored")
    data = calibration_tensor(calib_data, cfg.num_samples or 1024, cfg.seed)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if dtype != torch.float32:
        raise SlimkitError(f"the model's parameters are {str(dtype).replace('torch.', '')}: slimkit quantizes CNNs "
                           "in float32 (reconstruction needs its precision); pass model.float()")
    with torch.no_grad():       # (weights made under inference_mode() are read here all the same)
        bad = [n for n, p in model.named_parameters() if p.is_floating_point() and not bool(torch.isfinite(p).all())]
    if bad:
        raise SlimkitError(f"the model's weights are not all finite (NaN or inf in {', '.join(bad[:3])}"
                           f"{' ...' if len(bad) > 3 else ''}): a quantization grid cannot hold them; fix the model "
                           "first")
    torch.manual_seed(cfg.seed)

    fp_model, q_model, folded = prepare(model, data, cfg, device)
    t_calib = time.perf_counter() - t0

    from .methods import METHODS

    stats = METHODS[cfg.method](q_model, fp_model, data, cfg, device)
    for layer in quant_layers(q_model).values():
        if not layer.frozen:
            layer.freeze()
    q_model.eval()
    if not _finite_where_float_is(q_model, fp_model, data[:2].to(device)):
        raise SlimkitError(f"{cfg.method} produced a model whose outputs are not finite where the float model's are: "
                           "the reconstruction diverged; lower lr_round / lr_act or iters (and check the weights' "
                           "range)")
    q_model.slimkit_info = {
        "method": cfg.method,
        "config": cfg.applied(),
        "folded_bn": [list(p) for p in folded],
        "layers": {name: layer.settings() for name, layer in quant_layers(q_model).items()},
        "blocks": stats,
        "input_shape": list(data.shape[1:]),
        "calibration": {"samples": len(data)},      # what was used: num_samples is an upper bound
        "model_spec": getattr(model, "_slimkit_spec", None),
        "reference_digest": reference_digest(model),
        "seconds": {"calibration": t_calib, "total": time.perf_counter() - t0},
        "device": str(device),
    }
    sparsity = (getattr(model, "slimkit_info", None) or {}).get("sparsity")
    if sparsity is not None:
        q_model.slimkit_info["sparsity"] = sparsity
    return q_model
