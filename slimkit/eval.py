"""Evaluation: accuracy when labels exist, fidelity to the full-precision model, and model size."""
from __future__ import annotations

import operator
import time
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .core.data import check_inputs, input_dtype
from .core.sparsity import stored_bytes
from .core.wrap import QuantLayer
from .errors import SlimkitError


def model_output(out) -> tuple[torch.Tensor, bool]:
    """(the tensor a model's output stands for, whether it is logits; FCPTS distils it, predict returns it): a
    plain tensor, `.logits` or a dict's "logits" (classifiers, causal LMs) are logits; otherwise the last hidden
    state (encoders; attribute or dict key), which FCPTS matches by mean squared error; a tuple or list stands for
    its first tensor, as logits."""
    if isinstance(out, torch.Tensor):
        return out, True
    get = out.get if isinstance(out, Mapping) else (lambda key: getattr(out, key, None))
    if get("logits") is not None:       # a Hugging Face ModelOutput is a Mapping too
        return get("logits"), True
    if get("last_hidden_state") is not None:
        return get("last_hidden_state"), False
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0], True
    keys = f" with keys {sorted(out)[:6]}" if isinstance(out, Mapping) else ""
    raise SlimkitError(f"slimkit cannot distil or evaluate a model output of type {type(out).__name__}{keys}: the "
                       "model should return logits (a tensor, a tuple starting with them, .logits or a 'logits' key) "
                       "or a last_hidden_state")


def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 256, device: torch.device | str = "cpu",
            progress: bool = False, desc: str = "evaluating") -> torch.Tensor:
    """The model's outputs (logits) for all inputs, computed in batches, returned on the CPU. A model may return
    a tensor, a tuple starting with its logits, or an object or dict with `logits` (or `last_hidden_state`)."""
    try:
        batch_size = None if isinstance(batch_size, bool) else operator.index(batch_size)
    except TypeError:
        batch_size = None
    if batch_size is None or batch_size < 1:
        raise SlimkitError("batch_size must be a positive integer")
    was_training = model.training
    model = model.eval().to(device)
    dtype = input_dtype(model, x)
    outs = []
    try:
        with torch.no_grad():
            for i in tqdm(range(0, len(x), batch_size), desc=desc, disable=not progress, leave=False):
                out = model(x[i : i + batch_size].to(device, dtype))
                outs.append(model_output(out)[0].float().cpu())
    finally:
        model.train(was_training)           # the caller's model keeps its mode
    return torch.cat(outs)


def check_data(model: nn.Module, x, labels=None) -> None:
    """Evaluation inputs the model takes and labels that fit them, or a clear error (before any long run):
    labels are class indices, one integer per sample."""
    from .quantize import check_runs

    if not isinstance(x, torch.Tensor):
        raise SlimkitError(f"the evaluation data must be a tensor of samples along a first axis, got "
                           f"{type(x).__name__} (an array: torch.from_numpy(x))")
    if x.dim() == 0 or len(x) == 0:
        raise SlimkitError("the evaluation data is empty or a single number: give samples along a first axis")
    check_inputs(x, "evaluation")
    if labels is not None:
        if not isinstance(labels, torch.Tensor):
            raise SlimkitError(f"evaluation labels must be a tensor of class indices, got {type(labels).__name__} "
                               "(an array: torch.from_numpy(labels); a list: torch.tensor(labels))")
        if labels.dim() != 1 or len(labels) != len(x):
            raise SlimkitError(f"evaluation labels must be one class index per sample: got labels of shape "
                               f"{tuple(labels.shape)} for {len(x)} samples (one-hot labels: take their argmax)")
        if torch.is_floating_point(labels) or labels.dtype == torch.bool:
            raise SlimkitError(f"evaluation labels must be integer class indices, got {labels.dtype}")
        if len(labels) and int(labels.min()) < 0:
            raise SlimkitError(f"evaluation labels must be class indices from 0, got {int(labels.min())}")
    out = check_runs(model, x[:2], "evaluation inputs")
    if labels is not None and len(labels):
        scores, is_logits = model_output(out)
        if scores.dim() != 2:
            raise SlimkitError(f"top-1 accuracy needs one row of class scores per sample, (N, classes); the model "
                               f"outputs {tuple(scores.shape[1:])} per sample (a segmentation map, a sequence ...): "
                               "evaluate it on inputs without labels (fidelity to FP only)")
        if is_logits and int(labels.max()) >= scores.shape[-1]:
            raise SlimkitError(f"label {int(labels.max())} is out of range: the model scores {scores.shape[-1]} "
                               "classes")


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    if logits.dim() != 2:
        raise SlimkitError(f"top-1 accuracy needs one row of class scores per sample, (N, classes); got outputs of "
                           f"shape {tuple(logits.shape)}")
    if labels.dim() != 1 or len(labels) != len(logits):
        raise SlimkitError(f"labels of shape {tuple(labels.shape)} do not fit {len(logits)} predictions: give one "
                           "class index per sample")
    if len(labels) and int(labels.max()) >= logits.shape[-1]:
        raise SlimkitError(f"label {int(labels.max())} is out of range: the model scores {logits.shape[-1]} classes")
    return (logits.argmax(-1) == labels.to(logits.device)).float().mean().item()


def fidelity(logits: torch.Tensor, ref_logits: torch.Tensor) -> dict[str, float]:
    """Top-1 agreement with the reference model and KL(reference || model), averaged over samples."""
    agree = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
    kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(ref_logits, -1), log_target=True, reduction="batchmean").item()
    return {"agreement": agree, "kl": kl}


def _storage_key(t: torch.Tensor):
    """What identifies a tensor's memory: two Parameter objects over one storage (a head tied to the embedding
    through separate Parameter wrappers) are stored once, as slimkit.save stores them."""
    return (t.device, t.data_ptr(), t.numel(), t.dtype) if t.numel() and t.device.type != "meta" else id(t)


def model_size_bytes(model: nn.Module) -> int:
    """Storage size, as slimkit.save stores the model: quantized weights at their bit width plus their scales and
    zero points (fp32); a sparse layer's kept weights (values, or codes when quantized) plus a one-bit mask (a float one
    as it is where that is smaller);
    every other parameter and buffer at its own dtype, each storage once. A quantized layer's float weight that
    another module also uses as it is (a quantized head tied to the embedding) is counted in float too.
    Non-persistent buffers (rotary frequencies, BERT's position_ids) are not stored (the model recomputes them)."""
    total, counted = 0, set()
    transient = {id(getattr(m, b)) for m in model.modules() for b in m._non_persistent_buffers_set
                 if getattr(m, b, None) is not None}
    sparse = set(((getattr(model, "slimkit_info", None) or {}).get("sparsity") or {}).get("layers", {}))
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, QuantLayer) and m.w_quant is not None}
    inner = {f"{q}.layer" for q in quantized}
    float_used = {_storage_key(p) for name, module in model.named_modules()      # held as plain parameters
                  if not isinstance(module, QuantLayer) and name not in inner for p in module.parameters(recurse=False)}
    for name, module in model.named_modules():
        if name in quantized:
            w = module.layer.weight
            kept = w.numel() if module.w_mask is None else int(module.w_mask.sum())
            total += (kept * module.w_quant.spec.bits + 7) // 8
            total += 0 if module.w_mask is None else (w.numel() + 7) // 8
            total += 2 * module.w_quant.scale.numel() * 4
            skip = [module.w_int, module.w_quant.scale, module.w_quant.zero_point]
            skip += [w] if _storage_key(w) not in float_used else []
            skip += [module.w_mask] if module.w_mask is not None else []
            counted.update(_storage_key(t) for t in skip if t is not None)
        elif name in sparse and getattr(module, "weight", None) is not None \
                and _storage_key(module.weight) not in counted:
            total += stored_bytes(module.weight)[0]
            counted.add(_storage_key(module.weight))
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in transient and _storage_key(t) not in counted:
            total += t.numel() * t.element_size()
            counted.add(_storage_key(t))
    return total


def evaluate(model: nn.Module, x: torch.Tensor, labels: torch.Tensor | None = None,
             reference: nn.Module | torch.Tensor | None = None, device: str | torch.device = "cpu",
             batch_size: int = 256, progress: bool = False) -> dict[str, float]:
    """Metrics of `model` on inputs `x`: top1 (with labels); agreement and kl (with a reference model or its
    logits); size in bytes; seconds: the time `model` took to run over x (the reference's time not included)."""
    check_data(model, x, labels)
    if reference is not None and not isinstance(reference, (nn.Module, torch.Tensor)):
        raise SlimkitError(f"reference must be a model (nn.Module) or its logits (a tensor), got "
                           f"{type(reference).__name__}: load a saved model first (slimkit.load)")
    if device is not None:               # None: where the model is
        from .quantize import pick_device

        device = pick_device(str(device) if isinstance(device, torch.device) else device)
    t0 = time.perf_counter()
    logits = predict(model, x, batch_size, device, progress)
    seconds = time.perf_counter() - t0
    metrics: dict[str, float] = {"samples": len(x), "size_bytes": model_size_bytes(model)}
    if labels is not None:
        metrics["top1"] = accuracy(logits, labels)
    if reference is not None:
        ref = reference if isinstance(reference, torch.Tensor) else predict(reference, x, batch_size, device, progress,
                                                                             desc="evaluating reference")
        if ref.shape != logits.shape:
            raise SlimkitError(f"the reference logits have shape {tuple(ref.shape)}, the model's {tuple(logits.shape)}: "
                               "give the reference's outputs on the same inputs (or the reference model)")
        metrics.update(fidelity(logits, ref))
    metrics["seconds"] = seconds
    return metrics
