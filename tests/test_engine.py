"""The reconstruction engine's fast paths compute the same function as the plain one."""
from __future__ import annotations

import torch

from slimkit.core.quantizer import compiled_static_fake_quant, static_fake_quant
from slimkit.core.reconstruct import ReconConfig, beta_at


def test_compiled_fake_quant_matches_eager():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4096, generator=g) * 3
    for learned in (False, True):
        outs, grads = [], []
        for fn in (static_fake_quant, compiled_static_fake_quant()):
            xi = x.clone().requires_grad_(True)
            s = torch.tensor([[0.05]], requires_grad=learned)
            z = torch.tensor([[7.0]])
            out = fn(xi, s, z, 0, 15, 0.01, learned, 1.0)
            (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
            outs.append(out.detach())
            grads.append((xi.grad.clone(), s.grad.clone() if learned else None))
        assert torch.equal(outs[0], outs[1])
        assert torch.allclose(grads[0][0], grads[1][0])
        if learned:
            assert torch.allclose(grads[0][1], grads[1][1], rtol=1e-4, atol=1e-6)


def test_compiled_drop_keeps_about_half():
    x = torch.randn(1, 100_000)
    out = compiled_static_fake_quant()(x, torch.tensor([[0.05]]), torch.tensor([[128.0]]), 0, 255, 1.0, False, 0.5)
    kept = (out != x).float().mean().item() / (static_fake_quant(x, torch.tensor([[0.05]]), torch.tensor([[128.0]]),
                                                                  0, 255, 1.0, False, 1.0) != x).float().mean().item()
    assert 0.45 < kept < 0.55


def test_schedule_edges():
    cfg = ReconConfig(iters=1000, warmup=0.2)
    assert beta_at(0, cfg) == beta_at(199, cfg) == 20.0
    assert abs(beta_at(1000, cfg) - 2.0) < 1e-9
