"""Uniform affine fake quantization: exact grids, qparams, LSQ and AdaRound gradients, QDrop, integer codes."""
from __future__ import annotations

import math

import pytest
import torch

from slimkit.core.quantizer import (
    QuantSpec,
    Quantizer,
    adaround_init,
    adaround_regularizer,
    dequantize,
    fake_quant,
    fake_quant_tensor,
    from_rows,
    qparams_from_range,
    quantize_int,
    rectified_sigmoid,
    to_rows,
)

BITS = range(2, 9)


def ref_qparams(lo: float, hi: float, bits: int, symmetric: bool) -> tuple[float, float]:
    """An independent reference: the range widened to hold 0, spread over the 2**bits - 1 steps."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    eps = torch.finfo(torch.float32).eps
    if symmetric:
        return max(max(-lo, hi) / ((2**bits - 1) / 2), eps), 0.0
    qmin, qmax = 0, 2**bits - 1
    s = max((hi - lo) / (qmax - qmin), eps)
    return s, float(min(max(qmin - round(lo / s), qmin), qmax))


# Each case: a spec, a tensor shape, and the slices that must be its rows, in row order.
def _cases(bits: int, symmetric: bool):
    kw = dict(bits=bits, symmetric=symmetric)
    yield "tensor", QuantSpec(granularity="tensor", **kw), (6, 5, 4), lambda x: [x]
    yield "channel0", QuantSpec(granularity="channel", ch_axis=0, **kw), (6, 5, 4), lambda x: [x[c] for c in range(x.shape[0])]
    yield "channel1", QuantSpec(granularity="channel", ch_axis=1, **kw), (6, 5, 4), lambda x: [x[:, c] for c in range(x.shape[1])]
    yield "token", QuantSpec(granularity="token", **kw), (3, 7, 16), lambda x: [x[b, t] for b in range(x.shape[0]) for t in range(x.shape[1])]
    yield "group8", QuantSpec(granularity="group", group_size=8, **kw), (4, 24), lambda x: [
        x[i, g * 8 : (g + 1) * 8] for i in range(x.shape[0]) for g in range(x.shape[1] // 8)]


def _data(shape, seed: int) -> torch.Tensor:
    """Values whose slices have very different ranges, some all-positive and some all-negative."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g))
    x[0] = x[0].abs() + 0.5  # an all-positive block (range not holding 0)
    x[-1] = -x[-1].abs() - 0.25  # an all-negative block
    return x


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", BITS)
def test_exact_grid_every_granularity(bits, symmetric):
    for name, spec, shape, slices in _cases(bits, symmetric):
        x = _data(shape, seed=bits * 10 + symmetric)
        rows = to_rows(x, spec)
        scale, zp = qparams_from_range(rows.amin(1), rows.amax(1), spec)
        out = fake_quant_tensor(x, spec, scale, zp)
        assert out.shape == x.shape
        assert torch.equal(from_rows(to_rows(x, spec), x, spec), x), name
        parts = slices(x)
        assert len(parts) == rows.shape[0] == scale.numel(), name
        qmin, qmax = spec.qmin, spec.qmax
        if symmetric:
            assert (qmin, qmax) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        else:
            assert (qmin, qmax) == (0, 2**bits - 1)
        out_parts = slices(out)
        for i, (xs, os_) in enumerate(zip(parts, out_parts)):
            s, z = scale[i], zp[i]
            # the scale of row i is the one computed on that slice alone (and matches the reference formula)
            s_alone, z_alone = qparams_from_range(xs.min(), xs.max(), spec)
            assert s.item() == s_alone.item() and z.item() == z_alone.item(), (name, i)
            s_ref, z_ref = ref_qparams(xs.min().item(), xs.max().item(), bits, symmetric)
            assert s.item() == pytest.approx(s_ref, rel=1e-5), (name, i)
            assert z.item() == z_ref, (name, i)
            assert z.item() == round(z.item()), (name, i)
            if symmetric:
                assert z.item() == 0
            # every output is (q - z) * s for an integer q on the grid
            q = os_ / s + z
            assert (q - q.round()).abs().max().item() < 1e-4, (name, i)
            assert q.round().min().item() >= qmin and q.round().max().item() <= qmax, (name, i)
            assert torch.unique(os_).numel() <= 2**bits, (name, i)
            # slice-by-slice fake quantization gives the same values
            assert torch.equal(os_, fake_quant(xs, s, z, qmin, qmax)), (name, i)
            # min-max scales cover the slice: error at most half a step everywhere
            assert (os_ - xs).abs().max().item() <= 0.5 * s.item() * (1 + 1e-4), (name, i)
        # the Quantizer module gives the same result (static scales, or dynamic for per-token)
        qz = Quantizer(spec, "minmax")
        if spec.granularity != "token":
            qz.set_qparams(scale, zp)
        assert torch.equal(qz(x), out), name


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", BITS)
def test_grid_values_pass_through_and_zero_is_exact(bits, symmetric):
    spec = QuantSpec(bits=bits, symmetric=symmetric)
    g = torch.Generator().manual_seed(bits)
    for lo, hi in [(-3.0, 5.0), (-0.7, 0.01), (0.3, 5.0), (-4.0, -0.2), (-1e-3, 2e-3)]:
        s, z = qparams_from_range(torch.tensor(lo), torch.tensor(hi), spec)
        q = torch.randint(spec.qmin, spec.qmax + 1, (1000,), generator=g).float()
        on_grid = (q - z) * s
        assert torch.equal(fake_quant(on_grid, s, z, spec.qmin, spec.qmax), on_grid)
        assert torch.equal(quantize_int(on_grid, s, z, spec.qmin, spec.qmax), q)
        zeros = torch.zeros(10)
        assert torch.equal(fake_quant(zeros, s, z, spec.qmin, spec.qmax), zeros)
        # and 0 stays exactly 0 amid other values
        x = torch.linspace(lo, hi, 101)
        x[50] = 0.0
        assert fake_quant(x, s, z, spec.qmin, spec.qmax)[50].item() == 0.0


@pytest.mark.parametrize("symmetric", [False, True])
def test_qparams_degenerate_and_widened_ranges(symmetric):
    spec = QuantSpec(bits=4, symmetric=symmetric)
    lo = torch.tensor([0.0, 2.0, -5.0, 0.0, 1.5])
    hi = torch.tensor([0.0, 5.0, -2.0, 3.0, 1.5])
    s, z = qparams_from_range(lo, hi, spec)
    assert torch.isfinite(s).all() and torch.isfinite(z).all() and (s > 0).all()
    x = torch.stack([torch.zeros(3), torch.tensor([2.0, 3.5, 5.0]), torch.tensor([-5.0, -3.0, -2.0]),
                     torch.tensor([0.0, 1.0, 3.0]), torch.full((3,), 1.5)])
    out = fake_quant(x, s[:, None], z[:, None], spec.qmin, spec.qmax)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0], torch.zeros(3))
    # ranges not holding 0 are widened to [min(lo, 0), max(hi, 0)]
    for i in range(5):
        s_ref, z_ref = ref_qparams(lo[i].item(), hi[i].item(), 4, symmetric)
        assert s[i].item() == pytest.approx(s_ref, rel=1e-6)
        assert z[i].item() == z_ref
        # zero maps to code z exactly, and both ends of the widened range are within half a step
        assert fake_quant(torch.zeros(1), s[i], z[i], spec.qmin, spec.qmax).item() == 0.0
    if not symmetric:
        assert z[1].item() == spec.qmin  # [2, 5] -> [0, 5]: 0 is the lowest code
        assert z[2].item() == spec.qmax  # [-5, -2] -> [-5, 0]: 0 is the highest code
    for i in range(1, 5):
        assert (out[i] - x[i]).abs().max().item() <= 0.5 * s[i].item() * (1 + 1e-5)


def _lsq_expected(x, s, z, g, qmin, qmax, per_row_n):
    """Closed-form LSQ gradients for rows x (R, N) with per-row s, z (R, 1), in float64."""
    x, s, z, g = (t.double() for t in (x, s, z, g))
    v = x / s
    r = torch.round(v) + z
    inside = (r >= qmin) & (r <= qmax)
    d_out_ds = torch.where(inside, torch.round(v) - v, torch.where(r < qmin, qmin - z, qmax - z))
    grad_s = (g * d_out_ds).sum(1) / math.sqrt(per_row_n * qmax)
    grad_x = torch.where(inside, g, torch.zeros_like(g))
    return grad_s, grad_x, inside


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_lsq_gradients_per_tensor(bits, symmetric):
    torch.manual_seed(bits)
    spec = QuantSpec(bits=bits, symmetric=symmetric)
    x = torch.randn(2000) * 2 + 0.3
    s, z = qparams_from_range(x.min(), x.max(), spec)
    q = Quantizer(spec, "minmax")
    q.set_qparams(s * 0.6, z)  # a smaller step than min-max so that both ends clip
    q.make_learnable()
    assert isinstance(q.scale, torch.nn.Parameter)
    x.requires_grad_(True)
    g = torch.randn(2000)
    (q(x) * g).sum().backward()
    grad_s, grad_x, inside = _lsq_expected(x.detach()[None], q.scale.detach()[:, None], q.zero_point[:, None],
                                           g[None], spec.qmin, spec.qmax, x.numel())
    assert (~inside).sum() > 10 and inside.sum() > 100  # both regimes are exercised
    assert q.scale.grad.shape == (1,)
    torch.testing.assert_close(q.scale.grad.double(), grad_s, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), grad_x[0], rtol=1e-5, atol=1e-6)
    assert (x.grad[~inside[0]] == 0).all()


@pytest.mark.parametrize("ch_axis", [0, 1])
def test_lsq_gradients_per_channel(ch_axis):
    torch.manual_seed(3 + ch_axis)
    spec = QuantSpec(bits=4, symmetric=False, granularity="channel", ch_axis=ch_axis)
    w = torch.randn(6, 40, 3) * torch.linspace(0.2, 3.0, 6).reshape(6, 1, 1)
    if ch_axis == 1:
        w = w.transpose(0, 1).contiguous()  # (40, 6, 3): channel axis 1
    rows = to_rows(w, spec)
    s, z = qparams_from_range(rows.amin(1), rows.amax(1), spec)
    q = Quantizer(spec, "minmax")
    q.set_qparams(s * torch.linspace(0.5, 1.0, s.numel()), z)
    q.make_learnable()
    w.requires_grad_(True)
    g = torch.randn_like(w)
    (q(w) * g).sum().backward()
    n = rows.shape[1]
    grad_s, grad_x, inside = _lsq_expected(rows, q.scale.detach()[:, None], q.zero_point[:, None],
                                           to_rows(g, spec), spec.qmin, spec.qmax, n)
    assert (~inside).sum() > 10
    torch.testing.assert_close(q.scale.grad.double(), grad_s, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(to_rows(w.grad, spec).double(), grad_x, rtol=1e-5, atol=1e-6)


def test_adaround_init_inverts_rectified_sigmoid():
    rest = torch.cat([torch.rand(10000, generator=torch.Generator().manual_seed(0)), torch.tensor([0.0, 0.5, 1 - 1e-7])])
    torch.testing.assert_close(rectified_sigmoid(adaround_init(rest)), rest, rtol=0, atol=1e-5)


def _central_diff(f, v: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    grad = torch.empty_like(v)
    flat, gflat = v.reshape(-1), grad.reshape(-1)
    for i in range(flat.numel()):
        old = flat[i].item()
        flat[i] = old + h
        up = f(v).sum().item()
        flat[i] = old - h
        down = f(v).sum().item()
        flat[i] = old
        gflat[i] = (up - down) / (2 * h)
    return grad


@pytest.mark.parametrize("beta", [2.0, 7.3, 20.0])
def test_adaround_gradients_match_finite_differences(beta):
    g = torch.Generator().manual_seed(int(beta * 10))
    # h(V) in (0.05, 0.95) for |V| < 1.95: away from the clip at 0 and 1
    v = (torch.rand(40, generator=g, dtype=torch.float64) * 3.8 - 1.9)
    v = v[(rectified_sigmoid(v) - 0.5).abs() > 0.02]  # |2h-1|^beta is smooth away from h = 1/2 too
    weights = torch.randn(v.numel(), generator=g, dtype=torch.float64)
    for f in (lambda t: rectified_sigmoid(t) * weights, lambda t: adaround_regularizer(t, beta)):
        vv = v.clone().requires_grad_(True)
        f(vv).sum().backward()
        torch.testing.assert_close(vv.grad, _central_diff(f, v.clone()), rtol=1e-6, atol=1e-8)


def test_adaround_regularizer_zero_only_at_hard_values():
    hard = torch.tensor([-12.0, -8.0, 9.0, 15.0, -30.0])
    assert set(rectified_sigmoid(hard).tolist()) == {0.0, 1.0}
    for beta in (2.0, 10.0, 20.0):
        assert adaround_regularizer(hard, beta).item() == 0.0
        soft = torch.randn(100, generator=torch.Generator().manual_seed(1))
        assert adaround_regularizer(soft, beta).item() > 0
        one_soft = torch.cat([hard, torch.tensor([0.3])])
        assert adaround_regularizer(one_soft, beta).item() > 0
    assert adaround_regularizer(torch.zeros(4), 2.0).item() == pytest.approx(4.0)  # h = 0.5 is the worst


@pytest.mark.parametrize("symmetric", [False, True])
def test_adaround_soft_and_hard_rounding(symmetric):
    torch.manual_seed(5)
    spec = QuantSpec(bits=3, symmetric=symmetric, granularity="channel", ch_axis=0)
    w = torch.randn(8, 50)
    rows = to_rows(w, spec)
    s, z = qparams_from_range(rows.amin(1), rows.amax(1), spec)
    q = Quantizer(spec, "minmax")
    q.set_qparams(s * 0.7, z)  # some clipping
    q.init_adaround(w)
    scale, zp = q.scale[:, None], q.zero_point[:, None]
    v = w / scale + zp
    inside = (v >= spec.qmin) & (v <= spec.qmax)
    assert (~inside).sum() > 0 and inside.sum() > 100
    soft = q(w)
    # learning starts at the float weight (inside the range); clipped weights sit at the ends of the grid
    assert (soft - w)[inside].abs().max().item() < 1e-5
    ends = torch.where(v < spec.qmin, (spec.qmin - zp) * scale, (spec.qmax - zp) * scale).expand_as(w)
    torch.testing.assert_close(soft[~inside], ends[~inside], rtol=0, atol=1e-5)
    # hard rounding right after init is round-to-nearest
    q.hard_round = True
    codes_rtn = quantize_int(w, scale, zp, spec.qmin, spec.qmax)
    assert torch.equal(q.int_codes(w).float(), codes_rtn)
    assert torch.equal(q(w), dequantize(codes_rtn, scale, zp))
    # and with arbitrary V: floor(w/s) + (V >= 0) + z, clamped
    with torch.no_grad():
        q.alpha.copy_(torch.randn(q.alpha.shape, generator=torch.Generator().manual_seed(9)))
    expected = torch.clamp(torch.floor(w / scale) + (q.alpha >= 0).float() + zp, spec.qmin, spec.qmax)
    assert not torch.equal(expected, codes_rtn)
    assert torch.equal(q.int_codes(w).float(), expected)
    assert q.int_codes(w).dtype == torch.int16
    assert torch.equal(q(w), (expected - zp) * scale)
    q.hard_round = False  # int_codes always rounds hard
    assert torch.equal(q.int_codes(w).float(), expected)


def test_qdrop_mixes_quantized_and_float_elementwise():
    torch.manual_seed(0)
    spec = QuantSpec(bits=4)
    x = torch.randn(100_000)
    q = Quantizer(spec, "minmax")
    q.set_qparams(*qparams_from_range(x.min(), x.max(), spec))
    fq = q(x)
    assert torch.equal(fq, q(x))  # quant_prob = 1.0: deterministic
    assert torch.equal(fq, fake_quant_tensor(x, spec, q.scale, q.zero_point))
    assert (fq != x).float().mean() > 0.99
    q.quant_prob = 0.5
    out = q(x)
    took_q, took_x = out == fq, out == x
    assert (took_q | took_x).all()
    frac = took_q.float().mean().item()
    assert 0.45 <= frac <= 0.55, frac
    out2 = q(x)
    assert not torch.equal(out, out2)  # a fresh draw each call
    q.quant_prob = 0.8  # quant_prob is the probability of keeping the *quantized* value
    frac = (q(x) == fq).float().mean().item()
    assert 0.78 <= frac <= 0.82, frac


@pytest.mark.parametrize("spec", [
    QuantSpec(bits=4), QuantSpec(bits=8, symmetric=True),
    QuantSpec(bits=3, granularity="channel", ch_axis=0), QuantSpec(bits=5, symmetric=True, granularity="channel", ch_axis=1),
    QuantSpec(bits=2, granularity="group", group_size=8), QuantSpec(bits=6, symmetric=True, granularity="group", group_size=8),
], ids=lambda s: f"{s.granularity}{s.ch_axis if s.granularity == 'channel' else ''}-b{s.bits}-{'sym' if s.symmetric else 'asym'}")
def test_int_codes_dequantize_equal_fake_quant(spec):
    torch.manual_seed(spec.bits)
    w = torch.randn(12, 3, 3, 16) * 0.3
    rows = to_rows(w, spec)
    scale, zp = qparams_from_range(rows.amin(1), rows.amax(1), spec)
    q = Quantizer(spec, "minmax")
    q.set_qparams(scale * 0.8, zp)
    codes = q.int_codes(w)
    assert codes.shape == w.shape and codes.dtype == torch.int16
    assert codes.min() >= spec.qmin and codes.max() <= spec.qmax
    deq = from_rows(dequantize(to_rows(codes.float(), spec), q.scale[:, None], q.zero_point[:, None]), w, spec)
    assert torch.equal(deq, q(w))


@pytest.mark.parametrize("kw", [dict(bits=1), dict(bits=9), dict(bits=0), dict(granularity="row"), dict(granularity="Tensor")])
def test_quantspec_rejects_bad_settings(kw):
    with pytest.raises(ValueError):
        QuantSpec(**kw)
