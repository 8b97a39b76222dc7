"""A fingerprint of a float model's weights, recorded with what slimkit makes from it.

`slimkit eval ARTIFACT` rebuilds the float reference from what the artifact recorded (a shipped model, a factory
and its weights file, a Hugging Face folder). Nothing guarantees that the rebuilt model is the one compressed: a
factory may build random weights on every call, a folder may have been saved over since. Comparing the
fingerprint recorded at compression time with the rebuilt model's says so, instead of reporting agreement with
another model.
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn


def weights_digest(model: nn.Module) -> str:
    """A short hash of every state tensor's name, shape and float64 sums (of values and of magnitudes, to 10
    significant digits: reductions in another thread count round differently in the last bits)."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
            if t.numel() and not t.is_complex():
                t = t.detach() if t.is_floating_point() else t.detach().double()
                h.update(f"{torch.sum(t, dtype=torch.float64).item():.10g}"
                         f"{torch.sum(t.abs(), dtype=torch.float64).item():.10g}".encode())
    return h.hexdigest()[:16]


def reference_digest(model: nn.Module) -> str | None:
    """The fingerprint of the float model `model` descends from: the one its own record carries when slimkit made
    it (a sparse model being quantized), else its own, when slimkit can rebuild it by name (else None: there is no
    reference to check)."""
    info = getattr(model, "slimkit_info", None) or {}
    if "reference_digest" in info or info.get("model_spec") or info.get("sparsity"):
        return info.get("reference_digest")
    return weights_digest(model) if getattr(model, "_slimkit_spec", None) else None
