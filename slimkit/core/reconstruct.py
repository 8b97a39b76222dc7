"""The block-wise reconstruction engine shared by AdaRound, BRECQ, QDrop and the later methods.

For each block in execution order:
1. cache, on the calibration set, the block's full-precision input and output (from the float model) and
   its input as the already-quantized earlier blocks produce it (from the quantized model);
2. optimise the block's learnable quantization parameters (AdaRound's V with Adam at lr 1e-3, LSQ
   activation steps with Adam at lr 4e-5 and cosine decay) against the block output error
   sum_c (y - y_hat)^2 averaged over the rest, plus AdaRound's rounding regulariser (weight 0.01, beta
   20 -> 2 after a 20% warm-up), the defaults of QDrop's public code;
3. freeze the block (hard rounding, integer weight codes) and go on.
QDrop (Wei et al., 2022) drops activation quantization at random: each element of each activation
quantizer's output, and of the block input, keeps its quantized value with probability `quant_prob`
(0.5) and takes the full-precision one otherwise. Memory: only one block's caches are held at a time.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import Block
from .wrap import QuantLayer, quant_layers


@dataclass
class ReconConfig:
    iters: int = 20000
    batch_size: int = 32
    lr_round: float = 1e-3
    lr_act: float = 4e-5
    round_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    adaround: bool = True  # learn weight rounding
    learn_act: bool = True  # learn activation step sizes (LSQ)
    act_in_recon: bool = True  # keep activation quantization on while reconstructing
    quant_prob: float = 1.0  # QDrop: probability that an element keeps its quantized value
    mix_inputs: bool = False  # QDrop: also mix quantized and float block inputs with that probability
    cache_device: str | None = None  # where block caches live; default: the compute device
    seed: int = 0
    progress: bool = True
    extra_loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)


class _Stop(Exception):
    pass


def capture(model: nn.Module, module: nn.Module, data: torch.Tensor, batch_size: int, device: torch.device,
            want_output: bool, cache_device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None, tuple, dict]:
    """Run `model` over `data` and return what `module` received (its tensor input, its other arguments)
    and, if asked, what it returned. The forward stops right after `module`, so later layers cost nothing."""
    inputs, outputs = [], []
    extra: dict = {}

    def pre(m, args, kwargs):
        inputs.append(args[0].detach().to(cache_device))
        extra["args"], extra["kwargs"] = args[1:], kwargs
        if not want_output:
            raise _Stop

    def post(m, args, kwargs, out):
        outputs.append(out.detach().to(cache_device))
        raise _Stop

    h1 = module.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = module.register_forward_hook(post, with_kwargs=True)
    try:
        with torch.no_grad():
            for i in range(0, len(data), batch_size):
                try:
                    model(data[i : i + batch_size].to(device))
                except _Stop:
                    pass
    finally:
        h1.remove()
        h2.remove()
    return torch.cat(inputs), (torch.cat(outputs) if want_output else None), extra.get("args", ()), extra.get("kwargs", {})


def output_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """QDrop's reconstruction loss: squared error summed over channels (dim 1), averaged over the rest."""
    return (pred - target).pow(2).sum(1).mean()


def beta_at(step: int, cfg: ReconConfig) -> float:
    """AdaRound's annealed beta: constant through the warm-up, then linear from beta_start to beta_end."""
    start = cfg.warmup * cfg.iters
    if step < start:
        return cfg.beta_start
    rel = (step - start) / max(1.0, cfg.iters - start)
    return cfg.beta_end + (cfg.beta_start - cfg.beta_end) * max(0.0, 1 - rel)


def reconstruct_block(block: nn.Module, q_in: torch.Tensor, fp_in: torch.Tensor, fp_out: torch.Tensor,
                      cfg: ReconConfig, device: torch.device, args: tuple = (), kwargs: dict | None = None,
                      desc: str = "") -> dict:
    """Optimise one block's quantizers against its float output; returns loss statistics."""
    kwargs = kwargs or {}
    layers = [block] if isinstance(block, QuantLayer) else list(quant_layers(block).values())
    round_params, act_params = [], []
    for layer in layers:
        if cfg.adaround and layer.w_quant is not None:
            layer.w_quant.init_adaround(layer.layer.weight)
            round_params.append(layer.w_quant.alpha)
        if layer.a_quant is not None:
            layer.a_quant.enabled = cfg.act_in_recon
            layer.a_quant.quant_prob = cfg.quant_prob
            if cfg.learn_act and cfg.act_in_recon and not layer.a_quant.dynamic:
                layer.a_quant.make_learnable()
                act_params.append(layer.a_quant.scale)
    frozen = [p for p in block.parameters() if p.requires_grad and not any(p is q for q in round_params + act_params)]
    for p in frozen:
        p.requires_grad_(False)
    opt_round = torch.optim.Adam(round_params, lr=cfg.lr_round) if round_params else None
    opt_act = torch.optim.Adam(act_params, lr=cfg.lr_act) if act_params else None
    sched_act = torch.optim.lr_scheduler.CosineAnnealingLR(opt_act, T_max=cfg.iters, eta_min=0.0) if opt_act else None

    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    n = len(q_in)
    first_loss = last_loss = float("nan")
    iters = cfg.iters if (round_params or act_params) else 0
    bar = tqdm(range(iters), desc=desc, disable=not cfg.progress, leave=False, dynamic_ncols=True)
    smoothed = None
    for step in bar:
        idx = torch.randint(0, n, (min(cfg.batch_size, n),), generator=gen).to(q_in.device)
        x = q_in.index_select(0, idx).to(device, non_blocking=True)
        if cfg.mix_inputs and cfg.quant_prob < 1.0:
            x_fp = fp_in.index_select(0, idx).to(device, non_blocking=True)
            x = torch.where(torch.rand_like(x) < cfg.quant_prob, x, x_fp)
        target = fp_out.index_select(0, idx).to(device, non_blocking=True)
        rec = output_loss(block(x, *args, **kwargs), target)
        loss = rec
        if opt_round is not None and step >= cfg.warmup * cfg.iters:
            beta = beta_at(step, cfg)
            loss = loss + cfg.round_weight * sum(l.w_quant.round_loss(beta) for l in layers if l.w_quant and l.w_quant.alpha is not None)
        if cfg.extra_loss is not None:
            loss = loss + cfg.extra_loss(block, x, target)
        for opt in (opt_round, opt_act):
            if opt is not None:
                opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in (opt_round, opt_act):
            if opt is not None:
                opt.step()
        if sched_act is not None:
            sched_act.step()
        if step == 0:
            first_loss = rec.item()
        if step % 100 == 0 or step == iters - 1:
            value = rec.item()
            smoothed = value if smoothed is None else 0.9 * smoothed + 0.1 * value
            last_loss = value
            bar.set_postfix(loss=f"{smoothed:.4g}")
    bar.close()
    for p in frozen:
        p.requires_grad_(True)
    for layer in layers:
        layer.freeze()
        if layer.a_quant is not None:
            layer.a_quant.enabled = True
    with torch.no_grad():
        final = sum(output_loss(block(q_in[i : i + 256].to(device), *args, **kwargs), fp_out[i : i + 256].to(device)).item()
                    * len(q_in[i : i + 256]) for i in range(0, n, 256)) / n
    return {"first_loss": first_loss, "last_loss": last_loss, "final_loss": final, "iters": iters}


def reconstruct_model(q_model: nn.Module, fp_model: nn.Module, data: torch.Tensor, blocks: list[Block],
                      cfg: ReconConfig, device: torch.device, capture_batch: int = 64) -> dict[str, dict]:
    """Reconstruct every block of `q_model` in order against the matching block of `fp_model`."""
    cache_device = torch.device(cfg.cache_device) if cfg.cache_device else device
    stats = {}
    outer = tqdm(blocks, desc="blocks", disable=not cfg.progress, dynamic_ncols=True)
    for i, blk in enumerate(outer):
        q_block, fp_block = q_model.get_submodule(blk.name), fp_model.get_submodule(blk.name)
        fp_in, fp_out, args, kwargs = capture(fp_model, fp_block, data, capture_batch, device, True, cache_device)
        q_in, _, _, _ = capture(q_model, q_block, data, capture_batch, device, False, cache_device)
        torch.manual_seed(cfg.seed + i)
        stats[blk.name] = reconstruct_block(q_block, q_in, fp_in, fp_out, cfg, device, args, kwargs,
                                            desc=f"{blk.name} ({i + 1}/{len(blocks)})")
        outer.set_postfix(block=blk.name, loss=f"{stats[blk.name]['final_loss']:.4g}")
        del fp_in, fp_out, q_in
    return stats

