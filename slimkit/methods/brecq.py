"""BRECQ (Li et al., 2021): reconstruct block by block (residual blocks, inverted residuals), learning
AdaRound weights and activation step sizes together, on inputs from the already-quantized blocks."""
from __future__ import annotations

from ..core.adapters import find_blocks, warn_if_layerwise, warn_skipped
from ..core.reconstruct import reconstruct_model
from .common import recon_config


def run(q_model, fp_model, data, cfg, device) -> dict:
    blocks, skipped = find_blocks(q_model, data[:1].to(device), block_names=cfg.blocks)
    warn_if_layerwise(blocks, "brecq")
    warn_skipped(skipped, "brecq", q_model)
    rc = recon_config(cfg, adaround=True, learn_act=True, act_in_recon=True, quant_prob=1.0, mix_inputs=False)
    return reconstruct_model(q_model, fp_model, data, blocks, rc, device)
