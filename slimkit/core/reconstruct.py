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
quantizer's output keeps its quantized value with probability `quant_prob` (0.5) and takes its unquantized
one otherwise; the block input, quantized by the block's input quantizer (core.entry), keeps it with the same
probability and takes the full-precision model's input otherwise (QDrop's recon.py). Memory: only one
block's caches are held at a time.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import Block
from .entry import entry_of, set_entry_enabled
from .quantizer import drop_mix
from .wrap import QuantLayer, quant_layers, weight_oi


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
    cuda_graph: bool = True  # on CUDA, replay each iteration as a captured CUDA graph
    compile: bool | None = None  # torch.compile the activation fake-quant; None: on the CPU for runs of >= 500 iterations
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
        inputs.append(args[0].detach().to(cache_device, copy=True))   # a copy: the block may change it in place
        extra["args"], extra["kwargs"] = args[1:], kwargs
        if not want_output:
            raise _Stop

    def post(m, args, kwargs, out):
        outputs.append(out.detach().to(cache_device, copy=True))
        raise _Stop

    h1 = module.register_forward_pre_hook(pre, with_kwargs=True, prepend=True)   # before a block-input quantizer
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


def _cosine(step: int, total: int) -> float:
    return 0.5 * (1 + math.cos(math.pi * min(step, total) / max(1, total)))


def _set_lr(opt: torch.optim.Optimizer, value: float) -> None:
    for group in opt.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(value)
        else:
            group["lr"] = value


def block_input(q_x: torch.Tensor, fp_x: torch.Tensor | None, entry_q, quant_prob: float) -> torch.Tensor:
    """A reconstruction step's block input: the quantized-prefix input through the block's input quantizer (if
    it has one) and, for QDrop (fp_x given, quant_prob < 1), each element of that kept with probability
    quant_prob and replaced by the float input's otherwise, as QDrop's code mixes them."""
    x = entry_q(q_x) if entry_q is not None else q_x
    if fp_x is not None and quant_prob < 1.0:
        x = drop_mix(x, fp_x, quant_prob)
    return x


def _input_quant_outside(block: nn.Module, entry: QuantLayer | None, outside: bool) -> None:
    """While reconstructing, the block's input quantizer runs in the training step instead of in the block:
    the block-input hook off, or a one-layer block's own input quantization."""
    if entry is None:
        return
    if entry is block:
        block.entry_block = "" if outside else None      # "" (not None): the layer skips its input quantizer
    else:
        set_entry_enabled(block, not outside)


def reconstruct_block(block: nn.Module, q_in: torch.Tensor, fp_in: torch.Tensor, fp_out: torch.Tensor,
                      cfg: ReconConfig, device: torch.device, args: tuple = (), kwargs: dict | None = None,
                      desc: str = "") -> dict:
    """Optimise one block's quantizers against its float output; returns loss statistics.

    On CUDA, with the caches on the GPU, one whole iteration (sampling, drop, forward, loss, backward, both
    Adam steps) is captured once as a CUDA graph and replayed: small blocks are otherwise bound by kernel
    launches, not arithmetic. Schedules (beta, the regulariser's warm-up, the cosine learning rate) live in
    device tensors updated between replays, so the graph and eager paths compute the same thing."""
    kwargs = kwargs or {}
    layers = [block] if isinstance(block, QuantLayer) else list(quant_layers(block).values())
    round_params, act_params = [], []
    for layer in layers:
        if cfg.adaround and layer.w_quant is not None:
            layer.w_quant.init_adaround(weight_oi(layer.layer))
            round_params.append(layer.w_quant.alpha)
        if layer.a_quant is not None:
            layer.a_quant.enabled = cfg.act_in_recon
            layer.a_quant.quant_prob = cfg.quant_prob
            if cfg.learn_act and cfg.act_in_recon and not layer.a_quant.dynamic:
                layer.a_quant.make_learnable()
                act_params.append(layer.a_quant.scale)
    # the quantizer of the block's input (core.entry's shared one, or a one-layer block's own): quantized here,
    # outside the block, so that QDrop mixes it with the float input as its code does, drop_mix(q(x_q), x_fp)
    entry = entry_of(block) if not isinstance(block, QuantLayer) else (block if block.entry_block is None else None)
    entry_q = entry.a_quant if entry is not None else None
    if entry_q is None:
        entry = None
    else:
        entry_q.quant_prob = 1.0          # no drop of its own: the mix below is the drop
    learned = {id(p) for p in round_params + act_params}
    frozen = [p for p in block.parameters() if p.requires_grad and id(p) not in learned]
    for p in frozen:
        p.requires_grad_(False)
    n = len(q_in)
    iters = cfg.iters if (round_params or act_params) else 0
    compiled = cfg.compile if cfg.compile is not None else (device.type == "cpu" and iters >= 500)
    for layer in layers:
        if layer.a_quant is not None:
            layer.a_quant.compiled = compiled
    use_graph = (cfg.cuda_graph and device.type == "cuda" and q_in.device.type == "cuda" and iters > 10)
    opt_kw = {"capturable": True} if use_graph else {}
    lr_act = torch.tensor(cfg.lr_act, device=device) if use_graph else cfg.lr_act
    opt_round = torch.optim.Adam(round_params, lr=cfg.lr_round, **opt_kw) if round_params else None
    opt_act = torch.optim.Adam(act_params, lr=lr_act, **opt_kw) if act_params else None
    optimizers = [o for o in (opt_round, opt_act) if o is not None]
    beta = torch.tensor(cfg.beta_start, device=device)
    round_on = torch.tensor(0.0, device=device)
    batch = min(cfg.batch_size, n)
    rounders = [l.w_quant for l in layers if l.w_quant is not None and l.w_quant.alpha is not None]

    def one_step() -> torch.Tensor:
        idx = torch.randint(0, n, (batch,), device=q_in.device)
        x = q_in.index_select(0, idx).to(device, non_blocking=True)
        mix = cfg.mix_inputs and cfg.quant_prob < 1.0
        x_fp = fp_in.index_select(0, idx).to(device, non_blocking=True) if mix else None
        x = block_input(x, x_fp, entry_q, cfg.quant_prob)
        target = fp_out.index_select(0, idx).to(device, non_blocking=True)
        rec = output_loss(block(x, *args, **kwargs), target)
        loss = rec
        if rounders:
            loss = loss + round_on * cfg.round_weight * sum(q.round_loss(beta) for q in rounders)
        if cfg.extra_loss is not None:
            loss = loss + cfg.extra_loss(block, x, target)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in optimizers:
            opt.step()
        return rec.detach()

    def schedule(step: int) -> None:
        beta.fill_(beta_at(step, cfg))
        round_on.fill_(1.0 if step >= cfg.warmup * cfg.iters else 0.0)
        if opt_act is not None:
            _set_lr(opt_act, cfg.lr_act * _cosine(step, cfg.iters))

    _input_quant_outside(block, entry, True)
    first_loss = last_loss = float("nan")
    smoothed = None
    graph, graph_loss, warm = None, None, 3
    bar = tqdm(range(iters), desc=desc, disable=not cfg.progress, leave=False, dynamic_ncols=True)
    for step in bar:
        schedule(step)
        if not use_graph:
            rec = one_step()
        elif step < warm:  # warm-up on a side stream, as CUDA graph capture requires
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                rec = one_step()
            torch.cuda.current_stream().wait_stream(side)
        else:
            if graph is None:
                graph = torch.cuda.CUDAGraph()
                for opt in optimizers:
                    opt.zero_grad(set_to_none=True)
                try:
                    with torch.cuda.graph(graph):
                        graph_loss = one_step()
                except RuntimeError as e:  # an op that cannot be captured: go on without the graph
                    warnings.warn(f"CUDA graph capture failed ({str(e).splitlines()[0]}); reconstructing eagerly")
                    use_graph, graph = False, None
                    torch.cuda.synchronize()
            if use_graph:
                graph.replay()
                rec = graph_loss
            else:
                rec = one_step()
        if step == 0:
            first_loss = rec.item()
        if step % 100 == 0 or step == iters - 1:
            last_loss = rec.item()
            smoothed = last_loss if smoothed is None else 0.9 * smoothed + 0.1 * last_loss
            bar.set_postfix(loss=f"{smoothed:.4g}")
    bar.close()
    del graph
    _input_quant_outside(block, entry, False)
    for p in frozen:
        p.requires_grad_(True)
    for layer in layers:
        layer.freeze()
        if layer.a_quant is not None:
            layer.a_quant.enabled = True
            layer.a_quant.compiled = False
    with torch.no_grad():
        final = sum(output_loss(block(q_in[i : i + 256].to(device), *args, **kwargs), fp_out[i : i + 256].to(device)).item()
                    * len(q_in[i : i + 256]) for i in range(0, n, 256)) / n
    return {"first_loss": first_loss, "last_loss": last_loss, "final_loss": final, "iters": iters,
            "cuda_graph": use_graph}


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

