"""Observers: turn the values a quantizer sees during calibration into a range, then a scale and zero point.

Every observer receives tensors already viewed as rows (one quantization group per row, see
`quantizer.to_rows`) and returns per-row (scale, zero_point).
- minmax: the running minimum and maximum.
- ema: a moving average of each batch's minimum and maximum (momentum 0.9), robust to a stray batch.
- mse: a search over clipping ratios of the min-max range, keeping per row the one with the least
  squared quantization error (QDrop's MSEObserver tries ratios 1.00, 0.99, ..., 0.21; we do the same).
- percentile: the 0.01% / 99.99% quantiles, a cheap outlier clip.
mse and percentile keep a uniform random sample of the values (at most `max_values`), so memory and search
time stay bounded on any calibration set.
"""
from __future__ import annotations

import torch

from .quantizer import QuantSpec, dequantize, qparams_from_range, quantize_int

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

    Each incoming column gets a uniform random key and the columns with the smallest keys are kept: an exact
    uniform sample over every batch seen so far (reservoir sampling), in bounded memory."""

    def __init__(self, spec: QuantSpec, max_values: int = 1 << 18, seed: int = 0):
        super().__init__(spec)
        self.max_values = max_values
        self.values: torch.Tensor | None = None
        self.keys: torch.Tensor | None = None
        self.generator = torch.Generator().manual_seed(seed)

    def update(self, rows: torch.Tensor) -> None:
        super().update(rows)
        cap = max(1, self.max_values // rows.shape[0])
        n = rows.shape[1]
        if n > 4 * cap:  # draw 4*cap columns uniformly (with replacement: O(cap) work, not O(n)); n >> cap here
            idx = torch.randint(0, n, (4 * cap,), generator=self.generator)
            rows = rows.index_select(1, idx.to(rows.device))
            n = 4 * cap
        keys = torch.rand(n, generator=self.generator) * (rows.shape[1] / n)  # every kept column: a uniform key
        if n > cap:  # only the `cap` smallest keys of this batch can ever be kept
            keys, pos = torch.topk(keys, cap, largest=False)
            rows = rows.index_select(1, pos.to(rows.device))
        rows = rows.cpu()
        if self.values is not None:
            rows, keys = torch.cat([self.values, rows], 1), torch.cat([self.keys, keys])
        if rows.shape[1] > cap:
            keys, idx = torch.topk(keys, cap, largest=False)
            rows = rows.index_select(1, idx)
        self.values, self.keys = rows, keys

    def _sample(self) -> torch.Tensor:
        return self.values


class MSEObserver(SampleObserver):
    def __init__(self, spec: QuantSpec, ratios: int = 80, step: float = 0.01, p: float = 2.0, **kw):
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


def mse_search(values: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec,
               ratios: int = 80, step: float = 0.01, p: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the clipped range [r*lo, r*hi] (r = 1, 1-step, ...) with the least sum |x - q(x)|^p."""
    best_err = torch.full_like(lo, float("inf"))
    best_scale, best_zp = qparams_from_range(lo, hi, spec)
    values = values.detach()
    for i in range(ratios):
        r = 1.0 - i * step
        scale, zp = qparams_from_range(lo * r, hi * r, spec)
        q = dequantize(quantize_int(values, scale[:, None], zp[:, None], spec.qmin, spec.qmax), scale[:, None], zp[:, None])
        err = (q - values).abs().pow(p).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zp = torch.where(better, zp, best_zp)
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
