"""Structured FFN layers: parameter ratios, exact dense equivalents, pre-merge, self-guided mixing, FLOPs, and
replace_ffn on tiny Hugging Face models. CPU, seconds, fixed seeds."""
from __future__ import annotations

import gc
import importlib
import json
import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from slimkit.errors import SlimkitError
from slimkit.structured import (BlockDenseLinear, BlockShuffleLinear, LowRankLinear, MergeChoice, SelfGuided,
                                SelfGuidedSchedule, choose_merge, drop_guides, ffn_linears, forward_flops,
                                load_structured, make_linear, premerge, replace_ffn, save_structured, set_progress,
                                train_flops_per_token)
from slimkit.structured.premerge import merged_linear, mergeable_layers
from tests.tiny_hf import tiny_inputs, tiny_model

SHAPES = [(32, 64), (64, 32), (768, 3072), (3072, 768)]
RATIOS = [0.5, 0.32, 0.25]


def _build(kind, i, o, ratio=0.32, **kw):
    torch.manual_seed(0)
    return make_linear(kind, i, o, ratio, **kw)


# ---------- parameter ratios ----------

@pytest.mark.parametrize("i,o", SHAPES)
@pytest.mark.parametrize("ratio", RATIOS)
def test_lowrank_ratio_within_rounding(i, o, ratio):
    layer = make_linear("lowrank", i, o, ratio, init=False)
    target = ratio * i * o / (i + o)
    step = 8 if target >= 32 else 1                       # the documented alignment rule
    assert abs(layer.rank - target) <= step / 2
    assert abs(layer.param_ratio - ratio) <= step / 2 * (i + o) / (i * o)
    assert layer.num_params == layer.rank * (i + o) + o
    if step == 8:
        assert layer.rank % 8 == 0


@pytest.mark.parametrize("i,o", SHAPES)
@pytest.mark.parametrize("ratio", RATIOS)
def test_blockshuffle_ratio_is_nearest_block_count(i, o, ratio):
    layer = make_linear("blockshuffle", i, o, ratio, init=False)
    m = min(i, o)
    ratio_of = lambda k, l: (m * i // k + m * o // l) / (i * o)
    pairs = [(k, l) for k in range(1, m + 1) for l in range(1, m + 1)
             if i % k == 0 and m % k == 0 and o % l == 0 and m % l == 0 and ratio_of(k, l) < 1]
    miss = lambda kl: abs(math.log(ratio_of(*kl) / ratio))
    equal = min((kl for kl in pairs if kl[0] == kl[1]), key=miss)
    k, l = layer.nblocks, layer.nblocks2
    assert layer.num_params == m * i // k + m * o // l + o
    assert layer.w1.shape == (k, m // k, i // k) and layer.w2.shape == (l, o // l, m // l)
    if miss(equal) <= math.log(1.05):            # the paper's form (one block count) when it is within 5%
        assert (k, l) == equal
    else:                                         # else the nearest of all (k, l)
        assert miss((k, l)) <= min(map(miss, pairs)) + 1e-9
    assert abs(layer.param_ratio - ratio) <= 0.25 * ratio
    if (i, o) == (768, 3072) and ratio == 0.32:
        assert (k, l) == (4, 4) and layer.param_ratio == 0.3125   # the paper's 32% BlockShuffle (nblocks 4)


@pytest.mark.parametrize("i,o,ratio,pair", [(2048, 8192, 0.25, (2, 8)), (8192, 2048, 0.25, (8, 2)),
                                            (2048, 8192, 0.32, (4, 4)), (64, 256, 0.25, (2, 8))])
def test_blockshuffle_quarter_at_power_of_two_widths(i, o, ratio, pair):
    """One block count gives 1.25/b at d -> 4d (0.3125, 0.156: no 25%); two counts reach it exactly."""
    layer = make_linear("blockshuffle", i, o, ratio, init=False)
    assert (layer.nblocks, layer.nblocks2) == pair
    if ratio == 0.25:
        assert layer.param_ratio == 0.25


@pytest.mark.parametrize("i,o", SHAPES)
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("nblocks", [None, 2])
def test_blockdense_ratio_within_rounding(i, o, ratio, nblocks):
    layer = make_linear("blockdense", i, o, ratio, nblocks=nblocks, init=False)
    b = layer.nblocks
    assert b == (nblocks or 4)
    target = ratio * i * o / (i / b + o)
    step = math.lcm(b, 8) if target >= 4 * math.lcm(b, 8) else b
    assert layer.rank % b == 0 and abs(layer.rank - target) <= step / 2
    assert layer.num_params == layer.rank * (i // b + o) + o
    assert abs(layer.param_ratio - ratio) <= step / 2 * (i / b + o) / (i * o)


# ---------- exact dense equivalents and layout ----------

def _monarch_reference(layer: BlockShuffleLinear) -> torch.Tensor:
    """W = P_out BD2 P_mid BD1 with explicit permutations (the Monarch layout of the paper's op), k first-factor
    and l second-factor blocks."""
    l = layer.nblocks2
    bd1 = torch.block_diag(*layer.w1.unbind(0))
    bd2 = torch.block_diag(*layer.w2.unbind(0))
    mid, out = bd1.shape[0], bd2.shape[0]
    # block j of the second factor reads middle channels j, j+l, j+2l, ...
    p_mid = torch.tensor([r * l + j for j in range(l) for r in range(mid // l)])
    # block j, row s writes output channel s*l + j
    p_out = torch.tensor([s * l + j for j in range(l) for s in range(out // l)])
    w = bd2 @ bd1[p_mid]
    return torch.empty_like(w).index_copy_(0, p_out, w)


@pytest.mark.parametrize("kind", ["lowrank", "blockshuffle", "blockdense"])
@pytest.mark.parametrize("i,o", [(32, 64), (64, 32), (48, 48)])
@pytest.mark.parametrize("bias", [True, False])
def test_dense_weight_reproduces_forward(kind, i, o, bias):
    layer = _build(kind, i, o, 0.4, bias=bias)
    if bias:
        nn.init.normal_(layer.bias)
    x = torch.randn(3, 5, i, generator=torch.Generator().manual_seed(1))
    expected = x @ layer.dense_weight().T + (layer.bias if bias else 0)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("i,o,nblocks,nblocks2", [(32, 64, 4, 4), (64, 32, 4, 4), (24, 36, 4, 4), (48, 48, 3, 3),
                                                  (32, 128, 2, 8), (128, 32, 8, 2), (24, 36, 3, 6)])
def test_blockshuffle_is_monarch_layout(i, o, nblocks, nblocks2):
    layer = _build("blockshuffle", i, o, None, nblocks=nblocks, nblocks2=nblocks2)
    ref = _monarch_reference(layer)
    torch.testing.assert_close(layer.dense_weight(), ref, atol=1e-6, rtol=1e-5)
    # the token-major path the fused FFN kernels take (after_first) is the same layer
    x = torch.randn(7, i, generator=torch.Generator().manual_seed(2))
    h = torch.einsum("tkp,kqp->tkq", x.view(7, nblocks, -1), layer.w1)
    torch.testing.assert_close(layer.after_first(h), x @ ref.T, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("in_fm", [False, True])
@pytest.mark.parametrize("out_fm", [False, True])
@pytest.mark.parametrize("k,l", [(2, 2), (2, 4), (4, 2), (2, 1)])
def test_monarch_feature_major_op_gradients(in_fm, out_fm, k, l):
    """The copy-free op's hand-written backward against autograd's numerical gradients, in every layout."""
    from slimkit.structured.layers import _Monarch
    g = torch.Generator().manual_seed(3)
    i, o, t = 8, 16, 5
    m = min(i, o)
    x = torch.randn(*((i, t) if in_fm else (t, i)), dtype=torch.float64, generator=g, requires_grad=True)
    w1 = torch.randn(k, m // k, i // k, dtype=torch.float64, generator=g, requires_grad=True)
    w2 = torch.randn(l, o // l, m // l, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: _Monarch.apply(*a, None, in_fm, out_fm), (x, w1, w2))
    if not out_fm:         # a bias rides in the closing transpose, its gradient in the gradient's
        b = torch.randn(o, dtype=torch.float64, generator=g, requires_grad=True)
        assert torch.autograd.gradcheck(lambda *a: _Monarch.apply(*a, in_fm, out_fm), (x, w1, w2, b))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("blocks", [((4, 4), (4, 4)), ((2, 8), (8, 2))])
def test_blockshuffle_ffn_equals_layer_by_layer(bias, blocks):
    """The feature-major FFN (no transposes between the layers) computes the eager FFN, values and gradients."""
    from slimkit.structured import blockshuffle_ffn
    from slimkit.structured.kernels import eager_ffn
    torch.manual_seed(0)
    fc1 = BlockShuffleLinear(32, 128, blocks[0][0], bias=bias, nblocks2=blocks[0][1]).double()
    fc2 = BlockShuffleLinear(128, 32, blocks[1][0], bias=bias, nblocks2=blocks[1][1]).double()
    if bias:
        nn.init.normal_(fc1.bias), nn.init.normal_(fc2.bias)
    x = torch.randn(3, 5, 32, dtype=torch.float64, requires_grad=True)
    params = [x, *fc1.parameters(), *fc2.parameters()]
    want = fc2(F.gelu(fc1(x), approximate="tanh"))
    grad = torch.randn_like(want)
    want_g = torch.autograd.grad(want, params, grad)
    seen = []
    hooked = (fc1.register_forward_hook(lambda m, i, o: seen.append(o.shape)), None)
    for got in (blockshuffle_ffn(fc1, fc2, x, "tanh"),
                eager_ffn(fc1, fc2, x, "tanh")):     # hooked: layer by layer, so the hook sees fc1's output
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
        for a, b in zip(torch.autograd.grad(got, params, grad), want_g):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    assert seen == [(3, 5, 128)]              # eager_ffn's call (blockshuffle_ffn itself does not run hooks)
    hooked[0].remove()
    # backward hooks and hooks registered for every module also make the pair run as modules, so that they fire
    grads, calls = [], []
    handles = [fc2.register_full_backward_hook(lambda m, gi, go: grads.append(go[0].shape)),
               nn.modules.module.register_module_forward_hook(lambda m, i, o: calls.append(type(m).__name__))]
    try:
        got = eager_ffn(fc1, fc2, x, "tanh")
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
        got.backward(grad)
    finally:
        for h in handles:
            h.remove()
    assert grads == [(3, 5, 32)] and calls == ["BlockShuffleLinear", "BlockShuffleLinear"]


def test_blockshuffle_spec_round_trip_and_old_specs():
    from slimkit.structured.layers import layer_from_spec
    layer = make_linear("blockshuffle", 64, 256, 0.25)
    spec = layer.spec()
    assert spec["nblocks"] == 2 and spec["nblocks2"] == 8
    again = layer_from_spec(spec)
    again.load_state_dict(layer.state_dict())
    x = torch.randn(4, 64)
    assert torch.equal(again(x), layer(x))
    old = {k: v for k, v in make_linear("blockshuffle", 64, 256, None, nblocks=4).spec().items() if k != "nblocks2"}
    assert (layer_from_spec(old).nblocks, layer_from_spec(old).nblocks2) == (4, 4)   # specs saved before nblocks2


@pytest.mark.parametrize("kind,i,o", [("blockshuffle", 8, 12), ("blockshuffle", 12, 8), ("blockdense", 8, 12),
                                      ("lowrank", 8, 12)])
def test_gradients_are_exact(kind, i, o):
    # the block kinds run a hand-written backward (block_diag_mm); check it against finite differences
    ratio = None if kind == "blockshuffle" else 0.6
    layer = _build(kind, i, o, ratio, **({"nblocks": 2} if kind != "lowrank" else {})).double()
    names, params = zip(*layer.named_parameters())
    f = lambda x, *ps: torch.func.functional_call(layer, dict(zip(names, ps)), (x,))
    x = torch.randn(2, 3, i, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (x, *params))


def test_float64_stays_float64_under_autocast_and_rank_checks():
    """Autocast leaves float64 matmuls alone (as F.linear's does): so do the block-diagonal layers. A BlockDense rank
    above in_features, a fractional or boolean low-rank rank: clear errors."""
    for kind in ("lowrank", "blockshuffle", "blockdense"):
        layer = _build(kind, 32, 64, None if kind == "blockshuffle" else 0.4, **({"nblocks": 4} if kind != "lowrank" else {}))
        layer = layer.double()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer(torch.randn(5, 32, dtype=torch.float64)).dtype == torch.float64
    with pytest.raises(SlimkitError, match="exceeds in_features"):
        BlockDenseLinear(8, 8, rank=16, nblocks=2)
    for rank in (2.5, True):
        with pytest.raises(SlimkitError, match="positive integer"):
            LowRankLinear(8, 8, rank)


def test_autocast_keeps_the_low_precision_dtype():
    for kind in ("lowrank", "blockshuffle", "blockdense"):
        layer = _build(kind, 32, 64, None if kind == "blockshuffle" else 0.4, **({"nblocks": 4} if kind != "lowrank" else {}))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(torch.randn(5, 32))
        assert y.dtype == torch.bfloat16
        y.float().sum().backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.parameters())


def test_paper_initialisation():
    torch.manual_seed(0)
    low = LowRankLinear(48, 96, rank=8)
    uu, vv = low.u @ low.u.T, low.v.T @ low.v                     # sqrt(S) split evenly: both equal diag(S)
    torch.testing.assert_close(uu, torch.diag(torch.diagonal(uu)), atol=1e-6, rtol=0)
    torch.testing.assert_close(uu, vv, atol=1e-6, rtol=1e-5)
    s = torch.diagonal(uu)
    assert 0.02 * 4 < s.max() < 0.02 * 20                       # singular values of a 96x48 N(0, 0.02) matrix
    shuffle, dense = BlockShuffleLinear(32, 64, nblocks=4), BlockDenseLinear(64, 32, rank=16, nblocks=4)
    for w in (shuffle.w1, shuffle.w2, dense.blocks, dense.v.unsqueeze(0)):   # "ortho": orthonormal rows or columns
        g = w @ w.transpose(-1, -2) if w.shape[-2] <= w.shape[-1] else w.transpose(-1, -2) @ w
        torch.testing.assert_close(g, torch.eye(g.shape[-1]).expand_as(g), atol=1e-5, rtol=0)
    for layer in (low, shuffle, dense):
        assert torch.count_nonzero(layer.bias) == 0


# ---------- pre-merge ----------

def _stack(seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    guided = SelfGuided(make_linear("lowrank", 64, 32, 0.4))
    with torch.no_grad():
        guided.guide.weight.add_(0.05 * torch.randn_like(guided.guide.weight))
    guided.share = 0.3
    return nn.Sequential(make_linear("lowrank", 32, 64, 0.32), nn.GELU(), make_linear("blockshuffle", 64, 64, None, nblocks=4),
                         make_linear("blockdense", 64, 64, 0.3), guided, nn.Linear(32, 8)).eval()


def test_premerge_equals_unmerged():
    model = _stack()
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x)
        premerge(model, tokens=6, always=True)
        out = model(x)
    assert not mergeable_layers(model) and all(isinstance(m, (nn.Linear, nn.GELU)) for m in model)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_premerge_of_a_bare_structured_layer_returns_its_merged_twin():
    """A structured (or self-guided) layer passed as the model itself: nothing holds it to swap, so premerge returns
    the merged nn.Linear and leaves the layer untouched (it used to hang the merged layer inside it, under '')."""
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(2))
    for layer in (_build("lowrank", 32, 64), SelfGuided(_build("blockdense", 32, 64, 0.3))):
        layer.eval()
        keys = list(layer.state_dict())
        assert list(mergeable_layers(layer)) == [""]                      # outermost only, not its inner layer
        with torch.no_grad():
            ref = layer(x)
            merged = premerge(layer, tokens=4, always=True)
            assert type(merged) is nn.Linear and list(layer.state_dict()) == keys
            torch.testing.assert_close(merged(x), ref, atol=1e-5, rtol=1e-5)
            kept = premerge(layer, tokens=4, min_run_time=0.001)
            assert kept is layer or type(kept) is nn.Linear
    with pytest.raises(SlimkitError, match="cannot replace the model itself"):
        from slimkit.core.wrap import set_submodule
        set_submodule(nn.Linear(2, 2), "", nn.Linear(2, 2))


def test_load_structured_of_a_bare_layer_is_refused_and_leaves_the_model_intact(tmp_path):
    save_structured(_build("lowrank", 32, 64), tmp_path / "s")
    assert list(json.loads((tmp_path / "s" / "structured.json").read_text())["layers"]) == [""]
    dense = nn.Linear(32, 64)
    with pytest.raises(SlimkitError, match="cannot replace the model itself"):
        load_structured(dense, tmp_path / "s")
    assert not list(dense.children()) and list(dense.state_dict()) == ["weight", "bias"]


def test_choose_merge_measures_and_caches_on_cpu():
    model = _stack()
    layer = model[0]
    first = choose_merge(layer, tokens=3, min_run_time=0.01)
    assert isinstance(first, MergeChoice) and first.merged_ms > 0 and first.structured_ms > 0
    assert first.merge == (first.merged_ms < first.structured_ms)
    assert choose_merge(layer, tokens=3, min_run_time=0.01) is first          # cached by kind, shape, tokens, ...
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(x)
        premerge(model, tokens=3, min_run_time=0.01)                       # whichever measured faster, per layer
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)


def test_premerge_under_autocast_or_inference_mode_keeps_the_model_fp32_and_trainable():
    """premerge inside an evaluation region (autocast, inference_mode) merges in the layer's own dtype and
    precision, into ordinary parameters: the model runs in fp32 afterwards, loads weights and trains."""
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(2))
    for region in (lambda: torch.autocast("cpu", dtype=torch.bfloat16), torch.inference_mode):
        model = _stack()
        with torch.no_grad():
            ref = model(x)
        with region():
            premerge(model, tokens=6, always=True)
        assert all(p.dtype == torch.float32 and not p.is_inference() for p in model.parameters())
        with torch.no_grad():
            torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)     # not bf16-rounded weights
        model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
        model.train()(x).sum().backward()


def test_premerge_keeps_frozen_layers_frozen_and_self_guided_inits_in_full_precision():
    """A frozen structured layer merges into a frozen nn.Linear (a frozen bias stays frozen on its own); a
    self-guided wrapper built under autocast starts its guide at the layer's fp32 matrix, not a bf16-rounded one."""
    model = _stack()
    model[0].requires_grad_(False)
    model[2].bias.requires_grad_(False)
    premerge(model, tokens=6, always=True)
    assert not any(p.requires_grad for p in model[0].parameters())
    assert model[2].weight.requires_grad and not model[2].bias.requires_grad
    assert all(p.requires_grad for p in model[3].parameters())
    layer = make_linear("lowrank", 64, 32, 0.4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        guided = SelfGuided(layer)
    assert guided.guide.weight.dtype == torch.float32
    torch.testing.assert_close(guided.guide.weight, layer.dense_weight(), rtol=0, atol=0)
    with torch.device("meta"):      # built where autocast does not exist (a model sized for its FLOPs), merged there
        meta = SelfGuided(make_linear("lowrank", 64, 32, 0.4)).eval()
        assert merged_linear(meta).weight.device.type == "meta"


premerge_mod = importlib.import_module("slimkit.structured.premerge")    # the module (the package exports the function)


def test_choose_merge_times_each_call_with_cold_weights(monkeypatch):
    """A decoding model streams each layer's weights from memory, so the timing must too: it cycles through
    copies of the layer whose weights add up to twice the cache, each copy called in turn, none twice in a row."""
    monkeypatch.setattr(premerge_mod, "CPU_CACHE_BYTES", 40_000)
    layer = make_linear("lowrank", 32, 64, 0.5).eval()            # 4 KB of fp32 weights (+ bias)
    size = sum(p.numel() * p.element_size() for p in layer.parameters())
    copies = premerge_mod._cold_copies(layer, torch.device("cpu"))
    assert copies[0] is layer and len(copies) == -(-80_000 // size)
    assert len({p.data_ptr() for c in copies for p in c.parameters()}) == len(copies) * len(list(layer.parameters()))
    calls = []
    layer.register_forward_hook(lambda m, a, out: calls.append(id(m)))    # deep copies carry the hook along
    premerge_mod._median_ms(layer, torch.randn(3, 32), 0.001, graph=False)
    n = len(copies)
    assert len(calls) >= 2 * n and calls[0] == id(layer) and len(set(calls[:n])) == n
    assert calls[n:2 * n] == calls[:n]
    monkeypatch.setattr(premerge_mod, "MAX_COPIES", 3)
    assert len(premerge_mod._cold_copies(layer, torch.device("cpu"))) == 3


# ---------- self-guided training ----------

def test_schedule_is_cosine_over_first_half():
    s = SelfGuidedSchedule()
    assert (s.guide_fraction, s.curve) == (0.5, "cosine")
    assert s.share(0, 1000) == 1.0 and s.share(500, 1000) == 0.0 and s.share(900, 1000) == 0.0
    assert s.share(250, 1000) == pytest.approx(0.5)
    assert s.share(100, 1000) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))
    assert SelfGuidedSchedule(0.4, "linear").share(100, 1000) == pytest.approx(0.75)


@pytest.mark.parametrize("value", ["no", "false", 0, None])
def test_schedule_refuses_a_non_bool_reduce_flops(value):
    """A truthy string used to switch the coin-flip guide on (and a falsy non-bool passed unchecked)."""
    with pytest.raises(SlimkitError, match="reduce_flops must be True or False"):
        SelfGuidedSchedule(reduce_flops=value)


def test_self_guided_equals_dense_at_start_and_structured_at_end():
    torch.manual_seed(0)
    layer = make_linear("blockdense", 32, 64, 0.3)
    nn.init.normal_(layer.bias)
    sg = SelfGuided(layer, SelfGuidedSchedule(0.5))
    torch.testing.assert_close(sg.guide.weight, layer.dense_weight())       # the paper starts the guide there
    with torch.no_grad():
        sg.guide.weight.add_(torch.randn_like(sg.guide.weight))               # make the two paths differ
    x = torch.randn(4, 7, 32)
    model = nn.Sequential(sg)
    assert set_progress(model, 0, 100) == 1.0
    assert torch.equal(sg(x), F.linear(x, sg.guide.weight, layer.bias))    # share 1: the dense layer, exactly
    set_progress(model, 20, 100)
    a = sg.share
    assert 0 < a < 1
    torch.testing.assert_close(sg(x), a * F.linear(x, sg.guide.weight, layer.bias) + (1 - a) * layer(x))
    assert set_progress(model, 50, 100) == 0.0
    assert torch.equal(sg(x), layer(x))                                      # share 0: the structured layer, exactly
    with torch.no_grad():
        sg.guide.weight.fill_(float("nan"))                                  # and the dense matmul is skipped
    assert torch.isfinite(sg(x)).all()


def test_train_flops_of_a_self_guided_layer_alone_count_it_once():
    """train_flops_per_token of a model that is itself one self-guided layer: the layer's FLOPs (guide included),
    not those plus its inner structured layer's and its guide's again."""
    sg = SelfGuided(make_linear("lowrank", 32, 64, 0.3))
    assert train_flops_per_token(sg) == 3 * forward_flops(sg, 1) == train_flops_per_token(nn.Sequential(sg))
    drop_guides(sg)
    assert train_flops_per_token(sg) == 3 * forward_flops(sg.layer, 1)


def test_merge_and_guide_refuse_a_layer_that_is_not_structured():
    for call in (lambda: merged_linear(nn.Linear(8, 8)), lambda: choose_merge(nn.Linear(8, 8), 2),
                 lambda: SelfGuided(nn.Linear(8, 8))):
        with pytest.raises(SlimkitError, match="structured"):
            call()
    with pytest.raises(SlimkitError, match="SelfGuidedSchedule"):
        SelfGuided(make_linear("lowrank", 32, 64, 0.3), "cosine")


def test_drop_guides_frees_dense_params():
    torch.manual_seed(0)
    model = nn.Sequential(SelfGuided(make_linear("lowrank", 32, 64, 0.3)), nn.GELU(),
                          SelfGuided(make_linear("blockshuffle", 64, 32, None, nblocks=4)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(8, 32)
    model(x).square().mean().backward()
    opt.step()
    before = sum(p.numel() for p in model.parameters())
    guide = weakref.ref(model[0].guide.weight)
    assert guide() in opt.state
    assert drop_guides(model, opt) == 2 * 32 * 64
    assert sum(p.numel() for p in model.parameters()) == before - 2 * 32 * 64
    assert all(m.guide is None for m in (model[0], model[2]))
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    gc.collect()
    assert guide() is None                                                   # nothing holds the dense weight
    opt.zero_grad()
    model(x).square().mean().backward()                                      # training goes on without guides
    opt.step()
    assert torch.equal(model[0](x), model[0].layer(x))


def test_drop_guides_keeps_an_optimizers_parameter_names_in_step():
    torch.manual_seed(0)
    model = nn.Sequential(SelfGuided(make_linear("lowrank", 32, 64, 0.3)), nn.GELU(), nn.Linear(64, 8))
    opt = torch.optim.AdamW(model.named_parameters(), lr=1e-3)
    if "param_names" not in opt.param_groups[0]:
        pytest.skip("this torch builds no named optimizers")
    drop_guides(model, opt)
    group = opt.param_groups[0]
    assert group["param_names"] == [n for n, _ in model.named_parameters()]
    assert all(p is q for p, q in zip(group["params"], model.parameters()))


# ---------- FLOPs ----------

def test_flops_match_manual_formulas():
    t = 10
    low, shuf, bd = _build("lowrank", 32, 64), _build("blockshuffle", 64, 64, None, nblocks=4), _build("blockdense", 64, 32)
    assert low.flops(t) == 2 * t * low.rank * (32 + 64)
    assert shuf.flops(t) == 2 * t * (64 * 128 // 4)
    assert bd.flops(t) == 2 * t * bd.rank * (64 // bd.nblocks + 32)
    sg = SelfGuided(_build("lowrank", 32, 64), SelfGuidedSchedule(0.5, reduce_flops=True))
    head = nn.Linear(64, 10)
    model = nn.Sequential(sg, head)
    set_progress(model, 25, 100)
    a = sg.share
    assert sg.flops(t) == low.flops(t) + round(a * 2 * t * 32 * 64)           # reduce_flops: expected guide use
    sg.schedule = SelfGuidedSchedule(0.5)
    assert sg.flops(t) == low.flops(t) + 2 * t * 32 * 64
    assert train_flops_per_token(model) == 3 * (2 * low.rank * 96 + 2 * 32 * 64 + 2 * 640)
    set_progress(model, 60, 100)
    assert train_flops_per_token(model) == 3 * (2 * low.rank * 96 + 2 * 640)
    drop_guides(model)
    assert train_flops_per_token(model) == 3 * (2 * low.rank * 96 + 2 * 640)


# ---------- replace_ffn on Hugging Face models ----------

@pytest.mark.parametrize("family,expected", [
    ("llama", {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}), ("gpt2", {"mlp.c_fc", "mlp.c_proj"})])
@pytest.mark.parametrize("kind", ["lowrank", "blockshuffle", "blockdense"])
def test_replace_ffn_hf_runs_trains_and_reloads(family, expected, kind, tmp_path):
    model = tiny_model(family)
    attn_before = {n: type(m) for n, m in model.named_modules() if ".attn" in n or "self_attn" in n}
    replace_ffn(model, kind, 0.32, self_guided=SelfGuidedSchedule() if kind == "lowrank" else None)
    swapped = {n for n, m in model.named_modules() if isinstance(m, (SelfGuided, LowRankLinear,
                                                                      BlockShuffleLinear, BlockDenseLinear))}
    outer = {n for n in swapped if not any(n.startswith(s + ".") for s in swapped)}
    assert {n.split(".", 3)[-1] for n in outer} == expected and len(outer) == 2 * len(expected)
    assert {n: type(m) for n, m in model.named_modules() if n in attn_before} == attn_before
    inputs = tiny_inputs(family)
    model.train()
    out = model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None for n, p in model.named_parameters() if ".mlp." in n)
    model.eval()
    with torch.no_grad():
        ref = model(**inputs).logits
    model.save_pretrained(tmp_path / "hf")                                  # the HF way: rebuild, then load
    twin = replace_ffn(tiny_model(family, seed=5), kind, 0.32,
                       self_guided=SelfGuidedSchedule() if kind == "lowrank" else None)
    state = load_file(tmp_path / "hf" / "model.safetensors")
    missing, unexpected = twin.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing)          # only a tied head is stored once
    with torch.no_grad():
        torch.testing.assert_close(twin(**inputs).logits, ref)
    save_structured(model, tmp_path / "sk")                                  # the slimkit way: shapes travel along
    again = load_structured(tiny_model(family, seed=7), tmp_path / "sk")
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).logits, ref)


@pytest.mark.parametrize("family,expected", [("opt", {"fc1", "fc2"}),
                                             ("bert", {"intermediate.dense", "output.dense"})])
def test_replace_ffn_finds_layer_level_ffn_pairs(family, expected, tmp_path):
    """OPT keeps its FFN linears on the decoder layer (fc1 / fc2), BERT in intermediate.dense / output.dense:
    both are found (attention's own output.dense is not), the model runs and learns, and reloads exactly."""
    model = tiny_model(family)
    names = set(ffn_linears(model))
    assert {n.split(".", 4 if family == "opt" else 3)[-1] for n in names} == expected and len(names) == 4
    attn = {n for n, m in model.named_modules() if "attention" in n or "self_attn" in n}
    replace_ffn(model, "blockdense", 0.32)
    assert not any(isinstance(model.get_submodule(n), BlockDenseLinear) for n in attn)
    inputs = tiny_inputs(family)
    out = model(**inputs)[0]
    out.float().pow(2).mean().backward()
    assert all(p.grad is not None for n in names for p in model.get_submodule(n).parameters())
    model.eval()
    with torch.no_grad():
        ref = model(**inputs)[0]
    save_structured(model, tmp_path / "sk")
    again = load_structured(tiny_model(family, seed=3), tmp_path / "sk").eval()
    with torch.no_grad():
        assert torch.equal(again(**inputs)[0], ref)


def test_load_structured_keeps_the_guides_share_and_refuses_another_layout(tmp_path):
    """A self-guided model saved mid-guide reloads at the same dense share, so its outputs are the same; a model
    already converted to another kind is a clear error, not a size-mismatch traceback."""
    model = replace_ffn(tiny_model("llama"), "lowrank", 0.32, self_guided=True)
    with torch.no_grad():                                      # guide and factors apart, as after training
        for n, p in model.named_parameters():
            if ".mlp." in n:
                p.add_(0.05 * torch.randn_like(p))
    set_progress(model, 1, 4)
    model.eval()
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        ref = model(**inputs).logits
    save_structured(model, tmp_path / "sg")
    back = load_structured(tiny_model("llama", seed=2), tmp_path / "sg").eval()
    assert {m.share for m in back.modules() if isinstance(m, SelfGuided)} == {0.5}
    with torch.no_grad():
        assert torch.equal(back(**inputs).logits, ref)
    with pytest.raises(SlimkitError, match="already a structured layer unlike the saved one"):
        load_structured(replace_ffn(tiny_model("llama"), "blockdense", 0.32), tmp_path / "sg")


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(16, 16)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.gate, self.mlp.fc2 = nn.Linear(16, 48, bias=False), nn.Linear(16, 48, bias=False), nn.Linear(48, 16, bias=False)


def test_replace_ffn_gpt_style_swiglu_and_idempotent():
    torch.manual_seed(0)
    model = nn.Sequential(_Block(), _Block())
    replace_ffn(model, "lowrank", 0.3, self_guided=True)
    assert isinstance(model[0].attn, nn.Linear) and isinstance(model[1].mlp.gate, SelfGuided)
    assert model[0].mlp.fc2.layer.bias is None
    with pytest.raises(SlimkitError, match="structured already"):       # guides are not FFN linears to swap
        replace_ffn(model, "lowrank", 0.3)


# ---------- bad input ----------

def test_bad_inputs_raise_clear_errors():
    with pytest.raises(SlimkitError, match=r"in \(0, 1\)"):
        make_linear("lowrank", 32, 64, 1.5)
    with pytest.raises(SlimkitError, match=r"rank 1 gives 0.0469.*\(rank 1 is the smallest\)"):
        make_linear("lowrank", 32, 64, 0.001)
    with pytest.raises(SlimkitError, match="rank 2 gives 0.333, rank 4 gives 0.667"):
        make_linear("blockdense", 8, 12, 0.5, nblocks=2)
    with pytest.raises(SlimkitError, match="nblocks=3 does not divide in_features=32"):
        make_linear("blockshuffle", 32, 64, None, nblocks=3)
    with pytest.raises(SlimkitError, match="nblocks=5 does not divide in_features=64"):
        make_linear("blockdense", 64, 32, 0.3, nblocks=5)
    with pytest.raises(SlimkitError, match="ratio is fixed by the block count .* b=4: 0.375"):
        make_linear("blockshuffle", 32, 64, 0.1, nblocks=4)
    with pytest.raises(SlimkitError, match=r"nblocks2=3 does not divide the middle width min\(in, out\)=32"):
        make_linear("blockshuffle", 32, 96, None, nblocks=4, nblocks2=3)
    with pytest.raises(SlimkitError, match="nblocks2=5 does not divide out_features=64"):
        make_linear("blockshuffle", 32, 64, None, nblocks=4, nblocks2=5)
    with pytest.raises(SlimkitError, match="no block count that saves weights"):
        make_linear("blockshuffle", 31, 64, 0.3)
    with pytest.raises(SlimkitError, match="choose one of dense, lowrank, blockshuffle, blockdense"):
        make_linear("butterfly", 32, 64, 0.3)
    with pytest.raises(SlimkitError, match="lowrank has no blocks"):
        make_linear("lowrank", 32, 64, 0.3, nblocks=2)
    with pytest.raises(SlimkitError, match="curve"):
        SelfGuidedSchedule(curve="exp")
    with pytest.raises(SlimkitError, match="supported: Hugging Face Llama"):
        replace_ffn(nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8)), "lowrank", 0.3)
    with pytest.raises(SlimkitError, match="align must be a positive integer, got 0"):
        make_linear("lowrank", 64, 64, 0.5, align=0)
    with pytest.raises(SlimkitError, match="in_features must be a positive integer, got 0"):
        make_linear("blockshuffle", 0, 64, 0.5)
    with pytest.raises(SlimkitError, match="nblocks must be a positive integer, got 2.0"):
        make_linear("blockdense", 64, 64, 0.3, nblocks=2.0)
    with pytest.raises(SlimkitError, match="rank must be a positive integer, got 0"):
        BlockDenseLinear(64, 64, rank=0, nblocks=4)
    with pytest.raises(SlimkitError, match="self_guided must be True/False or a SelfGuidedSchedule"):
        replace_ffn(tiny_model("llama"), "lowrank", 0.3, self_guided="yes")
    with pytest.raises(SlimkitError, match="with kind='dense' drop self_guided"):
        replace_ffn(tiny_model("llama"), "dense", 0.3, self_guided=True)
    with pytest.raises(SlimkitError, match="not written by slimkit"):
        load_structured(tiny_model("llama"), "/nonexistent")


class _MoEBlock(nn.Module):
    """A mixture-of-experts FFN as Qwen2-MoE / JetMoE lay one out: routers beside SwiGLU experts."""

    def __init__(self):
        super().__init__()
        self.mlp = nn.Module()
        self.mlp.gate = nn.Linear(16, 4, bias=False)                   # router: d -> experts
        self.mlp.router = nn.Module()
        self.mlp.router.layer = nn.Linear(16, 4, bias=False)
        self.mlp.shared_expert_gate = nn.Linear(16, 1, bias=False)
        self.mlp.experts = nn.ModuleList()
        for _ in range(2):
            e = nn.Module()
            e.gate, e.up, e.down = nn.Linear(16, 48), nn.Linear(16, 48), nn.Linear(48, 16)   # a SwiGLU gate widens
            self.mlp.experts.append(e)


def test_replace_ffn_leaves_routers_and_fails_whole():
    """Routers pick experts and stay dense; the experts' linears (SwiGLU gate included) are replaced. A kind no
    layer can take fails before any layer is swapped."""
    block = _MoEBlock()
    assert sorted(ffn_linears(block)) == sorted(f"mlp.experts.{i}.{n}" for i in range(2) for n in ("gate", "up", "down"))
    replace_ffn(block, "lowrank", 0.32)
    assert all(type(block.get_submodule(f"mlp.{n}")) is nn.Linear for n in ("gate", "router.layer", "shared_expert_gate"))
    narrow = nn.Module()            # a SwiGLU FFN narrower than d_model: its gate narrows too, like its up
    narrow.mlp = nn.Module()
    narrow.mlp.gate, narrow.mlp.up, narrow.mlp.down = nn.Linear(64, 48), nn.Linear(64, 48), nn.Linear(48, 64)
    assert sorted(ffn_linears(narrow)) == ["mlp.down", "mlp.gate", "mlp.up"]
    model = tiny_model("llama")     # intermediate 64: nblocks 6 divides none of gate/up (in 32) and down (in 64)
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(SlimkitError, match="nblocks=6 does not divide"):
        replace_ffn(model, "blockdense", 0.32, nblocks=6)
    assert {n: type(m) for n, m in model.named_modules()} == before


def test_layer_keywords_ratio_types_and_blockdense_cap():
    with pytest.raises(SlimkitError, match="replace_ffn takes no device"):
        replace_ffn(tiny_model("llama"), "lowrank", 0.5, device="cpu")
    for kw, what in ((dict(rel_tol=float("nan")), "rel_tol must be a non-negative"),
                     (dict(rel_tol=-1), "rel_tol must"), (dict(init_std=float("nan")), "init_std must be a positive")):
        with pytest.raises(SlimkitError, match=what):
            make_linear("lowrank", 64, 64, 0.3, **kw)
    with pytest.raises(SlimkitError, match="blockshuffle takes no align"):
        make_linear("blockshuffle", 64, 128, 0.32, align=4)
    with pytest.raises(SlimkitError, match="blockdense takes no init_std"):
        make_linear("blockdense", 64, 128, 0.32, init_std=0.01)
    with pytest.raises(SlimkitError, match="no fewer than the dense layer"):
        make_linear("blockdense", 8, 64, 0.9)
    with pytest.raises(SlimkitError, match="param_ratio must be a number"):
        make_linear("lowrank", 64, 64, "0.3")
    import numpy as np
    assert make_linear("lowrank", np.int64(64), 64, np.float64(0.3)).rank == make_linear("lowrank", 64, 64, 0.3).rank


def test_load_structured_bad_files_leave_the_model_alone(tmp_path):
    model = replace_ffn(tiny_model("llama"), "lowrank", 0.32)
    save_structured(model, tmp_path / "ok")
    (tmp_path / "file").write_text("x")
    with pytest.raises(SlimkitError, match="is a file"):
        save_structured(model, tmp_path / "file")
    import shutil
    for name, damage in [("json", lambda p: (p / "structured.json").write_text("{not json")),
                         ("weights", lambda p: (p / "model.safetensors").write_bytes(b"\0" * 10)),
                         ("other", None)]:
        bad = tmp_path / name
        shutil.copytree(tmp_path / "ok", bad)
        if damage:
            damage(bad)
        else:      # weights of another width
            save_structured(replace_ffn(tiny_model("llama"), "lowrank", 0.5), tmp_path / "half")
            shutil.copy(tmp_path / "half" / "model.safetensors", bad / "model.safetensors")
        fresh = tiny_model("llama")
        ref = {k: v.clone() for k, v in fresh.state_dict().items()}
        with pytest.raises(SlimkitError, match="two different saves" if name == "other" else "corrupt"):
            load_structured(fresh, bad)
        state = fresh.state_dict()
        assert state.keys() == ref.keys() and all(torch.equal(state[k], ref[k]) for k in ref)
    manifest = json.loads((tmp_path / "other" / "structured.json").read_text())
    manifest.pop("save_id")              # a manifest of before save ids: the weights' own check still refuses
    (tmp_path / "other" / "structured.json").write_text(json.dumps(manifest))
    with pytest.raises(SlimkitError, match="do not fit"):
        load_structured(tiny_model("llama"), tmp_path / "other")
    manifest = json.loads((tmp_path / "ok" / "structured.json").read_text())
    manifest["layers"]["model.layers.0.mlp"] = next(iter(manifest["layers"].values()))    # names a non-linear
    (tmp_path / "json").mkdir(exist_ok=True)
    shutil.copy(tmp_path / "ok" / "model.safetensors", tmp_path / "json" / "model.safetensors")
    (tmp_path / "json" / "structured.json").write_text(json.dumps(manifest))
    with pytest.raises(SlimkitError, match="where this model has a LlamaMLP, not a linear"):
        load_structured(tiny_model("llama"), tmp_path / "json")
    import transformers as T
    config = tiny_model("llama").config
    config.intermediate_size = 96
    with pytest.raises(SlimkitError, match="saved as 32->64, this model has 32->96"):    # a wider twin
        load_structured(T.LlamaForCausalLM(config), tmp_path / "ok")


def test_save_structured_keeps_out_of_other_folders_and_load_checks_the_format(tmp_path):
    model = replace_ffn(tiny_model("llama"), "lowrank", 0.32)
    hf = tmp_path / "hf"
    tiny_model("llama").save_pretrained(hf)               # a Hugging Face folder: its model.safetensors must survive
    before = (hf / "model.safetensors").read_bytes()
    with pytest.raises(SlimkitError, match="already holds other files.*config.json"):
        save_structured(model, hf)
    assert (hf / "model.safetensors").read_bytes() == before and not (hf / "structured.json").exists()
    save_structured(model, tmp_path / "s")
    save_structured(model, tmp_path / "s")               # over its own earlier save: fine
    manifest = json.loads((tmp_path / "s" / "structured.json").read_text())
    for key, value, why in (("version", 2, "version 2"), ("format", "x", "not a structured-model manifest")):
        (tmp_path / "s" / "structured.json").write_text(json.dumps({**manifest, key: value}))
        with pytest.raises(SlimkitError, match=why):
            load_structured(tiny_model("llama"), tmp_path / "s")

def test_a_failed_save_leaves_no_temporary_files_and_the_old_save(tmp_path, monkeypatch):
    import slimkit.structured.replace as R
    model = replace_ffn(tiny_model("llama"), "lowrank", 0.32)
    save_structured(model, tmp_path / "s")
    before = {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir()}

    def full_disk(*a, **kw):
        (tmp_path / "s" / "model.safetensors.tmp").write_bytes(b"\0" * 8)     # a partial write, then the error
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(R, "save_model", full_disk)
    with pytest.raises(SlimkitError, match="cannot write the structured model.*No space left"):
        save_structured(model, tmp_path / "s")
    assert {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir()} == before


@pytest.mark.parametrize("tokens", [0, -1, 2.5])
def test_premerge_refuses_bad_token_counts(tokens):
    with pytest.raises(SlimkitError, match="tokens must be a positive integer"):
        premerge(replace_ffn(tiny_model("llama"), "lowrank", 0.32), tokens)


@pytest.mark.parametrize("min_run_time", [math.nan, math.inf, 0, -1.0, "0.05", True])
def test_premerge_refuses_bad_min_run_times(min_run_time):
    """A NaN min_run_time used to time forever (benchmark's loop never reaches it)."""
    for call in (lambda m: premerge(m, 7, min_run_time=min_run_time),
                 lambda m: choose_merge(m[0], 7, min_run_time=min_run_time)):
        with pytest.raises(SlimkitError, match="min_run_time must be a positive, finite number"):
            call(nn.Sequential(_build("lowrank", 32, 64)))


def test_replace_ffn_on_t5_and_switch_runs_trains_and_reloads(tmp_path):
    """T5 keeps its FFN in DenseReluDense and casts to wo.weight's dtype before wo (as Switch's experts do):
    every FFN linear becomes structured, routers stay dense, and the models train and reload."""
    import transformers as T

    torch.manual_seed(0)
    ids = torch.randint(1, 96, (2, 7))

    def t5():
        return T.T5ForConditionalGeneration(T.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                       num_heads=4, decoder_start_token_id=0)).eval()

    def switch():
        return T.SwitchTransformersForConditionalGeneration(T.SwitchTransformersConfig(
            vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
            num_experts=4, expert_capacity=8, decoder_start_token_id=0, num_sparse_encoder_layers=1,
            num_sparse_decoder_layers=1)).eval()

    for build, kind in ((t5, "lowrank"), (switch, "blockdense")):
        model = build()
        names = set(ffn_linears(model))
        assert names and not any("router" in n for n in names)
        replace_ffn(model, kind, 0.5, self_guided=(kind == "lowrank"))
        assert all(isinstance(model.get_submodule(n), (SelfGuided, LowRankLinear, BlockDenseLinear)) for n in names)
        assert all(isinstance(m, nn.Linear) for n, m in model.named_modules() if n.endswith("router.classifier"))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert torch.isfinite(loss)
        save_structured(model, tmp_path / kind)
        again = load_structured(build(), tmp_path / kind)
        torch.testing.assert_close(again(input_ids=ids, labels=ids).logits, model(input_ids=ids, labels=ids).logits)


def test_swapped_layers_keep_the_model_mode(tmp_path):
    """replace_ffn, load_structured and premerge build their layers in the mode of the layer they replace: an
    eval-mode model has no training-mode submodules afterwards, so a reduce_flops self-guided layer, which draws
    a coin per forward in training mode, gives the same output on every eval call."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))

        def forward(self, x):
            return self.mlp(x)

    def ffn_model():
        torch.manual_seed(0)
        return Net()

    model = ffn_model().eval()
    replace_ffn(model, "lowrank", 0.5, self_guided=SelfGuidedSchedule(reduce_flops=True))
    set_progress(model, 1, 4)
    assert not any(m.training for m in model.modules())
    x = torch.randn(3, 16)
    with torch.no_grad():
        ref = model(x)
        assert all(torch.equal(model(x), ref) for _ in range(8))
    save_structured(model, tmp_path / "s")
    again = load_structured(ffn_model().eval(), tmp_path / "s")
    assert not any(m.training for m in again.modules())
    premerge(model, tokens=3, always=True)
    assert not any(m.training for m in model.modules())
    train_model = replace_ffn(ffn_model().train(), "lowrank", 0.5)
    assert all(m.training for m in train_model.modules())


def test_replace_ffn_keeps_a_shared_linear_shared():
    """A linear two FFNs hold (weight sharing across blocks) becomes one structured layer held by both."""
    class Block(nn.Module):
        def __init__(self, up: nn.Linear, down: nn.Linear):
            super().__init__()
            self.mlp = nn.Sequential(up, nn.GELU(), down)

        def forward(self, x):
            return x + self.mlp(x)

    up, down = nn.Linear(16, 64), nn.Linear(64, 16)
    model = nn.Sequential(Block(up, down), Block(up, nn.Linear(64, 16)))
    replace_ffn(model, "lowrank", 0.5)
    assert model[0].mlp[0] is model[1].mlp[0] and isinstance(model[0].mlp[0], LowRankLinear)
    assert model[0].mlp[2] is not model[1].mlp[2]
    assert sum(isinstance(m, LowRankLinear) for m in model.modules()) == 3
    model(torch.randn(2, 16)).sum().backward()
    x = torch.randn(3, 16)
    with torch.no_grad():
        ref = model(x)
    premerge(model.eval(), tokens=1, always=True)          # and premerge merges it once, for both blocks
    assert model[0].mlp[0] is model[1].mlp[0] and type(model[0].mlp[0]) is nn.Linear
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_save_and_load_structured_keep_a_shared_linear_shared(tmp_path):
    class Block(nn.Module):
        def __init__(self, up: nn.Linear):
            super().__init__()
            self.mlp = nn.Sequential(up, nn.GELU(), nn.Linear(64, 16))

        def forward(self, x):
            return x + self.mlp(x)

    def build():
        torch.manual_seed(0)
        up = nn.Linear(16, 64)
        return nn.Sequential(Block(up), Block(up))

    model = replace_ffn(build(), "blockdense", 0.5)
    save_structured(model, tmp_path / "s")
    again = load_structured(build(), tmp_path / "s")
    assert again[0].mlp[0] is again[1].mlp[0] and isinstance(again[1].mlp[0], BlockDenseLinear)
    x = torch.randn(3, 16)
    assert torch.equal(again(x), model(x))


def test_ffn_discovery_across_layouts():
    """FFN linears are found in ALBERT (ffn / ffn_output), XLM (ffns.N.lin1 / lin2) and Phi-3 (fused
    gate_up_proj, d -> 2h); a projector named mlp (d -> d') is left alone; experts fused into one tensor are
    refused (none else found) or reported (some found), clearly."""
    import warnings

    import transformers as T

    small = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    albert = T.AlbertModel(T.AlbertConfig(**small, embedding_size=16))
    assert {n.rsplit(".", 1)[-1] for n in ffn_linears(albert)} == {"ffn", "ffn_output"}
    xlm = T.XLMModel(T.XLMConfig(vocab_size=96, emb_dim=32, n_layers=2, n_heads=4))
    assert len(ffn_linears(xlm)) == 4 and all(n.startswith("ffns.") for n in ffn_linears(xlm))
    phi3 = T.Phi3ForCausalLM(T.Phi3Config(**small, pad_token_id=0))
    assert {n.rsplit(".", 1)[-1] for n in ffn_linears(phi3)} == {"gate_up_proj", "down_proj"}
    replace_ffn(phi3, "lowrank", 0.5)
    phi3(torch.randint(1, 96, (1, 5))).logits.sum().backward()

    class Projector(nn.Module):
        def __init__(self, *widths):
            super().__init__()
            self.mlp = nn.Sequential(*[nn.Linear(a, b) for a, b in zip(widths, widths[1:])])
    for widths in ((32, 32, 8), (16, 64, 64), (16, 32, 32), (16, 32, 48)):
        assert ffn_linears(Projector(*widths)) == {}, widths
    assert len(ffn_linears(Projector(16, 16, 16))) == 2        # an FFN of width 16 -> 16 -> 16

    moe = dict(small, num_local_experts=4, num_experts_per_tok=2, num_key_value_heads=2)
    with pytest.raises(SlimkitError, match="fused weight tensors.*replaces nn.Linear layers only"):
        replace_ffn(T.MixtralForCausalLM(T.MixtralConfig(**moe)), "lowrank", 0.5)
    qwen = T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(**small, num_experts=4, num_experts_per_tok=2,
                                                  moe_intermediate_size=32, shared_expert_intermediate_size=64))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        replace_ffn(qwen, "lowrank", 0.5)
    assert any("fused expert weight tensors" in str(w.message) for w in caught)
    with pytest.raises(SlimkitError, match="structured already"):
        replace_ffn(qwen, "lowrank", 0.5)


def test_numpy_block_counts_and_zero_tokens(tmp_path):
    """NumPy integers for nblocks / nblocks2 / rank give plain-int specs (saved as JSON); zero tokens pass."""
    import json

    import numpy as np

    layers = [make_linear("blockshuffle", 32, 128, None, nblocks=np.int64(2), nblocks2=np.int64(8)),
              BlockDenseLinear(32, 16, rank=np.int64(8), nblocks=np.int64(4)), LowRankLinear(32, 16, rank=np.int64(4))]
    for layer in layers:
        assert json.loads(json.dumps(layer.spec())) == layer.spec()
        assert layer(torch.zeros(0, layer.in_features)).shape == (0, layer.out_features)
    shuffle = layers[0]
    assert shuffle.after_first(torch.zeros(0, 2, 16)).shape == (0, 128)
    model = nn.Sequential(nn.Module())
    model[0].mlp = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 32))
    replace_ffn(model, "blockshuffle", None, nblocks=np.int64(2), nblocks2=np.int64(8))
    save_structured(model, tmp_path / "s")
    assert json.loads((tmp_path / "s" / "structured.json").read_text())


@pytest.mark.parametrize("kind,ratio,kw", [("lowrank", 0.5, {}), ("blockdense", 0.5, {}), ("blockshuffle", 0.25, {}),
                                          ("blockshuffle", None, {"nblocks": 2})])
def test_second_order_gradients(kind, ratio, kw):
    """Gradient penalties and Hessian-vector products differentiate the backward: the custom backward functions
    (block-diagonal products, BlockShuffle's feature-major op) stay differentiable (gradgradcheck, float64), for
    a layer and for the feature-major BlockShuffle FFN."""
    torch.manual_seed(0)
    layer = make_linear(kind, 8, 16, ratio, **kw).double()
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    params = tuple(p for p in layer.parameters())
    fn = lambda x, *ps: torch.func.functional_call(layer, dict(zip([n for n, _ in layer.named_parameters()], ps)), (x,))  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (x, *params))
    if kind == "blockshuffle":
        from slimkit.structured.kernels import eager_ffn

        fc2 = make_linear(kind, 16, 8, ratio, **kw).double()
        ffn = lambda x: eager_ffn(layer, fc2, x)  # noqa: E731
        assert torch.autograd.gradgradcheck(ffn, (x,))


@pytest.mark.parametrize("L", [1, 2, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_token_major_blocks_is_the_second_factor_transposed(L, bias):
    """BlockShuffle's second factor written token-major (cuBLAS directly at one block, the matmul and a transpose
    here on the CPU otherwise) is the feature-major product transposed, block j's row s at column s L + j."""
    from slimkit.structured.interleave import grad_blocks, token_major_blocks, token_major_blocks_reference
    g = torch.Generator().manual_seed(4)
    S, R, t = 6, 5, 7
    w = torch.randn(L, S, R, dtype=torch.float64, generator=g)
    h = torch.randn(R * L, t, dtype=torch.float64, generator=g)
    b = torch.randn(S * L, dtype=torch.float64, generator=g) if bias else None
    want = torch.zeros(t, S * L, dtype=torch.float64)
    for j in range(L):
        for s in range(S):
            want[:, s * L + j] = w[j, s] @ h[j::L]
    if bias:
        want += b
    torch.testing.assert_close(token_major_blocks_reference(h, w, b), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(token_major_blocks(h, w, b), want, rtol=1e-12, atol=1e-12)
    dout = torch.randn(t, S * L, dtype=torch.float64, generator=g)
    dyv, db = grad_blocks(dout, w.shape, bias)
    assert dyv.shape == (L, S, t)
    for j in range(L):
        torch.testing.assert_close(dyv[j], dout[:, j::L].t(), rtol=0, atol=0)
    assert (db is None) == (not bias)
    if bias:
        torch.testing.assert_close(db, dout.sum(0), rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the recompiles showed on CUDA only")
@pytest.mark.parametrize("kind", ["blockdense", "blockshuffle"])
def test_compiled_block_layers_do_not_recompile_every_call(kind):
    """torch.compile of an FFN of block-diagonal layers: after the first calls, later ones reuse the compiled
    frames. (With the autocast-off context built by a helper around the autograd Function, whose out= matmuls
    break the graph, the resumed frame guarded the freed context object and recompiled at every call.)"""
    import torch._dynamo
    from slimkit.structured.kernels import eager_ffn
    torch._dynamo.reset()
    fc1 = make_linear(kind, 64, 256, 0.25).cuda().bfloat16()
    fc2 = make_linear(kind, 256, 64, 0.25).cuda().bfloat16()
    f = torch.compile(lambda x: eager_ffn(fc1, fc2, x, "tanh"), dynamic=False)
    x = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)

    def calls():
        with torch.no_grad():
            f(x)
        f(x.detach().requires_grad_()).sum().backward()
    calls(), calls()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            calls()


@pytest.mark.parametrize("kind,ratio", [("blockshuffle", 0.25), ("blockshuffle", 0.3125), ("blockshuffle", 0.5),
                                        ("blockdense", 0.25), ("lowrank", 0.3)])
def test_compiled_ffn_is_one_graph_and_matches_eager(kind, ratio):
    """torch.compile takes a structured FFN's forward and backward whole: no graph break (the strided out= matmuls
    run as the custom op slimkit::bmm_t01; before, each one broke the graph, 8-11 graphs an FFN), and the compiled
    forward and gradients equal the eager ones."""
    import torch._dynamo
    from slimkit.structured.kernels import eager_ffn
    torch.manual_seed(0)
    fc1, fc2 = make_linear(kind, 64, 256, ratio), make_linear(kind, 256, 64, ratio)
    params = [*fc1.parameters(), *fc2.parameters()]
    with torch.no_grad():
        for p in params:
            p.add_(0.01 * torch.randn_like(p))       # biases nonzero, so their gradients are checked as well

    def f(x):
        return eager_ffn(fc1, fc2, x, "tanh")
    x, g = torch.randn(40, 64, requires_grad=True), torch.randn(40, 64)
    torch._dynamo.reset()
    ex = torch._dynamo.explain(f)(x)
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), [b.reason for b in ex.break_reasons]

    def run(fn):
        x.grad = None
        for p in params:
            p.grad = None
        y = fn(x)
        y.backward(g)
        return [y.detach(), x.grad, *(p.grad for p in params)]
    torch._dynamo.reset()
    got, want = run(torch.compile(f, backend="aot_eager", dynamic=False)), run(f)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_bmm_t01_custom_op():
    """slimkit::bmm_t01 (what torch.compile sees of the strided-output matmuls): its fake (shape) function, schema
    and autograd registration pass torch.library.opcheck, and it equals the matmul written through the view."""
    from slimkit.structured.interleave import bmm_t01
    a, b = torch.randn(3, 5, 4, dtype=torch.float64), torch.randn(3, 4, 6, dtype=torch.float64)
    torch.library.opcheck(torch.ops.slimkit.bmm_t01.default, (a, b, [5, 18], [5, 3, 6]))
    y = bmm_t01(a, b, (5, 18), (5, 3, 6))
    assert y.is_contiguous() and y.shape == (5, 18)
    torch.testing.assert_close(y.view(5, 3, 6), torch.bmm(a, b).transpose(0, 1), rtol=0, atol=0)


def test_compiled_self_guided_gpt_is_one_graph():
    """train-lm --compile's model: a GPT whose FFNs are self-guided BlockShuffle layers compiles to one graph."""
    import torch._dynamo
    from slimkit.structured.gpt import GPT, GPTConfig
    from slimkit.structured.replace import replace_ffn
    torch.manual_seed(0)
    m = replace_ffn(GPT(GPTConfig(vocab_size=64, n_layer=2, n_head=2, d_model=64, seq_len=16)), "blockshuffle",
                    0.3125, self_guided=True)
    torch._dynamo.reset()
    ex = torch._dynamo.explain(m)(torch.randint(0, 64, (2, 16)))
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), [b.reason for b in ex.break_reasons]
