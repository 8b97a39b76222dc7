"""Weight gradients on a side stream (slimkit.structured.layers.Beside): the backward's results do not change by a
bit, eager or captured in a CUDA graph, on every path that uses it (the layers' own Functions, the Triton fused
FFN, the cuBLASLt epilogue FFNs). The GPU tests run where CUDA is (and nvmath-python, for the epilogue ones)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimkit.structured.epilogue as EP
import slimkit.structured.layers as L
from slimkit.structured import make_linear
from slimkit.structured.kernels import fused_ffn


def test_beside_off_the_gpu_is_a_plain_call():
    side = L.Beside(torch.zeros(1))
    assert not side.on
    a, b = torch.randn(3, 4), torch.randn(4, 5)
    assert torch.equal(side.run(torch.mm, a, b), a @ b)
    side.join()
    assert side.held == []


def _pair(kind1, kind2, d=256, hidden=1024, bias=True):
    torch.manual_seed(0)
    fc1 = nn.Linear(d, hidden, bias=bias) if kind1 == "dense" else make_linear(kind1, d, hidden, 0.5, bias)
    fc2 = nn.Linear(hidden, d, bias=bias) if kind2 == "dense" else make_linear(kind2, hidden, d, 0.5, bias)
    if bias:
        with torch.no_grad():
            fc1.bias.normal_(0, 0.5)
            fc2.bias.normal_(0, 0.5)
    return fc1.cuda().bfloat16(), fc2.cuda().bfloat16()


def _grads(fc1, fc2, x, grad, fn, graph: bool):
    """Output, input and parameter gradients of one step; with graph=True the step is captured and replayed."""
    params = list(fc1.parameters()) + list(fc2.parameters())
    xg = x.clone().requires_grad_(True)

    def step():
        for p in params:
            p.grad = None
        xg.grad = None
        y = fn(fc1, fc2, xg)
        y.backward(grad)
        return y
    if not graph:
        y = step()
        torch.cuda.synchronize()
        return [y.detach().clone(), xg.grad.clone()] + [p.grad.clone() for p in params]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = step()
    g.replay()
    torch.cuda.synchronize()
    return [y.detach().clone(), xg.grad.clone()] + [p.grad.clone() for p in params]


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PATHS = {
    "layers": lambda a, b, t: b(F.gelu(a(t), approximate="tanh")),
    "triton": lambda a, b, t: fused_ffn(a, b, t, "tanh"),
    "cublaslt": lambda a, b, t: fused_ffn(a, b, t, "tanh", matmul="cublaslt"),
}


@gpu
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("kinds", [("dense", "dense"), ("lowrank", "lowrank"), ("blockdense", "blockdense"),
                                   ("blockshuffle", "blockshuffle"), ("lowrank", "blockshuffle"),
                                   ("blockdense", "dense")])
@pytest.mark.parametrize("graph", [False, True])
def test_side_stream_changes_no_bit(monkeypatch, path, kinds, graph):
    if path == "cublaslt" and EP.lt is None:
        pytest.skip("needs nvmath-python")
    fc1, fc2 = _pair(*kinds)
    x = torch.randn(2048, 256, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn_like(x)
    monkeypatch.setattr(L, "OVERLAP", False)
    want = _grads(fc1, fc2, x.clone(), grad, PATHS[path], graph)
    monkeypatch.setattr(L, "OVERLAP", True)
    got = _grads(fc1, fc2, x.clone(), grad, PATHS[path], graph)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
