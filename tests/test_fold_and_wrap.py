"""BatchNorm folding, quantized layer twins (wrap/unwrap), bit packing and AdaRound's beta schedule."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimkit.core.fold import find_conv_bn_pairs, fold_bn
from slimkit.core.quantizer import QuantSpec
from slimkit.core.reconstruct import ReconConfig, beta_at, output_loss
from slimkit.core.wrap import LayerPlan, QuantLayer, layer_modules, unwrap_layers, wrap_layers
from slimkit.io.artifact import pack_bits, unpack_bits


class StaticPadConv(nn.Conv2d):
    """A Conv2d that pads inside its own forward (asymmetric "same" padding, as TF-ported models do)."""

    def forward(self, x):
        return F.conv2d(F.pad(x, (0, 2, 1, 1)), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _randomize_bn(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            with torch.no_grad():
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(c, generator=g))
                    m.running_var.copy_(torch.rand(c, generator=g) * 3 + 0.05)
                if m.weight is not None:
                    m.weight.copy_(torch.randn(c, generator=g))
                    m.bias.copy_(torch.randn(c, generator=g))


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = StaticPadConv(8, 8, 3, bias=True)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 6, 1, bias=True)
        self.bn3 = nn.BatchNorm2d(6, affine=False)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        return self.head(x.mean((2, 3)))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_fold_bn_preserves_function():
    torch.manual_seed(0)
    model = SmallCNN()
    _randomize_bn(model, 1)
    model.train()
    example, other = torch.randn(4, 3, 12, 12), torch.randn(3, 3, 9, 11)
    model.eval()
    with torch.no_grad():
        before_ex, before_other = model(example), model(other)
    model.train()
    pairs = fold_bn(model, example)
    assert sorted(pairs) == [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")]
    assert model.training  # the mode is restored
    for bn in ("bn1", "bn2", "bn3"):
        assert isinstance(getattr(model, bn), nn.Identity)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert model.conv1.bias is not None and isinstance(model.conv2, StaticPadConv)
    model.eval()
    with torch.no_grad():
        assert _rel(model(example), before_ex) < 1e-5
        assert _rel(model(other), before_other) < 1e-5  # a general identity, not fitted to the example


class SharedOutput(nn.Module):
    """conv's output feeds the BN and also a residual path: folding would change the residual."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_fold_bn_leaves_shared_conv_output_unfolded():
    torch.manual_seed(0)
    model = SharedOutput()
    _randomize_bn(model, 2)
    assert find_conv_bn_pairs(model.eval(), torch.randn(2, 3, 8, 8)) == [("conv", "bn")]  # the pair is seen...
    with pytest.warns(UserWarning, match="1 conv -> BatchNorm pair.*conv -> bn"):   # ...and the check keeps it
        assert fold_bn(model, torch.randn(2, 3, 8, 8)) == []
    assert isinstance(model.bn, nn.BatchNorm2d)


def test_fold_bn_refusal_leaves_model_untouched():
    torch.manual_seed(0)
    model = SharedOutput()
    _randomize_bn(model, 2)
    model.train()
    x = torch.randn(2, 3, 8, 8)
    state = copy.deepcopy(model.state_dict())
    with pytest.warns(UserWarning):
        fold_bn(model, x)
    assert isinstance(model.bn, nn.BatchNorm2d)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


class DenseStyle(nn.Module):
    """Two conv -> BN pairs: the first conv's output also goes into a concatenation (unsafe to fold), the
    second's only into its BN (safe); the model returns a dict."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(8, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv1(x)
        z = torch.cat([torch.relu(self.bn1(y)), y], 1)
        return {"logits": self.bn2(self.conv2(z)).mean((2, 3)), "aux": z.mean()}


def _eval_with_output(make, seed: int):
    """(model in eval mode with random BatchNorm statistics, an input, the model's output on it)."""
    torch.manual_seed(0)
    model = make()
    _randomize_bn(model, seed)
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        return model, x, model(x)


def test_fold_bn_keeps_the_safe_pairs_when_one_is_unsafe():
    model, x, before = _eval_with_output(DenseStyle, 4)
    with pytest.warns(UserWarning, match="conv1 -> bn1"):
        assert fold_bn(model, x) == [("conv2", "bn2")]
    assert isinstance(model.bn1, nn.BatchNorm2d) and isinstance(model.bn2, nn.Identity)
    with torch.no_grad():
        after = model(x)
    for key in before:      # every output of the dict, not only the first
        assert _rel(after[key], before[key]) < 1e-5, key


class InplaceReluBetween(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(torch.relu_(self.conv(x)))


class SharedBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv1(x)) + self.bn(self.conv2(x))


@pytest.mark.parametrize("make", [InplaceReluBetween, SharedBN,
                                  lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))],
                         ids=["inplace-relu-between", "shared-bn", "no-running-stats"])
def test_fold_bn_skips_pairs_that_cannot_fold(make):
    """A conv -> relu_ -> BN chain (the BN sees the conv's tensor, changed in place), a BN shared by two convs and
    a BN without running statistics are no pairs: nothing is folded, the outputs stay, no error."""
    model, x, before = _eval_with_output(make, 5)
    assert find_conv_bn_pairs(model, x) == []
    assert fold_bn(model, x) == []
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_fold_bn_ignores_bn_not_fed_by_conv():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.BatchNorm2d(4),
                          nn.Conv2d(4, 4, 1), nn.ReLU(), nn.AvgPool2d(2), nn.BatchNorm2d(4))
    _randomize_bn(model, 3)
    model.eval()
    for size in (8, 12, 16):
        x = torch.randn(2, 3, size, size)
        assert find_conv_bn_pairs(model, x) == []
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        before = model(x)
    assert fold_bn(model, x) == []
    with torch.no_grad():
        assert torch.equal(model(x), before)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), StaticPadConv(8, 8, 3), nn.ReLU())
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


PLAN8 = dict(w_spec=QuantSpec(bits=8, symmetric=True, granularity="channel"), a_spec=QuantSpec(bits=8))


def _calibrate(model: nn.Module, data: torch.Tensor) -> None:
    qs = [m.a_quant for m in model.modules() if isinstance(m, QuantLayer) and m.a_quant is not None]
    for q in qs:
        q.observing = True
    with torch.no_grad():
        model(data)
    for q in qs:
        q.observing = False
        q.compute_qparams()


def test_wrap_then_unwrap_restores_original_modules():
    torch.manual_seed(0)
    model = Net()
    originals = {n: m for n, m in model.named_modules()}
    state = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        ref = model(x)
    names = sorted(["features.0", "features.2", "fc"])
    assert sorted(layer_modules(model)) == names
    wrapped = wrap_layers(model, {n: LayerPlan(**PLAN8) for n in names})
    assert sorted(wrapped) == names
    for n in names:
        assert isinstance(model.get_submodule(n), QuantLayer)
        assert model.get_submodule(n).layer is originals[n]
    assert sorted(layer_modules(model)) == names  # the wrapped layers are listed once, by their own path
    unwrap_layers(model)
    for n in names:
        assert model.get_submodule(n) is originals[n]
    assert not any(isinstance(m, QuantLayer) for m in model.modules())
    assert model.state_dict().keys() == state.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # weights untouched by wrapping
    with torch.no_grad():
        assert torch.equal(model(x), ref)


@pytest.mark.parametrize("w_observer", ["minmax", "mse"])
def test_quant_layer_8bit_close_to_float(w_observer):
    torch.manual_seed(1)
    model = Net()
    x = torch.randn(8, 3, 10, 10)
    with torch.no_grad():
        ref = model(x)
    q_model = copy.deepcopy(model)
    wrap_layers(q_model, {n: LayerPlan(**PLAN8, w_observer=w_observer, a_observer="minmax")
                          for n in ["features.0", "features.2", "fc"]})
    _calibrate(q_model, x)
    with torch.no_grad():
        out = q_model(x)
    err = _rel(out, ref)
    assert 0 < err < 2e-2, err
    for layer in (q_model.features[0], q_model.fc):
        assert _rel(layer.quantized_weight(), layer.layer.weight) < 1e-2
    # and at 3 bits it is clearly not the float model (the quantizers are really on)
    q3 = copy.deepcopy(model)
    wrap_layers(q3, {n: LayerPlan(QuantSpec(bits=3, symmetric=True, granularity="channel"), QuantSpec(bits=3), w_observer, "minmax")
                     for n in ["features.0", "features.2", "fc"]})
    _calibrate(q3, x)
    with torch.no_grad():
        assert _rel(q3(x), ref) > 5 * err


@pytest.mark.parametrize("with_act", [False, True])
def test_quant_layer_keeps_subclass_forward(with_act):
    torch.manual_seed(2)
    conv = StaticPadConv(4, 6, 3, bias=True)
    x = torch.randn(2, 4, 7, 9)
    ql = QuantLayer(copy.deepcopy(conv), QuantSpec(bits=4, granularity="channel"),
                    QuantSpec(bits=6) if with_act else None, "minmax", "minmax")
    assert not ql._fast_conv
    if with_act:
        _calibrate(ql, x)
    w_q = ql.quantized_weight().detach()
    assert not torch.equal(w_q, conv.weight)
    ref_conv = copy.deepcopy(conv)
    with torch.no_grad():
        ref_conv.weight.copy_(w_q)
        x_in = ql.a_quant(x) if with_act else x
        ref = ref_conv(x_in)
        out = ql(x)
    assert out.shape == conv(x).shape == (2, 6, 7, 9)  # the subclass's own padding is applied
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    # not what a plain conv with the module's padding attribute would give
    assert F.conv2d(x_in, w_q, conv.bias).shape != out.shape
    # frozen (integer codes) computes the same
    ql.freeze()
    assert ql.frozen and ql.w_int.dtype == torch.int16
    with torch.no_grad():
        torch.testing.assert_close(ql(x), out, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("n", [1, 7, 8, 1001])
def test_pack_unpack_round_trip(bits, n):
    rng = np.random.default_rng(bits * 1000 + n)
    for codes in (rng.integers(0, 2**bits, n), np.zeros(n, dtype=np.int64), np.full(n, 2**bits - 1)):
        packed = pack_bits(codes, bits)
        assert packed.dtype == np.uint8
        assert packed.size == math.ceil(n * bits / 8)
        out = unpack_bits(packed, bits, n)
        assert out.shape == (n,)
        assert np.array_equal(out.astype(np.int64), codes.astype(np.int64))


def test_pack_bits_layout_is_little_endian_stream():
    # 3-bit codes 1, 2, 3 -> stream (lsb first) 100 010 110 -> byte 0 holds stream bits 0..7 lsb first
    assert pack_bits(np.array([1, 2, 3]), 3).tolist() == [0b11010001, 0b00000000]
    assert pack_bits(np.array([5, 7]), 4).tolist() == [0x75]


def test_beta_schedule():
    cfg = ReconConfig(iters=1000, warmup=0.2, beta_start=20.0, beta_end=2.0)
    for step in (0, 1, 100, 199):
        assert beta_at(step, cfg) == 20.0
    assert beta_at(200, cfg) == pytest.approx(20.0)
    assert beta_at(1000, cfg) == pytest.approx(2.0)
    assert beta_at(1500, cfg) == pytest.approx(2.0)  # never below beta_end
    for step in (250, 400, 600, 800, 999):
        assert beta_at(step, cfg) == pytest.approx(20.0 - 18.0 * (step - 200) / 800)
    assert beta_at(600, cfg) == pytest.approx(11.0)
    betas = [beta_at(s, cfg) for s in range(0, 1001)]
    assert all(a >= b for a, b in zip(betas, betas[1:]))
    # no warm-up: linear from the first step
    cfg0 = ReconConfig(iters=100, warmup=0.0, beta_start=20.0, beta_end=2.0)
    assert beta_at(0, cfg0) == pytest.approx(20.0) and beta_at(50, cfg0) == pytest.approx(11.0)


def test_output_loss_sums_channels_and_averages_the_rest():
    pred, target = torch.zeros(2, 3, 4, 5), torch.ones(2, 3, 4, 5)
    assert output_loss(pred, target).item() == pytest.approx(3.0)
    target[0, :, 0, 0] = 3.0
    expected = ((pred - target) ** 2).sum(1).mean()
    assert output_loss(pred, target).item() == pytest.approx(expected.item())


def test_capture_keeps_block_inputs_the_block_changes_in_place():
    """A pre-activation block that starts with relu_(x) changes its own input: the cached float input (which
    QDrop mixes into the block's input) must be the input as it came in."""
    from slimkit.core.reconstruct import capture

    class PreAct(nn.Module):
        def __init__(self):
            super().__init__()
            self.relu, self.conv = nn.ReLU(inplace=True), nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return self.conv(self.relu(x))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), PreAct(), nn.Flatten()).eval()
    x = torch.randn(6, 3, 8, 8)
    cpu = torch.device("cpu")
    fp_in, fp_out, _, _ = capture(model, model[1], x, 4, cpu, True, cpu)
    with torch.no_grad():
        assert torch.equal(fp_in, model[0](x)) and fp_in.min() < 0
        assert torch.equal(fp_out, model[1](model[0](x)))


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d in small: a BatchNorm2d subclass whose forward also applies .drop and .act."""

    def __init__(self, c: int):
        super().__init__(c)
        self.drop, self.act = nn.Identity(), nn.SiLU()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


class ScaledBN(nn.BatchNorm2d):
    """A BatchNorm2d subclass whose own forward does something slimkit cannot name: never folded."""

    def forward(self, x):
        return super().forward(x) * 2 + 1


def test_fold_bn_folds_batchnorm_act_subclasses_and_keeps_their_activation():
    """A conv -> BatchNormAct pair folds: the conv takes the normalisation, the activation stays in the
    BatchNorm's place, and the outputs hold to 1e-5; a subclass with an unknown forward stays, with a warning
    that names its class (not a shared conv output, which there is none of)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), BatchNormAct(8), nn.Conv2d(8, 4, 1), ScaledBN(4))
    _randomize_bn(model, 1)
    model.eval()
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        before = model(x)
    with pytest.warns(UserWarning, match=r"1 BatchNorm\(s\) of class ScaledBN left unfolded \(3\)"):
        pairs = fold_bn(model, x)
    assert pairs == [("0", "1")]
    assert isinstance(model[1], nn.Sequential) and isinstance(model[1][1], nn.SiLU) and isinstance(model[3], ScaledBN)
    with torch.no_grad():
        assert _rel(model(x), before) < 1e-5


class Aliased(nn.Module):
    """One conv held under two names (self.c2 = self.c1) and called twice."""

    def __init__(self):
        super().__init__()
        self.c0, self.c1 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.c2 = self.c1
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.c2(F.relu(self.c1(F.relu(self.c0(x))))))
        return self.fc(x.mean((2, 3)))


def test_wrap_layers_wraps_a_layer_at_every_name_that_holds_it():
    torch.manual_seed(0)
    model = Aliased()
    original = model.c1
    wrapped = wrap_layers(model, {n: LayerPlan(**PLAN8) for n in layer_modules(model)})
    assert sorted(wrapped) == ["c0", "c1", "fc"]
    assert isinstance(model.c2, QuantLayer) and model.c2 is model.c1 and model.c1.layer is original
    unwrap_layers(model)
    assert model.c1 is original and model.c2 is original
