"""QDrop (Wei et al., ICLR 2022): block reconstruction with activation quantization randomly dropped.

Same engine and blocks as BRECQ; during reconstruction every element of every activation quantizer's
output keeps its quantized value with probability `drop_prob` (0.5) and its float value otherwise, and the
block input, quantized once (core.entry), keeps it with the same probability and takes the float model's input
otherwise: QDrop's torch.where(rand < p, quantized input, float input). The paper
shows this flattens the optimised model on both calibration and test data, which is what makes W2A4 work.
"""
from __future__ import annotations

from ..core.adapters import find_blocks, warn_if_layerwise, warn_skipped
from ..core.reconstruct import reconstruct_model
from .common import recon_config


def run(q_model, fp_model, data, cfg, device) -> dict:
    blocks, skipped = find_blocks(q_model, data[:1].to(device), block_names=cfg.blocks)
    warn_if_layerwise(blocks, "qdrop")
    warn_skipped(skipped, "qdrop", q_model)
    rc = recon_config(cfg, adaround=True, learn_act=True, act_in_recon=True,
                      quant_prob=cfg.drop_prob, mix_inputs=cfg.drop_inputs)
    return reconstruct_model(q_model, fp_model, data, blocks, rc, device)
