"""AdaRound (Nagel et al., 2020): learn each layer's weight rounding, one layer at a time.

Each layer is its own block; its input comes from the already-quantized layers before it, its activation
quantizer stays off while its rounding is learned (the paper reconstructs weights only), and the
activation steps stay those of the observer.
"""
from __future__ import annotations

from ..core.adapters import find_blocks, warn_skipped
from ..core.reconstruct import reconstruct_model
from .common import recon_config


def run(q_model, fp_model, data, cfg, device) -> dict:
    blocks, skipped = find_blocks(q_model, data[:1].to(device), granularity="layer")
    warn_skipped(skipped, "adaround", q_model)
    rc = recon_config(cfg, adaround=True, learn_act=False, act_in_recon=False, quant_prob=1.0, mix_inputs=False)
    return reconstruct_model(q_model, fp_model, data, blocks, rc, device)
