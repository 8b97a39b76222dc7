"""Structured drop-in replacements for nn.Linear: LowRank, BlockShuffle and BlockDense, built from a parameter ratio.

Paper: Wei, Moalla, Pascanu, Gulcehre, "Building on Efficient Foundations: Effectively Training LLMs with
Structured Feedforward Layers" (arXiv 2406.16450). What we relied on in its code, CLAIRE-Labo/StructuredFFN
(read, not copied):
- src/modules/layer/lowrank.py: W = V U with U (r, in), V (out, r). Init "svd": draw a dense W0 ~ N(0, std) of
  shape (out, in), take its SVD and keep the top r: U = sqrt(S_r) Vh_r, V = U_r sqrt(S_r).
- src/modules/layer/blockshuffle.py, src/modules/op/block_shuffle.py (Monarch, Dao et al. 2022): two
  block-diagonal factors of b blocks each; the middle width is min(in, out); between them the channels are
  shuffled (viewed as (r, b) and transposed, block j takes every b-th channel), and the output of block l, row s
  lands at channel s*b + l. Init "ortho": every block replaced by U Vh of its own SVD (nearest orthogonal).
- src/modules/layer/blockdense.py, src/modules/op/block_dense.py: W = V blockdiag(B_1..B_b), B_k (rank/b, in/b),
  V (out, rank). Init "ortho" on every block and on V.
- src/modules/layer/basiclinear.py + src/configs/model/gpt2.yaml: bias zero; factors first drawn N(0, 0.02)
  ("fixed", initializer_range 0.02) before the post-init above.
- src/configs/method/*.yaml: the paper's defaults, rank 256 / nblocks 2 (BlockShuffle) / nblocks 4 (BlockDense).

The code takes a rank or a block count; the parameter-ratio rules are ours. "Parameter ratio" is the layer's
weights (bias not counted) over in*out. Each kind takes the achievable shape nearest the target and refuses,
with SlimkitError, one that misses it by more than `rel_tol` (default 25%):
- lowrank: rank r = ratio*in*out/(in+out) rounded to a multiple of `align` (8, for tensor cores), or to an integer
  when that is below 4*align; the rounding error in the ratio is at most step/2*(in+out)/(in*out).
- blockshuffle: weights m*in/k + m*out/l (m = min(in, out)) for k first-factor and l second-factor blocks. The
  paper's form has k = l = b, ratio m*(in+out)/(b*in*out): 1.25/b at d -> 4d, so no b gives 25% at power-of-two
  widths (0.3125 at b=4, 0.156 at b=8). The b nearest the target in log-ratio is taken when it is within 5%
  (EQUAL_TOL); otherwise the (k, l) pair nearest the target, Monarch's general form (its op takes w1 (k, q, p)
  and w2 (l, s, r) with l*r = k*q): (2, 8) for d -> 4d and (8, 2) for 4d -> d give exactly 0.25. `nblocks`
  (and `nblocks2`) when given are checked against the target instead.
- blockdense: weights rank*(in/b + out); rank = ratio*in*out/(in/b+out) rounded to a multiple of lcm(b, align)
  (or of b when below 4 times that); b = nblocks, default the yaml's 4 (2, then 1, when 4 does not divide `in`).
  Each linear is matched on its own (the paper gives fc1 and fc2 one rank and matches the FFN total instead).

Forward: each block-diagonal product is one torch.bmm over a (blocks, tokens, width) view of token-major
activations, its result written straight into a token-major buffer (block_diag_mm; no loop over blocks, no
activation copy in either pass). BlockShuffle runs feature-major (_Monarch): its shuffle and output interleave
are then strided views that torch.bmm reads and writes in place, and only the change back to token-major at
the end may copy (once per FFN when two BlockShuffle layers meet, kernels.blockshuffle_ffn; not even that where
interleave.token_major_blocks has the last matmul write it token-major). The paper's op (Monarch's)
copies for the shuffle and the interleave instead; at d 2048, 16384 tokens, 31% of the weights, on an H100
that FFN took 3.28 ms of GPU time forward+backward against 2.13 ms feature-major (dense 5.18 ms;
bench/results/structured_ffn_speed_nobias_events.md). At 16 tokens all kinds are slower than dense: see
premerge.py.
FLOPs: 2 * tokens * weights (each weight is used in one multiply-add per token); bias adds are not counted.
"""
from __future__ import annotations

import contextlib
import functools
import math
import numbers
import operator

import torch
import torch.nn.functional as F
from torch import nn

from ..core.wrap import is_conv1d
from ..errors import SlimkitError
from .interleave import bmm_t01, feature_major_blocks, grad_blocks, token_major_blocks

KINDS = ("dense", "lowrank", "blockshuffle", "blockdense")
INIT_STD = 0.02   # configs/model/gpt2.yaml: initializer_range
REL_TOL = 0.25    # how far (relative) the achieved parameter ratio may miss the target
EQUAL_TOL = 0.05  # BlockShuffle keeps one block count for both factors (the paper's form) when it is this close


# ---------- initialisation (pure functions) ----------

def svd_factors(out_features: int, in_features: int, rank: int, std: float = INIT_STD,
                device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's "svd" init: best rank-r factors (U (r, in), V (out, r)) of a dense N(0, std) matrix,
    the singular values split evenly between them. Row-major, as every parameter here (LAPACK hands U back
    column-major): a saved layer then reloads with the same memory layout and computes bit for bit alike."""
    w0 = torch.randn(out_features, in_features, device=device, dtype=_init_dtype()) * std
    u, s, vh = torch.linalg.svd(w0, full_matrices=False)
    root = s[:rank].sqrt()
    dtype = torch.get_default_dtype()
    return (root[:, None] * vh[:rank]).contiguous().to(dtype), (u[:, :rank] * root).contiguous().to(dtype)


def orthogonal_like(w: torch.Tensor) -> torch.Tensor:
    """The paper's "ortho" init: each matrix (batched over leading dims) replaced by U Vh of its SVD."""
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    with autocast_off(w.device):      # in w's precision, not an enclosing autocast's bf16
        return (u @ vh).contiguous()


def _init_dtype() -> torch.dtype:
    """The dtype initial factors are drawn and decomposed in: the default dtype, or float32 where that is a half
    precision (torch.set_default_dtype(torch.bfloat16)), for which there is no CPU SVD. The factors are then
    stored in the default dtype, as an nn.Linear built there would be."""
    default = torch.get_default_dtype()
    return default if default in (torch.float32, torch.float64) else torch.float32


def _ortho_normal(*shape: int, device=None) -> torch.Tensor:
    w = orthogonal_like(torch.randn(*shape, device=device, dtype=_init_dtype()) * INIT_STD)
    return w.to(torch.get_default_dtype())


# ---------- shape rules (pure functions) ----------

def _check_ratio(param_ratio: float | None, kind: str) -> float:
    if (param_ratio is None or isinstance(param_ratio, bool) or not isinstance(param_ratio, numbers.Real)
            or not 0.0 < float(param_ratio) < 1.0):
        raise SlimkitError(f"{kind}: param_ratio must be a number in (0, 1) (the share of the dense layer's "
                           f"weights to keep), got {param_ratio!r}")
    return float(param_ratio)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _check_positive(kind: str, **values) -> None:
    """Widths, ranks, block counts and alignments are positive integers (None: not given)."""
    for name, v in values.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1):
            raise SlimkitError(f"{kind}: {name} must be a positive integer, got {v!r}")


def _check_divides(nblocks: int, width: int, what: str, kind: str, name: str = "nblocks") -> None:
    _check_positive(kind, **{name: nblocks})
    if width % nblocks:
        near = [d for d in _divisors(width) if d <= 4 * max(nblocks, 1)][-6:]
        raise SlimkitError(f"{kind}: {name}={nblocks} does not divide {what}={width}; "
                           f"pass a divisor of {width}, e.g. one of {near}")


def _miss(kind: str, achieved: float, target: float, shape: str, fix: str, rel_tol: float) -> None:
    if abs(achieved - target) > rel_tol * target:
        raise SlimkitError(f"{kind}: no shape meets param_ratio={target:g} ({shape} gives {achieved:.4g}, more "
                           f"than {rel_tol:.0%} off); {fix}")


def _neighbours(rank: int, step: int, smallest: int, ratio_of) -> str:
    """'rank 4 gives 0.33, rank 8 gives 0.67' for the achievable ranks around `rank`."""
    ranks = sorted({max(smallest, rank - step), rank, rank + step})
    return "achievable here: " + ", ".join(f"rank {r} gives {ratio_of(r):.3g}" for r in ranks)


def _round_step(target: float, step: int, floor: int) -> int:
    """Nearest multiple of `step` to `target`, or of `floor` for small targets (below 4 steps), where alignment
    buys no speed and would cost precision."""
    s = step if target >= 4 * step else floor
    return max(s, int(round(target / s)) * s)


def lowrank_rank(in_features: int, out_features: int, param_ratio: float, align: int = 8,
                 rel_tol: float = REL_TOL) -> int:
    """Rank r with r*(in+out) nearest param_ratio*in*out (a multiple of `align` once r is 4*align or more)."""
    ratio = _check_ratio(param_ratio, "lowrank")
    _check_positive("lowrank", in_features=in_features, out_features=out_features, align=align)
    target = ratio * in_features * out_features / (in_features + out_features)
    rank = _round_step(target, align, 1)
    ratio_of = lambda r: r * (in_features + out_features) / (in_features * out_features)
    _miss("lowrank", ratio_of(rank), ratio, f"rank {rank} of a {in_features}->{out_features} layer",
          f"{_neighbours(rank, 1 if target < 4 * align else align, 1, ratio_of)}: pass a param_ratio near one of "
          "these (rank 1 is the smallest) or keep it dense", rel_tol)
    achieved = ratio_of(rank)
    if achieved >= 1.0:
        raise SlimkitError(f"lowrank: rank {rank} keeps all {in_features}x{out_features} weights or more; "
                           "lower param_ratio or use kind='dense'")
    return rank


def blockshuffle_ratio(in_features: int, out_features: int, nblocks: int, nblocks2: int | None = None) -> float:
    """Parameter ratio of a BlockShuffle layer with k = nblocks first-factor and l = nblocks2 (default k)
    second-factor blocks: m*in/k + m*out/l weights over in*out, m = min(in, out) the middle width."""
    k, l = nblocks, nblocks if nblocks2 is None else nblocks2
    m = min(in_features, out_features)
    return m / (out_features * k) + m / (in_features * l)


def _shuffle_pairs(in_features: int, out_features: int) -> list[tuple[int, int]]:
    """Every (k, l) a BlockShuffle layer can take (k divides in and the middle width, l divides out and the
    middle width) that keeps fewer weights than dense."""
    m = min(in_features, out_features)
    firsts, seconds = _divisors(math.gcd(in_features, m)), _divisors(math.gcd(out_features, m))
    return [(k, l) for k in firsts for l in seconds if blockshuffle_ratio(in_features, out_features, k, l) < 1.0]


def blockshuffle_shape(in_features: int, out_features: int, param_ratio: float | None, nblocks: int | None = None,
                       nblocks2: int | None = None, rel_tol: float = REL_TOL) -> tuple[int, int]:
    """Block counts (k, l) of the two factors for `param_ratio`: the paper's form, one count b for both, when
    some b comes within EQUAL_TOL of the target (the b nearest in log-ratio); else Monarch's general form, the
    pair nearest the target (ties to the most even pair). Given counts are checked instead (nblocks alone means
    both factors take it)."""
    kind = "blockshuffle"
    _check_positive(kind, in_features=in_features, out_features=out_features, nblocks=nblocks, nblocks2=nblocks2)
    if nblocks is not None or nblocks2 is not None:
        k = nblocks if nblocks is not None else nblocks2
        l = nblocks2 if nblocks2 is not None else nblocks
        _check_shuffle_blocks(in_features, out_features, k, l)
        if param_ratio is None:
            return k, l
        ratio = _check_ratio(param_ratio, kind)
        best = (k, l)
    else:
        ratio = _check_ratio(param_ratio, kind)
        pairs = _shuffle_pairs(in_features, out_features)
        if not pairs:
            raise SlimkitError(f"{kind}: a {in_features}->{out_features} layer has no block count that saves "
                               f"weights (gcd of the widths is {math.gcd(in_features, out_features)}); "
                               "pick another kind")
        miss = lambda kl: abs(math.log(blockshuffle_ratio(in_features, out_features, *kl) / ratio))
        equal = [kl for kl in pairs if kl[0] == kl[1]]
        best = min(equal, key=miss) if equal else None
        if best is None or miss(best) > math.log1p(EQUAL_TOL):
            best = min(pairs, key=lambda kl: (round(miss(kl), 9), abs(math.log(kl[0] / kl[1]))))
    options = [kl for kl in _shuffle_pairs(in_features, out_features) if kl[0] == kl[1]]
    table = ", ".join(f"b={k}: {blockshuffle_ratio(in_features, out_features, k):.3g}" for k, _ in options[:8])
    shape = f"nblocks={best[0]}" + (f", nblocks2={best[1]}" if best[1] != best[0] else "")
    _miss(kind, blockshuffle_ratio(in_features, out_features, *best), ratio,
          f"{shape} of a {in_features}->{out_features} layer",
          f"its ratio is fixed by the block count ({table or 'no block count below ratio 1'}, one count for both "
          "factors): pass one of these ratios, or nblocks (and nblocks2 for the second factor), or pick another "
          "kind", rel_tol)
    return best


def _check_shuffle_blocks(in_features: int, out_features: int, k: int, l: int) -> None:
    kind, m = "blockshuffle", min(in_features, out_features)
    _check_divides(k, in_features, "in_features", kind)
    _check_divides(l, out_features, "out_features", kind, name="nblocks2" if l != k else "nblocks")
    for name, v in (("nblocks", k), ("nblocks2", l)):
        if m % v:
            raise SlimkitError(f"{kind}: {name}={v} does not divide the middle width min(in, out)={m}; "
                               f"pass a divisor of {m}")


def blockdense_shape(in_features: int, out_features: int, param_ratio: float, nblocks: int | None = None,
                     align: int = 8, rel_tol: float = REL_TOL) -> tuple[int, int]:
    """(rank, nblocks) of a BlockDense layer with rank*(in/b + out) nearest param_ratio*in*out."""
    kind = "blockdense"
    ratio = _check_ratio(param_ratio, kind)
    _check_positive(kind, in_features=in_features, out_features=out_features, nblocks=nblocks, align=align)
    if nblocks is None:
        nblocks = next(b for b in (4, 2, 1) if in_features % b == 0)
    _check_divides(nblocks, in_features, "in_features", kind)
    per_rank = in_features / nblocks + out_features
    target = ratio * in_features * out_features / per_rank
    step = math.lcm(nblocks, align)
    rank = _round_step(target, step, nblocks)
    ratio_of = lambda r: r * per_rank / (in_features * out_features)
    achieved = ratio_of(rank)
    _miss(kind, achieved, ratio, f"rank {rank}, nblocks={nblocks} of a {in_features}->{out_features} layer",
          f"{_neighbours(rank, step if target >= 4 * step else nblocks, nblocks, ratio_of)}: pass a param_ratio near "
          "one of these, use fewer blocks (finer ranks), or keep it dense", rel_tol)
    if rank > in_features:
        raise SlimkitError(f"blockdense: rank {rank} exceeds in_features={in_features}; lower param_ratio")
    if achieved >= 1.0:
        raise SlimkitError(f"blockdense: rank {rank}, nblocks={nblocks} of a {in_features}->{out_features} layer keeps "
                           f"{achieved:.1%} of its weights, no fewer than the dense layer; lower param_ratio or "
                           "keep it dense")
    return rank, nblocks


# ---------- the layers ----------

class StructuredLinear(nn.Module):
    """What the three kinds share: widths, an optional bias, forward = project(x, bias), counts and FLOPs."""

    kind = "structured"

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None):
        super().__init__()
        _check_positive(self.kind, in_features=in_features, out_features=out_features)
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    def project(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x @ W^T (+ bias) on (..., in) inputs; each kind implements it, fusing the bias where it can and
        keeping the matmul's dtype under autocast (an fp32 bias would otherwise promote a bf16 output)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(x, self.bias)

    def factors(self) -> list[torch.Tensor]:
        """The weight tensors (no bias)."""
        return [p for n, p in self.named_parameters(recurse=False) if n != "bias"]

    @property
    def weight(self) -> torch.Tensor:
        """The first factor, so that code which reads a linear's `.weight.dtype` / `.device` works unchanged
        (transformers' T5 and Switch FFNs cast their input to `wo.weight.dtype`). It is not the (out, in) matrix:
        that is dense_weight()."""
        return self.factors()[0]

    @property
    def weight_params(self) -> int:
        return sum(p.numel() for p in self.factors())

    @property
    def num_params(self) -> int:
        return self.weight_params + (0 if self.bias is None else self.bias.numel())

    @property
    def param_ratio(self) -> float:
        return self.weight_params / (self.in_features * self.out_features)

    def flops(self, tokens: int) -> int:
        """Forward FLOPs: 2 per weight per token."""
        return 2 * tokens * self.weight_params

    def dense_weight(self) -> torch.Tensor:
        """The equivalent (out, in) matrix: the layer applied to the identity (exact, each sum has one term)."""
        w = self.factors()[0]
        return self.project(torch.eye(self.in_features, device=w.device, dtype=w.dtype)).T

    def spec(self) -> dict:
        """What rebuilds this layer's shape (saved next to the weights)."""
        return {"kind": self.kind, "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.spec().items() if k != "kind") + f", ratio={self.param_ratio:.3f}"


def linear_cast_bias(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """F.linear with the bias cast to the input's dtype (the fused paths take an fp32 bias beside bf16 weights)."""
    return F.linear(h, w, None if b is None else b.to(h.dtype))


def regrad(reference, inputs: tuple, needs: tuple, grad_out: torch.Tensor) -> tuple:
    """A custom Function's input gradients when its backward must itself be differentiable (create_graph=True:
    gradient penalties, Hessian-vector products): recompute `reference(*inputs)` with plain differentiable torch
    ops and differentiate that, so the gradients carry a graph. `needs`: ctx.needs_input_grad for `inputs`
    (non-tensors and inputs that need no gradient get None)."""
    wanted = [i for i, (t, n) in enumerate(zip(inputs, needs)) if n and isinstance(t, torch.Tensor)]
    with torch.enable_grad():
        out = reference(*inputs)
        grads = torch.autograd.grad(out, [inputs[i] for i in wanted], grad_out, create_graph=True,
                                    allow_unused=True)
    result = [None] * len(inputs)
    for i, g in zip(wanted, grads):
        result[i] = g if g is not None else torch.zeros_like(inputs[i])
    return tuple(result)


def has_autocast(device_type: str) -> bool:
    """torch.amp.is_autocast_available, answered without the call for CUDA and the CPU, which always have autocast:
    torch.compile before torch 2.13 does not trace that call and broke the graph at each one."""
    return device_type in ("cuda", "cpu") or torch.amp.is_autocast_available(device_type)


def autocasts(x: torch.Tensor) -> bool:
    """Whether autocast, if on for x's device, casts a matmul reading x: float64 it leaves alone, as F.linear's
    autocast does."""
    dev = x.device.type       # "meta" has no autocast, and asking whether it is on there raises
    return has_autocast(dev) and torch.is_autocast_enabled(dev) and x.dtype != torch.float64


def autocast_off(device: torch.device):
    """A context with autocast off on `device`, so that what runs in it keeps its tensors' own precision; a plain
    null context on devices that have no autocast ("meta": models built there to count their FLOPs). Not for code
    that torch.compile traces where it may break the graph inside the context (the autograd Functions here, whose
    out= matmuls it does not trace): the context object this returns is then guarded by identity and, freed after
    each call, makes every call recompile (on CUDA: 150 ms a forward until the recompile limit). There
    block_diag_mm and monarch_product write `with torch.autocast(...)` in the function itself, which it handles."""
    if has_autocast(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def block_diag_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.einsum("tbp,bqp->tbq", x, w)


def block_diag_product(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """y[t, k] = w[k] @ x[t, k], x (T, b, p), w (b, q, p) -> y (T, b, q), one bmm reading and writing token-major
    views (no autograd: _BlockDiagMM and the fused FFN paths call it). `out`: a (T, b, q) view to write into, rows
    of any stride (a block of columns of a wider buffer)."""
    if out is None:
        shape = (x.shape[0], w.shape[0], w.shape[1])
        return bmm_t01(x.transpose(0, 1), w.transpose(1, 2), shape, shape)
    torch.bmm(x.transpose(0, 1), w.transpose(1, 2), out=out.transpose(0, 1))
    return out


class _BlockDiagMM(torch.autograd.Function):
    """y[t, k] = w[k] @ x[t, k] for x (T, b, p), w (b, q, p) -> y (T, b, q), all token-major.

    torch.bmm wants the blocks first; reading a (b, T, p) view of x is free, and writing through a (b, T, q)
    view of a (T, b, q) buffer (out=) is too, so neither pass copies an activation. Autograd cannot track
    out=, hence this Function (the paper's op does the same, src/modules/op/block_dense.py)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        return block_diag_product(x, w)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w = ctx.saved_tensors
        if torch.is_grad_enabled():          # a double backward: differentiate the reference instead
            return regrad(block_diag_reference, (x, w), ctx.needs_input_grad, dy)
        dy_b = dy.contiguous().transpose(0, 1)                      # (b, T, q)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = bmm_t01(dy_b, w, x.shape, x.shape)
        if ctx.needs_input_grad[1]:
            dw = torch.bmm(dy_b.transpose(1, 2), x.transpose(0, 1))
        return dx, dw


def block_diag_mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Block-diagonal matmul on token-major activations: x (T, b, p), w (b, q, p) -> (T, b, q).
    Under autocast both are cast to the autocast dtype first, as torch.bmm would be."""
    dev = x.device.type
    if autocasts(x):
        dt = torch.get_autocast_dtype(dev)
        x, w = x.to(dt), w.to(dt)
    if x.stride(-1) != 1 or x.stride(0) < x.shape[1] * x.shape[2]:
        x = x.contiguous()
    if has_autocast(dev):      # torch.autocast itself, here: see autocast_off
        with torch.autocast(dev, enabled=False):
            return _BlockDiagMM.apply(x, w)
    return _BlockDiagMM.apply(x, w)


class LowRankLinear(StructuredLinear):
    """y = V (U x) + b: two thin matrices, U (rank, in) and V (out, rank)."""

    kind = "lowrank"

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, init_std: float = INIT_STD,
                 device=None, init: bool = True):
        super().__init__(in_features, out_features, bias, device)
        _check_positive(self.kind, rank=rank)
        if not 1 <= rank <= min(in_features, out_features):
            raise SlimkitError(f"lowrank: rank must be in [1, {min(in_features, out_features)}], got {rank}")
        self.rank = operator.index(rank)      # a NumPy integer too, stored as int (specs are JSON)
        u, v = (svd_factors(out_features, in_features, rank, init_std, device) if init else
                (torch.empty(rank, in_features, device=device), torch.empty(out_features, rank, device=device)))
        self.u, self.v = nn.Parameter(u), nn.Parameter(v)

    @classmethod
    def from_ratio(cls, in_features: int, out_features: int, param_ratio: float, bias: bool = True,
                   align: int = 8, rel_tol: float = REL_TOL, **kw) -> "LowRankLinear":
        return cls(in_features, out_features, lowrank_rank(in_features, out_features, param_ratio, align, rel_tol),
                   bias, **kw)

    def project(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(F.linear(x, self.u), self.v, bias)

    def dense_weight(self) -> torch.Tensor:
        return self.v @ self.u

    def spec(self) -> dict:
        return {**super().spec(), "rank": self.rank}


def _monarch_reference(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, in_fm: bool = False,
                       out_fm: bool = False) -> torch.Tensor:
    """_Monarch's forward (without bias) in plain differentiable torch ops, copies included."""
    (k, _, p), (l, s, r) = w1.shape, w2.shape
    t = x.shape[1] if in_fm else x.shape[0]
    xb = x.reshape(k, p, t) if in_fm else x.reshape(t, k, p).permute(1, 2, 0)
    h = torch.bmm(w1, xb).reshape(r, l, t).transpose(0, 1)              # block j: rows j, j+l, ... of the middle
    y = torch.bmm(w2, h).transpose(0, 1).reshape(l * s, t)              # its row s to output row s*l + j
    return y if out_fm else y.t()


class _Monarch(torch.autograd.Function):
    """BlockShuffle's two block-diagonal products and the shuffle between them, with no activation copied.

    Feature-major (hidden x tokens) is the layout in which the op is all strided views: with hT = BD1 x^T
    (m, T), the second factor's block j reads rows j, j+l, j+2l, ... of hT, a (r, T) matrix of row stride l*T,
    and its row s lands at output row s*l + j, again a matrix of row stride l*T. torch.bmm takes such views as
    they are (cuBLAS's strided-batched lda/ldc), so only the layout changes at the ends cost a copy:
    `in_fm` says x is (in, T) instead of (T, in) (a token-major x is read transposed, free), `out_fm` that the
    result stays (out, T) instead of being token-major (T, out). Two BlockShuffle layers in a row (an FFN)
    therefore change layout only at the FFN's output (kernels.blockshuffle_ffn), where interleave.token_major_blocks
    writes it token-major (with one block, or two on a Hopper GPU, no copy; else kernels.transpose after the
    matmul) and interleave.grad_blocks takes its gradient back."""

    @staticmethod
    def forward(ctx, x, w1, w2, bias, in_fm: bool, out_fm: bool):
        k, q, p = w1.shape
        t = x.shape[1] if in_fm else x.shape[0]
        xb = x.view(k, p, t) if in_fm else x.view(t, k, p).permute(1, 2, 0)
        h = torch.bmm(w1, xb).view(k * q, t)
        ctx.save_for_backward(x, w1, w2, h)
        ctx.in_fm, ctx.out_fm, ctx.bias_dtype = in_fm, out_fm, None if bias is None else bias.dtype
        return feature_major_blocks(h, w2) if out_fm else token_major_blocks(h, w2, bias)

    @staticmethod
    def backward(ctx, dy):
        x, w1, w2, h = ctx.saved_tensors
        if torch.is_grad_enabled():          # a double backward: differentiate the reference instead
            ref = functools.partial(_monarch_reference, in_fm=ctx.in_fm, out_fm=ctx.out_fm)
            dx, dw1, dw2 = regrad(ref, (x, w1, w2), ctx.needs_input_grad[:3], dy)
            db = dy.sum(0).to(ctx.bias_dtype) if ctx.needs_input_grad[3] else None
            return dx, dw1, dw2, db, None, None
        (k, q, p), (l, s, r) = w1.shape, w2.shape
        db = None
        if ctx.out_fm:
            dyv = dy.contiguous().view(s, l, -1).transpose(0, 1)              # dy (out, T)
        else:                                                                # dy (T, out)
            dyv, db = grad_blocks(dy, w2.shape, ctx.needs_input_grad[3])
            db = None if db is None else db.to(ctx.bias_dtype)
        t = dyv.shape[2]
        xb = x.view(k, p, t) if ctx.in_fm else x.view(t, k, p).permute(1, 2, 0)
        hv = h.view(r, l, t).transpose(0, 1)
        dw2 = torch.bmm(dyv, hv.transpose(1, 2)) if ctx.needs_input_grad[2] else None
        dx = dw1 = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            dh = bmm_t01(w2.transpose(1, 2), dyv, (k * q, t), (r, l, t))
            dhb = dh.view(k, q, t)
            if ctx.needs_input_grad[1]:
                dw1 = torch.bmm(dhb, xb.transpose(1, 2))
            if ctx.needs_input_grad[0]:
                if ctx.in_fm:
                    dx = torch.bmm(w1.transpose(1, 2), dhb).view(k * p, t)
                else:
                    dx = bmm_t01(dhb.transpose(1, 2), w1, (t, k * p), (t, k, p))
        return dx, dw1, dw2, db, None, None


def monarch_product(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, in_fm: bool = False,
                    out_fm: bool = False, bias: torch.Tensor | None = None) -> torch.Tensor:
    """BlockShuffle's product: x (T, in) or, with in_fm, (in, T); result (T, out) or, with out_fm, (out, T).
    w1 (k, m/k, in/k), w2 (l, out/l, m/l). A bias (token-major results only) is added where the result is written
    token-major (interleave.token_major_blocks: the matmul, the kernel or the closing transpose).
    Under autocast all are cast to its dtype first."""
    if bias is not None and out_fm:
        raise ValueError("monarch_product adds a bias to a token-major result only (out_fm=False)")
    dev = x.device.type
    if autocasts(x):
        dt = torch.get_autocast_dtype(dev)
        x, w1, w2 = x.to(dt), w1.to(dt), w2.to(dt)
        bias = None if bias is None else bias.to(dt)
    elif bias is not None:
        bias = bias.to(x.dtype)
    if has_autocast(dev):      # torch.autocast itself, here: see autocast_off
        with torch.autocast(dev, enabled=False):
            return _Monarch.apply(x.contiguous(), w1, w2, bias, in_fm, out_fm)
    return _Monarch.apply(x.contiguous(), w1, w2, bias, in_fm, out_fm)


class BlockShuffleLinear(StructuredLinear):
    """Monarch-like: block-diagonal w1 (k, m/k, in/k), channel shuffle, block-diagonal w2 (l, out/l, m/l), with
    middle width m = min(in, out); k = nblocks, l = nblocks2 (default k, the paper's form). Second-factor block j
    reads middle channels j, j+l, j+2l, ...; its row s is output channel s*l + j."""

    kind = "blockshuffle"

    def __init__(self, in_features: int, out_features: int, nblocks: int, bias: bool = True, device=None,
                 init: bool = True, nblocks2: int | None = None):
        super().__init__(in_features, out_features, bias, device)
        _check_positive(self.kind, nblocks=nblocks, nblocks2=nblocks2)
        k, l = nblocks, nblocks if nblocks2 is None else nblocks2
        _check_shuffle_blocks(in_features, out_features, k, l)
        self.nblocks, self.nblocks2 = operator.index(k), operator.index(l)
        m = min(in_features, out_features)
        make = _ortho_normal if init else (lambda *s, device=None: torch.empty(*s, device=device))
        self.w1 = nn.Parameter(make(k, m // k, in_features // k, device=device))
        self.w2 = nn.Parameter(make(l, out_features // l, m // l, device=device))

    @classmethod
    def from_ratio(cls, in_features: int, out_features: int, param_ratio: float | None, bias: bool = True,
                   nblocks: int | None = None, nblocks2: int | None = None, rel_tol: float = REL_TOL,
                   **kw) -> "BlockShuffleLinear":
        k, l = blockshuffle_shape(in_features, out_features, param_ratio, nblocks, nblocks2, rel_tol)
        return cls(in_features, out_features, k, bias, nblocks2=l, **kw)

    def project(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = monarch_product(x.reshape(-1, self.in_features), self.w1, self.w2, bias=bias)
        return y.view(*x.shape[:-1], self.out_features)

    def after_first(self, h: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The layer from the first block-diagonal product h (T, k, m/k) (token-major) on: shuffle, w2,
        interleave, bias (a copy each for the shuffle and the interleave)."""
        l, t = self.nblocks2, h.shape[0]
        h = h.reshape(t, self.w2.shape[2], l).transpose(1, 2).contiguous()   # shuffle: channel c to block c % l
        y = block_diag_mm(h, self.w2)                          # (T, l, out/l)
        y = y.transpose(1, 2).reshape(t, self.out_features)    # block j, row s -> channel s*l + j
        return y if bias is None else y + bias.to(y.dtype)

    def spec(self) -> dict:
        return {**super().spec(), "nblocks": self.nblocks, "nblocks2": self.nblocks2}


class BlockDenseLinear(StructuredLinear):
    """y = V blockdiag(B_1..B_b) x + b: blocks (b, rank/b, in/b), then a dense V (out, rank)."""

    kind = "blockdense"

    def __init__(self, in_features: int, out_features: int, rank: int, nblocks: int, bias: bool = True,
                 device=None, init: bool = True):
        super().__init__(in_features, out_features, bias, device)
        _check_positive(self.kind, rank=rank)
        _check_divides(nblocks, in_features, "in_features", self.kind)
        _check_divides(nblocks, rank, "rank", self.kind)
        if rank > in_features:
            raise SlimkitError(f"blockdense: rank {rank} exceeds in_features={in_features} (its block-diagonal factor "
                               "would widen the input); pass a rank of at most in_features")
        self.rank, self.nblocks = operator.index(rank), operator.index(nblocks)
        make = _ortho_normal if init else (lambda *s, device=None: torch.empty(*s, device=device))
        self.blocks = nn.Parameter(make(nblocks, rank // nblocks, in_features // nblocks, device=device))
        self.v = nn.Parameter(make(out_features, rank, device=device))

    @classmethod
    def from_ratio(cls, in_features: int, out_features: int, param_ratio: float, bias: bool = True,
                   nblocks: int | None = None, align: int = 8, rel_tol: float = REL_TOL, **kw) -> "BlockDenseLinear":
        rank, nblocks = blockdense_shape(in_features, out_features, param_ratio, nblocks, align, rel_tol)
        return cls(in_features, out_features, rank, nblocks, bias, **kw)

    def project(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        b = self.nblocks
        h = block_diag_mm(x.reshape(-1, b, self.in_features // b), self.blocks)   # (T, b, rank/b)
        return self.after_first(h, bias).view(*x.shape[:-1], self.out_features)

    def after_first(self, h: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The layer from the block-diagonal product h (T, b, rank/b) on: the dense projection and bias."""
        return F.linear(h.reshape(h.shape[0], self.rank), self.v, bias)

    def dense_weight(self) -> torch.Tensor:
        return self.v @ torch.block_diag(*self.blocks.unbind(0))

    def spec(self) -> dict:
        return {**super().spec(), "rank": self.rank, "nblocks": self.nblocks}


STRUCTURED = {cls.kind: cls for cls in (LowRankLinear, BlockShuffleLinear, BlockDenseLinear)}


KEYWORDS = {"dense": {"device"}, "lowrank": {"align", "rel_tol", "init_std", "device", "init"},
            "blockdense": {"align", "rel_tol", "device", "init"}, "blockshuffle": {"nblocks2", "rel_tol", "device", "init"}}


def make_linear(kind: str, in_features: int, out_features: int, param_ratio: float | None, bias: bool = True,
                nblocks: int | None = None, **kw) -> nn.Module:
    """A linear layer of `kind` keeping about `param_ratio` of the dense weights ("dense" ignores the ratio).
    Extra keywords go to the kind's from_ratio / constructor: align (lowrank, blockdense), rel_tol (all three),
    init_std (lowrank), nblocks2 (blockshuffle: the second factor's block count), device."""
    _check_positive(kind, in_features=in_features, out_features=out_features, nblocks=nblocks,
                    align=kw.get("align"))
    extra = set(kw) - KEYWORDS.get(kind, set(kw))
    for name, positive in (("rel_tol", False), ("init_std", True)):
        v = kw.get(name)
        if name in kw and (isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v)
                           or v < 0 or (positive and v == 0)):
            raise SlimkitError(f"{kind}: {name} must be a {'positive' if positive else 'non-negative'} number, "
                               f"got {v!r}")
    if extra:
        raise SlimkitError(f"{kind} takes no {', '.join(sorted(extra))} (its keywords: "
                           f"{', '.join(sorted(KEYWORDS[kind]))}); drop {'it' if len(extra) == 1 else 'them'}")
    in_features, out_features = operator.index(in_features), operator.index(out_features)
    nblocks = None if nblocks is None else operator.index(nblocks)
    if kind == "dense":
        return nn.Linear(in_features, out_features, bias=bias, device=kw.get("device"))
    if kind == "lowrank":
        if nblocks is not None:
            raise SlimkitError("lowrank has no blocks: drop nblocks, or use kind='blockdense'")
        return LowRankLinear.from_ratio(in_features, out_features, param_ratio, bias, **kw)
    if kind in ("blockshuffle", "blockdense"):
        return STRUCTURED[kind].from_ratio(in_features, out_features, param_ratio, bias, nblocks=nblocks, **kw)
    raise SlimkitError(f"unknown structured kind {kind!r}; choose one of {', '.join(KINDS)}")


def layer_from_spec(spec: dict, device=None) -> StructuredLinear:
    """An uninitialised layer of the shape `spec` (StructuredLinear.spec()) describes, for loading weights into."""
    s = dict(spec)
    cls = STRUCTURED.get(s.pop("kind", None))
    if cls is None:
        raise SlimkitError(f"unknown structured layer spec {spec!r}")
    return cls(**s, device=device, init=False)


def forward_flops(module: nn.Module, tokens: int) -> int:
    """Forward FLOPs of one linear-like module (nn.Linear, HF Conv1D, structured, self-guided) on `tokens`."""
    if callable(getattr(module, "flops", None)):
        return int(module.flops(tokens))
    if isinstance(module, nn.Linear) or is_conv1d(module):
        return 2 * tokens * module.weight.numel()
    raise TypeError(f"no FLOP count for {type(module).__name__}")
