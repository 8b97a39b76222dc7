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
    assert HP._pick(8, 256, 1024, True) == (64, HP.Tile(128, 128, 8))
    assert HP._pick(8, 32, 128, False) == (32, HP.Tile(128, 128, 8))
    assert HP._pick(8, 120, 1024, True) is None              # k = 120: no k step of 16, 32 or 64 divides it
    assert HP._pick(8, 256, 96, True) is None                # p = 96 rows: no 128-row tile divides them
    assert HP._pick(4, 512, 2048, True) is None              # both k-long operands overflow shared memory
    assert HP.SMEM_BUDGET < 227 << 10


def test_applies_only_on_a_hopper_gpu_in_16_bit(monkeypatch):
    dz, w, pre = _operands(8, 64, 128, 32, True)
    assert not HP.applies(dz, w, pre, True)                   # the CPU, and float32
    dz, w, pre = dz.bfloat16(), w.bfloat16(), pre.bfloat16()
    assert not HP.applies(dz, w, pre, True)                   # the CPU
    if HP.gl is None:
        return
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))           # as if on an H100
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert HP.applies(dz, w, pre, True)
    assert not HP.applies(dz, w, pre, False)                  # the token-major shapes are others
    assert HP.applies(dz[:, :24], w, pre[:, :24], True)       # strided views are copied (aligned) first
    assert not HP.applies(dz[:, :20], w, pre[:, :20], True)   # 20 tokens: rows not a multiple of 16 bytes
    shifted = torch.zeros(dz.numel() + 1, dtype=dz.dtype)[1:].view(dz.shape)      # contiguous, 2 bytes off
    assert shifted.is_contiguous() and not HP.applies(shifted, w, pre, True)
    assert not HP.applies(dz, w, pre[:-8], True)              # pre of another shape
    h = torch.zeros(40 * 8, 256, dtype=torch.bfloat16)
    w2 = torch.zeros(8, 128, 32, dtype=torch.bfloat16)
    assert HP.up_applies(h, w2, 256) and HP.up_applies(h[:, :128].contiguous(), w2, 128)
    assert not HP.up_applies(h[:, :128], w2, 128)             # a strided middle
    assert not HP.up_applies(h[: 30 * 8], w2, 256)            # fewer middle rows than the blocks read
    assert not HP.up_applies(h[:, :120].contiguous(), w2, 120)      # tokens off the 128-token tile


@pytest.mark.parametrize("bias", [True, False])
def test_interleaved_up_reference_is_what_the_gelu_aux_matmuls_compute(bias):
    """fc1's second factor through bias + GELU, as ShuffleGeluFFN's cuBLASLt path computes it (the weight given a
    bias column, the middle ones rows, one GELU_AUX a block), equals gelu_blocks_interleaved_reference."""
    torch.manual_seed(0)
    l, s, r, t = 4, 16, 8, 24
    w, b = torch.randn(l, s, r, dtype=torch.float64), torch.randn(s * l, dtype=torch.float64)
    rp = EP._shuffle_pad(r, bias)
    h = torch.randn(rp * l, t, dtype=torch.float64)
    h[r * l:] = 1
    w2p = torch.cat([w, b.view(s, l).t().unsqueeze(2), w.new_zeros(l, s, rp - r - 1)], 2) if bias else w
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(EP, "_matmul", EP.reference_matmul)
        want_act, want_pre = EP._shuffle_up(h, w2p.contiguous(), t, True)
    act, pre = HP.gelu_blocks_interleaved_reference(h, w, b if bias else None, t)
    torch.testing.assert_close(act, want_act, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(pre, want_pre, rtol=1e-9, atol=1e-9)
    assert HP._pick_up(1024, 256, 16384) == (128, 128, 64, 8)
    assert HP._pick_up(1024, 256, 16008) is None              # tokens off every tile: a tile would cross blocks
    assert HP._pick_up(1024, 264, 16384) is None              # no k step divides r


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
    monkeypatch.setattr(HP, "up_applies", lambda *a, **k: True)
    ups = []

    def up_stand_in(h, w, b, t, store_pre=True):
        ups.append((tuple(h.shape), tuple(w.shape), store_pre))
        act, pre = HP.gelu_blocks_interleaved_reference(h, w, b, t)
        return act, (pre if store_pre else None)
    monkeypatch.setattr(HP, "gelu_blocks_interleaved", up_stand_in)
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
    if kind == "blockshuffle":       # the forward's kernel took fc1's second factor, the middle's ones rows beside
        l, s, r = fc1.w2.shape
        assert ups == [((EP._shuffle_pad(r, True) * l, 16), (l, s, r), True)]
        with torch.no_grad():
            torch.testing.assert_close(fused_ffn(fc1, fc2, x, "tanh", matmul="cublaslt"), want[0], rtol=1e-5,
                                       atol=1e-5)
    blocks = fc2.w1 if kind == "blockshuffle" else fc2.blocks
    assert calls == [((blocks.shape[0] * blocks.shape[1], 16) if kind == "blockshuffle" else
                      (16, blocks.shape[0] * blocks.shape[1]), tuple(blocks.shape), kind == "blockshuffle")]


@pytest.mark.parametrize("kind", ["blockshuffle", "blockdense"])
def test_a_kernel_that_fails_to_launch_warns_and_the_ffn_falls_back(monkeypatch, kind):
    """A kernel that cannot be built or launched (here: the CPU) switches the kernels off with one warning naming
    the failure, and the FFN takes its cuBLASLt path (reference epilogues standing in): outputs and gradients as
    eager's; applies() then says no."""
    monkeypatch.setattr(EP, "_matmul", EP.reference_matmul)
    monkeypatch.setattr(EP, "available", lambda x: True)
    monkeypatch.setattr(HP, "FAILED", None)
    real_applies, real_up = HP.applies, HP.up_applies
    monkeypatch.setattr(HP, "applies", lambda *a, **k: HP.FAILED is None)
    monkeypatch.setattr(HP, "up_applies", lambda *a, **k: HP.FAILED is None)
    torch.manual_seed(0)
    fc1, fc2 = make_linear(kind, 256, 1024, 0.25, True), make_linear(kind, 1024, 256, 0.25, True)   # shapes it tiles
    x, grad = torch.randn(128, 256), torch.randn(128, 256)
    params = list(fc1.parameters()) + list(fc2.parameters())

    def run(fn):
        for p in params:
            p.grad = None
        t = x.clone().requires_grad_(True)
        fn(t).backward(grad)
        return [t.grad] + [p.grad for p in params]
    with pytest.warns(UserWarning, match="failed to build or launch") as caught:
        got = run(lambda t: fused_ffn(fc1, fc2, t, "tanh", matmul="cublaslt"))
    for a, b in zip(got, run(lambda t: fc2(F.gelu(fc1(t), approximate="tanh")))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert HP.FAILED and len([w for w in caught if "failed to build" in str(w.message)]) == 1
    dz, w, pre = _operands(8, 64, 128, 32, True, torch.bfloat16)
    monkeypatch.setattr(HP, "applies", real_applies)
    monkeypatch.setattr(HP, "up_applies", real_up)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))      # as if on a GPU: still off
    assert not HP.applies(dz, w, pre, True)


def test_a_gluon_the_kernels_do_not_fit_leaves_them_off(monkeypatch):
    """The kernels live in their own module, imported inside a try: a Triton whose Gluon API differs (here the
    import fails) leaves hopper unavailable and the FFN paths importable, instead of breaking them."""
    import importlib
    import sys

    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name == "slimkit.structured._gluon_kernels":
                raise ImportError("simulated: this Triton's Gluon lacks what the kernels use")
    had = HP._K is not None
    import slimkit.structured as package
    monkeypatch.delitem(sys.modules, "slimkit.structured._gluon_kernels", raising=False)
    monkeypatch.delattr(package, "_gluon_kernels", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Refuse()] + sys.meta_path)
    try:
        importlib.reload(HP)
        assert HP.gl is None and HP._K is None
        dz, w, pre = _operands(8, 64, 128, 32, True, torch.bfloat16)
        assert not HP.applies(dz, w, pre, True) and not HP.up_applies(pre, w, 32)
        importlib.reload(EP)                      # the FFN paths import as before
    finally:
        monkeypatch.undo()
        importlib.reload(HP)
        importlib.reload(EP)
    assert (HP._K is not None) == had


hopper_gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and HP.gl is not None and torch.cuda.get_device_capability()[0] == 9),
    reason="needs a Hopper GPU and a Triton with Gluon")


@hopper_gpu
@pytest.mark.parametrize("l,s,r,t", [(8, 1024, 256, 2048), (2, 256, 64, 640), (4, 128, 32, 128)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_interleaved_up_kernel_equals_reference_on_gpu(l, s, r, t, bias, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    rp = EP._shuffle_pad(r, True)
    h = torch.randn(rp * l, t, device="cuda", generator=g).to(dtype)
    h[r * l:] = 1
    w = (torch.randn(l, s, r, device="cuda", generator=g) / r ** 0.5).to(dtype)
    b = torch.randn(s * l, device="cuda", generator=g).to(dtype) if bias else None
    assert HP.up_applies(h, w, t)
    act, pre = HP.gelu_blocks_interleaved(h, w, b, t)
    want_act, want_pre = HP.gelu_blocks_interleaved_reference(h.float(), w.float(), None if b is None else b.float(),
                                                              t)
    for got, want in ((act, want_act), (pre, want_pre)):
        assert ((got.float() - want).norm() / want.norm()).item() < 4e-3
    act2, none = HP.gelu_blocks_interleaved(h, w, b, t, store_pre=False)
    assert none is None and torch.equal(act2, act)


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


def test_applies_edges(monkeypatch):
    """No tokens is declined (a TMA descriptor takes no empty dimension: the launch would fail and switch the kernels
    off for the process); token-major takes any token count (only feature-major rows carry it); ROCm's capability
    9.x (MI200 / MI300) is no Hopper."""
    if HP.gl is None:
        return
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    dz, w, pre = _operands(8, 64, 128, 0, False, torch.bfloat16)
    assert not HP.applies(dz, w, pre, False)
    dz, w, pre = _operands(8, 64, 128, 0, True, torch.bfloat16)
    assert not HP.applies(dz, w, pre, True)
    empty, w2 = torch.zeros(40 * 8, 0, dtype=torch.bfloat16), torch.zeros(8, 128, 32, dtype=torch.bfloat16)
    assert not HP.up_applies(empty, w2, 0)
    dz, w, pre = _operands(8, 64, 128, 1001, False, torch.bfloat16)
    assert HP.applies(dz, w, pre, False)
    dz, w, pre = _operands(8, 64, 128, 1001, True, torch.bfloat16)
    assert not HP.applies(dz, w, pre, True)                   # feature-major: 1001-token rows, not 16-byte aligned
    monkeypatch.setattr(torch.version, "hip", "6.2")
    dz, w, pre = _operands(8, 64, 128, 32, True, torch.bfloat16)
    assert not HP.applies(dz, w, pre, True)


def test_interleaved_rejects_tiles_and_bias_it_cannot_index():
    h, w = torch.zeros(40 * 8, 256, dtype=torch.bfloat16), torch.zeros(8, 128, 32, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="do not divide"):
        HP.gelu_blocks_interleaved(h[:, :200].contiguous(), w, None, 200, tiles=(128, 128, 32, 8))
    with pytest.raises(ValueError, match="bias of"):
        HP.gelu_blocks_interleaved(h, w, torch.zeros(100, dtype=torch.bfloat16), 256, tiles=(128, 128, 32, 8))


@hopper_gpu
def test_kernels_gelu_math_is_accurate_value_by_value_on_gpu():
    """With identity blocks and unit gradients the kernels return gelu_tanh(x) and gelu_tanh'(x) themselves: each
    value within bf16 rounding (2^-8 relative) plus 2^-9 absolute of the fp64 function over x in [-8, 8] (the
    hardware tanh's error where 1 + tanh(u) cancels, for negative x, stays under that absolute term)."""
    x = torch.linspace(-8, 8, 128 * 256, device="cuda", dtype=torch.float64).view(128, 256)
    xb = x.bfloat16()
    xd = xb.double()
    eye = torch.eye(128, device="cuda", dtype=torch.bfloat16).unsqueeze(0)
    dpre = HP.dgelu_blocks(torch.ones(128, 256, device="cuda", dtype=torch.bfloat16), eye, xb, True)
    want = torch.ops.aten.gelu_backward(torch.ones_like(xd), xd, approximate="tanh")
    err = (dpre.double() - want).abs() - 2 ** -8 * want.abs()
    assert err.max().item() <= 2 ** -9, err.max().item()
    act, pre = HP.gelu_blocks_interleaved(xb, eye, None, 256)
    want = torch.nn.functional.gelu(xd, approximate="tanh")
    assert torch.equal(pre, xb)
    err = (act.double() - want).abs() - 2 ** -8 * want.abs()
    assert err.max().item() <= 2 ** -9, err.max().item()


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9),
                    reason="needs a Hopper GPU")
@pytest.mark.parametrize("L,S,R,t", [(2, 1024, 1024, 4096), (2, 72, 40, 264), (2, 512, 256, 2048), (2, 24, 16, 136)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_interleave_kernel_equals_reference_on_gpu(L, S, R, t, bias, dtype):
    import slimkit.structured.interleave as IL
    g = torch.Generator(device="cuda").manual_seed(0)
    w = (torch.randn(L, S, R, device="cuda", generator=g) / R ** 0.5).to(dtype)
    h = torch.randn(R * L, t, device="cuda", generator=g).to(dtype)
    b = torch.randn(S * L, device="cuda", generator=g).to(dtype) if bias else None
    assert IL.kernel_applies(h, w)
    y = IL._kernel(h, w, b)
    want = IL.token_major_blocks_reference(h.double(), w.double(), None if b is None else b.double())
    assert y is not None and y.dtype == dtype
    assert ((y.double() - want).norm() / want.norm()).item() < 5e-3
