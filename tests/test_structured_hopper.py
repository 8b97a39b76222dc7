"""slimkit.structured.hopper: the block-diagonal matmul through GELU' as one Gluon kernel. On the CPU: its PyTorch
reference against the block-diagonal definition, the tile choice, and the FFN backward's wiring to it (the
reference standing in for the kernel); on a Hopper GPU: the kernel against the reference."""
import pytest
import torch
import torch.nn.functional as F

import slimkit.structured.epilogue as EP
import slimkit.structured.hopper as HP
from slimkit.structured import make_linear
from slimkit.structured.kernels import fused_ffn


def _operands(nb, q, p, t, feature_major, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    w = (torch.randn(nb, q, p, generator=g, device=device) / q ** 0.5).to(dtype)
    shape_dz, shape_pre = ((nb * q, t), (nb * p, t)) if feature_major else ((t, nb * q), (t, nb * p))
    dz = torch.randn(*shape_dz, generator=g, device=device).to(dtype)
    pre = (2 * torch.randn(*shape_pre, generator=g, device=device)).to(dtype)
    return dz, w, pre


@pytest.mark.parametrize("feature_major", [True, False])
def test_reference_is_the_block_diagonal_matmul_through_gelu_grad(feature_major):
    dz, w, pre = _operands(3, 8, 16, 10, feature_major, torch.float64)
    bd = torch.block_diag(*w)                                 # (nb q, nb p)
    dh = bd.t() @ dz if feature_major else dz @ bd
    want = torch.ops.aten.gelu_backward(dh, pre, approximate="tanh")
    torch.testing.assert_close(HP.dgelu_blocks_reference(dz, w, pre, feature_major), want, rtol=1e-6, atol=1e-6)


def test_tile_choice():
    assert HP._pick(8, 256, 1024, True) == (128, 128, 64, 8)
    assert HP._pick(8, 32, 128, False) == (128, 128, 32, 8)
    assert HP._pick(8, 120, 1024, True) is None              # k = 120: no k step of 16, 32 or 64 divides it
    assert HP._pick(8, 256, 96, True) is None                # p = 96 rows: no 128-row tile divides them
    assert HP._pick(4, 512, 2048, True) is None              # both k-long operands overflow shared memory
    assert HP.SMEM_BUDGET < 227 << 10


def test_applies_only_on_a_hopper_gpu_in_16_bit():
    dz, w, pre = _operands(8, 64, 128, 32, True)
    assert not HP.applies(dz, w, pre, True)                   # the CPU, and float32
    assert not HP.applies(dz.bfloat16(), w.bfloat16(), pre.bfloat16(), True)      # the CPU


@pytest.mark.parametrize("kind", ["blockshuffle", "blockdense"])
def test_ffn_backward_hands_the_kernel_its_operands(monkeypatch, kind):
    """With the kernel said to apply (its reference standing in, cuBLASLt's epilogues likewise), the FFN's
    output and every gradient equal the eager FFN's, and the kernel took every block of fc2's first factor."""
    monkeypatch.setattr(EP, "_matmul", EP.reference_matmul)
    monkeypatch.setattr(EP, "available", lambda x: True)
    monkeypatch.setattr(HP, "applies", lambda *a, **k: True)
    calls = []

    def stand_in(dz, w, pre, feature_major, out=None):
        calls.append((tuple(dz.shape), tuple(w.shape), feature_major))
        got = HP.dgelu_blocks_reference(dz, w, pre, feature_major)
        return got if out is None else out.copy_(got)
    monkeypatch.setattr(HP, "dgelu_blocks", stand_in)
    torch.manual_seed(0)
    fc1, fc2 = make_linear(kind, 64, 256, 0.25, True), make_linear(kind, 256, 64, 0.25, True)
    with torch.no_grad():
        fc1.bias.normal_(0, 0.5)
        fc2.bias.normal_(0, 0.5)
    x = torch.randn(16, 64)
    grad = torch.randn(16, 64)
    params = list(fc1.parameters()) + list(fc2.parameters())

    def run(fn):
        for p in params:
            p.grad = None
        t = x.clone().requires_grad_(True)
        y = fn(t)
        y.backward(grad)
        return [y.detach(), t.grad] + [p.grad for p in params]
    got = run(lambda t: fused_ffn(fc1, fc2, t, "tanh", matmul="cublaslt"))
    want = run(lambda t: fc2(F.gelu(fc1(t), approximate="tanh")))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    blocks = fc2.w1 if kind == "blockshuffle" else fc2.blocks
    assert calls == [((blocks.shape[0] * blocks.shape[1], 16) if kind == "blockshuffle" else
                      (16, blocks.shape[0] * blocks.shape[1]), tuple(blocks.shape), kind == "blockshuffle")]


hopper_gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and HP.gl is not None and torch.cuda.get_device_capability()[0] == 9),
    reason="needs a Hopper GPU and a Triton with Gluon")


@hopper_gpu
@pytest.mark.parametrize("feature_major", [True, False])
@pytest.mark.parametrize("nb,q,p,t", [(8, 256, 1024, 4096), (2, 128, 512, 600), (4, 32, 256, 1000),
                                      (8, 64, 128, 136)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_equals_reference_on_gpu(feature_major, nb, q, p, t, dtype):
    """Every shape here applies, token counts off the 128-token tile included; the result is the reference's up to
    the dtype's rounding (fp32 accumulation, the hardware tanh)."""
    dz, w, pre = _operands(nb, q, p, t, feature_major, dtype, "cuda")
    assert HP.applies(dz, w, pre, feature_major)
    got = HP.dgelu_blocks(dz, w, pre, feature_major)
    want = HP.dgelu_blocks_reference(dz, w, pre, feature_major).float()
    err = ((got.float() - want).norm() / want.norm()).item()
    assert err < 4e-3, err
    assert (got.float() - want).abs().max().item() <= 0.02 * want.abs().max().item()
