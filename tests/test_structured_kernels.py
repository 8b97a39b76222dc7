"""The fused FFN kernels (slimkit.structured.kernels) against their PyTorch references, run on the CPU through
Triton's interpreter; fused_ffn's forward and every gradient against the eager FFN."""
import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

triton = pytest.importorskip("triton")

# Triton decides interpreted vs compiled when it is first imported, so the kernel tests run in a child pytest
# with TRITON_INTERPRET=1 set from the start; in this process only the test that launches it runs.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
inner = pytest.mark.skipif(not INTERPRETED, reason="runs in the interpreted child (test_kernels_interpreted)")


@pytest.mark.skipif(INTERPRETED, reason="this is the child")
@pytest.mark.skipif(tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 8),
                    reason="Triton's interpreter before 3.8 fails on numpy 2 (scalar __index__)")
def test_kernels_interpreted():
    env = {**os.environ, "TRITON_INTERPRET": "1", "SLIMKIT_FUSED_FFN": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__], env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert " passed" in last and "failed" not in last and "error" not in last, last


@pytest.fixture(scope="module")
def K():
    import slimkit.structured.kernels as kernels
    assert kernels.INTERPRET and kernels.available(torch.zeros(1))
    return kernels


APPROX = ["none", "tanh"]


@inner
@pytest.mark.parametrize("approximate", APPROX)
def test_gelu_grad_reference_is_the_derivative(K, approximate):
    x = torch.linspace(-6, 6, 301, dtype=torch.float64, requires_grad=True)
    F.gelu(x, approximate=approximate).sum().backward()
    assert torch.allclose(K.gelu_grad_ref(x.detach(), approximate), x.grad, atol=1e-12)


@inner
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_gelu_matches_reference(K, approximate, bias):
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(37, 24, generator=g), torch.randn(50, 24, generator=g)   # no size a tile multiple
    b = torch.randn(50, generator=g) if bias else None
    act, pre = K.linear_gelu(h, w, b, approximate)
    ref_act, ref_pre = K.linear_gelu_ref(h, w, b, approximate)
    torch.testing.assert_close(pre, ref_pre, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(act, ref_act, rtol=1e-5, atol=1e-5)


@inner
@pytest.mark.parametrize("approximate", APPROX)
def test_gelu_linear_backward_matches_reference(K, approximate):
    g = torch.Generator().manual_seed(1)
    dz, u, pre = torch.randn(37, 20, generator=g), torch.randn(20, 45, generator=g), torch.randn(37, 45, generator=g)
    dpre, db = K.gelu_linear_backward(dz, u.t().contiguous().t(), pre, approximate)   # u strided, not contiguous
    ref, ref_db = K.gelu_linear_backward_ref(dz, u, pre, approximate)
    torch.testing.assert_close(dpre, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(db, ref_db, rtol=1e-5, atol=1e-4)
    assert K.gelu_linear_backward(dz, u, pre, approximate, bias=False)[1] is None


@inner
@pytest.mark.parametrize("approximate", APPROX)
def test_gelu_backward_matches_reference(K, approximate):
    g = torch.Generator().manual_seed(2)
    dact, pre = torch.randn(33, 40, generator=g), torch.randn(33, 40, generator=g)
    dpre, db = K.gelu_backward(dact, pre, approximate)
    ref, ref_db = K.gelu_backward_ref(dact, pre, approximate)
    torch.testing.assert_close(dpre, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(db, ref_db, rtol=1e-5, atol=1e-5)


def _layers(kind1, kind2, d=16, hdim=48):
    from slimkit.structured import make_linear
    torch.manual_seed(3)
    fc1 = nn.Linear(d, hdim) if kind1 == "dense" else make_linear(kind1, d, hdim, 0.5, rel_tol=0.5)
    fc2 = nn.Linear(hdim, d) if kind2 == "dense" else make_linear(kind2, hdim, d, 0.5, rel_tol=0.5)
    for p in list(fc1.parameters()) + list(fc2.parameters()):   # non-zero biases, so their gradients are tested
        if p.dim() == 1:
            nn.init.normal_(p, std=0.5)
    return fc1, fc2


@inner
@pytest.mark.parametrize("kind1,kind2", [("dense", "dense"), ("lowrank", "lowrank"), ("blockdense", "lowrank"),
                                         ("lowrank", "blockdense"), ("blockdense", "blockshuffle")])
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("matmul", ["triton", "cublas"])
def test_fused_ffn_equals_eager_forward_and_gradients(K, kind1, kind2, approximate, matmul):
    fc1, fc2 = _layers(kind1, kind2)
    params = list(fc1.parameters()) + list(fc2.parameters())
    x = torch.randn(3, 7, 16, requires_grad=True)          # a leading batch dimension, 21 tokens
    grad = torch.randn(3, 7, 16)

    def run(fn):
        for p in params:
            p.grad = None
        x.grad = None
        y = fn(x)
        y.backward(grad)
        return y.detach(), x.grad.clone(), [p.grad.clone() for p in params]

    y, dx, dps = run(lambda t: K.fused_ffn(fc1, fc2, t, approximate, matmul))
    y0, dx0, dps0 = run(lambda t: fc2(F.gelu(fc1(t), approximate=approximate)))
    torch.testing.assert_close(y, y0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dx0, rtol=1e-5, atol=1e-5)
    for a, b in zip(dps, dps0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    def penalty_grads(fn):       # second order: d/dparams of |d out / d x|^2
        gx, = torch.autograd.grad((fn(x) * grad).sum(), x, create_graph=True)
        gs = torch.autograd.grad(gx.square().sum(), params, allow_unused=True)    # (fc2's bias: unused)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)]
    for a, b in zip(penalty_grads(lambda t: K.fused_ffn(fc1, fc2, t, approximate, matmul)),
                    penalty_grads(lambda t: fc2(F.gelu(fc1(t), approximate=approximate)))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@inner
def test_fused_ffn_falls_back_where_the_kernels_do_not_apply(K):
    fc1, fc2 = _layers("blockshuffle", "dense")                # fc1 ends block-diagonal
    assert not K.supported(fc1) and K.supported(nn.Linear(4, 4)) and not K.supported(nn.Linear(4, 4), "swiglu")
    x = torch.randn(5, 16)
    torch.testing.assert_close(K.fused_ffn(fc1, fc2, x), fc2(F.gelu(fc1(x))))


@inner
@pytest.mark.parametrize("matmul", ["triton", "cublas"])
def test_fused_ffn_under_autocast_casts_the_bias_as_eager_does(K, matmul):
    """fp32 layers with biases under fp16 autocast: the fused FFN computes in fp16 as the eager one does (the
    cuBLAS path passed the fp32 bias to an fp16 matmul and failed), gradients reach the fp32 parameters."""
    fc1, fc2 = _layers("lowrank", "dense")
    x = torch.randn(9, 16)
    with torch.autocast("cpu", dtype=torch.float16):
        y = K.fused_ffn(fc1, fc2, x, "tanh", matmul)
        y0 = fc2(F.gelu(fc1(x), approximate="tanh"))
    assert y.dtype == y0.dtype == torch.float16
    torch.testing.assert_close(y.float(), y0.float(), rtol=1e-2, atol=1e-2)
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in fc1.parameters())


gpu = pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled kernels)")


@gpu
@pytest.mark.parametrize("kind1,kind2", [("dense", "dense"), ("lowrank", "lowrank"), ("blockdense", "blockdense")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("matmul", ["triton", "cublas"])
def test_fused_ffn_on_gpu_equals_eager(kind1, kind2, dtype, matmul):
    """fp32: the fused FFN equals the eager one to 1e-4. bf16: both are compared with the fp32 computation, and
    the fused one's error is no worse than eager's (GELU on the fp32 accumulator rounds differently, so the
    two bf16 results differ by rounding noise that sums up in the weight gradients; neither is 'the' answer)."""
    import copy
    from slimkit.structured import kernels as K
    from slimkit.structured import make_linear
    torch.manual_seed(0)
    d, hdim = 256, 1024
    fc1 = (nn.Linear(d, hdim) if kind1 == "dense" else make_linear(kind1, d, hdim, 0.32)).cuda()
    fc2 = (nn.Linear(hdim, d) if kind2 == "dense" else make_linear(kind2, hdim, d, 0.32)).cuda()
    ref1, ref2 = copy.deepcopy(fc1), copy.deepcopy(fc2)              # fp32 copies
    fc1, fc2 = fc1.to(dtype), fc2.to(dtype)
    x = torch.randn(2, 300, d, device="cuda")
    grad = torch.randn(2, 300, d, device="cuda")

    def run(f1, f2, fn, dt):
        params = list(f1.parameters()) + list(f2.parameters())
        for p in params:
            p.grad = None
        t = x.to(dt).requires_grad_(True)
        torch.backends.cuda.matmul.allow_tf32 = False
        y = fn(f1, f2, t)
        y.backward(grad.to(dt))
        return [y.detach().float(), t.grad.float()] + [p.grad.float() for p in params]

    fused = run(fc1, fc2, lambda f1, f2, t: K.fused_ffn(f1, f2, t, "tanh", matmul), dtype)
    eager = run(fc1, fc2, lambda f1, f2, t: f2(F.gelu(f1(t), approximate="tanh")), dtype)
    if dtype == torch.float32:
        for a, b in zip(fused, eager):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        return
    exact = run(ref1, ref2, lambda f1, f2, t: f2(F.gelu(f1(t), approximate="tanh")), torch.float32)
    for a, b, r in zip(fused, eager, exact):
        err_fused, err_eager = ((a - r).abs().max() / r.abs().max()).item(), ((b - r).abs().max() / r.abs().max()).item()
        assert err_fused <= 1.5 * err_eager + 1e-3, (err_fused, err_eager)


# ---------- feature-major BlockShuffle: transpose and bias + GELU kernels ----------

def _fm_device():
    """CUDA (compiled kernels) in this process, the CPU in the interpreted child; else skip."""
    if INTERPRETED:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    pytest.skip("needs a CUDA GPU or Triton's interpreter")


@pytest.mark.parametrize("shape", [(1, 1), (37, 130), (64, 64), (200, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transpose_kernel_is_bit_exact(shape, dtype):
    import slimkit.structured.kernels as K
    dev = _fm_device()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(4)).to(dev, dtype)
    assert K.available(x)
    y = K.transpose(x)
    assert y.is_contiguous() and torch.equal(y, x.t().contiguous())
    b = torch.randn(shape[0], generator=torch.Generator().manual_seed(5)).to(dev, dtype)
    # rounded once, as torch: exactly on the GPU; Triton's interpreter rounds fp32 -> bf16 its own way (1 ulp)
    tol = 2 ** -7 if INTERPRETED and dtype == torch.bfloat16 else 0
    torch.testing.assert_close(K.transpose(x, b), x.t() + b, rtol=tol, atol=tol)
    yt, sums = K.transpose_colsum(x)
    assert torch.equal(yt, x.t().contiguous())
    torch.testing.assert_close(sums.float(), x.float().sum(0), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                               atol=1e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("shape", [(64, 2, 8, 8, 2), (48, 4, 4, 4, 4), (32, 1, 4, 4, 1)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("approximate", APPROX)
def test_blockshuffle_ffn_small_tokens_matches_the_layers(monkeypatch, shape, bias, approximate):
    """At decoding token counts, without gradients, two BlockShuffle layers run as four small-token kernels
    (blockshuffle_ffn_small: each layout, interleave, bias and GELU in the strides and epilogues): equal to the
    layers called one by one, in fp64, for 1 to 64 tokens in 2-D and 3-D inputs; with gradients wanted, or past
    64 tokens, the general path runs (and the output differentiates)."""
    import slimkit.structured.kernels as K
    from slimkit.structured.layers import BlockShuffleLinear
    dev = _fm_device()
    monkeypatch.setattr(K, "SMALL_EAGER", True)         # eager calls take them too (on a GPU: only in graphs)
    d, k, l, k2, l2 = shape
    torch.manual_seed(7)
    fc1 = BlockShuffleLinear(d, 4 * d, k, bias=bias, nblocks2=l).to(dev)
    fc2 = BlockShuffleLinear(4 * d, d, k2, bias=bias, nblocks2=l2).to(dev)
    if bias:
        with torch.no_grad():
            fc1.bias.normal_()
            fc2.bias.normal_()
    ref1, ref2 = (copy.deepcopy(m).double().cpu() for m in (fc1, fc2))
    for xs in [(1, d), (7, d), (64, d), (2, 5, d), (2, 32, d)]:
        x = torch.randn(*xs, device=dev)
        want = ref2(F.gelu(ref1(x.double().cpu()), approximate=approximate))
        with torch.no_grad():
            assert K.small_applies(fc1, fc2, x)
            got = K.blockshuffle_ffn(fc1, fc2, x, approximate)
        assert got.shape == want.shape and got.dtype == x.dtype
        assert ((got.double().cpu() - want).norm() / want.norm()).item() < 1e-5
    x = torch.randn(65, d, device=dev)
    with torch.no_grad():
        assert not K.small_applies(fc1, fc2, x)
    x = torch.randn(3, d, device=dev)
    assert not K.small_applies(fc1, fc2, x)              # the parameters want gradients
    out = K.blockshuffle_ffn(fc1, fc2, x, approximate)
    out.sum().backward()
    assert fc1.w1.grad is not None and fc2.w2.grad is not None


def _layer(kind, i, o, bias):
    from slimkit.structured.layers import BlockDenseLinear, BlockShuffleLinear, LowRankLinear
    if kind == "lowrank":
        return LowRankLinear(i, o, 8, bias=bias)
    if kind == "blockdense":
        return BlockDenseLinear(i, o, 16, 2, bias=bias)
    return BlockShuffleLinear(i, o, 4, bias=bias, nblocks2=2)


@pytest.mark.parametrize("kinds", [("lowrank", "lowrank"), ("blockdense", "blockdense"), ("lowrank", "blockshuffle"),
                                   ("blockshuffle", "blockdense")])
@pytest.mark.parametrize("split_min_k", [2048, 16])
def test_structured_ffn_small_tokens_matches_the_layers(monkeypatch, kinds, split_min_k):
    """Low-rank, BlockDense and mixed structured pairs at decoding token counts, without gradients, run as one
    small-token kernel a factor (eager_ffn -> structured_ffn_small), K split into parts where a factor is short
    and deep (split_min_k 16 splits the tiny test factors: the parts' fp32 tiles added by the last one in): equal
    to the layers called one by one, in fp64, for 1 to 64 tokens in 2-D and 3-D inputs, with and without biases;
    with gradients wanted the layers' own path runs and differentiates."""
    import slimkit.structured.kernels as K
    dev = _fm_device()
    monkeypatch.setattr(K, "SPLIT_MIN_K", split_min_k)
    monkeypatch.setattr(K, "SMALL_EAGER", True)
    monkeypatch.setattr(K, "SPLIT_PART", min(split_min_k, K.SPLIT_PART))
    torch.manual_seed(11)
    for bias in (True, False):
        fc1, fc2 = _layer(kinds[0], 32, 128, bias).to(dev), _layer(kinds[1], 128, 32, bias).to(dev)
        if bias:
            with torch.no_grad():
                fc1.bias.normal_()
                fc2.bias.normal_()
        sms = K._sms(torch.device(dev))
        splits = [K._small_plan(*w.shape, sms)[2] for layer in (fc1, fc2) for w, _ in K._small_factors(layer)]
        assert (max(splits) > 1) == (split_min_k == 16)      # the parts are exercised where meant
        ref1, ref2 = (copy.deepcopy(m).double().cpu() for m in (fc1, fc2))
        for xs in [(1, 32), (5, 32), (64, 32), (2, 7, 32)]:
            x = torch.randn(*xs, device=dev)
            want = ref2(F.gelu(ref1(x.double().cpu()), approximate="tanh"))
            with torch.no_grad():
                assert K.small_applies(fc1, fc2, x)
                got = K.eager_ffn(fc1, fc2, x, "tanh")
            assert got.shape == want.shape and got.dtype == x.dtype
            assert ((got.double().cpu() - want).norm() / want.norm()).item() < 1e-5
    x = torch.randn(3, 32, device=dev)
    assert not K.small_applies(fc1, fc2, x)              # the parameters want gradients
    K.eager_ffn(fc1, fc2, x).sum().backward()
    assert all(q.grad is not None for q in fc1.parameters())


def test_small_token_kernels_run_in_graph_warmups_and_only_seen_calls_in_captures(monkeypatch):
    """Called eagerly an FFN at decoding token counts is bound by the host's launches, so by default (off the
    interpreter) the small-token kernels run only in graph_warmup() (graphed's warm-up and capture); in a CUDA-graph
    capture they run only for an FFN call they already ran for outside one, never compiling in the capture. The
    results are the layers' either way."""
    import slimkit.structured.kernels as K
    dev = _fm_device()
    monkeypatch.setattr(K, "SMALL_EAGER", False)
    monkeypatch.setattr(K, "_SMALL_SEEN", set())
    runs = []
    real = K.structured_ffn_small
    monkeypatch.setattr(K, "structured_ffn_small", lambda *a: runs.append(1) or real(*a))
    torch.manual_seed(2)
    fc1, fc2 = _layer("lowrank", 32, 128, True).to(dev), _layer("blockdense", 128, 32, True).to(dev)
    x = torch.randn(4, 32, device=dev)
    with torch.no_grad():
        want = fc2(F.gelu(fc1(x)))
        capturing = [False]
        monkeypatch.setattr(K, "_capturing", lambda x: capturing[0])
        capturing[0] = True
        torch.testing.assert_close(K.eager_ffn(fc1, fc2, x), want, rtol=1e-5, atol=1e-5)
        assert runs == []                               # never seen: not in a capture
        capturing[0] = False
        torch.testing.assert_close(K.eager_ffn(fc1, fc2, x), want, rtol=1e-5, atol=1e-5)
        assert runs == []                               # eager: the layers' path
        with K.graph_warmup():
            torch.testing.assert_close(K.eager_ffn(fc1, fc2, x), want, rtol=1e-5, atol=1e-5)
        assert runs == [1] and K._GRAPH_WARMUP == [0]
        capturing[0] = True
        torch.testing.assert_close(K.eager_ffn(fc1, fc2, x), want, rtol=1e-5, atol=1e-5)
        assert runs == [1, 1]                           # seen in the warm-up: captured
        torch.testing.assert_close(K.eager_ffn(fc1, fc2, x[:3]), want[:3], rtol=1e-5, atol=1e-5)
        assert runs == [1, 1]                           # another token count: not seen


def test_small_plan_splits_short_deep_factors_into_whole_parts():
    """_small_plan's split-K: a factor with fewer row tiles than SMs and a K of SPLIT_MIN_K or more (low-rank's U
    on the hidden width) is split into parts of at least SPLIT_PART, a whole number of BK steps each, that cover
    K once, about 3/4 of a program an SM in all; a short K, or enough row tiles for the SMs, is not split."""
    import slimkit.structured.kernels as K
    for nb, f, k in [(1, 512, 8192), (1, 384, 2048), (4, 320, 2048), (1, 8192, 512), (1, 2048, 1280), (4, 160, 512),
                     (1, 1664, 16384), (1, 16384, 1664), (8, 512, 2048)]:
        bf, bk, split, ks = K._small_plan(nb, f, k, 132)
        assert ks % bk == 0 and (split - 1) * ks < k <= split * ks
        tiles = nb * -(-f // bf)
        assert (split > 1) == (k >= K.SPLIT_MIN_K and tiles < 132)
        assert split == 1 or (ks >= K.SPLIT_PART and tiles * (split - 1) < 99)
    assert K._small_plan(1, 512, 8192, 132)[:3] == (64, 128, 13) and K._small_plan(1, 8192, 512, 132)[2] == 1


def test_blockshuffle_ffn_small_tokens_follow_autocast(monkeypatch):
    """Under autocast the layers compute in its dtype (monarch_product casts x and the weights): the small-token
    kernels cast nothing, so with fp32 layers they returned fp32 (and computed in fp32) where the layers and the
    general path give the autocast dtype; they must leave that to the general path, and may run where x and the
    layers are in the autocast dtype already."""
    import slimkit.structured.kernels as K
    from slimkit.structured.layers import BlockShuffleLinear
    dev = _fm_device()
    monkeypatch.setattr(K, "SMALL_EAGER", True)
    torch.manual_seed(3)
    fc1 = BlockShuffleLinear(24, 96, 3, nblocks2=6).to(dev)
    fc2 = BlockShuffleLinear(96, 24, 4, nblocks2=2).to(dev)
    x = torch.randn(2, 3, 24, device=dev)
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16):
        want = fc2(F.gelu(fc1(x)))
        got = K.blockshuffle_ffn(fc1, fc2, x)
        small = K.small_applies(fc1, fc2, x)
        assert K.small_applies(fc1.bfloat16(), fc2.bfloat16(), x.bfloat16())   # nothing to cast
    assert got.dtype == want.dtype == torch.bfloat16 and not small
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_small_token_kernels_that_fail_fall_back_with_one_warning(monkeypatch):
    """A Triton or GPU the small-token kernels do not build on: one warning, the general path's result, and the
    kernels off for the rest of the process."""
    import slimkit.structured.kernels as K
    from slimkit.structured.layers import BlockShuffleLinear
    dev = _fm_device()
    fc1 = BlockShuffleLinear(32, 128, 2, nblocks2=4).to(dev)
    fc2 = BlockShuffleLinear(128, 32, 4, nblocks2=2).to(dev)
    x = torch.randn(5, 32, device=dev)

    def broken(*a, **k):
        raise RuntimeError("PassManager::run failed")
    monkeypatch.setattr(K, "_blocks_small_kernel", type("Launch", (), {"__getitem__": lambda self, grid: broken})())
    monkeypatch.setattr(K, "SMALL_FFN", True)
    monkeypatch.setattr(K, "SMALL_EAGER", True)
    with torch.no_grad():
        want = fc2(F.gelu(fc1(x)))
        with pytest.warns(UserWarning, match="small-token FFN kernels failed"):
            got = K.blockshuffle_ffn(fc1, fc2, x)
        assert not K.SMALL_FFN and not K.small_applies(fc1, fc2, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_small_token_path_checks_shapes_and_arguments(monkeypatch):
    """The small-token kernels trust the layers' shapes: an fc2 narrower than fc1's output made them read part of
    the hidden activations and return a result where the layers (and the general path) raise. And an argument
    error raised inside them (x's width, an unknown approximate) was taken for a kernel that fails to build:
    a warning blaming the kernels, and the kernels off for the rest of the process."""
    import warnings
    import slimkit.structured.kernels as K
    from slimkit.structured.layers import BlockShuffleLinear
    dev = _fm_device()
    monkeypatch.setattr(K, "SMALL_FFN", True)
    monkeypatch.setattr(K, "SMALL_EAGER", True)
    fc1 = BlockShuffleLinear(24, 96, 3, nblocks2=6).to(dev)
    fc2 = BlockShuffleLinear(96, 24, 4, nblocks2=2).to(dev)
    narrow = BlockShuffleLinear(48, 24, 4, nblocks2=2).to(dev)
    x = torch.randn(5, 24, device=dev)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError):
            narrow(F.gelu(fc1(x)))
        with pytest.raises(RuntimeError):
            K.blockshuffle_ffn(fc1, narrow, x)
        with pytest.raises(RuntimeError):
            K.blockshuffle_ffn(fc1, fc2, torch.randn(4, 12, device=dev))     # 48 values: 2 rows of 24
        with pytest.raises(KeyError):
            K.blockshuffle_ffn(fc1, fc2, x, "Tanh")
        assert K.SMALL_FFN and K.small_applies(fc1, fc2, x)
        torch.testing.assert_close(K.blockshuffle_ffn(fc1, fc2, x), fc2(F.gelu(fc1(x))), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 1), (65, 17), (256, 130), (5, 2048)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_partial_sums_finish_in_one_kernel(shape, dtype):
    """_sum_rows, which finishes the kernels' per-tile partial sums (bias gradients): every column summed over
    every row (shapes off its 64 x 16 tiles included), rounded once to the result's dtype, the same bits twice."""
    import slimkit.structured.kernels as K
    dev = _fm_device()
    part = torch.randn(*shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    got = K._sum_rows(part.float().to(dev), dtype)
    assert got.dtype == dtype and got.shape == (shape[1], )
    want = part.sum(0)
    tol = 2 ** -7 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.double().cpu(), want, rtol=tol, atol=tol * shape[0] ** 0.5)
    assert torch.equal(got, K._sum_rows(part.float().to(dev), dtype))


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("shape", [(48, 37), (5, 300)])
def test_bias_gelu_rows_matches_reference(approximate, shape):
    """Kernel against the PyTorch expression in fp32: values, and the gradients of h and of the bias (whose row
    sums are added per token tile)."""
    import slimkit.structured.kernels as K
    dev = _fm_device()
    g = torch.Generator().manual_seed(5)
    h = torch.randn(*shape, generator=g).to(dev).requires_grad_(True)
    b = torch.randn(shape[0], generator=g).to(dev).requires_grad_(True)
    dact = torch.randn(*shape, generator=g).to(dev)
    got = K.bias_gelu_rows(h, b, approximate)
    want = F.gelu(h + b[:, None], approximate=approximate)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    dh, db = torch.autograd.grad(got, [h, b], dact, create_graph=True)
    dh0, db0 = torch.autograd.grad(want, [h, b], dact, create_graph=True)
    torch.testing.assert_close(dh, dh0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(db, db0, rtol=1e-4, atol=1e-4)
    # second order (a gradient penalty): the kernel's backward is differentiable too
    for a, b_ in zip(torch.autograd.grad(dh.square().sum() + db.sum(), [h, b]),
                     torch.autograd.grad(dh0.square().sum() + db0.sum(), [h, b])):
        torch.testing.assert_close(a, b_, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bias", [True, False])
def test_blockshuffle_ffn_with_kernels_equals_layer_by_layer(bias):
    """The feature-major FFN with its kernels (transpose, bias + GELU) against the eager layers, fp32."""
    from slimkit.structured import BlockShuffleLinear
    import slimkit.structured.kernels as K
    dev = _fm_device()
    torch.manual_seed(6)
    fc1 = BlockShuffleLinear(32, 128, 2, bias=bias, nblocks2=8).to(dev)
    fc2 = BlockShuffleLinear(128, 32, 8, bias=bias, nblocks2=2).to(dev)
    if bias:
        nn.init.normal_(fc1.bias), nn.init.normal_(fc2.bias)
    x = torch.randn(3, 41, 32, device=dev, requires_grad=True)
    params = [x, *fc1.parameters(), *fc2.parameters()]
    want = fc2(F.gelu(fc1(x), approximate="tanh"))
    grad = torch.randn_like(want)
    got = K.blockshuffle_ffn(fc1, fc2, x, "tanh")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for a, b in zip(torch.autograd.grad(got, params, grad), torch.autograd.grad(want, params, grad)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@inner
@pytest.mark.parametrize("L,S,R,t", [(2, 32, 48, 40), (2, 16, 32, 24), (2, 40, 24, 16), (2, 24, 16, 8)])
@pytest.mark.parametrize("bias", [False, True])
def test_interleave_kernel_matches_reference(L, S, R, t, bias):
    """The token-major second-factor kernel (interpreted, fp16) against the fp64 reference: token counts that end
    part-way through a tile (its last tile reads past block j's columns into block j+1's) and rows that do not
    fill the last row tile."""
    import slimkit.structured.interleave as IL
    g = torch.Generator().manual_seed(7)
    w = (torch.randn(L, S, R, generator=g) / R ** 0.5).half()
    h = torch.randn(R * L, t, generator=g).half()
    b = torch.randn(S * L, generator=g).half() if bias else None
    assert IL.kernel_applies(h, w) and not IL.kernel_applies(h.bfloat16(), w.bfloat16())
    four = torch.zeros(4, 16, 16, dtype=torch.float16)        # four blocks: the matmul and the transpose
    assert IL.kernel_applies(torch.zeros(32, 16, dtype=torch.float16), four[:2])
    assert not IL.kernel_applies(torch.zeros(64, 16, dtype=torch.float16), four)
    y = IL._kernel(h, w, b)
    want = IL.token_major_blocks_reference(h.double(), w.double(), None if b is None else b.double())
    assert y is not None and y.dtype == torch.float16 and y.shape == (t, S * L)
    torch.testing.assert_close(y.double(), want, rtol=2e-3, atol=2e-3)
    for j in range(L):      # a block's stored values read nothing of the other's (its overreads land past T or S)
        hp, wp = h.clone(), w.clone()
        hp[1 - j::L], wp[1 - j] = float("nan"), float("nan")
        assert torch.equal(IL._kernel(hp, wp, b)[:, j::L], y[:, j::L])
    flat = torch.zeros(1 + w.numel(), dtype=w.dtype)         # a weight 2 bytes into a flat buffer (as FSDP's)
    w_off = flat[1:].view_as(w).copy_(w)
    assert w_off.data_ptr() % 16 and IL.kernel_applies(h, w_off)
    torch.testing.assert_close(IL._kernel(h, w_off, b), y, rtol=0, atol=0)


@inner
@pytest.mark.parametrize("l", [1, 2, 4])
def test_monarch_product_through_the_interleave_kernel(monkeypatch, l):
    """A BlockShuffle layer's token-major output (fp16, interpreted; the kernel at two second-factor blocks, cuBLAS
    at one, the matmul and the transpose at four): forward and every gradient against the same layer in fp64."""
    import slimkit.structured.interleave as IL
    from slimkit.structured.layers import monarch_product
    ran = []
    kernel = IL._kernel
    monkeypatch.setattr(IL, "_kernel", lambda *a: ran.append(a[0].dtype) or kernel(*a))
    g = torch.Generator().manual_seed(8)
    i, o, t = 32, 64, 24
    x = torch.randn(t, i, generator=g)
    w1 = torch.randn(2, 16, 16, generator=g) / 4
    w2 = torch.randn(l, o // l, 32 // l, generator=g) / 4
    b = torch.randn(o, generator=g)
    grad = torch.randn(t, o, generator=g)
    outs = []
    for dt in (torch.float16, torch.float64):
        leaves = [a.to(dt).requires_grad_() for a in (x, w1, w2, b)]
        y = monarch_product(leaves[0], leaves[1], leaves[2], bias=leaves[3])
        outs.append([y, *torch.autograd.grad(y, leaves, grad.to(dt))])
    assert ran == ([torch.float16] if l == 2 else [])
    for got, want in zip(*outs):
        torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=1e-2)
