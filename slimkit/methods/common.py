"""What the reconstruction methods share: turning the user's config into the engine's."""
from __future__ import annotations

from ..core.reconstruct import ReconConfig


def recon_config(cfg, **method_fields) -> ReconConfig:
    return ReconConfig(iters=cfg.iters, batch_size=cfg.batch_size, lr_round=cfg.lr_round, lr_act=cfg.lr_act,
                       round_weight=cfg.round_weight, warmup=cfg.warmup, seed=cfg.seed, progress=cfg.progress,
                       compile=cfg.compile, cuda_graph=cfg.cuda_graph,
                       **method_fields)
