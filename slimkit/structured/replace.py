"""Swap a model's feed-forward linears for structured ones, and save / load the result.

Found generically: every nn.Linear or Hugging Face Conv1D inside a module named for an FFN (FFN_NAMES: mlp, ffn,
feed_forward, ff, ffns, DenseReluDense, also numbered or prefixed: ffn1, shared_mlp) that holds an up and a down
projection (d -> h or d -> 2h fused with its gate, then h -> d), routers excepted; and a layer's FFN_PAIRS (fc1 /
fc2, intermediate.dense / output.dense, ALBERT's ffn / ffn_output, ...) where the two chain d -> h -> d. That
covers Hugging Face Llama-style models (mlp.gate_proj / up_proj / down_proj), Phi-3 (gate_up_proj), GPT-2
(mlp.c_fc / c_proj, Conv1D with its weight stored (in, out)), OPT, BART, T5, BERT-style encoders, ViT, CLIP,
mixture-of-experts models whose experts are nn.Linear layers (Switch, NLLB-MoE) and slimkit's GPT (mlp.fc1 /
fc2, and mlp.gate for SwiGLU). A probe of 149 tiny transformers 5.23 models (architectures and variants) found
every FFN of 129; the rest are fused-expert MoEs, SqueezeBERT and I-BERT (no nn.Linear FFN) and BLOOM's
slow_but_exact mode (refused: it slices the FFN's weight). Attention is never touched. Experts fused into one weight tensor for all of them (transformers' Mixtral, Qwen-MoE,
DeepSeek) are no linears: refused when nothing else is found, reported with a warning otherwise
(fused_experts). As in the paper (CLAIRE-Labo/StructuredFFN src/modules/__init__.py replace_mlp) the new layers
are freshly initialised for training from scratch; the old FFN weights are not carried over.

Saving: the model's state dict is plain tensors, so `save_pretrained` / `torch.save(model.state_dict())` work,
but reloading needs the same structure first: call replace_ffn on a fresh model before load_state_dict, or use
save_structured / load_structured, which store the per-layer shapes in a JSON manifest next to the safetensors.
"""
from __future__ import annotations

import json
import os
import re
import uuid
import warnings
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_model
import torch
from torch import nn

from ..core.wrap import is_conv1d, swap_modules
from ..errors import SlimkitError
from .layers import KINDS, StructuredLinear, layer_from_spec, make_linear
from .self_guided import SelfGuided, SelfGuidedSchedule

# a module holding an FFN's linears: mlp / ffn / feed_forward (most models; ffn1 / ffn2 and feed_forward1 / 2 in
# Conformer-style blocks), ff (XLNet), ffns (XLM, FlauBERT: a list of them), DenseReluDense (T5, mT5, LongT5, UMT5)
# (also with a prefix: shared_mlp, GraniteMoeShared's shared expert)
FFN_NAMES = ("mlp", "ffn", "feed_forward", "ff", "ffns", "DenseReluDense")
_FFN_NAME = re.compile(r"^(?:[A-Za-z0-9]+_)?(?:" + "|".join(FFN_NAMES) + r")\d*$")
# a mixture-of-experts FFN's routing linears (Switch and NLLB-MoE router.classifier, JetMoE / AFMoE router.*,
# Qwen2-MoE shared_expert_gate): they pick experts, they are no FFN weights. A linear named `gate` or `wg` is a
# router when it narrows (d -> experts: Qwen2-MoE mlp.gate, Hunyuan gate.wg), a SwiGLU gate when it widens.
ROUTER_NAMES = ("router", "gating", "shared_expert_gate")
NARROW_ROUTER_NAMES = ("gate", "wg")
# (up, down) linears a transformer layer holds directly: OPT / BART / Whisper, BERT-style encoders, ALBERT,
# BLIP-2's Q-Former, LXMERT's cross-modality layers, LeViT
FFN_PAIRS = (("fc1", "fc2"), ("intermediate.dense", "output.dense"), ("ffn", "ffn_output"),
             ("intermediate_query.dense", "output_query.dense"), ("lang_inter.dense", "lang_output.dense"),
             ("visn_inter.dense", "visn_output.dense"), ("linear_up.linear", "linear_down.linear"))
SUPPORTED = ("Hugging Face Llama-style models (mlp.gate_proj/up_proj/down_proj), GPT-2 (mlp.c_fc/c_proj), OPT "
             "(fc1/fc2), BERT-style encoders (intermediate.dense/output.dense), and GPT-style models whose blocks "
             "hold their feed-forward nn.Linear layers in a module named " + "/".join(FFN_NAMES))
WEIGHTS, MANIFEST = "model.safetensors", "structured.json"
FORMAT, VERSION = "slimkit-structured", 1


def _widths(layer: nn.Module) -> tuple[int, int]:
    """(in, out) of an nn.Linear or a Conv1D (whose weight is (in, out))."""
    w = layer.weight
    return (w.shape[0], w.shape[1]) if is_conv1d(layer) else (w.shape[1], w.shape[0])


def _linear(m: nn.Module | None) -> bool:
    return isinstance(m, nn.Linear) or (m is not None and is_conv1d(m))


def _router(path: str, layer: nn.Module, siblings: list[tuple[str, nn.Module]] = ()) -> bool:
    """Whether the linear at `path` (inside an FFN module) routes tokens to experts rather than transforming them.
    A narrowing 'gate' is a router unless a sibling linear has its very widths: then it is a GLU gate (SwiGLU
    with a hidden width below d_model)."""
    if _named(path, ROUTER_NAMES, router_suffix=True):
        return True
    in_f, out_f = _widths(layer)
    if not (_named(path, NARROW_ROUTER_NAMES) and out_f < in_f):
        return False
    return not any(_widths(other) == (in_f, out_f) for name, other in siblings
                   if not _named(name, ROUTER_NAMES + NARROW_ROUTER_NAMES, router_suffix=True))


def _named(path: str, names: tuple[str, ...], router_suffix: bool = False) -> bool:
    """Whether a part of `path` is one of `names` (or, with router_suffix, ends in 'router')."""
    return any(part in names or (router_suffix and part.endswith("router")) for part in path.split("."))


def _ffn_pairs(module: nn.Module) -> list[str]:
    """The (up, down) child paths of a transformer layer that holds its FFN linears directly (FFN_PAIRS), each
    pair two linears d -> h -> d."""
    subs = []
    for up, down in FFN_PAIRS:
        try:
            a, b = module.get_submodule(up), module.get_submodule(down)
        except AttributeError:
            continue
        if _linear(a) and _linear(b) and _widths(a)[1] == _widths(b)[0] and _widths(a)[0] == _widths(b)[1]:
            subs += [up, down]
    return subs


def _maps_back(linears: list[nn.Module]) -> bool:
    """Whether the linears (in registration order) hold an FFN's up and down projections: with d the first one's
    input width, one maps d -> h (or d -> 2h, up fused with its gate: Phi-3's gate_up_proj, ModernBERT's Wi) and
    another h -> d, in any order (Meta's Llama code registers w1, w2 (down), w3). A projector (d -> d', or
    d -> h -> h') holds no such pair."""
    if not linears:
        return False
    widths = [_widths(m) for m in linears]
    d = widths[0][0]
    return any(i != j and a[0] == d and b[1] == d and a[1] in (b[0], 2 * b[0])
               for i, a in enumerate(widths) for j, b in enumerate(widths))


def fused_experts(model: nn.Module) -> list[str]:
    """Weights of mixture-of-experts FFNs stored as one tensor for all experts (transformers' fused experts:
    experts.gate_up_proj / down_proj of shape (experts, out, in), JetMoE's input_linear, DBRX's experts.mlp.w1),
    which replace_ffn cannot restructure: matrices (2-D or 3-D) held directly by a module that is no linear,
    convolution, embedding or norm, under an `experts` module, or 3-D under an FFN or MoE module."""
    found = []
    for name, module in model.named_modules():
        if _linear(module) or isinstance(module, (nn.modules.conv._ConvNd, nn.Embedding)) or \
                isinstance(module, (StructuredLinear, SelfGuided)) or "norm" in type(module).__name__.lower():
            continue
        parts = name.lower().split(".")
        expert = any("expert" in part for part in parts)
        ffn = expert or any(_FFN_NAME.match(part) or "moe" in part for part in name.split("."))
        for pname, p in module.named_parameters(recurse=False):
            if pname in ("scale", "zero_point"):      # a quantizer's, not a weight
                continue
            if (p.dim() == 3 and ffn) or (p.dim() == 2 and expert):
                found.append(f"{name}.{pname}" if name else pname)
    return found


def ffn_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Dense feed-forward linears by name: nn.Linear / Conv1D inside an mlp/ffn/feed_forward module, or a
    layer's fc1/fc2 or intermediate.dense/output.dense pair (see _ffn_pairs); not inside an already structured or
    self-guided layer."""
    done = tuple(n + "." for n, m in model.named_modules() if isinstance(m, (StructuredLinear, SelfGuided)))
    found = {}
    for name, module in model.named_modules():
        subs = _ffn_pairs(module)
        if _FFN_NAME.match(name.rpartition(".")[2]) and not _linear(module):
            linears = [(sub, child) for sub, child in module.named_modules() if sub and _linear(child)]
            inner = [sub for sub, child in linears if not _router(sub, child, linears)]
            if _maps_back([module.get_submodule(sub) for sub in inner]):
                subs += inner
        for sub in subs:
            full = f"{name}.{sub}" if name else sub
            if not full.startswith(done):
                found[full] = module.get_submodule(sub)
    return found


def replace_ffn(model: nn.Module, kind: str, param_ratio: float | None,
                self_guided: SelfGuidedSchedule | bool | None = None, nblocks: int | None = None, **kw) -> nn.Module:
    """Replace every feed-forward linear of `model` by a `kind` layer keeping about `param_ratio` of its weights,
    in place, on the old layer's device and dtype; wrapped in SelfGuided when a schedule (or True) is given.
    Extra keywords go to make_linear (align, rel_tol, init_std: each kind takes its own). Returns the model."""
    if kind not in KINDS:
        raise SlimkitError(f"unknown structured kind {kind!r}; choose one of {', '.join(KINDS)}")
    fixed = sorted({"device", "init", "bias", "dtype"} & set(kw))
    if fixed:
        raise SlimkitError(f"replace_ffn takes no {', '.join(fixed)}: each new layer takes the device, dtype and "
                           "bias of the linear it replaces, and the paper's initialisation (move the model "
                           "afterwards with model.to(...))")
    if not (self_guided is None or isinstance(self_guided, (bool, SelfGuidedSchedule))):
        raise SlimkitError(f"self_guided must be True/False or a SelfGuidedSchedule, got {self_guided!r}")
    schedule = SelfGuidedSchedule() if self_guided is True else (self_guided or None)
    if kind == "dense":
        if schedule is not None:
            raise SlimkitError("self-guided training guides a structured layer; with kind='dense' drop self_guided")
        return model
    targets = ffn_linears(model)
    fused = fused_experts(model)
    if not targets:
        if any(isinstance(m, (StructuredLinear, SelfGuided)) for m in model.modules()):
            raise SlimkitError(f"the feed-forward linears of {type(model).__name__} are structured already: "
                               "replace_ffn works on a dense model (build a fresh one)")
        if fused:
            raise SlimkitError(f"{type(model).__name__} keeps its experts as fused weight tensors ({fused[0]}"
                               f"{f' and {len(fused) - 1} more' if len(fused) > 1 else ''}), one tensor for all "
                               "experts, which replace_ffn cannot restructure; it replaces nn.Linear layers only")
        raise SlimkitError(f"found no feed-forward linears in {type(model).__name__}; supported: {SUPPORTED}")
    if fused:
        warnings.warn(f"replace_ffn: {len(fused)} fused expert weight tensors of {type(model).__name__} (e.g. "
                      f"{fused[0]}) stay dense; only the nn.Linear FFN layers ({len(targets)}) are replaced",
                      stacklevel=2)
    cfg = getattr(model, "config", None)
    if getattr(cfg, "pretraining_tp", 1) > 1 and getattr(cfg, "slow_but_exact", False):
        raise SlimkitError("this BLOOM model's slow_but_exact path slices its FFN's weight matrices, which "
                           "structured layers do not have: set model.config.slow_but_exact = False first")
    seen = set()
    targets = {n: m for n, m in targets.items() if not (id(m) in seen or seen.add(id(m)))}   # shared: once
    built = {}
    for name, old in targets.items():    # every layer built before any is swapped: an error leaves the model as it was
        w = old.weight
        in_f, out_f = _widths(old)
        try:
            with torch.inference_mode(False):     # ordinary parameters, which train, even if called under it
                new = make_linear(kind, in_f, out_f, param_ratio, bias=old.bias is not None, nblocks=nblocks,
                                  device=w.device, **kw)
                new = (SelfGuided(new, schedule) if schedule is not None else new).to(dtype=w.dtype)
        except SlimkitError as e:
            raise SlimkitError(f"{name}: {e}") from None
        # in the old layer's mode: an eval-mode model stays in eval mode throughout (a self-guided layer in
        # training mode would draw reduce_flops' coin in every forward)
        built[name] = _keep_layout(new, old).train(old.training)
    swap_modules(model, built, targets)
    return model


def _keep_layout(new: nn.Module, old: nn.Module) -> nn.Module:
    """Mark a layer that takes the place of a Hugging Face Conv1D (its weight stored (in, out)), and the
    structured layer inside a self-guided one, so that premerge gives back a Conv1D: a premerged GPT-2 then saves
    (save_pretrained) as a plain dense GPT-2 checkpoint that from_pretrained reloads."""
    if is_conv1d(old):
        for m in (new, getattr(new, "layer", None)):
            if m is not None:
                m.merge_conv1d = True
    return new


def structured_specs(model: nn.Module) -> dict[str, dict]:
    """Per-layer shapes of the structured / self-guided layers, outermost only (what load_structured rebuilds)."""
    specs: dict[str, dict] = {}
    for name, m in model.named_modules():
        if isinstance(m, (StructuredLinear, SelfGuided)) and not any(name.startswith(n + "." if n else "")
                                                                     for n in specs):
            specs[name] = m.spec()
    return specs


def save_structured(model: nn.Module, path: str | Path) -> Path:
    """Write the model's weights (safetensors; tied weights stored once) and the structured layers' shapes
    (structured.json) into directory `path`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SlimkitError(f"{path} is a file: save_structured writes a folder; give a new path")
    if path.is_dir():
        foreign = sorted(p.name for p in path.iterdir()
                         if p.name not in (WEIGHTS, MANIFEST, WEIGHTS + ".tmp", MANIFEST + ".tmp"))
        if foreign:     # e.g. a Hugging Face model folder or another artifact, whose model.safetensors it would replace
            raise SlimkitError(f"{path} already holds other files ({', '.join(foreign[:3])}"
                               f"{', ...' if len(foreign) > 3 else ''}): save_structured writes into a new folder or "
                               "over its own earlier save; give another path")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SlimkitError(f"cannot create {path}: {e}") from None
    # one id ties the two files: a save killed between its two renames leaves them disagreeing, which
    # load_structured tells, instead of loading new weights under an old manifest
    save_id = uuid.uuid4().hex
    manifest = json.dumps({"format": FORMAT, "version": VERSION, "save_id": save_id,
                           "layers": structured_specs(model)},
                          indent=1)       # first: a spec that does not serialise fails before anything is written
    tmp_weights, tmp_manifest = path / (WEIGHTS + ".tmp"), path / (MANIFEST + ".tmp")
    try:
        save_model(model, str(tmp_weights), metadata={"slimkit_save_id": save_id})
        tmp_manifest.write_text(manifest)
        os.replace(tmp_weights, path / WEIGHTS)
        os.replace(tmp_manifest, path / MANIFEST)
    except OSError as e:
        raise SlimkitError(f"cannot write the structured model into {path}: {e}") from None
    finally:
        for tmp in (tmp_weights, tmp_manifest):
            tmp.unlink(missing_ok=True)
    return path


def _rebuild(spec: dict, device, dtype) -> nn.Module:
    s = dict(spec)
    guided = s.pop("self_guided", None)
    layer = layer_from_spec(s, device=device).to(dtype=dtype)
    if guided is None:
        return layer
    sched = SelfGuidedSchedule(guided["guide_fraction"], guided["curve"], guided["reduce_flops"])
    wrapped = SelfGuided(layer, sched, init_guide=False)
    if not guided["guide"]:
        wrapped.drop_guide()
    else:
        wrapped.share = float(guided.get("share", 1.0))     # the mix it was saved at (older manifests: 1)
    return wrapped


def _weights_fit(model: nn.Module, weights: dict) -> str | None:
    """What keeps `weights` (a state dict whose tied tensors appear once) from loading into `model`, or None."""
    state = model.state_dict(keep_vars=True)
    unexpected = sorted(k for k in weights if k not in state)
    wrong = sorted(k for k in weights if k in state and tuple(weights[k].shape) != tuple(state[k].shape))
    groups: dict[int, list[str]] = {}
    for k, v in state.items():
        groups.setdefault(v.data_ptr() if v.numel() else id(v), []).append(k)
    missing = sorted(k for keys in groups.values() if not any(j in weights for j in keys) for k in keys)
    if not (unexpected or wrong or missing):
        return None
    return (f"missing {missing[:5]}, unexpected {unexpected[:5]}, of another shape "
            f"{[(k, tuple(weights[k].shape), tuple(state[k].shape)) for k in wrong[:3]]}")


def _same_layout(spec: dict, saved: dict) -> bool:
    """Whether a layer's spec matches a saved one in everything its weights' shapes depend on."""
    drop = lambda d: {k: v for k, v in d.items() if k != "self_guided"}  # noqa: E731
    g1, g2 = spec.get("self_guided"), saved.get("self_guided")
    return drop(spec) == drop(saved) and (g1 is None) == (g2 is None) and (
        g1 is None or g1["guide"] == g2["guide"])


def load_structured(model: nn.Module, path: str | Path) -> nn.Module:
    """Load what save_structured wrote into `model`, a freshly built dense twin of the saved one: its
    feed-forward linears are first replaced by layers of the saved shapes, then all weights are loaded strictly."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise SlimkitError(f"{path} has no {MANIFEST}: not written by slimkit.structured.save_structured")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        layers = manifest["layers"]
        if not isinstance(layers, dict):
            raise TypeError("'layers' is no mapping")
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise SlimkitError(f"{path / MANIFEST} is corrupt ({e}): save the model again with save_structured") from None
    if manifest.get("format") != FORMAT:
        raise SlimkitError(f"{path / MANIFEST} is not a structured-model manifest (format {manifest.get('format')!r}, "
                           f"expected {FORMAT!r})")
    if manifest.get("version") != VERSION:
        raise SlimkitError(f"{path} was saved as structured-model version {manifest.get('version')!r}; this slimkit "
                           f"reads version {VERSION}: use the slimkit that saved it, or upgrade")
    try:
        with safe_open(str(path / WEIGHTS), "pt") as f:
            saved_with = (f.metadata() or {}).get("slimkit_save_id")
            weights = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise SlimkitError(f"{path / WEIGHTS} is missing or corrupt ({e}): save the model again with "
                           "save_structured") from None
    if manifest.get("save_id") is not None and saved_with != manifest["save_id"]:
        raise SlimkitError(f"{path}: its {WEIGHTS} and {MANIFEST} come from two different saves (one was "
                           "interrupted between writing them): save the model again with save_structured")
    swaps, shares = {}, {}
    for name, spec in layers.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise SlimkitError(f"the saved model has a structured layer at {name}, which this model lacks: "
                               "build the same architecture before loading") from None
        if not (_linear(old) or isinstance(old, (StructuredLinear, SelfGuided))):
            raise SlimkitError(f"the saved model has a structured layer at {name}, where this model has a "
                               f"{type(old).__name__}, not a linear: build the same architecture before loading")
        if isinstance(old, (StructuredLinear, SelfGuided)):
            if not _same_layout(old.spec(), spec):
                raise SlimkitError(f"{name} is already a structured layer unlike the saved one ({old.spec()} here, "
                                   f"{spec} saved): load into a fresh dense model, or one replaced the same way")
            if isinstance(old, SelfGuided) and old.guide is not None:
                shares[name] = float(spec.get("self_guided", {}).get("share", old.share))
            continue
        try:
            if _widths(old) != (spec["in_features"], spec["out_features"]):
                raise SlimkitError(f"{name}: saved as {spec['in_features']}->{spec['out_features']}, this model has "
                                   f"{_widths(old)[0]}->{_widths(old)[1]}; build the same architecture before loading")
            with torch.inference_mode(False):     # ordinary parameters, which train, even if loaded under it
                swaps[name] = _keep_layout(_rebuild(spec, old.weight.device, old.weight.dtype), old).train(old.training)
        except SlimkitError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise SlimkitError(f"{path / MANIFEST} is corrupt at {name} ({e}): save the model again") from None
    olds = {name: model.get_submodule(name) for name in swaps}
    swap_modules(model, swaps, olds)
    problem = _weights_fit(model, weights)
    if problem:
        swap_modules(model, olds, swaps)            # leave the model as it came
        raise SlimkitError(f"weights in {path} do not fit this model: {problem}")
    model.load_state_dict(weights, strict=False)     # tied tensors are stored once; loading one fills its twins
    for name, share in shares.items():
        model.get_submodule(name).share = share
    return model
