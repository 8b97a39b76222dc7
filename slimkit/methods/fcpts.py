"""FCPTS: fast, controllable post-training sparsity with learned per-layer rates (ModelTC/FCPTS, msbench).

Each counted layer l has one learnable threshold t_l on |w|; its mask keeps |w| > t_l and its sparsity rate is
s_l(t) = #{|w| < t} / n_l. The *bridge* between rate and threshold is that step function forward and, backward,
its derivative ds/dt = density of |w| at t, estimated from a 100-bin histogram of the layer's |w| (the paper's
kernel density estimate; the public code differentiates a histogram of the signed weights the same way). The
*control term* lambda * |S(t) - S*| on the size-weighted global rate S = sum n_l s_l / sum n_l drives the global
sparsity to the target while a distillation loss (KL of the sparse model's logits to the dense model's; for
encoders without logits, the MSE of the last hidden state) decides where the sparsity goes. Weights, BatchNorm
statistics and thresholds learn together on the calibration data (BatchNorm in train mode recalibrates to the
pruned weights), as in the public code.

Choices of ours, where the public code is silent or does otherwise:
- t_l = sigmoid(a_l) * max|w_l| (the public code uses sigmoid(a_l) as an absolute threshold): scale-free, so one
  learning rate suits layers of any weight scale. Thresholds start from ERK rates at the target (as the code).
- The distillation gradient reaches the thresholds through a straight-through mask whose backward is that of a
  sigmoid of (|w| - t) / (histogram bin width) (the public release stops it with no_grad; the paper trains the
  thresholds by both terms). Thresholds learn with Adam (the weights with SGD, momentum 0.9, cosine schedule).
- Scores (`score`): "magnitude" ranks a layer's weights by |w|, as the paper does (CNNs, ViTs). "activation"
  ranks a linear layer's weights by |w_ij| * ||x_j|| (Wanda's importance: the weight times the L2 norm of its
  input channel over the calibration tokens, measured once on the dense model) and thresholds that instead; for
  transformers, whose outlier input channels make |w| alone a poor guide, the rates learned on this score keep
  what Wanda keeps within a layer while FCPTS still learns how much each layer keeps. Convolutions always use
  |w|. "auto" (the default, decided in slimkit.sparsify) is "activation" for transformers, "magnitude" else.
- Distillation temperature 1 (`temperature`; the public run script's DistillKL uses 4): post-training, the
  sparse model should reproduce the dense model's predictions as they are used, at T=1, which is also what
  top-1 agreement, KL to fp32 and perplexity measure. Measured with the same code and seeds
  (bench/results/sparsity_gpu.md, 'fcpts' T=1 against 'fcpts-t4'): SmolLM2-135M perplexity 13.4 / 34.0 at
  50 / 70% against 15.0 / 57.1; EfficientNet-Lite0 KL to fp32 lower at 50-90% (1.34 / 2.30 / 3.15 / 3.39 against
  1.64 / 2.50 / 3.16 / 3.54); the Fashion-MNIST ResNet within 0.1 point either way.
- `block_kd=True` adds, to the logits' KL, the mean squared error of every block's output (scaled by the
  teacher's mean square; blocks as slimkit.core.adapters finds them for reconstruction: residual blocks, and
  every layer outside one), the public code's `--use_intel_layer_loss` variant; its newer run script distils
  the logits only, the default here.
- `reconstruct="sparsegpt"` (ours, linear layers only): the rates are learned as above on a scratch copy, then
  the dense model's layers are pruned at those rates by SparseGPT's one-shot update of the surviving weights
  (methods/sparsegpt.py, block by block) instead of the distillation with fixed masks: FCPTS's allocation with
  SparseGPT's reconstruction, as OWL's rates are paired with SparseGPT in the LLM pruning literature. Measured
  on MiniLM (CPU, bench/results/sparsity.md): embedding cosine 0.912 at 50% (SparseGPT 0.909, FCPTS 0.881) but
  0.669 at 70% (SparseGPT 0.724): rates learned alongside FCPTS's own weight training do not always suit
  SparseGPT's update, so it is opt-in.
- Exactness: the learned rates go through slimkit.core.sparsity.exact_counts, so the final masks (the highest
  scores of each layer) hold exactly round(S* n) zeros; then `finetune_iters` more distillation steps with the
  masks fixed, BatchNorm in train mode throughout, so its running statistics follow the final masks.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..core.sparsity import apply_mask, erk_rates, exact_counts, magnitude_mask
from ..core.wrap import is_conv1d
from ..errors import SlimkitError
from ..eval import model_output

BINS = 100


class SparsityRate(torch.autograd.Function):
    """s(t) = share of |w| below t; backward ds/dt = histogram density of |w| at t (the bridge function)."""

    @staticmethod
    def forward(ctx, absw: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(absw, t)
        return (absw < t).float().mean()

    @staticmethod
    def backward(ctx, grad):
        absw, t = ctx.saved_tensors
        return None, grad * rate_density(absw, t)


def rate_density(absw: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Density of |w| at t from a BINS-bin histogram over [0, max|w|] (0 outside that range)."""
    top = absw.max().clamp_min(1e-12)
    width = top / BINS
    hist = torch.histc(absw.float(), bins=BINS, min=0.0, max=float(top))
    i = torch.clamp((t / width).long(), 0, BINS - 1)
    inside = (t >= 0) & (t <= top)
    return torch.where(inside, hist[i] / (absw.numel() * width), torch.zeros_like(t))


@dataclass
class FCPTSConfig:
    sparsity: float
    iters: int = 400                 # joint learning steps (weights, BatchNorm, thresholds)
    finetune_iters: int = 100        # distillation steps with the final masks fixed
    batch_size: int = 64
    lr: float = 0.01                 # weights: SGD with momentum 0.9, cosine to 0
    lr_threshold: float = 0.05       # thresholds (logits): Adam
    weight_decay: float = 3e-4
    temperature: float = 1.0         # distillation temperature (the public run script: 4; see above)
    control_weight: float = 1.0      # lambda of the control term
    score: str = "magnitude"         # "magnitude" (|w|) or "activation" (|w| * input channel norm, linears)
    block_kd: bool = False           # also match every block's output (MSE), as the public code's older variant
    reconstruct: str = "distill"     # after the rates: "distill" (fixed masks, finetune_iters) or "sparsegpt"
    seed: int = 0
    progress: bool = True


SCORES = ("auto", "magnitude", "activation")


class _Masked:
    """One layer's threshold logit, and the per-input-channel factor of its score (None: the score is |w|)."""

    def __init__(self, layer: nn.Module, rate: float, scale: torch.Tensor | None = None):
        w = layer.weight.detach()
        self.layer, self.n, self.scale = layer, w.numel(), scale
        absw = self.score(w).flatten()
        k = min(max(int(round(rate * self.n)), 0), self.n - 1)
        t0 = absw.kthvalue(k + 1).values if k > 0 else absw.min() * 0.5
        frac = float((t0 / absw.max().clamp_min(1e-12)).clamp(1e-6, 1 - 1e-6))
        self.logit = nn.Parameter(torch.tensor(math.log(frac / (1 - frac)), device=w.device))

    def score(self, w: torch.Tensor) -> torch.Tensor:
        return w.abs() if self.scale is None else w.abs() * self.scale

    def threshold(self) -> torch.Tensor:
        return torch.sigmoid(self.logit) * self.score(self.layer.weight.detach()).max()

    def rate(self) -> torch.Tensor:
        return SparsityRate.apply(self.score(self.layer.weight.detach()).flatten(), self.threshold())

    def masked_weight(self) -> torch.Tensor:
        w = self.layer.weight
        t = self.threshold()
        s = self.score(w)
        width = s.detach().max().clamp_min(1e-12) / BINS
        soft = torch.sigmoid((s - t) / width)
        mask = (s.detach() > t).to(w.dtype) + soft - soft.detach()
        return w * mask.to(w.dtype)     # (the threshold and scores are fp32: keep a bf16 / fp16 weight's dtype)


def _channel_scales(model: nn.Module, layers: dict[str, nn.Module], data: torch.Tensor,
                    device: torch.device) -> dict[str, torch.Tensor]:
    """Per linear layer, its input channels' L2 norms (over the calibration tokens, divided by their mean),
    shaped to broadcast over the weight parameter (Linear (out, in); GPT-2's Conv1D (in, out))."""
    from .owl import input_norms

    linear = {k: m for k, m in layers.items() if not isinstance(m, nn.modules.conv._ConvNd)}
    if not linear:
        return {}
    with torch.no_grad():
        norms = input_norms(model, linear, data, device)
    out = {}
    for k, n in norms.items():
        n = (n / n.mean().clamp_min(1e-12)).to(device)
        out[k] = n[:, None] if is_conv1d(linear[k]) else n[None, :]
    return out


def _weight_holders(model: nn.Module, masked: dict[str, _Masked]) -> list[tuple[nn.Module, str, _Masked]]:
    """(module, attribute, layer) wherever a counted layer's weight parameter is held: a layer held twice
    (self.b = self.a) is one module; a weight tied to another module's is held there too."""
    by_param = {id(m.layer.weight): m for m in masked.values()}
    return [(module, name, by_param[id(p)]) for module in model.modules()
            for name, p in module._parameters.items() if p is not None and id(p) in by_param]


def _forward_masked(model: nn.Module, holders: list[tuple[nn.Module, str, _Masked]], x: torch.Tensor) -> torch.Tensor:
    """model(x) with each counted layer's weight replaced, wherever it is held, by its straight-through masked
    weight. Swapped by hand: torch.func.functional_call leaves a module held under two names with the
    replacement after the call. The masked weight shadows the parameter from the module's instance __dict__
    (found before nn.Module's own lookup), so the parameters keep their order: a copy by position
    (parameters_to_vector) still lines up."""
    weights = {id(m): m.masked_weight() for _, _, m in holders}      # all before any swap: they read the weights
    swapped = []
    try:
        for module, name, m in holders:
            module.__dict__[name] = weights[id(m)]
            swapped.append((module, name))
        return model(x)
    finally:
        for module, name in swapped:
            module.__dict__.pop(name, None)


def _kd_loss(student, teacher, temperature: float) -> torch.Tensor:
    """KL of the logits at `temperature` (times T^2, over every position), or MSE of hidden states scaled by
    the teacher's mean square (so its size does not depend on the model's activation scale)."""
    s, is_logits = model_output(student)
    t_out = model_output(teacher)[0]
    if not is_logits:
        return (s.float() - t_out.float()).pow(2).mean() / t_out.float().pow(2).mean().clamp_min(1e-12)
    t = temperature
    s, t_out = s.reshape(-1, s.shape[-1]).float(), t_out.reshape(-1, t_out.shape[-1]).float()
    return F.kl_div(F.log_softmax(s / t, -1), F.log_softmax(t_out / t, -1), log_target=True,
                    reduction="batchmean") * t * t


class _BlockOutputs:
    """Forward hooks recording the outputs of `names` (tensors only) in a model, for block_kd."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.out: dict[str, torch.Tensor] = {}
        self.handles = [model.get_submodule(n).register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name):
        def hook(module, args, out):
            if isinstance(out, torch.Tensor):
                self.out[name] = out
        return hook

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def _block_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over blocks of each output's MSE scaled by the teacher output's mean square."""
    terms = [(student[k].float() - t.float()).pow(2).mean() / t.float().pow(2).mean().clamp_min(1e-12)
             for k, t in teacher.items() if k in student]
    return torch.stack(terms).mean()


def _block_names(model: nn.Module, example: torch.Tensor) -> list[str]:
    """A transformer's decoder / encoder blocks (its family's layout); a CNN's blocks as reconstruction finds them."""
    from ..transformer import is_transformer

    if is_transformer(model):
        from ..core.families import layout

        return layout(model).blocks
    from ..core.adapters import find_blocks

    return [b.name for b in find_blocks(model, example)[0]]


def _finite(loss: torch.Tensor, step: int, cfg: FCPTSConfig) -> torch.Tensor:
    """The loss, or a clear error once it is no longer finite (the weights would follow it to NaN)."""
    if not torch.isfinite(loss.detach()).all():
        raise SlimkitError(f"FCPTS diverged at step {step + 1}: the distillation loss is {float(loss.detach())}. "
                           f"Lower the weights' learning rate (lr={cfg.lr:g}; --lr)"
                           f"{' or drop block_kd' if cfg.block_kd else ''}")
    return loss


def _train_mode(model: nn.Module, batch: int) -> None:
    """Eval mode (no dropout) except BatchNorm, which trains: its statistics follow the pruned weights. With one
    sample per batch a BatchNorm1d has one value per channel and no statistics to take: it stays in eval mode."""
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (batch > 1 or not isinstance(m, nn.BatchNorm1d)):
            m.train()


def fcpts(model: nn.Module, teacher: nn.Module, layers: dict[str, nn.Module], data: torch.Tensor,
          cfg: FCPTSConfig, device: torch.device) -> tuple[dict[str, torch.Tensor], dict]:
    """Learn per-layer rates on `data` and prune `model` (in place, on `device`) to exactly cfg.sparsity over
    `layers`; returns the keep-masks per layer and a log (learned rates, control history, seconds)."""
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(cfg.seed)
    sizes = {k: m.weight.numel() for k, m in layers.items()}
    init = erk_rates({k: tuple(m.weight.shape) for k, m in layers.items()}, cfg.sparsity)
    if cfg.score not in ("magnitude", "activation"):
        raise ValueError(f"FCPTS score must be 'magnitude' or 'activation', got {cfg.score!r}")
    scales = _channel_scales(model, layers, data, device) if cfg.score == "activation" else {}
    masked = {k: _Masked(m, init[k], scales.get(k)) for k, m in layers.items()}
    total = sum(sizes.values())
    frozen = not any(p.requires_grad for p in model.parameters())
    if frozen:      # a model frozen for inference (requires_grad_(False)): its weights learn here all the same
        model.requires_grad_(True)
    weights = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in weights if p.dim() > 1]
    rest = [p for p in weights if p.dim() <= 1]
    opt_w = torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0}],
                            lr=cfg.lr, momentum=0.9)
    opt_t = torch.optim.Adam([m.logit for m in masked.values()], lr=cfg.lr_threshold)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_w, T_max=max(1, cfg.iters + cfg.finetune_iters))
    teacher.eval()
    log = {"global_rate": [], "kd": []}

    def batch() -> torch.Tensor:
        idx = torch.randint(data.shape[0], (min(cfg.batch_size, data.shape[0]),), generator=g)
        return data[idx].to(device)

    with contextlib.ExitStack() as stack:     # hooks (block_kd) come off the models however this ends
        hooks = None
        if cfg.block_kd:
            names = _block_names(model.eval(), data[:2].to(device))
            hooks = tuple(stack.enter_context(_BlockOutputs(m, names)) for m in (model, teacher))

        def distil(student_out, ref) -> torch.Tensor:
            kd = _kd_loss(student_out, ref, cfg.temperature)
            return kd if hooks is None else kd + _block_loss(hooks[0].out, hooks[1].out)

        _train_mode(model, min(cfg.batch_size, data.shape[0]))
        holders = _weight_holders(model, masked)
        for _ in tqdm(range(cfg.iters), desc="FCPTS: learning rates", disable=not cfg.progress, leave=False):
            x = batch()
            with torch.no_grad():
                ref = teacher(x)
            kd = _finite(distil(_forward_masked(model, holders, x), ref), len(log["kd"]), cfg)
            global_rate = sum(m.rate() * m.n for m in masked.values()) / total
            loss = kd + cfg.control_weight * (global_rate - cfg.sparsity).abs()
            opt_w.zero_grad(set_to_none=True)
            opt_t.zero_grad(set_to_none=True)
            loss.backward()
            opt_w.step()
            opt_t.step()
            sched.step()
            log["global_rate"].append(float(global_rate.detach()))
            log["kd"].append(float(kd.detach()))
        with torch.no_grad():
            learned = {k: float(m.rate()) for k, m in masked.items()}
        counts = exact_counts(learned, sizes, cfg.sparsity)
        with torch.no_grad():
            masks = {k: magnitude_mask(masked[k].score(layers[k].weight), counts[k]) for k in layers}
        with torch.no_grad():
            for k, layer in layers.items():
                layer.weight.copy_(apply_mask(layer.weight, masks[k]))
        for step in tqdm(range(cfg.finetune_iters), desc="FCPTS: fine-tuning with fixed masks", disable=not cfg.progress,
                      leave=False):
            x = batch()
            with torch.no_grad():
                ref = teacher(x)
            kd = _finite(distil(model(x), ref), cfg.iters + step, cfg)
            opt_w.zero_grad(set_to_none=True)
            kd.backward()
            opt_w.step()
            sched.step()
            with torch.no_grad():
                for k, layer in layers.items():
                    layer.weight.copy_(apply_mask(layer.weight, masks[k]))
    model.eval()
    if frozen:
        model.requires_grad_(False)
    log.update({"learned_rates": learned, "init_rates": init, "counts": counts, "seconds": time.perf_counter() - t0})
    return masks, log
