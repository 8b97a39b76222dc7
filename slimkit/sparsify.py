"""slimkit.sparsify: set a chosen share of a model's weights to zero, layer by layer, at an exact global sparsity.

Allocation methods (how many weights each layer loses; inside a layer the smallest |w| go, unless noted):
- "fcpts": rates learned on calibration data (slimkit.methods.fcpts: bridge function, control term, distillation),
  weights and BatchNorm adjusted with them; needs `calib_data`; in transformers it ranks weights inside a layer
  by |w| * input channel norm (score="activation", the default there) instead of |w|;
- "uniform": every counted layer at the target rate;
- "global_magnitude": one magnitude threshold over all counted layers;
- "erk": Erdos-Renyi-Kernel densities (small layers kept denser), as RigL defines them;
- "wanda" (every layer at the target, weights ranked by |w| * input-channel norm within each output row) and
  "owl" (Wanda's ranking, per-block rates from activation outliers): one-shot LLM baselines (methods/owl.py);
  they need calibration data and linear layers;
- "sparsegpt": every layer at the target, pruned one-shot with the optimal-brain-surgeon update of the surviving
  weights (methods/sparsegpt.py), block by block; calibration data and linear layers.
`nm="2:4"` instead keeps the N largest of every M consecutive input channels, per output channel (and kernel
position of a convolution): the pattern sparse tensor cores run; the sparsity is then 1 - N/M in every counted
layer.

Counted layers: every nn.Linear / nn.Conv2d / Conv1D (in a Hugging Face transformer: those inside its blocks),
except those named in `exclude` and weights shared with another module (tied embeddings: pruning one would prune
the other; a warning names them and the report lists them under 'excluded' and 'tied'). The achieved global
sparsity over them equals the target to within one weight (slimkit.core.sparsity.exact_counts).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import math
import numbers
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from .core.fingerprint import reference_digest
from .core.sparsity import (apply_mask, check_nm, check_target, erk_rates, exact_counts, global_magnitude_counts,
                            magnitude_mask, nm_inputs, nm_keep, uniform_rates)
from .core.wrap import quantizable, working_copy
from .errors import SlimkitError
from .io.atomic import atomic_write

METHODS = ("fcpts", "uniform", "global_magnitude", "erk", "wanda", "owl", "sparsegpt")
NEEDS_DATA = ("fcpts", "wanda", "owl", "sparsegpt")

# Besides what quantization wraps (Linear, Conv2d, GPT-2's Conv1D), sparsity counts 1-d and 3-d convolutions:
# a mask needs only the weight (transposed convolutions, whose weight is stored (in, out), are left out).
EXTRA_CONVS = (nn.Conv1d, nn.Conv3d)


def countable(module: nn.Module) -> bool:
    """Whether sparsify counts (prunes) this module's weight (one without weights, e.g. Linear(0, n), is not)."""
    return (quantizable(module) or isinstance(module, EXTRA_CONVS)) and module.weight.numel() > 0


def parse_nm(nm) -> tuple[int, int] | None:
    """'2:4' or (2, 4) -> (2, 4); None stays None."""
    if nm is None:
        return None
    try:
        parts = [v.strip() for v in nm.split(":")] if isinstance(nm, str) else list(nm)
        if len(parts) != 2 or not all((isinstance(v, str) and v.isdigit()) or
                                      (isinstance(v, numbers.Integral) and not isinstance(v, bool)) for v in parts):
            raise ValueError
        n, m = (int(v) for v in parts)
    except (ValueError, TypeError):
        raise SlimkitError(f"nm must look like '2:4' (keep N of every M weights, whole numbers), got {nm!r}") from None
    check_nm(n, m)
    return n, m


def _excluded(name: str, pattern: str) -> bool:
    """Whether layer `name` is left out by an `exclude` entry: the name itself, a prefix of it (a parent
    module), or a glob pattern (fnmatch: *, ?, [...])."""
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.startswith(pattern + ".")


def prunable_layers(model: nn.Module, exclude=(), tied: list | None = None) -> dict[str, nn.Module]:
    """The layers sparsify counts: Linear and Conv1d/2d/3d layers (and GPT-2's Conv1D) by path, minus `exclude`
    (names, prefixes or glob patterns such as "*depthwise*"; an entry that matches no layer is an error) and
    layers whose weight tensor another module also holds (tied weights). In a Hugging Face transformer of a
    supported family, only the linears inside its blocks (the output head and the embeddings stay dense, as
    LLM pruning methods leave them). `tied`, when given, receives the names left out for sharing their weight."""
    inside = tuple(b + "." for b in _blocks(model)) or None
    owners: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    found, used = {}, set()
    candidates = [(n, m) for n, m in model.named_modules() if countable(m)]
    for name, module in candidates:
        hits = [e for e in exclude if _excluded(name, e)]
        used.update(hits)
        if hits or (inside is not None and not name.startswith(inside)):
            continue
        if owners.get(id(module.weight), 0) > 1:
            if tied is not None:
                tied.append(name)
            continue
        found[name] = module
    unused = [e for e in exclude if e not in used]
    if unused:
        raise SlimkitError(f"exclude entry {unused[0]!r} matches no Linear/Conv layer of the model: give layer names, "
                           "their parent modules or glob patterns (e.g. '*depthwise*'), as named_modules() lists them")
    return found


def _blocks(model: nn.Module) -> list[str]:
    """A supported transformer's block paths in forward order (none for other models)."""
    from .transformer import is_transformer

    if not is_transformer(model):
        return []
    from .core.families import layout

    return layout(model).blocks


def _sparsegpt(model: nn.Module, layers: dict[str, nn.Module], counts: dict[str, int], data, dev,
               progress: bool) -> dict:
    """SparseGPT at the given per-layer counts, block by block for a transformer; the model ends on the CPU."""
    from .methods.sparsegpt import sparsegpt

    masks = sparsegpt(model, layers, _blocks(model), counts, data, dev, progress)
    model.cpu()
    return masks


def _counts(method: str, layers: dict[str, nn.Module], target: float) -> dict[str, int]:
    sizes = {k: m.weight.numel() for k, m in layers.items()}
    if method == "uniform":
        return exact_counts(uniform_rates(sizes, target), sizes, target)
    if method == "erk":
        return exact_counts(erk_rates({k: tuple(m.weight.shape) for k, m in layers.items()}, target), sizes, target)
    if method == "global_magnitude":
        return global_magnitude_counts({k: m.weight for k, m in layers.items()}, target)
    raise SlimkitError(f"unknown sparsity method {method!r}: choose one of {', '.join(METHODS)}")


def sparsify(model: nn.Module, calib_data=None, method: str | None = "fcpts", sparsity: float | None = None,
             nm=None, exclude=(), inplace: bool = False, device: str | None = None, num_samples: int | None = None,
             seq_len: int | None = None, tokenizer=None, progress: bool = True, **options) -> nn.Module:
    """A copy of `model` (or `model` itself with inplace=True) whose counted layers hold `sparsity` (0.5) zeros in all,
    allocated by `method`; or N:M sparse with `nm="2:4"`. The result's `slimkit_info["sparsity"]` holds the
    target, the achieved global sparsity, the counted layers and each one's rate (see `sparsity_table`).
    `calib_data` (inputs as for slimkit.quantize; at most `num_samples` used: default 1024 inputs, or 128 token
    blocks for transformers, as SparseGPT and Wanda calibrate) is needed by fcpts, wanda, owl and sparsegpt; for
    Hugging Face transformers it is text (file, folder, list, shipped corpus name) or token ids, cut into
    `num_samples` blocks of `seq_len` tokens (default 2048, 128 for encoders) with the model's `tokenizer`;
    `progress` shows progress bars;
    `options` are its FCPTSConfig fields (iters, finetune_iters, batch_size, lr, lr_threshold, score, block_kd,
    temperature, ...);
    score="auto" (default) ranks weights inside a layer by |w| * input channel norm in transformers, by |w|
    elsewhere (slimkit.methods.fcpts)."""
    # called under torch.no_grad() / inference_mode(), FCPTS still learns and the result holds ordinary tensors
    with torch.inference_mode(False), torch.enable_grad():
        return _sparsify(model, calib_data, method, sparsity, nm, exclude, inplace, device, num_samples, seq_len,
                         tokenizer, progress, **options)


def _sparsify(model, calib_data, method, sparsity, nm, exclude, inplace, device, num_samples, seq_len, tokenizer,
              progress, **options) -> nn.Module:
    t0 = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise SlimkitError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    from .core.wrap import quant_layers

    if quant_layers(model):
        raise SlimkitError("this model is already quantized: sparsify the float model first, then quantize the "
                           "sparse one (slimkit keeps its zeros through quantization)")
    pattern = parse_nm(nm)
    if pattern is None:
        method = method or "fcpts"
        target = check_target(0.5 if sparsity is None else sparsity)
    else:
        target = 1 - pattern[0] / pattern[1]
    if pattern is None and method not in METHODS:
        raise SlimkitError(f"unknown sparsity method {method!r}: choose one of {', '.join(METHODS)}")
    if pattern is not None and (method not in (None, "fcpts") or (sparsity is not None and sparsity != target)):
        raise SlimkitError(f"nm={nm!r} prunes every group of {pattern[1]} weights to {pattern[0]} by magnitude, which "
                           f"sets both the method and the sparsity ({target:.0%}): drop method= and sparsity=")
    if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int)
                                    or num_samples < 1):
        raise SlimkitError(f"num_samples must be a positive integer, got {num_samples!r}")
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1):
        raise SlimkitError(f"seq_len must be a positive integer (tokens per calibration block), got {seq_len!r}")
    learn = pattern is None and method == "fcpts"
    needs_data = pattern is None and method in NEEDS_DATA
    if needs_data and calib_data is None:
        raise SlimkitError(f"{method} needs calibration data: pass calib_data (--calib), or choose a magnitude "
                           "method (uniform, global_magnitude, erk)")
    if learn:
        from .methods.fcpts import FCPTSConfig

        unknown = set(options) - set(FCPTSConfig.__dataclass_fields__) - {"sparsity"}
        if unknown:
            raise SlimkitError(f"unknown fcpts option(s) {', '.join(sorted(unknown))}: choose from "
                               f"{', '.join(k for k in FCPTSConfig.__dataclass_fields__ if k != 'sparsity')}")
        from .methods.fcpts import SCORES

        if options.get("score", "auto") not in SCORES:
            raise SlimkitError(f"fcpts score must be one of {', '.join(SCORES)}, got {options['score']!r}")
        if options.get("reconstruct", "distill") not in ("distill", "sparsegpt"):
            raise SlimkitError(f"fcpts reconstruct must be 'distill' (fine-tune with the masks fixed) or 'sparsegpt' "
                               f"(SparseGPT's update at the learned rates), got {options['reconstruct']!r}")
        temperature = options.get("temperature", 1.0)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise SlimkitError(f"fcpts temperature must be a number above 0 (1 matches the model's own "
                               f"predictions), got {temperature!r}")
        for name, low in (("iters", 1), ("finetune_iters", 0), ("batch_size", 1)):
            v = options.get(name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
                raise SlimkitError(f"fcpts {name} must be an integer of at least {low}, got {v!r}")
        seed = options.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise SlimkitError(f"fcpts seed must be an integer, got {seed!r}")
        for name in ("lr", "lr_threshold", "weight_decay", "control_weight", "temperature"):
            v = options.get(name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                                  or v < 0 or (name != "weight_decay" and v == 0)):
                raise SlimkitError(f"fcpts {name} must be a number above 0{' (or 0)' if name == 'weight_decay' else ''}, "
                                   f"got {v!r}")
    elif options:
        raise SlimkitError(f"option(s) {', '.join(sorted(options))} apply to method fcpts only")
    if isinstance(exclude, str):
        exclude = (exclude,)
    tied: list[str] = []
    layers = prunable_layers(model, exclude, tied)
    if tied:
        warnings.warn(f"{', '.join(tied[:4])}{' ...' if len(tied) > 4 else ''} share{'s' if len(tied) == 1 else ''} "
                      "its weight with another module (tied): left dense and out of the count, which the report's "
                      "'tied' lists", stacklevel=3)
    if not layers:
        raise SlimkitError("the model has no prunable layers (nn.Linear / nn.Conv1d/2d/3d) left after `exclude`")
    if learn and options.get("reconstruct") == "sparsegpt":
        convs = [k for k, m in layers.items() if isinstance(m, nn.modules.conv._ConvNd)]
        if convs:
            raise SlimkitError(f"fcpts reconstruct='sparsegpt' updates linear layers from their inputs; {convs[0]} is a "
                               "convolution: keep reconstruct='distill' (the default) for CNNs, or exclude the "
                               "convolutions")
    if pattern is not None:
        bad = [f"{k or 'the model itself'} ({nm_inputs(m)} input channels)" for k, m in layers.items()
               if nm_inputs(m) % pattern[1]]
        if bad:
            raise SlimkitError(f"N:M {pattern[0]}:{pattern[1]} needs every counted layer's input channels (per group, "
                               f"for a grouped convolution) to divide by "
                               f"{pattern[1]}; these do not: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}. "
                               "Leave them dense with exclude=[...] (--exclude): names, parent modules or glob patterns "
                               "such as '*depthwise*'")
    data = None
    if needs_data:
        from .transformer import is_transformer

        if is_transformer(model):   # token ids (N, L), from text with the model's tokenizer
            from types import SimpleNamespace

            from .transformer import check_token_ids, lm_calibration, model_vocab

            data = lm_calibration(model, calib_data, SimpleNamespace(num_samples=num_samples or 128, seq_len=seq_len,
                                                                     seed=options.get("seed", 0)), tokenizer)
            if isinstance(data, dict):      # {'input_ids', 'attention_mask'}: unpadded rows only
                mask = data.get("attention_mask")
                if mask is not None and not bool((mask != 0).all()):
                    raise SlimkitError("sparsify calibrates on unpadded token blocks: give input_ids (N, L) whose "
                                       "rows are all real tokens (or text), not a padded batch")
                ignored = [k for k, v in data.items() if k not in ("input_ids", "attention_mask", "labels")
                           and isinstance(v, torch.Tensor) and not (k == "token_type_ids" and not bool(v.any()))]
                if ignored:     # the methods feed input_ids alone: these would be dropped without a word
                    raise SlimkitError(f"sparsify calibrates on input_ids alone, so {', '.join(ignored)} would be "
                                       "ignored: give input_ids (N, L) (token_type_ids only if all zeros, the "
                                       "model's default), or text")
                data = data.get("input_ids")
            if isinstance(data, torch.Tensor) and data.numel() == 0 and not isinstance(calib_data, torch.Tensor):
                raise SlimkitError("the calibration text gave no token blocks: give more text or token ids (N, L)")
            check_token_ids(model_vocab(model), data)
        else:
            from .core.data import calibration_tensor
            from .quantize import check_runs

            data = calibration_tensor(calib_data, num_samples or 1024, options.get("seed", 0))
            dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), data.dtype)
            data = data.to(dtype)    # a float64 / bf16 model calibrates in its own dtype
            check_runs(model, data[:2])
    digest = reference_digest(model)        # now: with inplace=True the model itself is about to change
    out = working_copy(model, inplace)
    layers = prunable_layers(out, exclude)
    log = None
    if needs_data:
        from .quantize import pick_device

        dev = pick_device(device)
    if learn:
        from .methods.fcpts import FCPTSConfig, fcpts

        if options.get("score", "auto") == "auto":
            from .transformer import is_transformer

            options["score"] = "activation" if is_transformer(out) else "magnitude"
        teacher = working_copy(model).to(dev).eval()
        out.to(dev)
        cfg = FCPTSConfig(sparsity=target, progress=progress, **options)
        if cfg.reconstruct == "sparsegpt":    # learn the rates on a scratch copy, then prune `out` by SparseGPT
            scratch = working_copy(model).to(dev)
            _, log = fcpts(scratch, teacher, prunable_layers(scratch, exclude), data,
                           dataclasses.replace(cfg, finetune_iters=0), dev)
            del scratch
            masks = _sparsegpt(out, layers, log["counts"], data, dev, progress)
        else:
            masks, log = fcpts(out, teacher, layers, data, cfg, dev)
        out.cpu().eval()
        del teacher
    elif pattern is not None:
        masks = {k: nm_keep(m, *pattern) for k, m in layers.items()}
    elif method == "sparsegpt":
        sizes = {k: m.weight.numel() for k, m in layers.items()}
        masks = _sparsegpt(out, layers, exact_counts(uniform_rates(sizes, target), sizes, target), data, dev,
                           progress)
    elif method in ("wanda", "owl"):
        from .methods.owl import input_norms, owl_rates, wanda_mask

        norms = input_norms(out, layers, data, dev, progress=progress)
        out.cpu()
        sizes = {k: m.weight.numel() for k, m in layers.items()}
        if method == "owl":
            rates = owl_rates(layers, norms, _blocks(out), target)
        else:
            rates = uniform_rates(sizes, target)
        counts = exact_counts(rates, sizes, target)
        masks = {k: wanda_mask(m, norms[k], counts[k]) for k, m in layers.items()}
    else:
        counts = _counts(method, layers, target)
        masks = {k: magnitude_mask(m.weight, counts[k]) for k, m in layers.items()}
    report = {}
    with torch.no_grad():
        for name, layer in layers.items():
            keep = masks[name].to(layer.weight.device)
            layer.weight.copy_(apply_mask(layer.weight, keep))
            zeros = int((layer.weight == 0).sum())     # the zeros there are (a model pruned before keeps its own)
            report[name] = {"numel": keep.numel(), "pruned": zeros, "rate": zeros / keep.numel()}
    total = sum(r["numel"] for r in report.values())
    pruned = sum(r["pruned"] for r in report.values())
    cut = [k for k, r in report.items() if r["numel"] and r["pruned"] == r["numel"]]
    if cut:
        warnings.warn(f"{', '.join(cut[:4])}{' ...' if len(cut) > 4 else ''}: every weight pruned, so the layer "
                      "passes nothing on (only its bias): lower the sparsity, use an allocation that keeps small "
                      "layers denser (erk, fcpts), or exclude it", stacklevel=3)
    if target is not None and total and pruned / total > target + 0.01:
        warnings.warn(f"the sparse model has {100 * pruned / total:.1f}% zeros, above the {100 * target:.1f}% asked "
                      "for: the model held that many zero weights already (pruning never restores a weight)",
                      stacklevel=3)
    info = dict(getattr(model, "slimkit_info", None) or {})
    info["sparsity"] = {"method": f"nm {pattern[0]}:{pattern[1]}" if pattern else method, "target": target,
                        "achieved": pruned / total, "counted_params": total, "layers": report,
                        "excluded": list(exclude), "tied": tied, "seconds": time.perf_counter() - t0}
    if log is not None:
        info["sparsity"]["fcpts"] = {"learned_rates": log["learned_rates"], "init_rates": log["init_rates"],
                                     "final_global_rate": log["global_rate"][-1] if log["global_rate"] else None,
                                     "seconds": log["seconds"], "samples": int(data.shape[0]),
                                     "score": options["score"],
                                     "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "progress"}}
    info.setdefault("model_spec", getattr(model, "_slimkit_spec", None))
    info.setdefault("reference_digest", digest)
    out.slimkit_info = info
    return out


def sparsity_table(info: dict, title: str = "per-layer sparsity"):
    """A rich Table of a sparsified model's per-layer rates (from slimkit_info['sparsity'])."""
    from rich.table import Table

    s = info["sparsity"]
    table = Table(title=f"{title}: {s['method']}, target {100 * s['target']:.2f}%, achieved "
                        f"{100 * s['achieved']:.2f}% of {s['counted_params']:,} counted weights")
    for col, just in (("layer", "left"), ("weights", "right"), ("sparsity", "right")):
        table.add_column(col, justify=just)
    for name, r in s["layers"].items():
        table.add_row(name, f"{r['numel']:,}", f"{100 * r['rate']:.1f}%")
    return table


def plot_rates(info: dict, path) -> None:
    """Bar chart PNG of the per-layer sparsity rates, bars in layer order, the target as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = info["sparsity"]
    names = list(s["layers"])
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(names) + 2), 3.5))
    ax.bar(range(len(names)), [100 * s["layers"][k]["rate"] for k in names], color="tab:blue")
    ax.axhline(100 * s["target"], color="tab:red", ls="--", lw=1, label=f"global target {100 * s['target']:.1f}%")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax.set_ylabel("sparsity (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"per-layer sparsity: {s['method']} (achieved {100 * s['achieved']:.2f}%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:                 # (a chart cut short never sits in the artifact)
        atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)
