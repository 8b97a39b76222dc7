"""Observers: min-max, moving average, MSE search, percentile, and the bounded sample they keep."""
from __future__ import annotations

import pytest
import torch

from slimkit.core.observers import (
    EMAObserver,
    MSE_P,
    MSEObserver,
    Observer,
    PercentileObserver,
    SampleObserver,
    make_observer,
    mse_search,
)
from slimkit.core.quantizer import QuantSpec, Quantizer, fake_quant, qparams_from_range, to_rows


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The MSE search runs hundreds of tiny ops; on a busy shared CPU, intra-op threads only add wake-up stalls."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _qerr(values: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, spec: QuantSpec, p: float = 2.0) -> torch.Tensor:
    """Per-row sum of |quantization error|^p (squared by default)."""
    q = fake_quant(values, scale[:, None], zp[:, None], spec.qmin, spec.qmax)
    return (q - values).abs().pow(p).sum(1)


def _heavy_tailed(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lap = torch.distributions.Laplace(0.0, 1.0)
    torch.manual_seed(seed)
    x = lap.sample((n,))
    idx = torch.randperm(n, generator=g)[:5]
    x[idx] = torch.tensor([60.0, -45.0, 80.0, 55.0, -70.0])
    return x


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_minmax_is_global_min_max_over_batches(granularity):
    torch.manual_seed(0)
    spec = QuantSpec(bits=8, granularity=granularity, ch_axis=1)
    batches = [torch.randn(4, 3, 5, 5) * (i + 1) + i for i in range(5)]
    obs = Observer(spec)
    for b in batches:
        obs.update(to_rows(b, spec))
    allx = to_rows(torch.cat(batches), spec)
    lo, hi = obs.range()
    assert torch.equal(lo, allx.amin(1)) and torch.equal(hi, allx.amax(1))
    s, z = obs.compute()
    s_ref, z_ref = qparams_from_range(allx.amin(1), allx.amax(1), spec)
    assert torch.equal(s, s_ref) and torch.equal(z, z_ref)
    # the same through a Quantizer's calibration mode, which passes values through untouched
    q = Quantizer(spec, "minmax")
    q.observing = True
    for b in batches:
        assert torch.equal(q(b), b)
    q.observing = False
    q.compute_qparams()
    assert torch.equal(q.scale, s_ref) and torch.equal(q.zero_point, z_ref)


def test_observer_without_data_raises():
    with pytest.raises(RuntimeError):
        Observer(QuantSpec()).compute()


def test_ema_follows_recurrence():
    torch.manual_seed(1)
    spec = QuantSpec(bits=8, granularity="channel")
    obs = EMAObserver(spec, momentum=0.9)
    lo_ref = hi_ref = None
    for i in range(6):
        rows = torch.randn(3, 50) * (1 + i) - i
        obs.update(rows)
        lo, hi = rows.amin(1), rows.amax(1)
        if lo_ref is None:
            lo_ref, hi_ref = lo, hi
        else:
            lo_ref, hi_ref = 0.9 * lo_ref + 0.1 * lo, 0.9 * hi_ref + 0.1 * hi
        torch.testing.assert_close(obs.lo, lo_ref)
        torch.testing.assert_close(obs.hi, hi_ref)
    assert make_observer("ema", spec).momentum == 0.9
    # a single stray batch moves the range by only (1 - m) of its excursion
    before = obs.hi.clone()
    obs.update(torch.full((3, 50), 1000.0))
    torch.testing.assert_close(obs.hi, 0.9 * before + 100.0)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [3, 8])
def test_mse_search_clips_heavy_tails(bits, symmetric):
    spec = QuantSpec(bits=bits, symmetric=symmetric)
    x = _heavy_tailed(20_000, seed=bits)[None]
    lo, hi = x.amin(1), x.amax(1)
    s_mm, z_mm = qparams_from_range(lo, hi, spec)
    s2, z2 = mse_search(x, lo, hi, spec, p=2.0)
    assert s2.item() < 0.95 * s_mm.item()  # squared error: a clipped range
    assert s2.item() >= 0.2 * s_mm.item() * 0.999  # within the searched ratios 1.00 .. 0.21
    assert _qerr(x, s2, z2, spec).item() < _qerr(x, s_mm, z_mm, spec).item()
    # the default, QDrop's L2.4 error, weighs the tails more: it clips no more, and never loses to min-max in it
    s, z = mse_search(x, lo, hi, spec)
    assert s2.item() <= s.item() <= s_mm.item()
    assert _qerr(x, s, z, spec, MSE_P).item() <= _qerr(x, s_mm, z_mm, spec, MSE_P).item()
    # the observer gives the same result from batches
    obs = MSEObserver(spec)
    for chunk in x.split(5000, dim=1):
        obs.update(chunk)
    s2, z2 = obs.compute()
    assert torch.equal(s2, s) and torch.equal(z2, z)


def test_mse_search_never_worse_than_minmax():
    g = torch.Generator().manual_seed(0)
    datasets = [
        torch.rand(1000, generator=g),
        torch.randn(1000, generator=g),
        torch.rand(1000, generator=g) * 4 - 1,
        torch.cat([torch.full((500,), -1.0), torch.full((500,), 1.0)]),  # two spikes at the ends: no clip wins
        torch.full((1000,), 0.37),
        torch.zeros(1000),
        torch.linspace(-2, 7, 1000),
        _heavy_tailed(1000, seed=3),
    ]
    for bits in (2, 4, 8):
        for symmetric in (False, True):
            spec = QuantSpec(bits=bits, symmetric=symmetric)
            for x in datasets:
                x = x[None]
                lo, hi = x.amin(1), x.amax(1)
                s, z = mse_search(x, lo, hi, spec)
                assert torch.isfinite(s).all() and torch.isfinite(z).all()
                e_mm = _qerr(x, *qparams_from_range(lo, hi, spec), spec).item()
                assert _qerr(x, s, z, spec).item() <= e_mm * (1 + 1e-6) + 1e-12
    # with two spikes at the ends any clipping is worse, so the search keeps the full range
    spikes = datasets[3][None]
    spec = QuantSpec(bits=4)
    s, z = mse_search(spikes, spikes.amin(1), spikes.amax(1), spec)
    s_mm, z_mm = qparams_from_range(spikes.amin(1), spikes.amax(1), spec)
    assert torch.equal(s, s_mm) and torch.equal(z, z_mm)


def test_mse_search_per_row():
    spec = QuantSpec(bits=4, granularity="channel")
    g = torch.Generator().manual_seed(2)
    rows = torch.stack([
        torch.rand(4000, generator=g) * 2 - 1,  # uniform: little to gain from clipping
        _heavy_tailed(4000, seed=4),  # outliers: clip hard
        torch.cat([torch.full((2000,), -3.0), torch.full((2000,), 2.0)]),  # spikes at the ends: never clip
        _heavy_tailed(4000, seed=5) * 0.01 + 5,  # all positive, tiny spread
    ])
    lo, hi = rows.amin(1), rows.amax(1)
    s, z = mse_search(rows, lo, hi, spec)
    s_mm, _ = qparams_from_range(lo, hi, spec)
    # rows are searched independently: reordering the rows reorders the result and changes nothing else
    perm = torch.tensor([2, 0, 3, 1])
    s_p, z_p = mse_search(rows[perm], lo[perm], hi[perm], spec)
    assert torch.equal(s_p, s[perm]) and torch.equal(z_p, z[perm])
    assert s[0].item() > 0.85 * s_mm[0].item()
    assert s[1].item() < 0.9 * s_mm[1].item()
    assert s[2].item() == s_mm[2].item()
    errs, errs_mm = _qerr(rows, s, z, spec), _qerr(rows, *qparams_from_range(lo, hi, spec), spec)
    assert (errs <= errs_mm).all() and errs[1] < errs_mm[1]


def test_percentile_clips_outliers():
    torch.manual_seed(0)
    spec = QuantSpec(bits=8)
    obs = PercentileObserver(spec)
    batches = [torch.randn(1, 50_000) for _ in range(4)]
    batches[2][0, :3] = torch.tensor([500.0, -400.0, 300.0])
    for b in batches:
        obs.update(b)
    s, z = obs.compute()
    allx = torch.cat(batches, 1)
    assert obs.hi.item() == 500.0 and obs.lo.item() == -400.0  # min/max still tracked
    s_mm, _ = qparams_from_range(obs.lo, obs.hi, spec)
    assert s.item() < 0.05 * s_mm.item()
    lo_ref, hi_ref = torch.quantile(allx[0], 1e-4), torch.quantile(allx[0], 1 - 1e-4)
    s_ref, z_ref = qparams_from_range(lo_ref[None], hi_ref[None], spec)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=0)
    assert z.item() == z_ref.item()


@pytest.mark.parametrize("cls", [SampleObserver, MSEObserver, PercentileObserver])
def test_sample_memory_is_bounded(cls):
    spec = QuantSpec(bits=8, granularity="channel")
    obs = cls(spec, max_values=1024)
    g = torch.Generator().manual_seed(0)
    for i in range(60):
        obs.update(torch.randn(4, 5000, generator=g) + i)
        stored = obs._sample().numel()
        assert stored <= 1024, (i, stored)
    assert obs._sample().numel() <= 1024
    assert obs.lo.shape == (4,)
    s, z = obs.compute()
    assert s.shape == (4,) and torch.isfinite(s).all()


def test_sample_is_uniform_over_batches():
    spec = QuantSpec(bits=8)
    obs = SampleObserver(spec, max_values=4000)
    for i in range(40):
        obs.update(torch.full((1, 10_000), float(i)))  # every batch the same size, tagged by its value
    sample = obs._sample()
    first_half = (sample < 20).float().mean().item()
    assert 0.4 <= first_half <= 0.6, first_half


def test_sample_is_uniform_over_unequal_batches():
    """Batches of very different sizes: each value's chance to be kept is the same (reservoir merge)."""
    obs = SampleObserver(QuantSpec(bits=8), max_values=2000)
    sizes = [100, 50_000, 300, 5000, 40_000, 1000]
    for i, n in enumerate(sizes):
        obs.update(torch.full((1, n), float(i)))
    sample = obs._sample()[0]
    assert sample.numel() == 2000
    for i, n in enumerate(sizes):
        share = (sample == i).float().mean().item()
        expected = n / sum(sizes)
        assert abs(share - expected) < 4 * (expected * (1 - expected) / 2000) ** 0.5 + 1e-3, (i, share, expected)


@pytest.mark.parametrize("symmetric", [False, True])
def test_mse_search_batched_ratios_pick_the_same_range(symmetric):
    """The GPU path (ratios in chunks) and the CPU path (one ratio at a time) choose bit-identical qparams."""
    g = torch.Generator().manual_seed(3)
    values = torch.randn(33, 257, generator=g) * torch.rand(33, 1, generator=g) * 3
    values[0, 0] = 40.0
    spec = QuantSpec(bits=4, symmetric=symmetric, granularity="channel")
    lo, hi = values.amin(1), values.amax(1)
    one = mse_search(values, lo, hi, spec, chunk=1)
    for chunk in (7, 80):
        batched = mse_search(values, lo, hi, spec, chunk=chunk)
        assert torch.equal(one[0], batched[0]) and torch.equal(one[1], batched[1])


def test_lp_error_is_the_power_of_the_absolute_error():
    from slimkit.core.observers import lp_error
    d = torch.cat([torch.randn(1000), torch.zeros(3), torch.tensor([-2.0, 1e-20, 3e4])])
    for p in (2.0, 2.4, 1.5, 3):
        torch.testing.assert_close(lp_error(d, p), d.abs().pow(p), rtol=2e-6, atol=0)
    assert torch.equal(lp_error(torch.zeros(4), 2.4), torch.zeros(4))


@pytest.mark.parametrize("p", [2.4, 2.0])
def test_mse_chunk_errors_in_place_equal_the_quantizer_composition(p):
    """The search's in-place error kernel computes bit for bit what dequantize(quantize_int(x)) and lp_error do."""
    from slimkit.core.observers import _chunk_errors, lp_error
    from slimkit.core.quantizer import dequantize, qparams_from_range, quantize_int
    g = torch.Generator().manual_seed(7)
    values = torch.randn(9, 301, generator=g) * 3
    spec = QuantSpec(bits=4, symmetric=False, granularity="channel")
    r = torch.tensor([1.0, 0.9, 0.55])[:, None]
    scale, zp = qparams_from_range(values.amin(1) * r, values.amax(1) * r, spec)
    s3, z3 = scale[..., None], zp[..., None]
    want = lp_error(dequantize(quantize_int(values, s3, z3, spec.qmin, spec.qmax), s3, z3) - values, p).sum(-1)
    assert torch.equal(_chunk_errors(values, s3, z3, spec.qmin, spec.qmax, p), want)


@pytest.mark.parametrize("p", [2.4, 2.0])
def test_fused_search_expression_is_the_chunk_errors(p):
    """_errors_expr (what mse_search(fused=True) compiles on CUDA) computes what the in-place _chunk_errors does:
    the same operations in the same order, so eagerly the same bits."""
    from slimkit.core.observers import _chunk_errors, _errors_expr
    g = torch.Generator().manual_seed(3)
    values = torch.randn(6, 50, generator=g) * 2
    for symmetric in (False, True):
        spec = QuantSpec(bits=4, symmetric=symmetric, granularity="channel")
        lo, hi = values.amin(1), values.amax(1)
        r = torch.tensor([1.0, 0.9, 0.75])[:, None]
        scale, zp = qparams_from_range(lo * r, hi * r, spec)
        args = (values, scale[..., None], zp[..., None], spec.qmin, spec.qmax, p)
        assert torch.equal(_errors_expr(*args), _chunk_errors(*args))


def test_fused_search_off_cuda_is_the_eager_search():
    g = torch.Generator().manual_seed(4)
    values = torch.randn(8, 64, generator=g)
    spec = QuantSpec(bits=3, symmetric=False, granularity="channel")
    lo, hi = values.amin(1), values.amax(1)
    for a, b in zip(mse_search(values, lo, hi, spec, fused=True), mse_search(values, lo, hi, spec)):
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused (compiled) path runs on CUDA")
@pytest.mark.parametrize("symmetric", [False, True])
def test_fused_mse_search_picks_the_eager_range_on_cuda(symmetric):
    """mse_search(fused=True), all ratios' errors in one compiled kernel (OS+'s threshold search), chooses what the
    eager search chooses, up to rows whose two best ratios tie within the fused kernel's summation order."""
    g = torch.Generator().manual_seed(5)
    values = (torch.randn(512, 1024, generator=g) * torch.rand(512, 1, generator=g) * 3).cuda()
    values[0, 0] = 40.0
    spec = QuantSpec(bits=4, symmetric=symmetric, granularity="channel")
    lo, hi = values.amin(1), values.amax(1)
    eager = mse_search(values, lo, hi, spec)
    fused = mse_search(values, lo, hi, spec, fused=True)
    assert (eager[0] == fused[0]).float().mean().item() >= 0.99
    torch.testing.assert_close(fused[0], eager[0], rtol=0.05, atol=0)
