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

Pre-merge is for inference only: the merged nn.Linear holds W = (factors multiplied out), from which the factors
cannot be recovered (a factorisation is not unique). Keep a copy (copy.deepcopy) of the model to train on.
"""
from __future__ import annotations

import copy
import numbers
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.benchmark import Timer

from ..core.wrap import swap_modules
from ..errors import SlimkitError
from .decode import graphed
from .layers import StructuredLinear
from .self_guided import SelfGuided

MERGEABLE = (StructuredLinear, SelfGuided)
_CACHE: dict[tuple, "MergeChoice"] = {}


@dataclass(frozen=True)
class MergeChoice:
    """Whether to merge, and the two median forward times (milliseconds) it was decided on."""
    merge: bool
    merged_ms: float
    structured_ms: float


def merged_linear(layer: nn.Module) -> nn.Linear:
    """The dense nn.Linear computing what `layer` (structured, or self-guided in eval mode) computes."""
    with torch.no_grad():
        w = layer.dense_weight().detach()
        out = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                        device=w.device, dtype=w.dtype)
        out.weight.copy_(w)
        if layer.bias is not None:
            out.bias.copy_(layer.bias)
    return out


def _where(layer: nn.Module, device, dtype) -> tuple[torch.device, torch.dtype]:
    p = next(layer.parameters())
    return torch.device(device) if device is not None else p.device, dtype or p.dtype


def _key(layer: nn.Module, tokens: int, device: torch.device, dtype: torch.dtype, graph: bool) -> tuple:
    shapes = tuple((n, tuple(p.shape)) for n, p in layer.named_parameters())
    active = isinstance(layer, SelfGuided) and layer.guide_active
    return type(layer).__name__, shapes, active, tokens, str(device), str(dtype), graph


class _Repeat(nn.Module):
    """`module` applied `times` times to the same input (the last output returned): captured as one graph, its
    replay time over `times` is the layer's GPU time, with the replay's own host cost spread thin, as in a
    graph-decoded model where one replay runs every layer."""

    def __init__(self, module: nn.Module, times: int):
        super().__init__()
        self.module, self.times = module, times

    def forward(self, x):
        for _ in range(self.times - 1):
            self.module(x)
        return self.module(x)


GRAPH_REPEATS = 16


def _median_ms(module: nn.Module, x: torch.Tensor, min_run_time: float, graph: bool) -> float:
    repeats = GRAPH_REPEATS if graph and x.is_cuda else 1
    forward = graphed(_Repeat(module, repeats).eval(), x, clone_output=False) if repeats > 1 else module

    def run():
        with torch.inference_mode():
            return forward(x)
    run()  # warm-up (lazy CUDA init, kernel selection)
    timer = Timer(stmt="run()", globals={"run": run})
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3 / repeats


def _check_tokens(tokens) -> None:
    if isinstance(tokens, bool) or not isinstance(tokens, numbers.Integral) or tokens < 1:
        raise SlimkitError(f"tokens must be a positive integer (tokens per forward, e.g. the decoding batch), "
                           f"got {tokens!r}")


def choose_merge(layer: nn.Module, tokens: int, device=None, dtype: torch.dtype | None = None,
                 min_run_time: float = 0.05, graph: bool = False) -> MergeChoice:
    """Time `layer` and its merged twin on `tokens` tokens (default: the layer's own device and dtype);
    merge only when the merged one is strictly faster. `graph=True` times both as CUDA-graph replays (on the
    CPU it changes nothing but the cache entry). Cached per kind, shapes, tokens, device, dtype and graph."""
    _check_tokens(tokens)
    device, dtype = _where(layer, device, dtype)
    key = _key(layer, tokens, device, dtype, graph)
    if key not in _CACHE:
        structured = copy.deepcopy(layer).to(device=device, dtype=dtype).eval()
        merged = merged_linear(structured).eval()
        x = torch.randn(tokens, layer.in_features, device=device, dtype=dtype)
        m_ms, s_ms = _median_ms(merged, x, min_run_time, graph), _median_ms(structured, x, min_run_time, graph)
        _CACHE[key] = MergeChoice(m_ms < s_ms, m_ms, s_ms)
    return _CACHE[key]


def mergeable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Structured and self-guided modules by name, outermost only (a SelfGuided's inner layer is not listed)."""
    found: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if isinstance(m, MERGEABLE) and not any(name.startswith(n + ".") for n in found):
            found[name] = m
    return found


def premerge(model: nn.Module, tokens: int, device=None, dtype: torch.dtype | None = None,
             always: bool = False, min_run_time: float = 0.05, graph: bool = False) -> nn.Module:
    """Swap each structured layer for its merged nn.Linear where that measures faster at `tokens` tokens per
    forward (for decoding: the batch size); `always=True` merges every one without timing. `graph=True` decides
    by CUDA-graph replay times, for a model decoded through decode.graphed (no effect on the CPU). In place;
    inference only (see the module docstring). Returns the model."""
    if not always:
        _check_tokens(tokens)
    layers = mergeable_layers(model)
    news = {name: merged_linear(layer) for name, layer in layers.items()
            if always or choose_merge(layer, tokens, device, dtype, min_run_time, graph).merge}
    swap_modules(model, news, layers)       # a layer shared by two blocks: one merged layer, shared the same way
    return model
