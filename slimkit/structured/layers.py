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
- blockshuffle: weights min(in,out)*(in+out)/b, so the ratio is a function of b alone; b is the divisor of
  gcd(in, out) nearest the target in log-ratio (or `nblocks` when given, checked against the target).
- blockdense: weights rank*(in/b + out); rank = ratio*in*out/(in/b+out) rounded to a multiple of lcm(b, align)
  (or of b when below 4 times that); b = nblocks, default the yaml's 4 (2, then 1, when 4 does not divide `in`).
  Each linear is matched on its own (the paper gives fc1 and fc2 one rank and matches the FFN total instead).

Forward: each block-diagonal product is one torch.bmm over a (blocks, tokens, width) view of token-major
activations, its result written straight into a token-major buffer (block_diag_mm; no loop over blocks, no
activation copy in either pass); BlockShuffle's shuffle and output interleave are one copy each way.
Seen once on an H100 (bf16, FFN 2048->8192->2048, 16384 tokens, forward+backward, speed-up over dense in the
same run): lowrank 0.32 2.16x, blockdense 0.32 1.97x, blockdense 0.25 2.60x, blockshuffle 0.31 1.59x (its
stride-b output interleave copy is what it loses on); at 16 tokens all are slower than dense: see premerge.py.
FLOPs: 2 * tokens * weights (each weight is used in one multiply-add per token); bias adds are not counted.
"""
from __future__ import annotations

import math
import numbers
import operator

import torch
import torch.nn.functional as F
from torch import nn

from ..core.wrap import is_conv1d
from ..errors import SlimkitError

KINDS = ("dense", "lowrank", "blockshuffle", "blockdense")
INIT_STD = 0.02   # configs/model/gpt2.yaml: initializer_range
REL_TOL = 0.25    # how far (relative) the achieved parameter ratio may miss the target


# ---------- initialisation (pure functions) ----------

def svd_factors(out_features: int, in_features: int, rank: int, std: float = INIT_STD,
                device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's "svd" init: best rank-r factors (U (r, in), V (out, r)) of a dense N(0, std) matrix,
    the singular values split evenly between them. Row-major, as every parameter here (LAPACK hands U back
    column-major): a saved layer then reloads with the same memory layout and computes bit for bit alike."""
    w0 = torch.randn(out_features, in_features, device=device) * std
    u, s, vh = torch.linalg.svd(w0, full_matrices=False)
    root = s[:rank].sqrt()
    return (root[:, None] * vh[:rank]).contiguous(), (u[:, :rank] * root).contiguous()


def orthogonal_like(w: torch.Tensor) -> torch.Tensor:
    """The paper's "ortho" init: each matrix (batched over leading dims) replaced by U Vh of its SVD."""
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    return (u @ vh).contiguous()


def _ortho_normal(*shape: int, device=None) -> torch.Tensor:
    return orthogonal_like(torch.randn(*shape, device=device) * INIT_STD)


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


def _check_divides(nblocks: int, width: int, what: str, kind: str) -> None:
    _check_positive(kind, nblocks=nblocks)
    if width % nblocks:
        near = [d for d in _divisors(width) if d <= 4 * max(nblocks, 1)][-6:]
        raise SlimkitError(f"{kind}: nblocks={nblocks} does not divide {what}={width}; "
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


def blockshuffle_ratio(in_features: int, out_features: int, nblocks: int) -> float:
    """Parameter ratio of a BlockShuffle layer: min(in,out)*(in+out)/(b*in*out)."""
    return min(in_features, out_features) * (in_features + out_features) / (nblocks * in_features * out_features)


def blockshuffle_nblocks(in_features: int, out_features: int, param_ratio: float | None,
                         nblocks: int | None = None, rel_tol: float = REL_TOL) -> int:
    """Block count b (dividing both widths) whose ratio is nearest param_ratio; `nblocks` is checked instead."""
    kind = "blockshuffle"
    _check_positive(kind, in_features=in_features, out_features=out_features, nblocks=nblocks)
    if nblocks is not None:
        _check_divides(nblocks, in_features, "in_features", kind)
        _check_divides(nblocks, out_features, "out_features", kind)
        if param_ratio is None:
            return nblocks
    ratio = _check_ratio(param_ratio, kind)
    options = [b for b in _divisors(math.gcd(in_features, out_features))
               if blockshuffle_ratio(in_features, out_features, b) < 1.0]
    if nblocks is None and not options:
        raise SlimkitError(f"{kind}: a {in_features}->{out_features} layer has no block count that saves weights "
                           f"(gcd of the widths is {math.gcd(in_features, out_features)}); pick another kind")
    best = nblocks or min(options,
                          key=lambda b: abs(math.log(blockshuffle_ratio(in_features, out_features, b) / ratio)))
    table = ", ".join(f"b={b}: {blockshuffle_ratio(in_features, out_features, b):.3g}" for b in options[:8])
    _miss(kind, blockshuffle_ratio(in_features, out_features, best), ratio,
          f"nblocks={best} of a {in_features}->{out_features} layer",
          f"its ratio is fixed by the block count ({table or 'no block count below ratio 1'}): "
          "pass one of these as param_ratio or nblocks, or pick another kind", rel_tol)
    return best


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
                           f"{achieved:.3g} of its weights, no fewer than the dense layer; lower param_ratio or "
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


def block_diag_product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """y[t, k] = w[k] @ x[t, k], x (T, b, p), w (b, q, p) -> y (T, b, q), one bmm reading and writing token-major
    views (no autograd: _BlockDiagMM and the fused FFN paths call it)."""
    y = x.new_empty(x.shape[0], w.shape[0], w.shape[1])
    torch.bmm(x.transpose(0, 1), w.transpose(1, 2), out=y.transpose(0, 1))
    return y


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
        dy_b = dy.contiguous().transpose(0, 1)                      # (b, T, q)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = x.new_empty(x.shape)
            torch.bmm(dy_b, w, out=dx.transpose(0, 1))
        if ctx.needs_input_grad[1]:
            dw = torch.bmm(dy_b.transpose(1, 2), x.transpose(0, 1))
        return dx, dw


def block_diag_mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Block-diagonal matmul on token-major activations: x (T, b, p), w (b, q, p) -> (T, b, q).
    Under autocast both are cast to the autocast dtype first, as torch.bmm would be."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        x, w = x.to(dt), w.to(dt)
    if x.stride(-1) != 1 or x.stride(0) < x.shape[1] * x.shape[2]:
        x = x.contiguous()
    with torch.autocast(dev, enabled=False):
        return _BlockDiagMM.apply(x, w)


class LowRankLinear(StructuredLinear):
    """y = V (U x) + b: two thin matrices, U (rank, in) and V (out, rank)."""

    kind = "lowrank"

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, init_std: float = INIT_STD,
                 device=None, init: bool = True):
        super().__init__(in_features, out_features, bias, device)
        if not 1 <= rank <= min(in_features, out_features):
            raise SlimkitError(f"lowrank: rank must be in [1, {min(in_features, out_features)}], got {rank}")
        self.rank = rank
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


class BlockShuffleLinear(StructuredLinear):
    """Monarch-like: block-diagonal w1 (b, q, in/b), channel shuffle, block-diagonal w2 (b, out/b, q), with
    middle width b*q = min(in, out); the output of block l, row s is channel s*b + l."""

    kind = "blockshuffle"

    def __init__(self, in_features: int, out_features: int, nblocks: int, bias: bool = True, device=None,
                 init: bool = True):
        super().__init__(in_features, out_features, bias, device)
        _check_divides(nblocks, in_features, "in_features", self.kind)
        _check_divides(nblocks, out_features, "out_features", self.kind)
        self.nblocks = b = nblocks
        q = min(in_features, out_features) // b
        make = _ortho_normal if init else (lambda *s, device=None: torch.empty(*s, device=device))
        self.w1 = nn.Parameter(make(b, q, in_features // b, device=device))
        self.w2 = nn.Parameter(make(b, out_features // b, q, device=device))

    @classmethod
    def from_ratio(cls, in_features: int, out_features: int, param_ratio: float | None, bias: bool = True,
                   nblocks: int | None = None, rel_tol: float = REL_TOL, **kw) -> "BlockShuffleLinear":
        return cls(in_features, out_features,
                   blockshuffle_nblocks(in_features, out_features, param_ratio, nblocks, rel_tol), bias, **kw)

    def project(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        b = self.nblocks
        h = block_diag_mm(x.reshape(-1, b, self.in_features // b), self.w1)     # (T, b, q)
        return self.after_first(h, bias).reshape(*x.shape[:-1], self.out_features)

    def after_first(self, h: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The layer from the first block-diagonal product h (T, b, q) on: shuffle, w2, interleave, bias."""
        b, t, q = self.nblocks, h.shape[0], h.shape[2]
        h = h.reshape(t, q, b).transpose(1, 2).contiguous()   # shuffle: middle channel m goes to block m % b
        y = block_diag_mm(h, self.w2)                         # (T, b, out/b)
        y = y.transpose(1, 2).reshape(t, self.out_features)   # block l, row s -> channel s*b + l
        return y if bias is None else y + bias.to(y.dtype)

    def spec(self) -> dict:
        return {**super().spec(), "nblocks": self.nblocks}


class BlockDenseLinear(StructuredLinear):
    """y = V blockdiag(B_1..B_b) x + b: blocks (b, rank/b, in/b), then a dense V (out, rank)."""

    kind = "blockdense"

    def __init__(self, in_features: int, out_features: int, rank: int, nblocks: int, bias: bool = True,
                 device=None, init: bool = True):
        super().__init__(in_features, out_features, bias, device)
        _check_positive(self.kind, rank=rank)
        _check_divides(nblocks, in_features, "in_features", self.kind)
        _check_divides(nblocks, rank, "rank", self.kind)
        self.rank, self.nblocks = rank, nblocks
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
            "blockdense": {"align", "rel_tol", "device", "init"}, "blockshuffle": {"rel_tol", "device", "init"}}


def make_linear(kind: str, in_features: int, out_features: int, param_ratio: float | None, bias: bool = True,
                nblocks: int | None = None, **kw) -> nn.Module:
    """A linear layer of `kind` keeping about `param_ratio` of the dense weights ("dense" ignores the ratio).
    Extra keywords go to the kind's from_ratio / constructor: align (lowrank, blockdense), rel_tol (all three),
    init_std (lowrank), device."""
    _check_positive(kind, in_features=in_features, out_features=out_features, nblocks=nblocks,
                    align=kw.get("align"))
    extra = set(kw) - KEYWORDS.get(kind, set(kw))
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
