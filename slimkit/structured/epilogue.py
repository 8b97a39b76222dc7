"""The FFN's GELU work in cuBLASLt matmul epilogues, through NVIDIA's nvmath-python (optional, GPU only).

An FFN y = fc2(gelu(fc1 x)) spends, besides its matmuls, several memory-bound passes over the (tokens x hidden)
activations: bias + GELU forward, GELU' backward and the bias-gradient sum. cuBLASLt can do the first two inside
the matmuls that touch those activations anyway:

- forward, fc1's last dense factor w (N, K) on h (T, K): epilogue GELU_AUX_BIAS (GELU_AUX without a bias) writes
  act = gelu(h w^T + b) and, as its auxiliary output, the pre-activation that the backward needs;
- backward, where fc2 starts with a dense factor u (k, N) (nn.Linear, LowRankLinear): the input gradient of that
  factor, dz u, goes through epilogue DGELU, which multiplies it by gelu'(pre) read from the auxiliary output.
  The bias gradient is one torch sum (the fused DGELU_BGRAD epilogue measured about 1 ms slower on an H200).
  An fc2 that starts block-diagonal gets the forward fusion only, and torch's GELU backward.

cuBLASLt's GELU is the tanh approximation, so only F.gelu(approximate="tanh") is fused. Each matmul is planned and
autotuned once per shape, stride, dtype, device and thread (plans are not thread-safe), then reused with new
operands; a cached plan keeps its last operands alive until the next call of that shape, and at most MAX_PLANS
plans are kept (least recently used dropped first).

Measured before this module (a probe of the same calls, H200, bf16, d 2048 -> 8192 -> 2048 at 16384 tokens,
forward+backward): low-rank 0.3125 2.01 ms against 2.16 ms eager, 2.63x over the eager dense FFN; the dense FFN
5.10 ms against 5.27 ms. `bench/structured_ffn_speed.py` measures this module as its '-lt' rows.

Used through `slimkit.structured.kernels.fused_ffn(..., matmul="cublaslt")`; `available(x)` says whether it runs
(nvmath-python importable, x on CUDA, SLIMKIT_FUSED_FFN not 0). Install: pip install nvmath-python==1.0.0.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict

import torch
import torch.nn.functional as F

try:
    from nvmath.linalg.advanced import Matmul, MatmulEpilog, MatmulPlanPreferences
except Exception:        # not installed, or no CUDA runtime: the module reports itself unavailable
    Matmul = MatmulEpilog = MatmulPlanPreferences = None

ENABLED = os.environ.get("SLIMKIT_FUSED_FFN", "1") != "0"
AUTOTUNE_ITERS = 10
MAX_PLANS = 32           # plans kept (each holds its last operands): training reuses a handful of shapes
_PLANS: OrderedDict = OrderedDict()


def available(x: torch.Tensor) -> bool:
    """Whether the cuBLASLt path runs for x: nvmath-python present, not disabled, x on CUDA."""
    return Matmul is not None and ENABLED and x.is_cuda


def _signature(*tensors: torch.Tensor) -> tuple:
    return tuple((tuple(t.shape), t.stride(), t.dtype, t.device) for t in tensors)


def _matmul(epilog_name: str | None, a: torch.Tensor, b: torch.Tensor, inputs: dict):
    """a @ b with the named epilogue (None: plain), from a cached, autotuned plan; returns nvmath's result
    ((out, aux dict) for epilogues with an auxiliary output, else out)."""
    key = (epilog_name, threading.get_ident()) + _signature(a, b, *inputs.values())
    mm = _PLANS.get(key)
    if mm is None:
        mm = Matmul(a, b)
        epilog = getattr(MatmulEpilog, epilog_name) if epilog_name else None
        mm.plan(epilog=epilog, epilog_inputs=inputs or None, preferences=MatmulPlanPreferences(limit=8))
        mm.autotune(iterations=AUTOTUNE_ITERS)
        _PLANS[key] = mm
        while len(_PLANS) > MAX_PLANS:       # least recently used first (its operands are released with it)
            old = _PLANS.popitem(last=False)[1]
            getattr(old, "free", lambda: None)()
    else:
        _PLANS.move_to_end(key)
        mm.reset_operands(a=a, b=b, epilog_inputs=inputs or None)
    return mm.execute()


def reference_matmul(epilog_name: str | None, a: torch.Tensor, b: torch.Tensor, inputs: dict):
    """What `_matmul` computes, in PyTorch (for tests on any device): the epilogues' definitions.
    GELU_AUX(_BIAS): pre = a @ b (+ bias per row), out = gelu_tanh(pre), aux {"gelu_aux": pre};
    DGELU: out = (a @ b) * gelu_tanh'(gelu_aux); None: a @ b."""
    out = a @ b
    if epilog_name in ("GELU_AUX", "GELU_AUX_BIAS"):
        pre = out + inputs["bias"][:, None] if epilog_name == "GELU_AUX_BIAS" else out
        return F.gelu(pre, approximate="tanh"), {"gelu_aux": pre}
    if epilog_name == "DGELU":
        return torch.ops.aten.gelu_backward(out, inputs["gelu_aux"], approximate="tanh")
    if epilog_name is None:
        return out
    raise ValueError(f"no reference for epilogue {epilog_name!r}")


def linear_gelu(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None):
    """(act, pre_t): act = gelu_tanh(h @ w^T + b) (T, N) and the pre-activation as cuBLASLt keeps it, (N, T)."""
    out, aux = _matmul("GELU_AUX_BIAS" if b is not None else "GELU_AUX", w, h.t(),
                       {"bias": b} if b is not None else {})
    return out.t(), aux["gelu_aux"]


def dgelu_linear(dz: torch.Tensor, u: torch.Tensor, pre_t: torch.Tensor) -> torch.Tensor:
    """dpre = (dz @ u) * gelu_tanh'(pre), (T, N), for dz (T, k), u (k, N) and pre_t from linear_gelu."""
    return _matmul("DGELU", u.t(), dz.t(), {"gelu_aux": pre_t}).t()


class GeluUp(torch.autograd.Function):
    """act = gelu_tanh(h @ w^T + b), the epilogue forward; the backward is torch's GELU backward."""

    @staticmethod
    def forward(ctx, h, w, b):
        act, pre_t = linear_gelu(h, w, b)
        ctx.save_for_backward(h, w, pre_t)
        ctx.has_bias = b is not None
        return act

    @staticmethod
    def backward(ctx, dact):
        h, w, pre_t = ctx.saved_tensors
        dpre = torch.ops.aten.gelu_backward(dact, pre_t.t(), approximate="tanh")
        db = dpre.sum(0) if ctx.has_bias else None
        return dpre @ w, dpre.t() @ h, db


class GeluUpDown(torch.autograd.Function):
    """z = gelu_tanh(h @ w^T + b) @ u^T: fc1's last factor with the GELU epilogue, then fc2's first dense factor,
    whose input gradient comes out of the DGELU epilogue."""

    @staticmethod
    def forward(ctx, h, w, b, u):
        act, pre_t = linear_gelu(h, w, b)
        ctx.save_for_backward(h, w, u, act, pre_t)
        ctx.has_bias = b is not None
        return F.linear(act, u)

    @staticmethod
    def backward(ctx, dz):
        h, w, u, act, pre_t = ctx.saved_tensors
        dz = dz.contiguous()
        dpre = dgelu_linear(dz, u, pre_t)
        db = dpre.sum(0) if ctx.has_bias else None
        return dpre @ w, dpre.t() @ h, db, dz.t() @ act
