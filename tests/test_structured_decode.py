"""CUDA-graph decoding (slimkit.structured.decode): the CPU fallback, input checks, choose_merge(graph=True); and,
on a GPU only, replay against eager, the per-signature cache and in-place weight updates."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from slimkit.errors import SlimkitError
from slimkit.structured import GraphedModule, MergeChoice, choose_merge, graphed, make_linear, premerge
from slimkit.structured.premerge import mergeable_layers

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _layers() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {"lowrank": make_linear("lowrank", 32, 64, 0.32).eval(),
            "blockdense": make_linear("blockdense", 32, 64, 0.3).eval(),
            "ffn": nn.Sequential(make_linear("lowrank", 32, 128, 0.32), nn.GELU(),
                                 make_linear("blockdense", 128, 32, 0.3)).eval()}


class Pair(nn.Module):
    """Two outputs from two inputs, as a tuple, a list, or (tensor, None) like GPT's (logits, loss)."""

    def __init__(self, kind: type = tuple, none: bool = False):
        super().__init__()
        self.fc, self.kind, self.none = make_linear("lowrank", 32, 64, 0.32), kind, none

    def forward(self, x, y):
        return self.kind([self.fc(x), None if self.none else self.fc(y) * 2])


class Counted(nn.Module):
    """Counts Python forward calls: a replay makes none, a capture makes warm-up + 1."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module, self.calls = module, 0

    def forward(self, x):
        self.calls += 1
        return self.module(x)


# ---------- CPU: the fallback and the checks ----------

@pytest.mark.parametrize("name", ["lowrank", "blockdense", "ffn"])
def test_cpu_fallback_equals_module_exactly(name):
    module = _layers()[name]
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))
    g = graphed(module, x)
    assert isinstance(g, GraphedModule)
    out = g(x)
    assert torch.equal(out, module(x)) and not out.requires_grad
    assert not g.graphs and g.device is None                              # nothing captured off CUDA


@pytest.mark.parametrize("kind,none", [(tuple, False), (list, False), (tuple, True)])
def test_cpu_fallback_tuple_outputs(kind, none):
    torch.manual_seed(0)
    module = Pair(kind, none).eval()
    x, y = torch.randn(3, 32), torch.randn(3, 32)
    out, ref = graphed(module)(x, y), module(x, y)
    assert type(out) is kind and len(out) == 2 and torch.equal(out[0], ref[0])
    assert out[1] is None if none else torch.equal(out[1], ref[1])


def test_training_mode_is_refused():
    layer = _layers()["lowrank"]
    x = torch.randn(2, 32)
    with pytest.raises(SlimkitError, match=r"call \.eval\(\) first"):
        graphed(layer.train(), x)
    g = graphed(layer.eval(), x)
    g.train()                                                              # reaches the wrapped module too
    with pytest.raises(SlimkitError, match="training mode"):
        g(x)


@pytest.mark.parametrize("kw", [{"warmup": 2.5}, {"warmup": float("nan")}, {"warmup": "3"}, {"warmup": None},
                                {"max_shapes": float("nan")}, {"max_shapes": float("inf")}, {"max_shapes": 0},
                                {"warmup": True}])
def test_bad_warmup_and_max_shapes_are_refused(kw):
    """Checked where they are given, on any device: on a GPU a fractional warmup fails at the first capture and
    a NaN or infinite max_shapes never drops a graph."""
    with pytest.raises(SlimkitError, match="must be an integer of at least 1"):
        graphed(_layers()["lowrank"], **kw)
    with pytest.raises(SlimkitError, match="wraps an nn.Module"):
        graphed(lambda x: x)


def test_non_tensor_inputs_are_refused():
    g = graphed(Pair().eval())
    with pytest.raises(SlimkitError, match=r"must be tensors.*#1 \(int\)"):
        g(torch.randn(2, 32), 3)
    with pytest.raises(SlimkitError, match=r"#0 \(list\)"):
        g([torch.randn(2, 32)], torch.randn(2, 32))


class _FakeCuda:
    """Stand-ins for the CUDA stream and graph calls that GraphedModule._capture makes, so that its capture runs
    on the CPU: the module's forward runs as it would during a real capture."""

    class Stream:
        def wait_stream(self, other):
            pass

    class CUDAGraph:
        pass

    @staticmethod
    def stream(s):
        import contextlib
        return contextlib.nullcontext()

    graph = stream

    @staticmethod
    def current_stream():
        return _FakeCuda.Stream()


def test_capture_records_no_autograd_graph(monkeypatch):
    """The capture leaves inference mode (its static buffers must be ordinary tensors), and leaving it turns
    gradient recording back on: the warm-up and captured forwards must still run under no_grad, or a decoding
    graph records autograd graphs, keeps their saved activations and takes the layers' training paths."""
    seen = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = make_linear("lowrank", 32, 64, 0.32)

        def forward(self, x):
            seen.append(torch.is_grad_enabled())
            return self.fc(x)

    for name in ("Stream", "CUDAGraph", "stream", "graph", "current_stream"):
        monkeypatch.setattr(torch.cuda, name, getattr(_FakeCuda, name))
    module = GraphedModule(Spy().eval(), warmup=2)
    x = torch.randn(3, 32)
    with torch.inference_mode():          # the caller's mode must not matter
        cap = module._capture((x, ))
    with torch.no_grad():
        cap2 = module._capture((x, ))
    cap3 = module._capture((x, ))
    assert seen == [False] * 9
    for c in (cap, cap2, cap3):
        assert not c.output.requires_grad and c.output.grad_fn is None
        assert not c.inputs[0].is_inference()        # static buffers later calls may copy into


def test_choose_merge_graph_flag_on_cpu_caches_separately():
    torch.manual_seed(0)
    layer = make_linear("lowrank", 48, 96, 0.32).eval()
    plain = choose_merge(layer, tokens=5, min_run_time=0.01)
    graph = choose_merge(layer, tokens=5, min_run_time=0.01, graph=True)
    assert isinstance(graph, MergeChoice) and graph.merged_ms > 0 and graph.structured_ms > 0
    assert graph is not plain                                              # its own cache entry
    assert choose_merge(layer, tokens=5, min_run_time=0.01, graph=True) is graph
    assert choose_merge(layer, tokens=5, min_run_time=0.01) is plain
    model = nn.Sequential(layer, nn.GELU()).eval()
    x = torch.randn(5, 48)
    with torch.no_grad():
        ref = model(x)
        premerge(model, tokens=5, min_run_time=0.01, graph=True)           # uses the cached choice
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)


# ---------- GPU: replay ----------

@gpu
def test_graph_equals_eager_for_two_shapes():
    ffn = _layers()["ffn"].cuda()
    g = graphed(ffn, torch.randn(4, 32, device="cuda"))
    for tokens in (4, 16):
        with torch.inference_mode():                                       # captured (16) or replayed (4) in it,
            g(torch.randn(tokens, 32, device="cuda"))
        for _ in range(2):                                                 # then replayed outside it on new data
            x = torch.randn(tokens, 32, device="cuda")
            with torch.no_grad():
                ref = ffn(x)
            torch.testing.assert_close(g(x), ref, atol=1e-5, rtol=1e-5)
    assert len(g.graphs) == 2 and g.device == torch.device("cuda", torch.cuda.current_device())
    with pytest.raises(SlimkitError, match="first capture"):
        g(torch.randn(4, 32))


@gpu
def test_graph_tuple_outputs_and_static_buffers():
    torch.manual_seed(0)
    module = Pair(list).cuda().eval()
    x, y = torch.randn(3, 32, device="cuda"), torch.randn(3, 32, device="cuda")
    with torch.no_grad():
        ref = module(x, y)
    out = graphed(module, x, y)(x, y)
    assert type(out) is list and all(torch.allclose(o, r, atol=1e-5, rtol=1e-5) for o, r in zip(out, ref))
    static = graphed(module, x, y, clone_output=False)
    first = static(x, y)
    assert static(2 * x, y)[0] is first[0]                                 # the same buffer, overwritten
    with torch.no_grad():
        torch.testing.assert_close(first[0], module(2 * x, y)[0], atol=1e-5, rtol=1e-5)


@gpu
def test_graph_cache_drops_least_recently_used_beyond_max_shapes():
    counted = Counted(_layers()["lowrank"]).cuda().eval()
    g = graphed(counted, warmup=1, max_shapes=2)
    x = {t: torch.randn(t, 32, device="cuda") for t in (1, 2, 3)}
    for t, calls in [(1, 2), (2, 4), (1, 4), (3, 6), (1, 6), (2, 8)]:     # a capture costs warm-up + 1 calls
        out = g(x[t])
        assert counted.calls == calls, t
        with torch.no_grad():
            torch.testing.assert_close(out, counted.module(x[t]), atol=1e-5, rtol=1e-5)
    assert len(g.graphs) == 2                  # 3 dropped 2 (1 was used later), 2 dropped 3; FIFO would drop 1


@gpu
def test_graph_sees_in_place_weight_updates():
    layer = _layers()["lowrank"].cuda()
    x = torch.randn(4, 32, device="cuda")
    g = graphed(layer, x)
    with torch.no_grad():
        layer.u.mul_(2.0)
        layer.bias.add_(1.0)
        ref = layer(x)
    torch.testing.assert_close(g(x), ref, atol=1e-5, rtol=1e-5)


@gpu
def test_premerge_graph_on_gpu_times_replays_and_keeps_outputs():
    from slimkit.structured.premerge import _CACHE
    _CACHE.clear()
    model = _layers()["ffn"].cuda().eval()
    x = torch.randn(4, 32, device="cuda")
    with torch.no_grad():
        ref = model(x)
    for name, layer in mergeable_layers(model).items():
        c = choose_merge(layer, tokens=4, min_run_time=0.01, graph=True)
        assert c.merged_ms > 0 and c.structured_ms > 0 and c.merge == (c.merged_ms < c.structured_ms)
    premerge(model, tokens=4, min_run_time=0.01, graph=True)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)


def test_premerge_decides_an_ffn_pair_by_timing_it_whole(monkeypatch):
    """The two linears of an FFN that runs them as one (slimkit's GPT MLP: `ffn_pair`) are decided by timing the
    MLP in its four forms, not each layer alone (alone, a layer runs its own path, not the pair's small-token
    kernels: at d_model 1024 on an H100 that merged BlockShuffle FFNs 1.19x faster unmerged). With made-up times
    where each layer alone would merge and the pair is fastest with only fc2 merged, only fc2 is merged; a layer
    outside any pair is still decided alone; the outputs stay the layers'."""
    import importlib
    from slimkit.structured import PairChoice, choose_pair_merge
    from slimkit.structured.gpt import GPTConfig, MLP
    from slimkit.structured.premerge import _CACHE
    _CACHE.clear()
    torch.manual_seed(0)
    mlp = MLP(GPTConfig(vocab_size=64, d_model=32, n_layer=1, n_head=2, ffn="gelu"))
    mlp.fc1, mlp.fc2 = make_linear("lowrank", 32, 128, 0.32), make_linear("blockshuffle", 128, 32, 0.25)
    model = nn.ModuleDict({"mlp": mlp, "head": make_linear("lowrank", 32, 16, 0.32)}).eval()
    forms = {(False, False): 1.0, (True, True): 2.0, (True, False): 3.0, (False, True): 0.5}

    def fake(module, x, min_run_time, graph):
        if isinstance(module, MLP):
            return forms[(isinstance(module.fc1, nn.Linear), isinstance(module.fc2, nn.Linear))]
        return 0.1 if isinstance(module, nn.Linear) else 1.0        # alone, every layer would merge
    monkeypatch.setattr(importlib.import_module("slimkit.structured.premerge"), "_median_ms", fake)
    x = torch.randn(5, 32)
    with torch.no_grad():
        ref, ref_head = mlp(x), model["head"](x)
    choice = choose_pair_merge(mlp, tokens=5, min_run_time=0.01)
    assert isinstance(choice, PairChoice) and choice.merge == (False, True) and choice.times_ms == forms
    premerge(model, tokens=5, min_run_time=0.01)
    assert not isinstance(mlp.fc1, nn.Linear) and isinstance(mlp.fc2, nn.Linear)
    assert isinstance(model["head"], nn.Linear)                     # alone: decided by choose_merge
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model["head"](x), ref_head, atol=1e-5, rtol=1e-5)
    swiglu = MLP(GPTConfig(vocab_size=64, d_model=32, n_layer=1, n_head=2, ffn="swiglu"))
    with pytest.raises(SlimkitError, match="ffn_pair"):
        choose_pair_merge(swiglu, tokens=5)                         # SwiGLU's linears do not run as one


def test_choose_pair_merge_keeps_ffn_classes_of_one_name_apart(monkeypatch):
    """choose_pair_merge's cache told FFN modules apart by their class's name: a model's own FFN class named MLP,
    whose forward runs otherwise than slimkit's GPT MLP, took the GPT MLP's cached choice (same linears, tokens,
    device, dtype) instead of being timed."""
    import copy
    import importlib
    from slimkit.structured import choose_pair_merge
    from slimkit.structured.gpt import MLP as GPTMLP, GPTConfig
    from slimkit.structured.premerge import _CACHE
    _CACHE.clear()

    class MLP(nn.Module):
        ffn_pair = ("fc1", "fc2")

        def __init__(self, fc1: nn.Module, fc2: nn.Module):
            super().__init__()
            self.fc1, self.fc2 = fc1, fc2

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    torch.manual_seed(0)
    gpt = GPTMLP(GPTConfig(vocab_size=64, d_model=32, n_layer=1, n_head=2, ffn="gelu"))
    gpt.fc1, gpt.fc2 = make_linear("lowrank", 32, 128, 0.32), make_linear("lowrank", 128, 32, 0.32)
    own = MLP(copy.deepcopy(gpt.fc1), copy.deepcopy(gpt.fc2))

    def fake(module, x, min_run_time, graph):       # each class is fastest in another form
        best = (False, True) if isinstance(module, GPTMLP) else (True, True)
        return 0.5 if (isinstance(module.fc1, nn.Linear), isinstance(module.fc2, nn.Linear)) == best else 1.0
    monkeypatch.setattr(importlib.import_module("slimkit.structured.premerge"), "_median_ms", fake)
    assert choose_pair_merge(gpt, tokens=5, min_run_time=0.01).merge == (False, True)
    assert choose_pair_merge(own, tokens=5, min_run_time=0.01).merge == (True, True)


def test_choose_pair_merge_times_each_ffn_kernel_and_gelu_form_apart(monkeypatch):
    """The GPT MLP's forward runs otherwise with kernel 'cublaslt' or another GELU form: choose_pair_merge keeps a
    choice per setting instead of reusing the one timed under the other."""
    import copy
    import importlib
    from slimkit.structured import choose_pair_merge
    from slimkit.structured.gpt import MLP as GPTMLP, GPTConfig
    from slimkit.structured.premerge import _CACHE
    _CACHE.clear()
    torch.manual_seed(0)
    eager = GPTMLP(GPTConfig(vocab_size=64, d_model=32, n_layer=1, n_head=2, ffn="gelu"))
    eager.fc1, eager.fc2 = make_linear("lowrank", 32, 128, 0.32), make_linear("lowrank", 128, 32, 0.32)
    lt, tanh = copy.deepcopy(eager), copy.deepcopy(eager)
    lt.kernel, tanh.approximate = "cublaslt", "tanh"
    best = {("eager", "none"): (False, False), ("cublaslt", "none"): (True, True), ("eager", "tanh"): (True, False)}

    def fake(module, x, min_run_time, graph):       # each setting is fastest in another form
        form = (isinstance(module.fc1, nn.Linear), isinstance(module.fc2, nn.Linear))
        return 0.5 if form == best[module.kernel, module.approximate] else 1.0
    monkeypatch.setattr(importlib.import_module("slimkit.structured.premerge"), "_median_ms", fake)
    for m in (eager, lt, tanh, eager):
        assert choose_pair_merge(m, tokens=5, min_run_time=0.01).merge == best[m.kernel, m.approximate]


@gpu
@pytest.mark.parametrize("ffn", [None, "lowrank", "blockshuffle", "blockdense"])
def test_generate_graphed_equals_eager_on_gpu(ffn):
    """On a GPU, generate through one CUDA graph a step (static KV cache, sampling in the graph, the structured
    FFNs through the small-token kernels, which run in the capture) gives the eager steps' tokens, greedy and
    seeded (fp32, where the two paths' rounding cannot flip a choice); a second call replays the kept graph and
    repeats them; bf16 runs too."""
    from slimkit.structured import gpt as G
    from slimkit.structured import kernels, replace_ffn
    torch.manual_seed(0)
    model = G.GPT(G.GPTConfig(vocab_size=64, n_layer=2, n_head=4, d_model=128, seq_len=48))
    if ffn:
        replace_ffn(model, ffn, 0.32)
    model = model.cuda().eval()
    idx = torch.randint(0, 64, (4, 8), device="cuda")
    kernels._SMALL_SEEN.clear()
    gen = lambda: torch.Generator("cuda").manual_seed(3)      # noqa: E731
    for t, k in ((0.0, None), (0.9, 20)):
        a, b = (model.generate(idx, 24, t, k, gen(), cuda_graph=g) for g in (True, False))
        assert torch.equal(a, b) and a.shape == (4, 32)
    assert bool(ffn) == any(key[2] == 4 for key in kernels._SMALL_SEEN)     # the FFN kernels ran in the graph
    kept = G._DECODE_GRAPHS[model][1]
    assert kept.graph is not None
    assert torch.equal(model.generate(idx, 24, 0.9, 20, gen()), a) and G._DECODE_GRAPHS[model][1] is kept
    model = model.to(torch.bfloat16)
    a, b = (model.generate(idx, 24, 0.9, 20, gen()) for _ in range(2))
    assert torch.equal(a, b) and a.shape == (4, 32) and torch.equal(a[:, :8], idx)


def test_graphed_static_inputs_do_not_record_autograd(monkeypatch):
    """The static input buffers are cloned under no_grad: an input that requires grad leaves them no autograd
    graph (which would keep the first call's graph, and its saved activations, alive as long as the capture)."""
    import importlib
    dec = importlib.import_module("slimkit.structured.decode")
    monkeypatch.setattr(dec, "capture", lambda fn, warmup=3, after_warmup=None: (None, fn()))   # no GPU needed
    layer = _layers()["lowrank"]
    x = torch.randn(4, 32, requires_grad=True) * 2
    with torch.no_grad():                   # as GraphedModule.forward calls _capture
        cap = GraphedModule(layer)._capture((x,))
    assert not cap.inputs[0].requires_grad and cap.inputs[0].grad_fn is None
