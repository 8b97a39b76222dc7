"""Uniform affine fake quantization: the math every slimkit quantization method shares.

A tensor is viewed as rows (`to_rows`): one row per quantization group, so per-tensor, per-channel,
per-token and per-group quantization are the same code with different views. Each row gets a scale `s`
and an integer zero point `z`; values map to the grid  q = clamp(round(x / s) + z, qmin, qmax)  and back
to  (q - z) * s.  Rounding uses the straight-through estimator, so autograd gives the LSQ gradient for the
step size (Esser et al., 2020, "Learned Step Size Quantization"), scaled by 1/sqrt(N * qmax) as the paper does.

AdaRound (Nagel et al., 2020) replaces round() by floor() plus a learned rectified sigmoid
h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1) with zeta = 1.1, gamma = -0.1, regularised by
sum(1 - |2h - 1|^beta) with beta annealed from 20 to 2 after a warm-up (QDrop's public code uses the same).
"""
from __future__ import annotations

from dataclasses import dataclass, asdict

import torch
from torch import nn

GRANULARITIES = ("tensor", "channel", "token", "group")
ADAROUND_ZETA, ADAROUND_GAMMA = 1.1, -0.1


@dataclass
class QuantSpec:
    """How one tensor is quantized: bit width, signedness and the granularity of its scales."""

    bits: int = 8
    symmetric: bool = False
    granularity: str = "tensor"  # tensor | channel | token | group
    group_size: int = 128
    ch_axis: int = 0  # the channel axis for granularity="channel"

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be an integer from 2 to 8, got {self.bits!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")
        if self.granularity == "group" and self.group_size < 1:
            raise ValueError(f"group_size must be positive, got {self.group_size}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def to_dict(self) -> dict:
        return asdict(self)


def to_rows(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """View `x` as a 2-D tensor with one quantization group per row (a view, no copy, in the common cases)."""
    if spec.granularity == "tensor":
        return x.reshape(1, -1)
    if spec.granularity == "channel":
        if spec.ch_axis == 0:
            return x.reshape(x.shape[0], -1)
        return x.movedim(spec.ch_axis, 0).reshape(x.shape[spec.ch_axis], -1)
    if spec.granularity == "token":
        return x.reshape(-1, x.shape[-1])
    row = x[0].numel() if spec.ch_axis == 0 and x.dim() > 1 else x.shape[-1]   # a weight: groups stay in a channel
    if row % spec.group_size:
        raise ValueError(f"{'each output channel' if spec.ch_axis == 0 else 'the last dimension'} holds {row} "
                         f"values, not divisible by group_size {spec.group_size}")
    return x.reshape(-1, spec.group_size)


def from_rows(rows: torch.Tensor, like: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Undo `to_rows` for a tensor shaped like `like`."""
    if spec.granularity == "channel" and spec.ch_axis != 0:
        shape, axis = list(like.shape), spec.ch_axis % like.dim()     # (-1: the last axis)
        moved = [shape[axis]] + shape[:axis] + shape[axis + 1 :]
        return rows.reshape(moved).movedim(0, axis)
    return rows.reshape(like.shape)


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point (float tensors) that map [lo, hi] onto the grid; the range always holds 0."""
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    eps = torch.finfo(torch.float32).eps
    if spec.symmetric:
        scale = torch.maximum(-lo, hi) / ((spec.qmax - spec.qmin) / 2)
        scale = scale.clamp_min(eps)
        zero_point = torch.zeros_like(scale)
    else:
        scale = ((hi - lo) / (spec.qmax - spec.qmin)).clamp_min(eps)
        zero_point = (spec.qmin - torch.round(lo / scale)).clamp(spec.qmin, spec.qmax)
    return scale, zero_point


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() whose gradient is the identity (straight-through estimator)."""
    return (torch.round(x) - x).detach() + x


def grad_scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity in the forward pass, gradient multiplied by `factor` (LSQ's step-size gradient scale)."""
    return (x - x * factor).detach() + x * factor


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Quantize and dequantize with STE rounding; gradients reach x (inside the range) and scale (LSQ)."""
    q = torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def quantize_int(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """The integer codes (as float) of `x` on the grid; `dequantize(quantize_int(x)) == fake_quant(x)`."""
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    return (q - zero_point) * scale


def fake_quant_tensor(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """Fake-quantize a whole tensor whose per-row scale and zero point are 1-D tensors (one per row)."""
    rows = to_rows(x, spec)
    out = fake_quant(rows, scale.reshape(-1, 1), zero_point.reshape(-1, 1), spec.qmin, spec.qmax)
    return from_rows(out, x, spec)


def dynamic_fake_quant(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Fake-quantize with scales taken from the tensor itself (min-max per row): per-token activations."""
    rows = to_rows(x, spec)
    scale, zero_point = qparams_from_range(rows.detach().amin(1), rows.detach().amax(1), spec)
    out = fake_quant(rows, scale.reshape(-1, 1), zero_point.reshape(-1, 1), spec.qmin, spec.qmax)
    return from_rows(out, x, spec)


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """AdaRound's h(V): a sigmoid stretched to (gamma, zeta) and clipped to [0, 1], so 0 and 1 are reachable."""
    return torch.clamp(torch.sigmoid(v) * (ADAROUND_ZETA - ADAROUND_GAMMA) + ADAROUND_GAMMA, 0, 1)


def adaround_init(rest: torch.Tensor) -> torch.Tensor:
    """V such that h(V) equals the fractional part `rest` in [0, 1): learning starts at the float weight."""
    rest = rest.clamp(1e-6, 1 - 1e-6)
    return -torch.log((ADAROUND_ZETA - ADAROUND_GAMMA) / (rest - ADAROUND_GAMMA) - 1)


def adaround_regularizer(v: torch.Tensor, beta: float) -> torch.Tensor:
    """sum(1 - |2 h(V) - 1|^beta): zero only when every h(V) is exactly 0 or 1."""
    return (1 - (2 * rectified_sigmoid(v) - 1).abs().pow(beta)).sum()


def drop_mix(quantized: torch.Tensor, full: torch.Tensor, quant_prob: float) -> torch.Tensor:
    """QDrop's element-wise mix: each element keeps its quantized value with probability `quant_prob`."""
    keep = (torch.rand_like(quantized) < quant_prob).to(quantized.dtype)
    return torch.lerp(full, quantized, keep)


def static_fake_quant(rows: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                      factor: float, learned: bool, quant_prob: float) -> torch.Tensor:
    """Fake quantization with stored per-row scales; with `learned`, the LSQ step (|s|, gradient scaled by
    `factor`); with `quant_prob` < 1, QDrop's random drop. One function, so it can be compiled as one kernel."""
    if learned:
        scale = grad_scale(scale.abs().clamp_min(torch.finfo(torch.float32).eps), factor)
    out = fake_quant(rows, scale, zero_point, qmin, qmax)
    return drop_mix(out, rows, quant_prob) if quant_prob < 1.0 else out


_COMPILED: dict = {}


def compiled_static_fake_quant():
    """static_fake_quant through torch.compile: its ~10 element-wise passes fused into one forward and one
    backward kernel (5x faster on the CPU, measured). Shapes are dynamic, so each block does not recompile."""
    if "fq" not in _COMPILED:
        _COMPILED["fq"] = torch.compile(static_fake_quant, dynamic=True)
    return _COMPILED["fq"]


class Quantizer(nn.Module):
    """A fake quantizer for one tensor: static scales set by an observer, optionally learned (LSQ).

    Modes: `observing` (record statistics, pass x through), `enabled` (fake-quantize). `quant_prob` < 1 makes
    each element keep its quantized value only with that probability and its float value otherwise (QDrop).
    `adaround` turns on learned rounding (weights only): call `init_adaround(w)` with the weight first.
    """

    def __init__(self, spec: QuantSpec, observer: str = "minmax", learn_scale: bool = False):
        super().__init__()
        from .observers import make_observer

        self.spec = spec
        self.observer_name = observer
        self.observer = make_observer(observer, spec) if spec.granularity != "token" else None
        self.learn_scale = learn_scale
        self.register_buffer("scale", torch.ones(1))
        self.register_buffer("zero_point", torch.zeros(1))
        self.enabled = True
        self.observing = False
        self.quant_prob = 1.0
        self.compiled = False  # use the torch.compile'd kernel (set by the engine for long CPU runs)
        self.alpha: nn.Parameter | None = None  # AdaRound's V
        self.w_floor: torch.Tensor | None = None  # floor(w / s) of the weight being rounded
        self.hard_round = False

    # -- calibration -------------------------------------------------------------------------------
    @property
    def dynamic(self) -> bool:
        return self.spec.granularity == "token"

    def observe(self, x: torch.Tensor) -> None:
        if self.observer is not None:
            self.observer.update(to_rows(x.detach().float(), self.spec))

    def compute_qparams(self) -> None:
        """Turn the observer's statistics into scale and zero point."""
        if self.observer is None:
            return
        scale, zero_point = self.observer.compute()
        self.set_qparams(scale, zero_point)

    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        scale = scale.detach().reshape(-1).float()
        zero_point = zero_point.detach().reshape(-1).float().to(scale.device)
        if self.learn_scale:
            self.scale = nn.Parameter(scale.clone())
        else:
            self.scale = scale.clone()
        self.zero_point = zero_point.clone()

    def make_learnable(self) -> None:
        """Turn the step size into a Parameter (LSQ)."""
        if self.dynamic:
            return
        self.learn_scale = True
        if not isinstance(self.scale, nn.Parameter):
            scale = self.scale.detach().clone()
            del self.scale
            self.scale = nn.Parameter(scale)

    def freeze_scale(self) -> None:
        """Turn a learned step size back into a buffer (after reconstruction)."""
        if isinstance(self.scale, nn.Parameter):
            scale = self.scale.detach().abs().clamp_min(torch.finfo(torch.float32).eps).clone()
            del self.scale
            self.register_buffer("scale", scale)
        self.learn_scale = False

    def _apply(self, fn, recurse=True):
        """Moves follow the model (.to(device), .cuda()), but scales and zero points stay float32 through a dtype
        cast (.half(), .to(torch.bfloat16), .double()): rounded to the model's dtype they would change the grid, and
        the model would no longer be the one slimkit.save writes and slimkit.load rebuilds (float32 steps)."""
        out = super()._apply(fn, recurse)
        for name in ("scale", "zero_point"):
            t = getattr(self, name, None)
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float32:
                if isinstance(t, nn.Parameter):
                    t.data = t.data.float()
                else:
                    self._buffers[name] = t.float()
        return out

    # -- AdaRound ---------------------------------------------------------------------------------
    def init_adaround(self, w: torch.Tensor) -> None:
        rows = to_rows(w.detach(), self.spec) / self.scale.detach().reshape(-1, 1)
        self.w_floor = torch.floor(rows)  # constant while the rounding is learned: computed once
        self.alpha = nn.Parameter(adaround_init(rows - self.w_floor))
        self.hard_round = False

    def round_loss(self, beta: float) -> torch.Tensor:
        return adaround_regularizer(self.alpha, beta)

    def drop_adaround(self) -> None:
        self.alpha = None
        self.w_floor = None
        self.hard_round = False

    # -- forward ------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.observe(x)
            return x
        if not self.enabled:
            return x
        if self.dynamic:
            out = dynamic_fake_quant(x, self.spec)
            return (drop_mix(out, x, self.quant_prob) if self.quant_prob < 1.0 else out).to(x.dtype)
        rows = to_rows(x, self.spec)
        zp = self.zero_point.reshape(-1, 1)
        if self.alpha is not None:  # AdaRound: floor + learned h(V), on the weight this quantizer was set up for
            scale = self.scale.reshape(-1, 1)
            soft = (self.alpha >= 0).to(rows.dtype) if self.hard_round else rectified_sigmoid(self.alpha)
            q = torch.clamp(self.w_floor + soft + zp, self.spec.qmin, self.spec.qmax)
            return from_rows((q - zp) * scale, x, self.spec).to(x.dtype)
        learned = isinstance(self.scale, nn.Parameter)
        factor = 1.0 / (rows.numel() / self.scale.numel() * self.spec.qmax) ** 0.5 if learned else 1.0
        fn = compiled_static_fake_quant() if self.compiled else static_fake_quant
        out = fn(rows, self.scale.reshape(-1, 1), zp, self.spec.qmin, self.spec.qmax, factor, learned, self.quant_prob)
        return from_rows(out, x, self.spec).to(x.dtype)     # fp32 scales must not promote a bf16 / fp16 model

    def int_codes(self, w: torch.Tensor) -> torch.Tensor:
        """Integer codes of `w` (same shape as w, as int16) under the current scales and rounding."""
        rows = to_rows(w.detach(), self.spec)
        scale, zp = self.scale.detach().reshape(-1, 1), self.zero_point.reshape(-1, 1)
        if self.alpha is not None:
            q = torch.clamp(self.w_floor + (self.alpha >= 0).to(rows.dtype) + zp, self.spec.qmin, self.spec.qmax)
        else:
            q = quantize_int(rows, scale, zp, self.spec.qmin, self.spec.qmax)
        return from_rows(q, w, self.spec).to(torch.int16)

    def extra_repr(self) -> str:
        s = self.spec
        return f"bits={s.bits}, symmetric={s.symmetric}, granularity={s.granularity}, observer={self.observer_name}"
