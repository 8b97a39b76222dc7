"""CUDA-graph decoding: replay a module's forward as one captured CUDA graph per input signature.

At decoding token counts a structured FFN's forward is a few small kernels whose launch cost exceeds their
work; a CUDA graph (torch.cuda.CUDAGraph) launches them all at once. `graphed(model, x)` wraps an eval-mode
module so that each call copies its inputs into static buffers and replays the graph captured for their shapes
and dtypes, as the PyTorch CUDA-graph docs prescribe (warm-up on a side stream, then capture). Inference only;
with inputs not on CUDA (e.g. on the CPU) the module is simply called.

A graph reads memory, not modules: weights changed in place after capture (copy_, an optimizer step,
load_state_dict's default copy) are seen by the next replay; a parameter replaced by another tensor (assigned,
or moved or cast by .to()/.half()) is not, and its old memory may be reused: call `graphed` again after that.
"""
from __future__ import annotations

import numbers
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import SlimkitError
from .kernels import graph_warmup       # the small-token FFN kernels run in graphs (compiled in the warm-up)

Output = torch.Tensor | tuple | list


@dataclass
class _Capture:
    """One captured forward: the graph, the static input buffers it reads and the static outputs it writes."""
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]
    output: Output


class GraphedModule(nn.Module):
    """`module` whose forward replays a CUDA graph captured per input signature; made by `graphed` (see there)."""

    def __init__(self, module: nn.Module, warmup: int = 3, max_shapes: int = 8, clone_output: bool = True):
        super().__init__()
        for name, v in (("warmup", warmup), ("max_shapes", max_shapes)):
            # an integer: range(2.5) fails at the first capture, and a NaN max_shapes never evicts a graph
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise SlimkitError(f"graphed: {name} must be an integer of at least 1, got {v!r}")
        if not isinstance(module, nn.Module):
            raise SlimkitError(f"graphed wraps an nn.Module, got {type(module).__name__}")
        self.module = module
        self.warmup, self.max_shapes, self.clone_output = warmup, max_shapes, clone_output
        self.device: torch.device | None = None   # of the first capture; later inputs must be on it
        self.graphs: OrderedDict[tuple, _Capture] = OrderedDict()   # by ((shape, dtype), ...), least recent first

    def forward(self, *inputs: torch.Tensor) -> Output:
        if self.module.training:
            raise SlimkitError(f"graphed: {type(self.module).__name__} is in training mode; call .eval() first: "
                               "CUDA graphs here are for inference")
        bad = [f"#{i} ({type(t).__name__})" for i, t in enumerate(inputs) if not isinstance(t, torch.Tensor)]
        if bad:
            raise SlimkitError(f"graphed: positional inputs must be tensors, but input {', '.join(bad)} is not; "
                               "bind other arguments into the module (e.g. a small nn.Module wrapper)")
        devices = {t.device for t in inputs}
        cuda = [d for d in devices if d.type == "cuda"]
        if self.device is None and not cuda:
            with torch.no_grad():
                return self.module(*inputs)
        where = self.device or cuda[0]
        if devices != {where}:
            first = ", the device of its first capture" if self.device is not None else ""
            raise SlimkitError(f"graphed: inputs are on {', '.join(sorted(map(str, devices)))}, but a graphed module "
                               f"replays on one device ({where}{first}); move them there, or call graphed() again "
                               "for another device")
        amp = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        sig = (amp, *((t.shape, t.dtype) for t in inputs))
        with torch.cuda.device(where), torch.no_grad():
            cap = self.graphs.get(sig)
            if cap is None:
                cap = self._capture(inputs)
                self.device, self.graphs[sig] = where, cap
                if len(self.graphs) > self.max_shapes:
                    self.graphs.popitem(last=False)
            else:
                self.graphs.move_to_end(sig)
                for static, t in zip(cap.inputs, inputs):
                    static.copy_(t)
            cap.graph.replay()
            out = cap.output
            if not self.clone_output:
                return out
            if isinstance(out, torch.Tensor):
                return out.clone()
            return type(out)(None if o is None else o.clone() for o in out)

    def _capture(self, inputs: tuple[torch.Tensor, ...]) -> _Capture:
        # ordinary tensors, which later calls may copy into (see capture); under no_grad, which leaving inference
        # mode turns off: an input that requires grad would tie its autograd graph to the static copy for good
        with torch.inference_mode(False), torch.no_grad():
            static = tuple(t.clone(memory_format=torch.contiguous_format) for t in inputs)
        graph, out = capture(lambda: self.module(*static), self.warmup)
        if not (isinstance(out, torch.Tensor)
                or type(out) in (tuple, list) and all(o is None or isinstance(o, torch.Tensor) for o in out)):
            raise SlimkitError(f"graphed: {type(self.module).__name__} returned {type(out).__name__}; a graphed "
                               "forward must return a tensor or a tuple/list of tensors (or None, e.g. no loss)")
        return _Capture(graph, static, out)


def capture(fn, warmup: int = 3, after_warmup=None):
    """(graph, fn's output) for fn() (a function of static tensors it closes over) captured on the current CUDA
    device, as the PyTorch CUDA-graph docs prescribe: `warmup` runs on a side stream (lazy init, cuBLAS workspaces,
    kernel choice), then the capture; `after_warmup()`, if given, runs between them (e.g. to undo the warm-up's
    writes to state that fn updates in place). Outside inference mode, so the static buffers are ordinary tensors
    that later calls outside it may copy into, and under no_grad (leaving inference mode turns gradient recording
    back on: without it the captured forward recorded autograd graphs, kept their saved activations and took the
    layers' training paths); with autocast's weight-cast cache off, so the casts are captured too (a cached cast
    lives outside the graph and is freed when the caller's autocast region ends; captured, it also follows
    in-place weight updates); in kernels.graph_warmup, where the small-token FFN kernels run."""
    amp = {"dtype": torch.get_autocast_dtype("cuda"), "enabled": torch.is_autocast_enabled("cuda")}
    with torch.inference_mode(False), torch.no_grad(), torch.autocast("cuda", **amp, cache_enabled=False), \
            graph_warmup():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        if after_warmup is not None:
            after_warmup()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
    return graph, out


def graphed(module: nn.Module, *example_inputs: torch.Tensor, warmup: int = 3, max_shapes: int = 8,
            clone_output: bool = True) -> GraphedModule:
    """Wrap eval-mode `module` for decoding: on CUDA each call replays a CUDA graph of its forward.

    One graph per input signature (shapes and dtypes of the positional tensor inputs, and the autocast dtype in
    force; the device is fixed by the first capture), captured under no_grad on the first call that brings it,
    after `warmup` eager runs on a side stream. At most `max_shapes` graphs are kept; a new one beyond that
    drops the least recently used (its memory is freed; a later call of that signature captures it again).
    `example_inputs`, when given, are run once now, so that errors show here and their graph is ready.

    A call copies the inputs into the graph's static buffers, replays, and returns the output (a tensor, or a
    tuple/list of tensors and Nones, like GPT's (logits, None)) cloned; with `clone_output=False` it returns
    the static output buffers themselves, valid until the next call, which overwrites them. Outputs never
    require grad. On the CPU, or for inputs not on CUDA, the module is called as it is (under no_grad).
    In-place weight updates are seen by replay; replacing a parameter (not in place) needs a new `graphed`
    call (see the module docstring).
    """
    wrapped = GraphedModule(module, warmup, max_shapes, clone_output)
    if example_inputs:
        wrapped(*example_inputs)
    return wrapped
