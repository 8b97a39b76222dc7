"""Observers: turn the values a quantizer sees during calibration into a range, then a scale and zero point.

Every observer receives tensors already viewed as rows (one quantization group per row, see
`quantizer.to_rows`) and returns per-row (scale, zero_point).
- minmax: the running minimum and maximum.
- ema: a moving average of each batch's minimum and maximum (momentum 0.9), robust to a stray batch.
- mse: a search over clipping ratios of the min-max range, keeping per row the one with the least
  quantization error sum |x - q(x)|^2.4 (QDrop's MSEObserver tries ratios 1.00, 0.99, ..., 0.21 with the
  L2.4 error, MSE_P; we do the same).
- percentile: the 0.01% / 99.99% quantiles, a cheap outlier clip.
mse and percentile keep a uniform random sample of the values (at most `max_values`), so memory and search
time stay bounded on any calibration set.
"""
from __future__ import annotations

import numpy as np
import torch

from .quantizer import QuantSpec, qparams_from_range

OBSERVERS = ("minmax", "ema", "mse", "percentile")


class Observer:
    """Running min/max per row; subclasses change how the final range is chosen."""

    def __init__(self, spec: QuantSpec):
        self.spec = spec
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def update(self, rows: torch.Tensor) -> None:
        lo, hi = rows.amin(1), rows.amax(1)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.lo is None:
            raise RuntimeError("observer saw no data: run calibration data through the model first")
        return self.lo, self.hi

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        return qparams_from_range(*self.range(), self.spec)


class EMAObserver(Observer):
    def __init__(self, spec: QuantSpec, momentum: float = 0.9):
        super().__init__(spec)
        self.momentum = momentum

    def update(self, rows: torch.Tensor) -> None:
        lo, hi = rows.amin(1), rows.amax(1)
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            m = self.momentum
            self.lo = m * self.lo + (1 - m) * lo
            self.hi = m * self.hi + (1 - m) * hi


class SampleObserver(Observer):
    """Keeps min/max and a uniform random sample of the values (columns) seen, at most `max_values` in all.

    Reservoir merge: the kept sample is a uniform draw without replacement from the N columns seen so far;
    for a batch of n more, a hypergeometric draw says how many of the `cap` kept columns come from the batch
    (k), and k random batch columns join cap-k random kept ones, again a uniform draw from all N+n. O(cap)
    work a batch and no sort (a top-k of random keys cost 28 ms a batch on the CPU and dominated calibration).
    Batches far larger than the sample are drawn from with replacement (the repeats are negligible there)."""

    def __init__(self, spec: QuantSpec, max_values: int = 1 << 18, seed: int = 0):
        super().__init__(spec)
        self.max_values = max_values
        self.values: torch.Tensor | None = None
        self.seen = 0
        self.generator = torch.Generator().manual_seed(seed)
        self.rng = np.random.default_rng(seed)

    def _pick(self, n: int, k: int) -> torch.Tensor:
        """k column indices out of n, uniformly (without replacement unless n is much larger than k)."""
        if n > 16 * k:
            return torch.randint(0, n, (k,), generator=self.generator)
        return torch.randperm(n, generator=self.generator)[:k]

    def update(self, rows: torch.Tensor) -> None:
        super().update(rows)
        cap = max(1, self.max_values // rows.shape[0])
        n, kept = rows.shape[1], (0 if self.values is None else self.values.shape[1])
        total = self.seen + n
        if self.seen == 0:
            k = min(n, cap)
        elif total < 10**8:  # numpy's hypergeometric needs populations under 1e9; binomial is exact enough above
            k = int(self.rng.hypergeometric(n, self.seen, min(cap, total)))
        else:
            k = int(self.rng.binomial(min(cap, total), n / total))
        k = min(k, n)
        new = rows if k == n else rows.index_select(1, self._pick(n, k).to(rows.device))
        new = new.detach().cpu()
        keep_old = min(cap, total) - k
        if self.values is None or keep_old <= 0:
            self.values = new
        else:
            old = self.values if keep_old >= kept else self.values.index_select(1, self._pick(kept, keep_old))
            self.values = torch.cat([old, new], 1)
        self.seen = total

    def _sample(self) -> torch.Tensor:
        return self.values


MSE_P = 2.4     # the error's exponent in QDrop's (and MQBench's) MSE observer


class MSEObserver(SampleObserver):
    def __init__(self, spec: QuantSpec, ratios: int = 80, step: float = 0.01, p: float = MSE_P, **kw):
        super().__init__(spec, **kw)
        self.ratios, self.step, self.p = ratios, step, p

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.range()
        values = self._sample().to(lo.device)
        return mse_search(values, lo, hi, self.spec, self.ratios, self.step, self.p)


class PercentileObserver(SampleObserver):
    def __init__(self, spec: QuantSpec, percentile: float = 99.99, **kw):
        super().__init__(spec, **kw)
        self.percentile = percentile

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        values = self._sample().float()
        q = self.percentile / 100
        lo, hi = torch.quantile(values, 1 - q, dim=1), torch.quantile(values, q, dim=1)
        return qparams_from_range(lo.to(self.lo.device), hi.to(self.hi.device), self.spec)


def lp_error(diff: torch.Tensor, p: float) -> torch.Tensor:
    """|diff|^p elementwise. A fractional p as exp(p log|diff|): the same values to rounding, about 2.3x faster
    than pow on the CPU (torch's pow with a fractional exponent is not vectorised there); 0 stays 0."""
    a = diff.abs()
    if float(p).is_integer():
        return a.pow(int(p))
    return torch.exp(torch.log(a) * p)


def _chunk_errors(values: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, qmin: int, qmax: int,
                  p: float) -> torch.Tensor:
    """sum over each row of |x - q(x)|^p for (chunk, rows, 1) scales and zero points: (chunk, rows). The same
    operations as dequantize(quantize_int(x)) and lp_error, in that order (bit-identical), done in place on one
    (chunk, rows, values) buffer: a fresh tensor for each of the dozen steps made the search allocation-bound on
    the CPU."""
    e = values / scale
    e.round_().add_(zp).clamp_(qmin, qmax).sub_(zp).mul_(scale).sub_(values).abs_()
    if float(p).is_integer():
        e.pow_(int(p))
    else:
        e.log_().mul_(p).exp_()
    return e.sum(-1)


def _errors_expr(values: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, qmin: int, qmax: int,
                 p: float) -> torch.Tensor:
    """_chunk_errors as one expression, for torch.compile to fuse into a single reduction kernel that never
    materialises the (ratios, rows, values) tensor."""
    d = ((torch.clamp(torch.round(values / scale) + zp, qmin, qmax) - zp) * scale - values).abs()
    return (d.pow(int(p)) if float(p).is_integer() else torch.exp(torch.log(d) * p)).sum(-1)


_COMPILED: dict = {}


def _errors_fused(values, scale, zp, qmin, qmax, p) -> torch.Tensor | None:
    """_errors_expr compiled once per process (None where compiling or running the compiled kernel fails: no
    Triton / Inductor in this build; the caller then searches eagerly, and later calls do not try again)."""
    fn = _COMPILED.get("fn")
    if fn is False:
        return None
    try:
        if fn is None:
            fn = _COMPILED["fn"] = torch.compile(_errors_expr, dynamic=True)
        return fn(values, scale, zp, qmin, qmax, p)
    except Exception:
        _COMPILED["fn"] = False
        return None


def mse_search(values: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec,
               ratios: int = 80, step: float = 0.01, p: float = MSE_P,
               chunk: int | None = None, fused: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the clipped range [r*lo, r*hi] (r = 1, 1-step, ...) with the least sum |x - q(x)|^p.

    The ratios are tried in chunks as one batched tensor (ratio, row, value): a few kernels instead of ~6 a
    ratio. On the GPU, launch-bound, the chunks hold up to 16M values; on the CPU up to 1M, so that a small
    tensor (a weight searched once per OS+ threshold candidate) takes one pass instead of 80 while a large one
    still runs a ratio at a time, in cache. The first ratio with the least error wins, as in a loop over r with
    a strict comparison, so every chunking picks the same range.
    fused=True (on CUDA) computes every ratio's errors in one compiled reduction kernel (torch.compile of
    _errors_expr) that reads the values once instead of a dozen passes a ratio: for a caller that searches
    thousands of times (OS+'s threshold search scores each candidate's weight), worth its one-off compile. Its
    sums run in another order, so a row whose two best ratios tie to rounding may pick the other one."""
    values = values.detach()
    r_all = torch.tensor([1.0 - i * step for i in range(ratios)], dtype=lo.dtype, device=lo.device)
    fused = fused and values.is_cuda
    eager_chunk = max(1, min(ratios, (1 << (24 if values.is_cuda else 20)) // max(1, values.numel())))
    if chunk is None:
        chunk = ratios if fused else eager_chunk
    best_err = torch.full_like(lo, float("inf"))
    best_scale, best_zp = qparams_from_range(lo, hi, spec)
    for i in range(0, ratios, chunk):
        r = r_all[i: i + chunk, None]
        scale, zp = qparams_from_range(lo * r, hi * r, spec)  # (chunk, rows)
        s3, z3 = scale[..., None], zp[..., None]
        err = _errors_fused(values, s3, z3, spec.qmin, spec.qmax, p) if fused else None
        if err is None:     # eagerly, at most eager_chunk ratios at a time (a failed fused chunk holds them all)
            err = torch.cat([_chunk_errors(values, s3[j: j + eager_chunk], z3[j: j + eager_chunk], spec.qmin,
                                           spec.qmax, p) for j in range(0, len(s3), eager_chunk)])  # (chunk, rows)
        chunk_err, idx = err.min(0)  # first minimum within the chunk
        better = chunk_err < best_err
        best_err = torch.where(better, chunk_err, best_err)
        best_scale = torch.where(better, scale.gather(0, idx[None])[0], best_scale)
        best_zp = torch.where(better, zp.gather(0, idx[None])[0], best_zp)
    return best_scale, best_zp


def make_observer(name: str, spec: QuantSpec) -> Observer:
    if name == "minmax":
        return Observer(spec)
    if name == "ema":
        return EMAObserver(spec)
    if name == "mse":
        return MSEObserver(spec)
    if name == "percentile":
        return PercentileObserver(spec)
    raise ValueError(f"unknown observer {name!r}: choose one of {', '.join(OBSERVERS)}")
