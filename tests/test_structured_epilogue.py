"""fused_ffn(matmul="cublaslt") (slimkit.structured.epilogue): the autograd wiring around the cuBLASLt epilogues,
checked on the CPU with the epilogues' PyTorch definitions standing in for nvmath, against the eager FFN; the
fallbacks; and, on a CUDA machine with nvmath-python, the real epilogues against the eager FFN."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimkit.structured.epilogue as EP
from slimkit.structured import BlockShuffleLinear, make_linear
import slimkit.structured.kernels as K
from slimkit.structured.kernels import fused_ffn


def _ffn(kind1: str, kind2: str, bias: bool, d: int = 16, hidden: int = 64, ratio: float = 0.5):
    torch.manual_seed(0)
    fc1 = nn.Linear(d, hidden, bias=bias) if kind1 == "dense" else make_linear(kind1, d, hidden, ratio, bias)
    fc2 = nn.Linear(hidden, d, bias=bias) if kind2 == "dense" else make_linear(kind2, hidden, d, ratio, bias)
    if bias:
        with torch.no_grad():      # the layers start with zero biases: make the bias gradients and adds matter
            fc1.bias.normal_(0, 0.5)
            fc2.bias.normal_(0, 0.5)
    return fc1, fc2


def _run(fc1, fc2, x, grad, fn):
    params = list(fc1.parameters()) + list(fc2.parameters())
    for p in params:
        p.grad = None
    t = x.clone().requires_grad_(True)
    y = fn(fc1, fc2, t)
    y.backward(grad)
    return [y.detach(), t.grad] + [p.grad for p in params]


def eager(fc1, fc2, t):
    return fc2(F.gelu(fc1(t), approximate="tanh"))


@pytest.mark.parametrize("kind1,kind2", [("dense", "dense"), ("lowrank", "lowrank"), ("blockdense", "dense"),
                                         ("lowrank", "blockdense"), ("dense", "blockshuffle"),
                                         ("blockdense", "blockdense"), ("blockshuffle", "lowrank")])
@pytest.mark.parametrize("bias", [True, False])
def test_cublaslt_wiring_equals_eager_with_reference_epilogues(monkeypatch, kind1, kind2, bias):
    """With reference_matmul in place of nvmath, the forward and every gradient equal the eager FFN's (fp32):
    the operand orders, transposes and the saved pre-activation are what the epilogues need. fc2 starting
    block-diagonal takes the batched DGELU over its blocks (GeluUpBlock), a dense start the DGELU backward
    (GeluUpDown); an fc1 ending block-diagonal (BlockShuffle) runs eager."""
    monkeypatch.setattr(EP, "_matmul", EP.reference_matmul)
    monkeypatch.setattr(EP, "available", lambda x: True)
    calls = []
    monkeypatch.setattr(EP.GeluFFN, "forward", _spy(EP.GeluFFN.forward, calls))
    fc1, fc2 = _ffn(kind1, kind2, bias)
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(1))
    grad = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(2))
    got = _run(fc1, fc2, x, grad, lambda a, b, t: fused_ffn(a, b, t, "tanh", matmul="cublaslt"))
    want = _run(fc1, fc2, x, grad, eager)
    tail = "dense" if kind2 in ("dense", "lowrank") else "block"
    assert calls == ([] if kind1 == "blockshuffle" else [(kind1, tail)])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    before, infer = list(calls), []
    ffn_infer = EP.ffn_infer
    monkeypatch.setattr(EP, "ffn_infer", lambda *a: infer.append(a[-2:]) or ffn_infer(*a))
    for min_tokens in (0, 15):   # inference: the epilogues without the pre-activation, no autograd Function, from
        monkeypatch.setattr(K, "INFER_MIN_TOKENS", min_tokens)       # INFER_MIN_TOKENS on (14 tokens here)
        with torch.no_grad():
            torch.testing.assert_close(fused_ffn(fc1, fc2, x, "tanh", matmul="cublaslt"), want[0], rtol=1e-5, atol=1e-5)
    assert calls == before
    assert infer == ([] if kind1 in ("dense", "blockshuffle") else [(kind1, tail)])    # a dense fc1 runs eager
    params = list(fc1.parameters()) + list(fc2.parameters())

    def penalty_grads(fn):       # second order (a gradient penalty): the epilogue functions' backward differentiates
        t = x.clone().requires_grad_(True)
        gx, = torch.autograd.grad((fn(fc1, fc2, t) * grad).sum(), t, create_graph=True)
        gs = torch.autograd.grad(gx.square().sum(), params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)]
    for a, b in zip(penalty_grads(lambda a, b, t: fused_ffn(a, b, t, "tanh", matmul="cublaslt")), penalty_grads(eager)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ratio", [0.25, 0.5])
@pytest.mark.parametrize("bias", [True, False])
def test_blockshuffle_pair_runs_the_shuffle_epilogues_as_eager_does(monkeypatch, ratio, bias):
    """Two BlockShuffle layers take ShuffleGeluFFN (feature-major, fc1's bias carried by ones rows into the
    GELU_AUX matmuls, GELU' in DGELU matmuls; reference epilogues in place of nvmath): the output and every
    gradient, fc1's bias gradient (the ones rows' column of the weight gradient) included, equal the eager FFN's;
    so do inference (no pre-activation written) and a gradient penalty. A token count that breaks the epilogues'
    8-element alignment runs eager."""
    monkeypatch.setattr(EP, "_matmul", EP.reference_matmul)
    monkeypatch.setattr(EP, "available", lambda x: True)
    calls = []
    forward = EP.ShuffleGeluFFN.forward
    monkeypatch.setattr(EP.ShuffleGeluFFN, "forward",
                        staticmethod(lambda ctx, *a: calls.append(a[-1]) or forward(ctx, *a)))
    fc1, fc2 = _ffn("blockshuffle", "blockshuffle", bias, d=64, hidden=256, ratio=ratio)
    assert (fc1.nblocks, fc1.nblocks2) == ((2, 8) if ratio == 0.25 else (1, 4))     # two block layouts
    assert K.lt_supported(fc1, fc2) and EP.shuffle_applies(fc1, fc2, 16, torch.float32)
    fused = lambda a, b, t: fused_ffn(a, b, t, "tanh", matmul="cublaslt")  # noqa: E731
    x = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(1))
    grad = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(2))
    want = _run(fc1, fc2, x, grad, eager)
    for a, b in zip(_run(fc1, fc2, x, grad, fused), want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert calls == [True]
    monkeypatch.setattr(K, "INFER_MIN_TOKENS", 0)
    with torch.no_grad():
        torch.testing.assert_close(fused(fc1, fc2, x), want[0], rtol=1e-5, atol=1e-5)
    assert calls == [True, False]
    params = list(fc1.parameters()) + list(fc2.parameters())

    def penalty_grads(fn):
        t = x.clone().requires_grad_(True)
        gx, = torch.autograd.grad((fn(fc1, fc2, t) * grad).sum(), t, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), params, allow_unused=True)
    for a, b in zip(penalty_grads(fused), penalty_grads(eager)):
        if b is None:
            assert a is None or not a.abs().any()
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    narrow = BlockShuffleLinear(64, 256, 2, bias=False, nblocks2=16)      # w2 rows of 4: unaligned unless padded
    assert not EP.shuffle_applies(narrow, fc2, 16, torch.float32)
    assert EP.shuffle_applies(BlockShuffleLinear(64, 256, 2, nblocks2=16), fc2, 16, torch.float32)
    calls.clear()
    odd = torch.randn(3, 5, 64)                              # 15 tokens: the feature-major views lose alignment
    torch.testing.assert_close(fused(fc1, fc2, odd), eager(fc1, fc2, odd), rtol=1e-5, atol=1e-5)
    assert calls == []


def test_transposed_operands_reach_cublaslt_without_a_copy(monkeypatch):
    """_matmul hands cuBLASLt an x that is contiguous either way round as it is (the transposed one as op(B) = T):
    ShuffleGeluFFN's DGELU reads each block of fc2's first factor transposed; any other stride is copied first."""
    seen = []

    class FakePlan:           # records what each call hands cuBLASLt (a plan is reused where the key matches)
        def __init__(self, epilogue, x, wt, out, aux, bias, aligns):
            pass

        def tune(self, *a):
            pass

        def run(self, x, wt, out, aux, bias):
            seen.append(x.stride())
            EP.reference_matmul("DGELU", x, wt, out, aux)

    monkeypatch.setattr(EP, "_Plan", FakePlan)
    monkeypatch.setattr(EP, "_PLANS", EP.OrderedDict())
    wt, pre = torch.randn(4, 6), torch.randn(5, 6)
    for x, stride in ((torch.randn(5, 4), (4, 1)), (torch.randn(4, 5).t(), (1, 5)), (torch.randn(5, 8)[:, ::2], (4, 1))):
        out = torch.empty(5, 6)
        EP._matmul("DGELU", x, wt, out, pre)
        torch.testing.assert_close(out, torch.ops.aten.gelu_backward(x @ wt, pre, approximate="tanh"))
        assert seen[-1] == stride
    assert EP._b_op(torch.randn(4, 5).t()) == (True, 5) and EP._b_op(torch.randn(5, 4)) == (False, 4)


def _spy(fn, calls):
    """GeluFFN.forward recording the (head, tail) it is called with."""
    def wrapped(ctx, x, first, w, b, tail_w, v2, b2, head, tail):
        calls.append((head, tail))
        return fn(ctx, x, first, w, b, tail_w, v2, b2, head, tail)
    return staticmethod(wrapped)


def test_cublaslt_falls_back_to_eager_where_it_does_not_apply(monkeypatch):
    fc1, fc2 = _ffn("lowrank", "lowrank", True)
    x = torch.randn(5, 16)
    # no nvmath / no CUDA here: the eager expression, exactly
    assert not EP.available(x) or x.is_cuda
    torch.testing.assert_close(fused_ffn(fc1, fc2, x, "tanh", matmul="cublaslt"), eager(fc1, fc2, x), rtol=0, atol=0)
    # cuBLASLt's GELU is the tanh one: the exact GELU is never sent to it
    monkeypatch.setattr(EP, "available", lambda x: True)
    monkeypatch.setattr(EP, "_matmul", lambda *a, **k: pytest.fail("exact GELU must not reach the epilogue"))
    torch.testing.assert_close(fused_ffn(fc1, fc2, x, "none", matmul="cublaslt"), fc2(F.gelu(fc1(x))))
    with pytest.raises(ValueError, match="cublaslt"):
        fused_ffn(fc1, fc2, x, "tanh", matmul="cutlass")


@pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")      # the hook-based form: still in use
def test_fused_ffn_runs_hooks_empty_inputs_and_dtype_errors_as_eager_does(monkeypatch):
    """Where the fused path cannot be what the layers compute, it is the eager FFN: a forward hook on fc1 or fc2
    (weight_norm's pre-hook too) runs, zero tokens give an empty output, and a float32 model given bfloat16 input
    without autocast raises eager's dtype error instead of being cast down silently."""
    monkeypatch.setattr(EP, "_matmul", EP.reference_matmul)
    monkeypatch.setattr(EP, "available", lambda x: True)
    calls = []
    monkeypatch.setattr(EP.GeluFFN, "forward", _spy(EP.GeluFFN.forward, calls))
    fused = lambda a, b, t: fused_ffn(a, b, t, "tanh", matmul="cublaslt")  # noqa: E731
    fc1, fc2 = _ffn("lowrank", "blockdense", True)
    x = torch.randn(5, 16)
    handle = fc1.register_forward_hook(lambda m, i, o: o * 0.5)
    torch.testing.assert_close(fused(fc1, fc2, x), eager(fc1, fc2, x))
    handle.remove()
    torch.testing.assert_close(fused(fc1, fc2, x), eager(fc1, fc2, x), rtol=1e-5, atol=1e-5)
    assert calls == [("lowrank", "block")]                 # only the call without the hook fused
    lin1, lin2 = nn.utils.weight_norm(nn.Linear(16, 64)), nn.Linear(64, 16)
    with torch.no_grad():
        lin1.weight_g.mul_(2)                              # weight recomputed by weight_norm's pre-hook
    torch.testing.assert_close(fused(lin1, lin2, x), eager(lin1, lin2, x))
    for kind1, kind2 in (("blockdense", "blockdense"), ("lowrank", "blockshuffle")):
        a, b = _ffn(kind1, kind2, True)
        t = torch.randn(2, 0, 16, requires_grad=True)
        y = fused(a, b, t)
        assert y.shape == (2, 0, 16)
        y.sum().backward()
    with pytest.raises(RuntimeError, match="dtype"):
        fused(fc1, fc2, x.bfloat16())


def test_reference_epilogues_are_their_definitions():
    g = torch.Generator().manual_seed(3)
    x, wt, bias = torch.randn(6, 4, generator=g), torch.randn(4, 5, generator=g), torch.randn(5, generator=g)
    out, aux = torch.empty(6, 5), torch.empty(6, 5)
    EP.reference_matmul("GELU_AUX_BIAS", x, wt, out, aux, bias)
    pre = x @ wt + bias
    torch.testing.assert_close(aux, pre)
    torch.testing.assert_close(out, F.gelu(pre, approximate="tanh"))
    p = pre.clone().requires_grad_(True)
    F.gelu(p, approximate="tanh").backward(x @ wt)
    dpre = torch.empty(6, 5)
    EP.reference_matmul("DGELU", x, wt, dpre, pre)
    torch.testing.assert_close(dpre, p.grad)
    EP.reference_matmul("GELU_BIAS", x, wt, out, None, bias)                # inference: no aux written
    torch.testing.assert_close(out, F.gelu(pre, approximate="tanh"))
    with pytest.raises(ValueError):
        EP.reference_matmul("RELU", x, wt, out, aux)
    with pytest.raises(ValueError, match="takes no aux"):
        EP._matmul("GELU_BIAS", x, wt, out, aux, bias)
    with pytest.raises(ValueError, match="takes an aux"):
        EP._matmul("GELU_AUX", x, wt, out, None)


def test_ones_column_rule():
    """The bias gradient rides on the weight gradient only where the appended columns stay inside the last tile."""
    assert EP.ones_fits(480) and EP.ones_fits(8) and EP.ones_fits(120)
    assert not EP.ones_fits(512) and not EP.ones_fits(384) and not EP.ones_fits(124)
    h = torch.randn(5, 12)
    h1 = EP.with_ones(h)
    assert h1.shape == (5, 12 + EP.ONES_PAD)
    torch.testing.assert_close(h1[:, :12], h)
    assert (h1[:, 12] == 1).all() and (h1[:, 13:] == 0).all()
    assert EP.with_ones(torch.randn(5, 128)) is None


@pytest.mark.parametrize("k", [12, 16, 5])
def test_ones_buffer_holds_h_beside_a_ones_column(k):
    """ones_buffer: h a view of the first k columns (what the head's matmul writes), then [1, 0...] to a
    multiple of ONES_PAD; the weight gradient through it carries the bias gradient, as with_ones does."""
    like = torch.empty(0, dtype=torch.bfloat16)
    hp, h = EP.ones_buffer((6, k), like)
    assert hp.dtype == torch.bfloat16 and hp.shape[1] % EP.ONES_PAD == 0 and hp.shape[1] > k
    assert h.data_ptr() == hp.data_ptr() and h.shape == (6, k) and h.stride() == (hp.shape[1], 1)
    assert (hp[:, k] == 1).all() and (hp[:, k + 1:] == 0).all()
    h.copy_(torch.randn(6, k))
    dpre = torch.randn(6, 10, dtype=torch.bfloat16)
    dw, db = EP.weight_bias_grads(torch.empty(10, k, dtype=torch.bfloat16), dpre, h, hp, True)
    torch.testing.assert_close(dw, dpre.t() @ h)
    torch.testing.assert_close(db, dpre.sum(0))


@pytest.mark.parametrize("k", [12, 128])
@pytest.mark.parametrize("col_major_w", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_weight_bias_grads_are_the_linear_backward(k, col_major_w, bias):
    """weight_bias_grads gives a linear's weight and bias gradients, through the ones column (k 12) or a separate
    sum (k 128), with the weight gradient laid out as the weight is (an SVD init's column-major factor too)."""
    g = torch.Generator().manual_seed(5)
    h, dpre = torch.randn(40, k, generator=g), torch.randn(40, 24, generator=g)
    w = torch.randn(k, 24, generator=g).t() if col_major_w else torch.randn(24, k, generator=g)
    wr = w.detach().clone().requires_grad_(True)
    br = torch.zeros(24, requires_grad=True)
    F.linear(h, wr, br if bias else None).backward(dpre)
    dw, db = EP.weight_bias_grads(w, dpre, h, EP.with_ones(h) if bias else None, bias)
    torch.testing.assert_close(dw, wr.grad)
    assert dw.stride() == w.stride()
    if bias:
        torch.testing.assert_close(db, br.grad)
        assert db.is_contiguous()
    else:
        assert db is None


def test_operand_a_orientation():
    """wt (K, N) is read as cuBLASLt's A without a copy when one of its strides is 1: a row-major wt (fc2's first
    factor u) untransposed, w.t() of a row-major w (fc1's last factor) transposed, each with its leading dimension."""
    u = torch.randn(3, 8)
    assert EP._a_op(u) == (False, 8)
    w = torch.randn(8, 3)
    assert EP._a_op(w.t()) == (True, 3)
    assert EP._a_op(torch.randn(6, 16)[:, ::2]) is None           # no unit stride: _matmul copies it first
    assert EP._a_op(torch.randn(1, 8)) == (False, 8)               # a single row: ld is the row length


def test_epilogues_apply_only_to_widths_and_dtypes_cublaslt_takes(monkeypatch):
    assert EP.applies(64, torch.bfloat16) and EP.applies(64, torch.float32)
    assert not EP.applies(60, torch.bfloat16)                      # the auxiliary output's ld: a multiple of 8
    assert not EP.applies(64, torch.float64)
    fc1, fc2 = nn.Linear(16, 60), nn.Linear(60, 16)
    x = torch.randn(5, 16)
    with pytest.raises(ValueError, match="epilogue"):
        EP._matmul("RELU", x, fc1.weight.t(), torch.empty(5, 60), torch.empty(5, 60))
    with pytest.raises(ValueError, match="one dtype"):        # a float32 bias read as bf16 bytes would be garbage
        EP._matmul("GELU_AUX_BIAS", x, fc1.weight.t(), torch.empty(5, 60), torch.empty(5, 60),
                   fc1.bias.double())
    with pytest.raises(ValueError, match="contiguous vector of N"):
        EP._matmul("GELU_AUX_BIAS", x, fc1.weight.t(), torch.empty(5, 60), torch.empty(5, 60),
                   torch.zeros(120)[::2])
    monkeypatch.setattr(EP, "available", lambda x: True)
    monkeypatch.setattr(EP, "_matmul", lambda *a, **k: pytest.fail("must fall back to eager"))
    torch.testing.assert_close(fused_ffn(fc1, fc2, x, "tanh", matmul="cublaslt"), eager(fc1, fc2, x))


gpu_lt = pytest.mark.skipif(not (torch.cuda.is_available() and EP.lt is not None),
                            reason="needs a CUDA GPU and nvmath-python")


@gpu_lt
@pytest.mark.parametrize("kind1,kind2", [("dense", "dense"), ("lowrank", "lowrank"), ("blockdense", "blockdense"),
                                         ("lowrank", "blockshuffle"), ("blockshuffle", "blockshuffle")])
@pytest.mark.parametrize("bias", [True, False])
def test_cublaslt_on_gpu_is_as_accurate_as_eager(kind1, kind2, bias):
    """bf16: the epilogue FFN and the eager one, each against the fp32 eager computation; the epilogue's error
    is no worse than 1.5x eager's (plus 1e-3 of the largest value), for the output and every gradient."""
    fc1, fc2 = _ffn(kind1, kind2, bias, d=256, hidden=1024)
    ref1, ref2 = copy.deepcopy(fc1).cuda(), copy.deepcopy(fc2).cuda()
    fc1, fc2 = fc1.cuda().bfloat16(), fc2.cuda().bfloat16()
    x = torch.randn(600, 256, device="cuda")
    grad = torch.randn(600, 256, device="cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    lt = _run(fc1, fc2, x.bfloat16(), grad.bfloat16(), lambda a, b, t: fused_ffn(a, b, t, "tanh", matmul="cublaslt"))
    ea = _run(fc1, fc2, x.bfloat16(), grad.bfloat16(), eager)
    exact = _run(ref1, ref2, x, grad, eager)
    for a, b, r in zip(lt, ea, exact):
        scale = r.abs().max()
        err_lt, err_eager = ((a.float() - r).abs().max() / scale).item(), ((b.float() - r).abs().max() / scale).item()
        assert err_lt <= 1.5 * err_eager + 1e-3, (err_lt, err_eager)


def test_plans_are_made_once_per_signature_and_the_oldest_dropped(monkeypatch):
    """_matmul plans and tunes a signature once, then only runs it with new operands; past MAX_PLANS the least
    recently used plan is dropped (a stand-in plan records what cuBLASLt would be asked to do)."""
    log = []

    class FakePlan:
        def __init__(self, epilogue, x, wt, out, aux, bias, aligns):
            log.append(("new", epilogue, tuple(x.shape), wt.stride()))

        def tune(self, x, wt, out, aux, bias):
            log.append(("tune", tuple(x.shape)))

        def run(self, x, wt, out, aux, bias):
            log.append(("run", tuple(x.shape)))
            EP.reference_matmul("GELU_AUX", x, wt, out, aux)

    monkeypatch.setattr(EP, "_Plan", FakePlan)
    monkeypatch.setattr(EP, "_alignment", lambda t: 256)      # CPU tensors' addresses vary; tested on the GPU
    monkeypatch.setattr(EP, "_PLANS", EP.OrderedDict())
    monkeypatch.setattr(EP, "MAX_PLANS", 2)
    w = torch.randn(5, 4)
    x = torch.randn(3, 4)
    act, pre = EP.linear_gelu(x, w, None)
    torch.testing.assert_close(pre, x @ w.t())
    torch.testing.assert_close(act, F.gelu(x @ w.t(), approximate="tanh"))
    EP.linear_gelu(torch.randn(3, 4), w, None)                              # same signature: run only
    assert log == [("new", "GELU_AUX", (3, 4), (1, 4)), ("tune", (3, 4)), ("run", (3, 4)), ("run", (3, 4))]
    EP.linear_gelu(torch.randn(6, 4), w, None)
    EP.linear_gelu(torch.randn(7, 4), w, None)
    assert len(EP._PLANS) == 2 and all(key[4] != (3, 4) for key in EP._PLANS)   # the (3, 4) plan was the oldest
    log.clear()
    EP.linear_gelu(x, w, None)
    assert log[0][0] == "new"                                               # planned again after eviction
    log.clear()
    EP.linear_gelu(torch.randn(16, 8)[:, ::2], w, None)                    # strided x: copied, then planned
    assert log[0] == ("new", "GELU_AUX", (16, 4), (1, 4))


def test_self_guided_layers_fuse_once_their_guide_is_gone(monkeypatch):
    """While a self-guided layer's dense guide is active, fused_ffn runs the eager mix; after drop_guide the
    wrapper computes its structured layer alone, and fused_ffn fuses that layer (same outputs and gradients)."""
    from slimkit.structured import SelfGuided

    monkeypatch.setattr(EP, "_matmul", EP.reference_matmul)
    monkeypatch.setattr(EP, "available", lambda x: True)
    calls = []
    monkeypatch.setattr(EP.GeluFFN, "forward", _spy(EP.GeluFFN.forward, calls))
    fc1, fc2 = _ffn("lowrank", "lowrank", True)
    fc1, fc2 = SelfGuided(fc1), SelfGuided(fc2)
    x = torch.randn(9, 16, generator=torch.Generator().manual_seed(4))
    grad = torch.randn(9, 16, generator=torch.Generator().manual_seed(5))
    fused = lambda a, b, t: fused_ffn(a, b, t, "tanh", matmul="cublaslt")  # noqa: E731
    for a, b in zip(_run(fc1, fc2, x, grad, fused), _run(fc1, fc2, x, grad, eager)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert calls == []
    fc1.drop_guide()
    fc2.drop_guide()
    for a, b in zip(_run(fc1, fc2, x, grad, fused), _run(fc1, fc2, x, grad, eager)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert calls == [("lowrank", "dense")]


@gpu_lt
def test_a_plan_first_needed_inside_a_graph_capture_is_made_untimed(monkeypatch):
    """A signature first met while a CUDA graph is being captured gets its plan without timing candidates (which
    would synchronise, illegal in a capture); the replay computes the epilogue's definition."""
    monkeypatch.setattr(EP, "_PLANS", EP.OrderedDict())
    torch.manual_seed(0)
    x = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1024, 256, device="cuda", dtype=torch.bfloat16) / 16
    act = torch.empty(512, 1024, device="cuda", dtype=torch.bfloat16)
    pre = torch.empty_like(act)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        EP._matmul("GELU_AUX", x, w.t(), act, pre)
    x.normal_()
    g.replay()
    want_act, want_pre = torch.empty_like(act), torch.empty_like(pre)
    EP.reference_matmul("GELU_AUX", x, w.t(), want_act, want_pre)
    torch.testing.assert_close(pre, want_pre, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(act, want_act, rtol=2e-2, atol=2e-2)
