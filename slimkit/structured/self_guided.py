"""Self-guided training: a dense matrix guides a structured layer early in training, then is dropped.

output = a * dense(x) + (1 - a) * structured(x), the dense share `a` decaying from 1 to 0. What we relied on in
CLAIRE-Labo/StructuredFFN (read, not copied):
- src/configs/optimization/training/self_guided_training.yaml: scheduler "cosine", max_step_ratio 0.5 (the guide
  is active for the first half of the steps), reduce_flop false, mode fixedstep.
- src/modules/layer/util.py (CosineTempDecay, LinearTempDecay): a(t) = 0.5 * (1 + cos(pi * t / T_g)) for t <= T_g,
  0 after, with T_g = int(max_step_ratio * total_steps) (src/optimization/trainer.py); linear: 1 - t / T_g.
- src/modules/layer/basiclinear.py: one bias, added after the mix (so the guide has none); the guide starts as the
  structured layer's own dense matrix (post_init in lowrank.py etc.); with reduce_flop the guide is computed only
  with probability a (else the structured output alone), halving its expected cost under the cosine curve.
- src/optimization/trainer.py: after T_g steps the guide is switched off; guide FLOPs are 2 * guide params per
  token forward, x3 for forward + backward; "fixedflop" mode repeats the guided tokens at the end to match FLOPs
  (that part is the trainer's, not this module's).

FLOP convention here: training = 3 x forward (backward costs two forward matmuls: input and weight gradients).
The dense guide adds 2*in*out per token forward while a > 0 (a * that with reduce_flops, its expectation).
The share is a plain float set from the step by `set_progress`, so resuming at step t reproduces it exactly;
with reduce_flops the coin comes from torch's global CPU generator (save its state to resume bit for bit).
Under DDP the guide phase needs find_unused_parameters=True when reduce_flops is on, and the DDP wrapper and the
optimizer must be rebuilt (or given to drop_guides) after the guides are dropped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.wrap import is_conv1d
from ..errors import SlimkitError
from .layers import StructuredLinear, autocast_off, forward_flops

CURVES = ("cosine", "linear")


@dataclass(frozen=True)
class SelfGuidedSchedule:
    """When and how fast the dense guide fades: over the first `guide_fraction` of the steps, on `curve`."""
    guide_fraction: float = 0.5
    curve: str = "cosine"
    reduce_flops: bool = False

    def __post_init__(self):
        if self.curve not in CURVES:
            raise SlimkitError(f"self-guided curve must be one of {CURVES}, got {self.curve!r}")
        if isinstance(self.guide_fraction, bool) or not isinstance(self.guide_fraction, (int, float)) \
                or not 0.0 <= self.guide_fraction <= 1.0:
            raise SlimkitError(f"guide_fraction is a share of training in [0, 1], got {self.guide_fraction}")
        if not isinstance(self.reduce_flops, bool):      # "no" or "false" would switch it on
            raise SlimkitError(f"reduce_flops must be True or False, got {self.reduce_flops!r}")

    def guided_steps(self, total_steps: int) -> int:
        return int(self.guide_fraction * total_steps)

    def share(self, step: int, total_steps: int) -> float:
        """The dense share a at `step` (0-based) of `total_steps`: 1 at step 0, 0 from guided_steps on."""
        t_g = self.guided_steps(total_steps)
        if step >= t_g:
            return 0.0
        rel = max(step, 0) / t_g
        return 0.5 * (1.0 + math.cos(math.pi * rel)) if self.curve == "cosine" else 1.0 - rel


class SelfGuided(nn.Module):
    """A structured layer plus a dense guide (nn.Linear without bias; the structured layer's bias is shared):
    a * (guide(x) + bias) + (1 - a) * layer(x). With a == 0 or the guide dropped, only the layer runs."""

    def __init__(self, layer: nn.Module, schedule: SelfGuidedSchedule | None = None, guide: nn.Linear | None = None,
                 init_guide: bool = True):
        super().__init__()
        if not isinstance(layer, StructuredLinear):      # it reads the layer's dense_weight() and shapes
            raise SlimkitError(f"SelfGuided guides a structured layer (make_linear / replace_ffn), got "
                               f"{type(layer).__name__}")
        if not (schedule is None or isinstance(schedule, SelfGuidedSchedule)):
            raise SlimkitError(f"SelfGuided's schedule must be a SelfGuidedSchedule, got {schedule!r}")
        self.layer, self.schedule, self.share = layer, schedule or SelfGuidedSchedule(), 1.0
        if guide is None:  # the paper starts the guide at the structured layer's own matrix
            p = next(layer.parameters())
            # no random init (it would draw from the global generator and shift every later layer's init): the
            # guide is the layer's own matrix, or weights loaded next
            guide = torch.nn.utils.skip_init(nn.Linear, layer.in_features, layer.out_features, bias=False,
                                             device=p.device, dtype=p.dtype)
            if init_guide:      # the product in the layer's own precision, whatever autocast the caller is under
                with torch.no_grad(), autocast_off(p.device):
                    guide.weight.copy_(layer.dense_weight())
        self.guide = guide

    @property
    def in_features(self) -> int:
        return self.layer.in_features

    @property
    def out_features(self) -> int:
        return self.layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The structured layer's `weight` (its first factor: for code that reads a linear's weight dtype)."""
        return self.layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.layer.bias

    @property
    def guide_active(self) -> bool:
        return self.guide is not None and self.share > 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer(x)
        a = self.share
        if not self.guide_active or (self.schedule.reduce_flops and self.training and float(torch.rand(())) >= a):
            return y
        return a * F.linear(x, self.guide.weight, self.layer.bias) + (1.0 - a) * y

    def drop_guide(self) -> list[nn.Parameter]:
        """Remove the dense guide (training goes on with the structured layer alone); returns its parameters."""
        params = [] if self.guide is None else list(self.guide.parameters())
        self.guide, self.share = None, 0.0
        return params

    def dense_weight(self) -> torch.Tensor:
        """The (out, in) matrix of this module's eval-mode output (the mix while the guide is active)."""
        w = self.layer.dense_weight()
        return self.share * self.guide.weight + (1.0 - self.share) * w if self.guide_active else w

    def flops(self, tokens: int) -> int:
        """Forward FLOPs: the structured layer's, plus the guide's while it is active (times a, its expected
        use, when reduce_flops)."""
        extra = 0
        if self.guide_active:
            extra = 2 * tokens * self.in_features * self.out_features
            extra = extra * self.share if self.schedule.reduce_flops else extra
        return forward_flops(self.layer, tokens) + int(round(extra))

    def spec(self) -> dict:
        inner = self.layer.spec() if hasattr(self.layer, "spec") else {"kind": "dense"}
        return {**inner, "self_guided": {"guide": self.guide is not None, "guide_fraction": self.schedule.guide_fraction,
                                         "curve": self.schedule.curve, "reduce_flops": self.schedule.reduce_flops,
                                         "share": self.share}}


def self_guided_modules(model: nn.Module) -> list[SelfGuided]:
    return [m for m in model.modules() if isinstance(m, SelfGuided)]


def set_progress(model: nn.Module, step: int, total_steps: int) -> float:
    """Set every SelfGuided module's dense share for `step` of `total_steps` (each from its own schedule);
    returns the largest share (0.0 when none is left: time for drop_guides)."""
    shares = [0.0]
    for m in self_guided_modules(model):
        m.share = m.schedule.share(step, total_steps) if m.guide is not None else 0.0
        shares.append(m.share)
    return max(shares)


def drop_guides(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Drop every dense guide; with `optimizer`, also remove their parameters and state from it, so the memory
    is freed. Returns the number of weights dropped."""
    dropped = [p for m in self_guided_modules(model) for p in m.drop_guide()]
    if optimizer is not None and dropped:
        gone = {id(p) for p in dropped}
        for group in optimizer.param_groups:
            keep = [i for i, p in enumerate(group["params"]) if id(p) not in gone]
            if "param_names" in group:     # an optimizer built from named_parameters() (torch >= 2.6)
                group["param_names"] = [group["param_names"][i] for i in keep]
            group["params"] = [group["params"][i] for i in keep]
        for p in dropped:
            optimizer.state.pop(p, None)
    return sum(p.numel() for p in dropped)


def _matmul_modules(model: nn.Module):
    """Linear-like modules, outermost first: a structured or self-guided module hides its own children."""
    skip = ()
    for name, m in model.named_modules():
        if skip and any(name.startswith(s) for s in skip):
            continue
        if isinstance(m, (SelfGuided, StructuredLinear)):
            skip += (name + "." if name else "",)       # the model itself one such layer: it hides all the rest
            yield m
        elif isinstance(m, nn.Linear) or is_conv1d(m):
            yield m


def train_flops_per_token(model: nn.Module, backward_factor: float = 3.0) -> float:
    """Training FLOPs per token of every matmul weight in the model: backward_factor (3: forward + backward) x
    2 x weights, structured layers by their factors, active dense guides included at the current share.
    Attention's score and value products (which grow with context length) and embeddings are not included."""
    # a tied output head shares its weight with the embedding but still runs its matmul: counted once, as a matmul
    return backward_factor * sum(forward_flops(m, 1) for m in _matmul_modules(model))
