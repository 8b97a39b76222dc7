"""Pre-merge for decoding: at small token counts one dense matmul can beat two thin ones.

The paper (arXiv 2406.16450, "pre-merge"; CLAIRE-Labo/StructuredFFN src/benchmark_eff/benchmark_model_infer.py)
merges the structured factors into the dense (out, in) matrix for online decoding, where the structured layer's
extra kernel launches and copies dominate. Here the choice is measured, not assumed: `choose_merge` times the
merged and the structured forward on the real shape, token count, device and dtype (torch.utils.benchmark, which
synchronises CUDA) and caches the answer per (kind, shapes, tokens, device, dtype, graph). With graph=True (on
CUDA) both forwards are timed as CUDA-graph replays (decode.graphed), the way a graph-decoded model runs them:
a graph removes most of the launch cost that pre-merge exists to avoid, so the answer can differ. Each graph
holds GRAPH_REPEATS calls of the layer, so that the time is the layer's own and not one replay's host overhead
(which a decoded model pays once per step, not once per layer).

Both forms are timed with their weights cold, as a model's layers run them: a decoding step reads every layer's
weights once, far more bytes than the cache holds, so each layer streams its own from memory. Calling one layer
over and over would instead find its weights in the GPU's L2 (50 MB on an H100: a merged 2048 x 8192 bf16 matrix
fits), and the merged layer, with four times the bytes of a 25% structured one, would look faster than it runs
in the model. So each timing cycles through copies of the layer whose weights add up to twice the cache
(`_cold_copies`).

An FFN whose two linears run as one (a module naming them in `ffn_pair`, as slimkit's GPT MLP does: in CUDA
graphs its structured pairs take small-token kernels at decoding token counts, kernels.structured_ffn_small) is timed as
a whole, in its four forms (both structured, both merged, either one merged), since a layer timed alone runs
its own path, not the pair's; `choose_pair_merge` decides it.

Pre-merge is for inference only: the merged nn.Linear holds W = (factors multiplied out), from which the factors
cannot be recovered (a factorisation is not unique). Keep a copy (copy.deepcopy) of the model to train on.
"""
from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.benchmark import Timer

from ..core.wrap import swap_modules
from ..errors import SlimkitError
from .decode import graphed
from .layers import StructuredLinear, autocast_off
from .self_guided import SelfGuided

MERGEABLE = (StructuredLinear, SelfGuided)
RUN_SETTINGS = ("kernel", "approximate")     # an FFN module's attributes that choose how its forward runs
_CACHE: dict[tuple, "MergeChoice"] = {}


@dataclass(frozen=True)
class MergeChoice:
    """Whether to merge, and the two median forward times (milliseconds) it was decided on."""
    merge: bool
    merged_ms: float
    structured_ms: float


def _conv1d(layer: nn.Module) -> bool:
    """Whether `layer` took the place of a Hugging Face Conv1D (replace_ffn / load_structured mark it so), whose
    merged form is a Conv1D again; with a bias only, as Conv1D always has one."""
    marked = getattr(layer, "merge_conv1d", False) or getattr(getattr(layer, "layer", None), "merge_conv1d", False)
    return bool(marked) and layer.bias is not None


def merged_linear(layer: nn.Module) -> nn.Module:
    """The dense nn.Linear computing what `layer` (structured, or self-guided in eval mode) computes (a Hugging Face
    Conv1D, its weight stored (in, out), where the layer replaced one: a premerged GPT-2 is then a plain GPT-2 for
    save_pretrained / from_pretrained), in the layer's dtype whatever mode the caller is in: autocast off (the
    product in the layer's own precision, not autocast's dtype) and outside inference mode (ordinary parameters,
    which load, update in place and train)."""
    _check_mergeable(layer, "merged_linear")
    with torch.inference_mode(False), torch.no_grad(), autocast_off(next(layer.parameters()).device):
        w = layer.dense_weight().detach()
        if _conv1d(layer):
            from transformers.pytorch_utils import Conv1D      # there since the layer replaced one
            out = Conv1D(layer.out_features, layer.in_features).to(device=w.device, dtype=w.dtype)
            out.weight.copy_(w.t())
        else:
            out = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                            device=w.device, dtype=w.dtype)
            out.weight.copy_(w)
        if layer.bias is not None:
            out.bias.copy_(layer.bias)
    # frozen stays frozen: the merged weight trains if any factor did, the bias as the layer's did
    factors = [q for n, q in layer.named_parameters() if n != "bias" and not n.endswith(".bias")]
    out.weight.requires_grad_(any(q.requires_grad for q in factors))
    if layer.bias is not None:
        out.bias.requires_grad_(layer.bias.requires_grad)
    return out.train(layer.training)      # in the mode of the model it goes into


def _check_mergeable(layer, what: str) -> None:
    if not isinstance(layer, MERGEABLE):
        raise SlimkitError(f"{what} takes a structured or self-guided layer (StructuredLinear, SelfGuided), got "
                           f"{type(layer).__name__}: for a whole model use premerge")


def _where(layer: nn.Module, device, dtype) -> tuple[torch.device, torch.dtype]:
    p = next(layer.parameters())
    return torch.device(device) if device is not None else p.device, dtype or p.dtype


def _key(layer: nn.Module, tokens: int, device: torch.device, dtype: torch.dtype, graph: bool) -> tuple:
    shapes = tuple((n, tuple(p.shape)) for n, p in layer.named_parameters())
    active = isinstance(layer, SelfGuided) and layer.guide_active
    return type(layer).__name__, shapes, active, tokens, str(device), str(dtype), graph


GRAPH_REPEATS = 16
CPU_CACHE_BYTES = 32 << 20      # a server CPU's last-level cache, order of magnitude
MAX_COPIES = 64


class _Cycle(nn.Module):
    """`calls` calls, one after another, cycling through `modules` (copies of one layer) on the same input: with
    more weight bytes than the cache holds, each call finds its weights cold."""

    def __init__(self, modules: list[nn.Module], calls: int):
        super().__init__()
        self.copies, self.calls = nn.ModuleList(modules), calls

    def forward(self, x):
        for i in range(self.calls - 1):
            self.copies[i % len(self.copies)](x)
        return self.copies[(self.calls - 1) % len(self.copies)](x)


def _cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)) or (50 << 20)
    return CPU_CACHE_BYTES


def _cold_copies(module: nn.Module, device: torch.device) -> list[nn.Module]:
    """`module` and enough deep copies of it that their weights add up to twice the device's cache (at most
    MAX_COPIES in all)."""
    size = sum(p.numel() * p.element_size() for p in module.parameters()) or 1
    n = min(MAX_COPIES, max(1, -(-2 * _cache_bytes(device) // size)))
    return [module] + [copy.deepcopy(module) for _ in range(n - 1)]


def _median_ms(module: nn.Module, x: torch.Tensor, min_run_time: float, graph: bool) -> float:
    """Median time of one call of `module` on x, in ms, its weights cold (see the module docstring)."""
    copies = _cold_copies(module, x.device)
    calls = max(len(copies), GRAPH_REPEATS) if graph and x.is_cuda else len(copies)
    forward = _Cycle(copies, calls).eval()
    if graph and x.is_cuda:
        forward = graphed(forward, x, clone_output=False)

    def run():
        with torch.inference_mode():
            return forward(x)
    run()  # warm-up (lazy CUDA init, kernel selection)
    timer = Timer(stmt="run()", globals={"run": run})
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3 / calls


def _check_tokens(tokens) -> None:
    if isinstance(tokens, bool) or not isinstance(tokens, numbers.Integral) or tokens < 1:
        raise SlimkitError(f"tokens must be a positive integer (tokens per forward, e.g. the decoding batch), "
                           f"got {tokens!r}")


def _check_min_run_time(min_run_time) -> None:
    """A positive, finite number of seconds: torch.utils.benchmark times until it is reached, which a NaN or an
    infinity never is."""
    if isinstance(min_run_time, bool) or not isinstance(min_run_time, numbers.Real) \
            or not math.isfinite(min_run_time) or min_run_time <= 0:
        raise SlimkitError(f"min_run_time must be a positive, finite number of seconds, got {min_run_time!r}")


def choose_merge(layer: nn.Module, tokens: int, device=None, dtype: torch.dtype | None = None,
                 min_run_time: float = 0.05, graph: bool = False) -> MergeChoice:
    """Time `layer` and its merged twin on `tokens` tokens (default: the layer's own device and dtype);
    merge only when the merged one is strictly faster. `graph=True` times both as CUDA-graph replays (on the
    CPU it changes nothing but the cache entry). Cached per kind, shapes, tokens, device, dtype and graph."""
    _check_mergeable(layer, "choose_merge")
    _check_tokens(tokens)
    _check_min_run_time(min_run_time)
    device, dtype = _where(layer, device, dtype)
    key = _key(layer, tokens, device, dtype, graph)
    if key not in _CACHE:
        structured = copy.deepcopy(layer).to(device=device, dtype=dtype).eval()
        merged = merged_linear(structured).eval()
        x = torch.randn(tokens, layer.in_features, device=device, dtype=dtype)
        m_ms, s_ms = _median_ms(merged, x, min_run_time, graph), _median_ms(structured, x, min_run_time, graph)
        _CACHE[key] = MergeChoice(m_ms < s_ms, m_ms, s_ms)
    return _CACHE[key]


@dataclass(frozen=True)
class PairChoice:
    """Which of an FFN's two linears to merge, and the four forms' median forward times (milliseconds), keyed
    (merge fc1, merge fc2)."""
    merge: tuple[bool, bool]
    times_ms: dict


def _pair(module: nn.Module) -> tuple[str, str] | None:
    """The names of the two linears `module` runs as one FFN (its `ffn_pair`), where both are mergeable."""
    names = getattr(module, "ffn_pair", None)
    if not (isinstance(names, tuple) and len(names) == 2 and all(isinstance(n, str) for n in names)):
        return None
    return names if all(isinstance(getattr(module, n, None), MERGEABLE) for n in names) else None


def choose_pair_merge(module: nn.Module, tokens: int, device=None, dtype: torch.dtype | None = None,
                      min_run_time: float = 0.05, graph: bool = False) -> PairChoice:
    """Time the FFN `module` (one that names its two linears in `ffn_pair`) with neither, either and both of
    them merged, on `tokens` tokens, weights cold (as choose_merge); the fastest form wins, the structured one on
    a tie. Cached per module type, its RUN_SETTINGS, the linears' kinds and shapes, tokens, device, dtype and
    graph."""
    _check_tokens(tokens)
    _check_min_run_time(min_run_time)
    names = _pair(module)
    if names is None:
        raise SlimkitError(f"choose_pair_merge: {type(module).__name__} names no two structured linears in "
                           "`ffn_pair` (e.g. ffn_pair = ('fc1', 'fc2')); use choose_merge for single layers")
    first = getattr(module, names[0])
    device, dtype = _where(first, device, dtype)
    # the class itself, not its name: an FFN runs its class's forward, and two classes may share a name (MLP); and
    # the settings that choose its path (slimkit's GPT MLP: the kernel, eager or cublaslt, and the GELU form)
    runs = tuple(repr(getattr(module, a, None)) for a in RUN_SETTINGS)
    key = (type(module), names, runs) + tuple(_key(getattr(module, n), tokens, device, dtype, graph) for n in names)
    if key not in _CACHE:
        base = copy.deepcopy(module).to(device=device, dtype=dtype).eval()
        x = torch.randn(tokens, first.in_features, device=device, dtype=dtype)
        times = {}
        for merge in ((False, False), (True, True), (True, False), (False, True)):
            form = copy.deepcopy(base)
            for name, m in zip(names, merge):
                if m:
                    setattr(form, name, merged_linear(getattr(form, name)).eval())
            times[merge] = _median_ms(form, x, min_run_time, graph)
        _CACHE[key] = PairChoice(min(times, key=times.get), times)   # dicts keep order: structured first on ties
    return _CACHE[key]


def mergeable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Structured and self-guided modules by name, outermost only (a SelfGuided's inner layer is not listed)."""
    found: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if isinstance(m, MERGEABLE) and not any(name.startswith(n + "." if n else "") for n in found):
            found[name] = m
    return found


def premerge(model: nn.Module, tokens: int, device=None, dtype: torch.dtype | None = None,
             always: bool = False, min_run_time: float = 0.05, graph: bool = False) -> nn.Module:
    """Swap each structured layer for its merged nn.Linear where that measures faster at `tokens` tokens per
    forward (for decoding: the batch size); `always=True` merges every one without timing. The two linears of an
    FFN that runs them as one (a module naming them in `ffn_pair`) are decided together (choose_pair_merge),
    every other layer alone (choose_merge). `graph=True` decides
    by CUDA-graph replay times, for a model decoded through decode.graphed (no effect on the CPU). In place;
    inference only (see the module docstring). Returns the model; a model that is itself one structured or
    self-guided layer cannot be swapped in place, so its merged nn.Linear is returned instead (where chosen)."""
    if not always:
        _check_tokens(tokens)
        _check_min_run_time(min_run_time)
    layers = mergeable_layers(model)
    if "" in layers:
        merge = always or choose_merge(model, tokens, device, dtype, min_run_time, graph).merge
        return merged_linear(model) if merge else model
    chosen = {}                             # layer name -> merge, decided with its FFN's other linear where paired
    if not always:
        for name, module in model.named_modules():
            names = _pair(module)
            paired = [f"{name}.{n}" if name else n for n in names or ()]
            if names and all(p in layers and p not in chosen for p in paired):
                chosen.update(zip(paired, choose_pair_merge(module, tokens, device, dtype, min_run_time, graph).merge))
    news = {name: merged_linear(layer) for name, layer in layers.items()
            if always or chosen.get(name, False)
            or (name not in chosen and choose_merge(layer, tokens, device, dtype, min_run_time, graph).merge)}
    swap_modules(model, news, layers)       # a layer shared by two blocks: one merged layer, shared the same way
    return model
