"""Train a small GPT, dense or with structured FFNs (optionally self-guided), with exact resume after a kill.

`train(TrainConfig(corpus=..., out=...))` runs on one CPU, one GPU, or several GPUs under torchrun (DDP, or FSDP2
with fsdp=True) without code changes. What it writes to `out`:

    ckpt/step_000500/model.safetensors      full (unsharded) model weights; a tied weight stored once
    ckpt/step_000500/optimizer.safetensors  AdamW's state tensors, named "<param name>/<key>" (exp_avg, exp_avg_sq, step)
    ckpt/step_000500/state.json             step, config, AdamW's param groups, the loss log, FLOPs and tokens so far
    report.json                             train/val perplexity, tokens, training FLOPs (guides included), wall time

No pickle anywhere. Exact resume: everything a step depends on is either saved (weights, AdamW state) or a pure
function of the step number (the batch, see data.BatchSampler; the learning rate; the self-guided dense share; the
dropout RNG, reseeded every step: its masks follow the split of the global batch, so with dropout a resumed run
keeps batch_size, grad_accum and the world size), so a run resumed from step s gives the losses of steps s+1.. of
the uninterrupted run: bitwise on one CPU process (tests/test_structured_train.py checks it, across the self-guided guide drop too);
on CUDA up to the GPU's own run-to-run noise (two uninterrupted bf16 runs on an H100 already differ by ~1e-5 in
the loss from a few dozen steps on, and a resumed run stays within that).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields, replace as replace_fields
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from ..errors import SlimkitError
from ..io.atomic import nearest_existing, unwritable_part
from .data import BatchSampler, Corpus, atomic_write, eval_windows, open_corpus, prepare_corpus
from .gpt import FFN_KERNELS, GPT, GPTConfig, set_ffn_kernel

FFN_KINDS = ("dense", "lowrank", "blockshuffle", "blockdense")
CKPT_FORMAT = 1


@dataclass
class TrainConfig:
    """Everything a run depends on. Fields marked (trajectory) must match when resuming."""
    out: str = "runs/lm"
    corpus: Optional[str] = None        # folder of text files; tokenised once into data_dir
    data_dir: Optional[str] = None      # prepared token files (default: a folder in slimkit's cache)
    tokenizer: str = "bpe"              # "bpe" (trained on the corpus) | "smollm2"
    vocab_size: int = 8192              # for "bpe"
    val_percent: float = 10.0
    # model (trajectory)
    d_model: int = 384
    n_layer: int = 6
    n_head: int = 6
    d_ff: Optional[int] = None
    seq_len: int = 256
    pos: str = "rope"
    act: str = "gelu"                   # FFN activation: "gelu" | "gelu_tanh" | "swiglu"
    norm: str = "layernorm"
    tie_embeddings: bool = True
    dropout: float = 0.0
    # structured FFN (trajectory)
    ffn: str = "dense"                  # dense | lowrank | blockshuffle | blockdense
    param_ratio: float = 0.32
    nblocks: Optional[int] = None
    self_guided: bool = False
    guide_fraction: float = 0.5         # self-guided: the dense guide fades over this share of the steps
    guide_curve: str = "cosine"         # self-guided: "cosine" | "linear"
    # optimisation (trajectory); the global batch is batch_size * grad_accum * world size sequences
    steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    # evaluation and checkpoints
    eval_every: int = 200               # 0: only at the end
    eval_tokens: int = 131072           # held-out tokens per evaluation
    ckpt_every: int = 500               # 0: only at the end
    keep_ckpts: int = 2
    resume: bool = False                # continue from the latest checkpoint in out (start fresh if there is none)
    # runtime
    device: Optional[str] = None        # default cuda when available
    dtype: str = "auto"                 # "auto" (bf16 autocast on CUDA, fp32 on CPU) | "bf16" | "fp32"
    fsdp: bool = False
    compile: bool = False
    ffn_kernel: str = "eager"           # "eager" | "cublaslt" (tanh GELU in cuBLASLt epilogues; needs act gelu_tanh)
    progress: bool = True

    def __post_init__(self) -> None:
        if self.ffn not in FFN_KINDS:
            raise SlimkitError(f"unknown ffn {self.ffn!r}: use one of {', '.join(FFN_KINDS)}")
        if isinstance(self.guide_fraction, bool) or not isinstance(self.guide_fraction, (int, float)) \
                or not 0 <= self.guide_fraction <= 1:
            raise SlimkitError(f"guide_fraction is a share of training in [0, 1], got {self.guide_fraction!r}")
        if self.self_guided and self.ffn == "dense":
            raise SlimkitError("self-guided training guides a structured FFN: give --ffn lowrank, blockshuffle or "
                               "blockdense")
        if self.self_guided:        # the schedule checks its curve, here before the run tokenises anything
            from .self_guided import SelfGuidedSchedule
            SelfGuidedSchedule(self.guide_fraction, self.guide_curve)
        if self.ffn_kernel not in FFN_KERNELS:
            raise SlimkitError(f"ffn_kernel must be one of {', '.join(FFN_KERNELS)}, got {self.ffn_kernel!r}")
        if self.ffn_kernel == "cublaslt":
            if self.act != "gelu_tanh":
                raise SlimkitError("--ffn-kernel cublaslt fuses GELU's tanh approximation only: add --act gelu_tanh")
            if self.compile:
                raise SlimkitError("--ffn-kernel cublaslt and --compile do not combine (torch.compile does its own "
                                   "GELU fusion): pick one")
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise SlimkitError(f"dtype must be auto, bf16 or fp32, got {self.dtype!r}")
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "eval_tokens"):
            if getattr(self, name) < 1:
                raise SlimkitError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_tokens < self.seq_len:
            raise SlimkitError(f"eval_tokens ({self.eval_tokens}) is below seq_len ({self.seq_len}): evaluation reads "
                               "whole windows of seq_len tokens; give at least seq_len")
        if self.warmup < 0 or self.eval_every < 0 or self.ckpt_every < 0:
            raise SlimkitError("warmup, eval_every and ckpt_every must be >= 0")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise SlimkitError(f"lr must be a positive number, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise SlimkitError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name, lo, hi, closed in (("weight_decay", 0, math.inf, True), ("grad_clip", 0, math.inf, True),
                                     ("beta1", 0, 1, False), ("beta2", 0, 1, False), ("dropout", 0, 1, False),
                                     ("val_percent", 0, 100, False)):
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and math.isfinite(v) and lo <= v and (v < hi or (closed and v == hi))
            if not ok:
                what = f"a number >= {lo}" if hi == math.inf else f"in [{lo}, {hi})"
                raise SlimkitError(f"{name} must be {what}, got {v!r}")
        if not 0 <= self.seed < 2 ** 32:
            raise SlimkitError(f"seed must be in [0, 2**32), got {self.seed}")
        if self.d_ff is not None and self.d_ff < 1:
            raise SlimkitError(f"d_ff must be >= 1, got {self.d_ff}")
        if self.device is not None:
            try:
                kind = torch.device(self.device).type
            except (RuntimeError, TypeError):
                kind = None
            if kind not in ("cpu", "cuda"):
                raise SlimkitError(f"device must be cpu, cuda or cuda:N, got {self.device!r}")
        if self.corpus is None and self.data_dir is None:
            raise SlimkitError("give a corpus folder (--corpus DIR) or a prepared data_dir")
        if self.ffn != "dense":      # the FFN shapes now, not after the corpus is tokenised
            from .layers import make_linear

            d_ff = self.gpt_config(1).d_ff
            for what, i, o in (("fc1", self.d_model, d_ff), ("fc2", d_ff, self.d_model)):
                try:
                    make_linear(self.ffn, i, o, self.param_ratio, nblocks=self.nblocks, device="meta", init=False)
                except SlimkitError as e:
                    raise SlimkitError(f"the FFN's {what} ({i} -> {o}): {e}") from None

    def unread(self) -> dict[str, str]:
        """The settings this run never reads, each with the flag that would make it read them."""
        out = {}
        if self.ffn == "dense":
            out.update(dict.fromkeys(("param_ratio", "nblocks"), "--ffn lowrank | blockshuffle | blockdense"))
        if not self.self_guided:
            out.update(dict.fromkeys(("guide_fraction", "guide_curve"), "--self-guided"))
        if self.corpus is None:     # a prepared data_dir alone: its token files fix the tokenizer and the split
            out.update(dict.fromkeys(("tokenizer", "vocab_size", "val_percent"), "--corpus"))
        return out

    def gpt_config(self, vocab_size: int) -> GPTConfig:
        return GPTConfig(vocab_size=vocab_size, n_layer=self.n_layer, n_head=self.n_head, d_model=self.d_model,
                         d_ff=self.d_ff, seq_len=self.seq_len, pos=self.pos, ffn=self.act, norm=self.norm,
                         tie_embeddings=self.tie_embeddings, dropout=self.dropout)


# fields that may change between a run and its resumption: they do not change what a step computes (with dropout
# batch_size and grad_accum do, as its masks follow the split: _check_resumable holds them then)
RUNTIME_FIELDS = {"out", "corpus", "data_dir", "eval_every", "eval_tokens", "ckpt_every", "keep_ckpts", "resume",
                  "device", "dtype", "progress", "compile", "fsdp", "batch_size", "grad_accum", "ffn_kernel"}


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of update `step` (0-based): linear warm-up to cfg.lr, then cosine down to lr * min_lr_ratio."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


# --- distributed ------------------------------------------------------------------------------------------------

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_dist(device: Optional[str]) -> tuple[Dist, torch.device]:
    """Join the process group when started by torchrun (RANK/WORLD_SIZE set): NCCL on CUDA, gloo on CPU."""
    want_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if want_cuda and not torch.cuda.is_available():
        raise SlimkitError(f"device {device!r} asked for but CUDA is not available: use --device cpu")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        d = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))
        dev = torch.device("cuda", d.local_rank) if want_cuda else torch.device("cpu")
        if want_cuda:
            torch.cuda.set_device(dev)  # before the first collective: NCCL works on the current device
        if not dist.is_initialized():
            dist.init_process_group("nccl" if want_cuda else "gloo")
        return d, dev
    return Dist(), torch.device(device or ("cuda" if want_cuda else "cpu"))


def _all_mean(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x = x / d.world
    return x


# --- model, optimizer -------------------------------------------------------------------------------------------

def _structured():
    """The structured-FFN API (slimkit.structured), imported only when it is needed."""
    from . import SelfGuidedSchedule, drop_guides, replace_ffn, set_progress, train_flops_per_token

    return replace_ffn, set_progress, drop_guides, train_flops_per_token, SelfGuidedSchedule


def guide_schedule(cfg: TrainConfig):
    """The self-guided schedule of cfg, or None."""
    return _structured()[4](cfg.guide_fraction, cfg.guide_curve) if cfg.self_guided else None


def _fit_blockshuffle(model: nn.Module, state: dict) -> None:
    """BlockShuffle layers take the block counts a checkpoint's weights have: the shape rule for a ratio may have
    changed since it was written (0.25 at d -> 4d gave 4 blocks before two-count shapes, 2 and 8 now)."""
    from ..core.wrap import set_submodule
    from .layers import BlockShuffleLinear
    from .self_guided import SelfGuided

    for name, m in list(model.named_modules()):
        inner = isinstance(m, SelfGuided)
        layer = m.layer if inner else m
        if not isinstance(layer, BlockShuffleLinear):
            continue
        prefix = f"{name}.layer" if inner else name
        w1, w2 = state.get(f"{prefix}.w1"), state.get(f"{prefix}.w2")
        if w1 is None or w2 is None or w1.dim() != 3 or w2.dim() != 3:
            continue
        k, l = int(w1.shape[0]), int(w2.shape[0])
        if (k, l) == (layer.nblocks, layer.nblocks2):
            continue
        try:
            new = BlockShuffleLinear(layer.in_features, layer.out_features, k, bias=layer.bias is not None,
                                     nblocks2=l, init=False)
        except SlimkitError:
            continue            # load_state_dict then names the mismatch
        if inner:
            m.layer = new
        else:
            set_submodule(model, name, new)


def build_model(cfg: TrainConfig, vocab_size: int, guides_dropped: bool = False,
                state: Optional[dict] = None) -> nn.Module:
    """The GPT of cfg, its FFNs replaced by cfg.ffn layers (with self-guided guides unless already dropped);
    with a checkpoint's `state`, BlockShuffle layers shaped as its weights are."""
    model = GPT(cfg.gpt_config(vocab_size))
    if cfg.ffn != "dense":
        replace_ffn, _, drop_guides, _, _ = _structured()
        replace_ffn(model, cfg.ffn, cfg.param_ratio, self_guided=guide_schedule(cfg), nblocks=cfg.nblocks)
        if cfg.self_guided and guides_dropped:
            drop_guides(model)
        if state is not None and cfg.ffn == "blockshuffle":
            _fit_blockshuffle(model, state)
    for p in model.parameters():  # FSDP2 shards only contiguous parameters (SVD-initialised factors may not be)
        if not p.is_contiguous():
            p.data = p.data.contiguous()
    return set_ffn_kernel(model, cfg.ffn_kernel)


def guides_done(cfg: TrainConfig, step: int) -> bool:
    """Whether the self-guided guide phase is over before update `step` (the dense share is zero from then on)."""
    return cfg.self_guided and step >= guide_schedule(cfg).guided_steps(cfg.steps)


def flops_per_token(model: GPT, cfg: TrainConfig) -> float:
    """Training FLOPs per token now: 6 x matmul weights (active self-guided guides included) + attention."""
    if cfg.ffn == "dense":
        return float(model.flops_per_token())
    return float(_structured()[3](model)) + model.attention_flops_per_token()


def make_optimizer(model: nn.Module, cfg: TrainConfig, fused: bool = False) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (dim >= 2) only, the nanoGPT/GPT-3 convention."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused or None)


def wrap(model: nn.Module, cfg: TrainConfig, d: Dist, device: torch.device) -> nn.Module:
    """The module the training step calls: the model itself, DDP around it, or the model sharded in place (FSDP2)."""
    if cfg.compile:
        model.compile()
    if d.world == 1:
        return model
    if cfg.fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def _sync_grads(model: nn.Module, on: bool):
    """Gradient all-reduce only on the last micro-batch of an accumulation."""
    if hasattr(model, "no_sync") and not on:
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(on)
    return contextlib.nullcontext()


# --- checkpoints ------------------------------------------------------------------------------------------------

def _full_state(model: nn.Module, opt: torch.optim.Optimizer, every_rank: bool = False) -> tuple[dict, dict]:
    """Unsharded model and optimizer state dicts keyed by parameter name (a collective under FSDP): on the CPU
    and on rank 0 only, or on the device and on every rank with every_rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=not every_rank))


def _load_full_state(model: nn.Module, opt: torch.optim.Optimizer, msd: dict, osd: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd,
                   options=StateDictOptions(full_state_dict=True))


def _dedupe(sd: dict[str, torch.Tensor], model: nn.Module | None = None
            ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors stored once when several names share them (tied embeddings); returns (tensors, alias -> name).
    Shared memory tells a tie; so does one Parameter under two names in `model`, for state dicts gathered from
    FSDP shards, whose full tensors are separate copies."""
    tied: dict[str, str] = {}
    if model is not None:
        first: dict[int, str] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            tied[name] = first.setdefault(id(p), name)
    seen: dict[tuple, str] = {}
    out, aliases = {}, {}
    for k, v in sd.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()))
        owner = tied.get(k, k)
        if v.numel() and key in seen:
            aliases[k] = seen[key]
            continue
        if owner != k and owner in out and torch.equal(out[owner], v.detach()):
            aliases[k] = owner
            continue
        seen[key] = k
        out[k] = v.detach().contiguous()
    return out, aliases


def flatten_optimizer(osd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state dict keyed by parameter name → (tensors named "<param>/<key>", JSON-able rest)."""
    tensors, scalars = {}, {}
    for pname, st in osd["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"{pname}/{key}"] = val.detach().contiguous().cpu()
            else:
                scalars.setdefault(pname, {})[key] = val
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in osd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[str, dict] = {}
    for name, t in tensors.items():
        pname, key = name.rsplit("/", 1)
        state.setdefault(pname, {})[key] = t
    for pname, vals in meta["scalars"].items():
        state.setdefault(pname, {}).update(vals)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def ckpt_dirs(out: Path) -> list[Path]:
    """Complete checkpoints in out/ckpt, oldest first."""
    root = out / "ckpt"
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob("step_*") if (p / "state.json").exists()), key=lambda p: p.name)


def save_checkpoint(out: Path, model: nn.Module, opt: torch.optim.Optimizer, state: dict, d: Dist,
                    keep: int = 2) -> Optional[Path]:
    """Write ckpt/step_NNNNNN atomically (temporary folder, then rename); only rank 0 writes."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    msd, osd = _full_state(model, opt)  # every rank takes part (FSDP gathers)
    if not d.main:
        return None
    tensors, aliases = _dedupe(msd, model)
    opt_tensors, opt_meta = flatten_optimizer(osd)
    final = out / "ckpt" / f"step_{state['step']:06d}"
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        for stale in final.parent.glob(".step_*.tmp-*"):  # left by a run killed while writing
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
        save_file({k: v.cpu() for k, v in tensors.items()}, tmp / "model.safetensors")
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        meta = {**state, "format": CKPT_FORMAT, "aliases": aliases, "optimizer": opt_meta}
        (tmp / "state.json").write_text(json.dumps(meta, indent=1) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
    except (OSError, SafetensorError) as e:     # a full disk (safetensors tells it as its own error): the
        # checkpoints before this one are untouched
        raise SlimkitError(f"could not write the checkpoint {final}: {getattr(e, 'strerror', None) or e}; free "
                           "space (or fix --out) and continue the run with --resume") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in ckpt_dirs(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(path: Path) -> tuple[dict, dict, dict]:
    """(model state dict, optimizer state dict, state.json) of a checkpoint folder; tied names restored."""
    from safetensors.torch import load_file

    from safetensors import SafetensorError

    try:
        meta = json.loads((path / "state.json").read_text())
        if not isinstance(meta, dict):
            raise ValueError("state.json holds no mapping")
        if meta.get("format") != CKPT_FORMAT:
            raise SlimkitError(f"{path} is a checkpoint of format {meta.get('format')}, this slimkit reads "
                               f"{CKPT_FORMAT}")
        for key, kind in (("step", int), ("config", dict), ("vocab_size", int), ("guides_dropped", bool),
                          ("global_batch", int), ("losses", list), ("history", list), ("data", dict)):
            if not isinstance(meta.get(key), kind):
                raise ValueError(f"state.json's {key!r} is missing or no {kind.__name__}")
        msd = load_file(path / "model.safetensors")
        for alias, name in meta["aliases"].items():
            msd[alias] = msd[name]
        osd = unflatten_optimizer(load_file(path / "optimizer.safetensors"), meta["optimizer"])
    except SlimkitError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as e:
        raise CorruptCheckpoint(f"checkpoint {path} is incomplete or corrupt ({type(e).__name__}: {e})") from None
    return msd, osd, meta


class CorruptCheckpoint(SlimkitError):
    """A checkpoint folder whose files cannot be read back."""


def _latest_readable(found: list[Path], main: bool) -> tuple[Path, tuple[dict, dict, dict]]:
    """The newest checkpoint of `found` (oldest first) that reads back, and its contents; a corrupt newer one is
    skipped with a warning (a disk fault or a copy cut short: the writes themselves are atomic)."""
    first = None
    for path in reversed(found):
        try:
            return path, read_checkpoint(path)
        except CorruptCheckpoint as e:
            first = first or e
            if main:
                print(f"slimkit: warning: {e}; trying the one before", file=sys.stderr, flush=True)
    raise SlimkitError(f"{first}; no earlier checkpoint reads back either: delete the ckpt folder to start over")


def checkpoint_dir(path: str | Path) -> Path:
    """A checkpoint folder itself, or a run folder's latest checkpoint."""
    path = Path(path)
    if (path / "state.json").exists():
        return path
    found = ckpt_dirs(path)
    if not found:
        raise SlimkitError(f"{path} holds no checkpoint (ckpt/step_*/state.json): train with slimkit train-lm")
    return found[-1]


def load_model(path: str | Path, device: str = "cpu") -> GPT:
    """The trained GPT (structured FFNs included) from a run folder (its latest checkpoint) or a checkpoint folder."""
    ckpt = checkpoint_dir(path)
    msd, _, meta = read_checkpoint(ckpt)
    unknown = sorted(set(meta["config"]) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise SlimkitError(f"checkpoint {ckpt} has settings this slimkit does not know ({', '.join(unknown)}): it was "
                           "written by another slimkit version; load it with the one that trained it")
    cfg = TrainConfig(**{**meta["config"], "resume": False})
    model = build_model(cfg, meta["vocab_size"], guides_dropped=meta["guides_dropped"], state=msd)
    try:
        model.load_state_dict(msd)
    except RuntimeError as e:
        raise SlimkitError(f"checkpoint {ckpt}: its weights do not fit the model its state.json describes "
                           f"({str(e).splitlines()[-1].strip()}): the folder is damaged or was edited") from None
    if cfg.self_guided and not meta["guides_dropped"]:
        # the guides' dense share is no weight: set it as the run last trained and evaluated with (the share
        # of the checkpoint's last step)
        _structured()[1](model, max(meta["step"] - 1, 0), cfg.steps)
    return model.to(device).eval()


def run_tokenizer(path: str | Path, data_dir: str | Path | None = None):
    """The tokenizer a run folder's (or checkpoint folder's) model was trained with: the one saved beside its
    token files (data_dir if given, else the run's --data-dir, else the cache folder its corpus was tokenised
    into), or SmolLM2's for --tokenizer smollm2."""
    from .data import default_data_dir, load_tokenizer, smollm2_tokenizer

    state_file = checkpoint_dir(path) / "state.json"
    try:
        state = json.loads(state_file.read_text())
        cfg = state["config"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SlimkitError(f"cannot read {state_file} ({type(e).__name__}: {e})") from None
    if data_dir is None and cfg.get("tokenizer") == "smollm2":
        return smollm2_tokenizer()
    # the folder the run read (absolute for the default cache folder): a relative --corpus, resolved again from
    # another working directory, would name another cache folder
    folder = data_dir or (state.get("data") or {}).get("dir") or cfg.get("data_dir") or (
        default_data_dir(Path(cfg["corpus"]).expanduser(), cfg.get("tokenizer", "bpe"), cfg.get("vocab_size", 8192),
                         cfg.get("val_percent", 10.0)) if cfg.get("corpus") else None)
    if folder is None or not (Path(folder) / "tokenizer.json").exists():
        raise SlimkitError(f"the tokenizer of {path} is not where its run left it ({folder or 'no data folder recorded'}"
                           "): give the folder its corpus was tokenised into (--data-dir, the one holding tokenizer.json)")
    want = (state.get("data") or {}).get("tokenizer_sha1")      # None in checkpoints written before it was recorded
    if want is not None and hashlib.sha1((Path(folder) / "tokenizer.json").read_bytes()).hexdigest() != want:
        raise SlimkitError(f"{Path(folder) / 'tokenizer.json'} is not the tokenizer {path} was trained with (the "
                           "folder was tokenised again since, or holds another corpus): give the folder it was trained "
                           "on (--data-dir), or tokenise its corpus again with the run's settings")
    return load_tokenizer(folder)


def _check_resumable(meta: dict, cfg: TrainConfig, global_batch: int, corpus: Corpus | None) -> None:
    """A resumed run must compute what the interrupted one would have: same settings, batch and data (the data
    only with `corpus`: the settings are checked first, before the data folder is prepared)."""
    saved = meta["config"]
    skip = RUNTIME_FIELDS | set(cfg.unread())
    if saved.get("corpus") is None:     # a run on a prepared data_dir: its files, not these settings, told the data
        skip |= {"tokenizer", "vocab_size", "val_percent"}
    diff = [f"{f.name} ({saved.get(f.name)!r} saved, {getattr(cfg, f.name)!r} now)" for f in fields(TrainConfig)
            if f.name not in skip and saved.get(f.name) != getattr(cfg, f.name)]
    if corpus is not None and meta["data"]["source_hash"] != corpus.meta["source_hash"]:
        diff.append("the corpus (its files changed)")
    elif corpus is not None and meta["data"].get("tokenizer_sha1") not in (None, corpus.meta.get("tokenizer_sha1")):
        diff.append(f"the tokenizer (the data folder {corpus.dir} was tokenised again since, with other settings)")
    if meta["global_batch"] != global_batch:
        diff.append(f"global batch ({meta['global_batch']} saved, {global_batch} now: batch_size * grad_accum * "
                    "world size must stay the same)")
    elif cfg.dropout > 0 and (saved.get("batch_size"), saved.get("grad_accum")) != (cfg.batch_size, cfg.grad_accum):
        # each rank reseeds the dropout RNG with the step and draws it micro-batch after micro-batch: the masks
        # follow how the global batch is split (batch_size x grad_accum x world size), which must then stay
        diff.append(f"batch_size x grad_accum with dropout ({saved.get('batch_size')!r} x {saved.get('grad_accum')!r} "
                    f"saved, {cfg.batch_size!r} x {cfg.grad_accum!r} now: the dropout masks follow how the global "
                    "batch is split)")
    if diff:
        raise SlimkitError(f"cannot resume: the checkpoint was trained with other settings for {', '.join(diff)}; "
                           "use the saved settings or a new --out")


# --- evaluation -------------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device, autocast, d: Dist) -> float:
    """Mean next-token cross-entropy over windows, each rank taking every world-th window (same batch count on all
    ranks, so FSDP's collectives line up)."""
    was = model.training
    model.eval()
    n = len(windows)
    idx = torch.arange(d.rank, math.ceil(n / d.world) * d.world, d.world)
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of losses * tokens, tokens)
    for i in range(0, len(idx), batch_size):
        sel = idx[i:i + batch_size]
        w = windows[sel % n].to(device)
        weight = (sel < n).to(device, torch.float64)
        with autocast():
            logits, _ = model(w[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), w[:, 1:], reduction="none")
        total[0] += (loss.double().sum(1) * weight).sum()
        total[1] += weight.sum() * loss.shape[1]
    if d.world > 1:
        dist.all_reduce(total)
    model.train(was)
    return float(total[0] / total[1])


# --- the loop ---------------------------------------------------------------------------------------------------

def _prepare_data(cfg: TrainConfig, d: Dist) -> Corpus:
    """Rank 0 tokenises (or finds the cached tokens); the other ranks then open its folder and check that they
    read the same preparation (a folder of that name on another node's disk may hold other tokens, or be
    missing). An error on any rank stops all."""
    corpus, err, failure = None, None, None
    if d.main:
        try:
            corpus = (prepare_corpus(cfg.corpus, cfg.data_dir, cfg.tokenizer, cfg.vocab_size, cfg.val_percent,
                                     progress=cfg.progress) if cfg.corpus is not None else open_corpus(cfg.data_dir))
        except Exception as e:      # noqa: BLE001 - told to every rank, so none waits for rank 0 forever
            err, failure = (str(e) if isinstance(e, SlimkitError) else f"{type(e).__name__}: {e}"), e
    if d.world > 1:
        box = [err, None if corpus is None else str(corpus.dir)]
        dist.broadcast_object_list(box, src=0)
        err, folder = box
        if err is None:
            mine = None
            try:
                if not d.main:
                    corpus = open_corpus(folder)
                ident = (corpus.meta, int(corpus.train.size), int(corpus.val.size))
            except SlimkitError as e:
                mine, ident = str(e), None
            views: list = [None] * d.world
            dist.all_gather_object(views, (mine, ident))
            for r, (e, seen) in enumerate(views):
                if e is not None or seen != views[0][1]:
                    err = (f"rank {r} cannot read the token folder {folder} that rank 0 prepared "
                           f"({e or 'it holds other tokens there'}): under torchrun every rank must see rank 0's "
                           "data folder (--data-dir on a filesystem that every rank shares)")
                    break
    if err is not None:
        if d.main and failure is not None and not isinstance(failure, SlimkitError):
            raise failure
        raise SlimkitError(err)
    return corpus


def _check_folder(path, flag: str) -> None:
    """A folder the run will create: no part of its path may be a file (fails at once, on every rank)."""
    p = nearest_existing(path)
    if not p.is_dir():
        raise SlimkitError(f"{flag} {path}: {p} is a file; give a folder path")


def _check_writable(path, flag: str) -> None:
    """A folder the run will write: the nearest part of its path that exists must take new files (a read-only
    filesystem or folder fails at once, not at the first checkpoint, hours in)."""
    p = unwritable_part(path)
    if p is not None:
        raise SlimkitError(f"{flag}: cannot write in {p} (read-only, or not yours): give a folder you can write")


def _same_checkpoints(out: Path, found: list[Path], resume_from: Optional[Path], failure: Optional[Exception],
                      d: Dist) -> None:
    """Under torchrun every rank must see the checkpoints of --out as rank 0 does (only rank 0 writes them): a rank
    that saw none would start from step 0 while the others resume, their gradients averaged across different
    steps until the collectives no longer line up (a gloo abort, or a hang under FSDP). A collective, so that the
    refusal is raised on every rank."""
    mine = ([p.name for p in found], None if resume_from is None else resume_from.name,
            None if failure is None else str(failure))
    views: list = [None] * d.world
    dist.all_gather_object(views, mine)
    if all(v == views[0] for v in views):
        return

    def seen(v) -> str:
        names, chosen, err = v
        if err is not None:
            return f"none readable ({err})"
        if not names:
            return "none"
        return ", ".join(names) + (f" (resumes from {chosen})" if chosen is not None and chosen != names[-1] else "")

    odd = [r for r, v in enumerate(views) if v != views[0]]
    raise SlimkitError(f"the ranks see different checkpoints in --out {out} (rank 0: {seen(views[0])}; "
                       + "; ".join(f"rank {r}: {seen(views[r])}" for r in odd[:3])
                       + "): under torchrun --out must be one folder that every rank sees (a shared filesystem; "
                         "rank 0 writes it, every rank reads it to resume)")


def train(cfg: TrainConfig, on_step: Optional[Callable[[int, float], None]] = None) -> dict:
    """Train per cfg and return the report (also written to out/report.json).

    on_step(step, loss) is called after every update (step counts updates done, from 1) on every rank; raising
    from it stops the run as a kill would, which is how the tests simulate one. Under torchrun the process group
    this call joined is left again when it returns or raises (one it found already joined stays): a process that
    exits with gloo's still alive may abort in its teardown, and torchrun then reports a SIGABRT, not the error.
    """
    joins = int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized()
    try:
        return _train(cfg, on_step)
    finally:
        if joins and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, on_step: Optional[Callable[[int, float], None]]) -> dict:
    d, device = setup_dist(cfg.device)
    if d.main and cfg.fsdp and d.world == 1:
        print("slimkit: warning: --fsdp shards the model over the processes torchrun starts; this is one process, "
              "so it trains unsharded", file=sys.stderr, flush=True)
    if cfg.ffn_kernel == "cublaslt" and device.type != "cuda":
        if d.main:
            print("slimkit: warning: --ffn-kernel cublaslt runs on CUDA only; this run on the CPU takes the eager "
                  "FFN (and records ffn_kernel eager)", file=sys.stderr, flush=True)
        cfg = replace_fields(cfg, ffn_kernel="eager")
    if cfg.ffn_kernel == "cublaslt" and device.type == "cuda":
        from . import epilogue
        if epilogue.lt is None:
            raise SlimkitError("--ffn-kernel cublaslt needs nvmath-python: pip install 'slimkit[cublaslt]' (or train "
                               "with --ffn-kernel eager)")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise SlimkitError(f"--out {out} is a file: give a folder for the run's checkpoints")
    _check_folder(out, "--out")
    for name, folder in (("ckpt", True), ("report.json", False)):    # what the run writes there, checked before it
        p = out / name
        if p.exists() and p.is_dir() != folder:
            raise SlimkitError(f"--out {out} holds {'a file' if folder else 'a folder'} named {name}, where the run "
                               f"writes its {'checkpoints folder' if folder else 'report'}: move it or choose "
                               "another --out")
    _check_writable(out / "ckpt", "--out")
    if cfg.data_dir is not None:
        _check_folder(cfg.data_dir, "--data-dir")
    found = ckpt_dirs(out)
    global_batch = cfg.batch_size * cfg.grad_accum * d.world
    resume_from = saved = failure = None
    if found and cfg.resume:
        try:
            resume_from, (msd, osd, saved) = _latest_readable(found, d.main)
        except SlimkitError as e:
            failure = e
    if d.world > 1:
        _same_checkpoints(out, found, resume_from, failure, d)
    if found and not cfg.resume:
        raise SlimkitError(f"{out} already holds checkpoints: pass --resume to continue that run, or choose another "
                           "--out")
    if failure is not None:
        raise failure
    if saved is not None:   # settings checked before the data folder is touched (a refused resume changes nothing)
        _check_resumable(saved, cfg, global_batch, None)
    corpus = _prepare_data(cfg, d)
    vocab = 64 * math.ceil(corpus.vocab_size / 64)  # padded: matmuls run faster on multiples of 64
    sampler = BatchSampler(corpus.train, cfg.seq_len, global_batch, cfg.seed)
    val_windows = eval_windows(corpus.val, cfg.seq_len, cfg.eval_tokens)
    train_windows = eval_windows(corpus.train, cfg.seq_len, cfg.eval_tokens)
    use_bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda")

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    # state that survives a resume
    start, losses, history, flops, tokens, elapsed = 0, [], [], 0.0, 0, 0.0
    if saved is not None:
        _check_resumable(saved, cfg, global_batch, corpus)     # and the corpus it tokenised
        start, losses, history = saved["step"], saved["losses"], saved["history"]
        flops, tokens, elapsed = saved["train_flops"], saved["tokens"], saved["elapsed_s"]
    guides_dropped = guides_done(cfg, start)

    torch.manual_seed(cfg.seed)  # the initial weights
    raw = build_model(cfg, vocab, guides_dropped, state=msd if resume_from is not None else None).to(device)
    model = wrap(raw, cfg, d, device)
    opt = make_optimizer(raw, cfg, fused=device.type == "cuda" and not cfg.fsdp)
    if resume_from is not None:
        try:
            _load_full_state(raw, opt, msd, osd)
        except (RuntimeError, KeyError, ValueError) as e:
            raise SlimkitError(f"checkpoint {resume_from} does not fit this model: {str(e).splitlines()[0]}") from None
        del msd, osd
    if d.main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SlimkitError(f"cannot create the run folder --out {out}: {e.strerror or e}; give a folder you can "
                               "write") from None

    def state_at(step: int) -> dict:
        return {"step": step, "config": asdict(cfg), "vocab_size": vocab, "global_batch": global_batch,
                "world_size": d.world, "guides_dropped": guides_dropped, "losses": losses, "history": history,
                "train_flops": flops, "tokens": tokens, "elapsed_s": elapsed,
                "sampler": {"seed": cfg.seed, "global_batch": global_batch, "next_sample": step * global_batch},
                "data": {"dir": str(corpus.dir), "source_hash": corpus.meta["source_hash"],
                         "tokenizer_sha1": corpus.meta.get("tokenizer_sha1")}}

    def run_eval(step: int) -> dict:
        row = {"step": step, "tokens": tokens, "train_flops": flops, "eval_tokens": cfg.eval_tokens,
               "val_loss": evaluate(model, val_windows, cfg.batch_size, device, autocast, d),
               "train_loss": evaluate(model, train_windows, cfg.batch_size, device, autocast, d)}
        row.update(val_ppl=math.exp(row["val_loss"]), train_ppl=math.exp(row["train_loss"]))
        history.append(row)
        return row

    bar = tqdm(total=cfg.steps, initial=start, disable=not (cfg.progress and d.main), desc="train", unit="step",
               dynamic_ncols=True)
    tokens_per_step = global_batch * cfg.seq_len
    t_last, run_time, run_steps = time.perf_counter(), 0.0, 0
    model.train()
    for step in range(start, cfg.steps):
        if cfg.self_guided and not guides_dropped and guides_done(cfg, step):
            raw, model, opt = _drop_guides(raw, opt, cfg, vocab, d, device)
            guides_dropped = True
        if cfg.self_guided and not guides_dropped:
            _structured()[1](raw, step, cfg.steps)
        torch.manual_seed(cfg.seed * 1_000_003 + step)  # dropout RNG: a pure function of the step
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        step_flops = flops_per_token(raw, cfg) * tokens_per_step
        loss_sum = torch.zeros((), device=device)
        for micro in range(cfg.grad_accum):
            x, y = sampler.batch(step, (d.rank * cfg.grad_accum + micro) * cfg.batch_size, cfg.batch_size)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with _sync_grads(model, micro == cfg.grad_accum - 1):
                with autocast():
                    _, loss = model(x, y)
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_val = float(_all_mean(loss_sum / cfg.grad_accum, d))
        losses.append(loss_val)
        flops += step_flops
        tokens += tokens_per_step
        dt = time.perf_counter() - t_last
        elapsed, run_time, run_steps = elapsed + dt, run_time + dt, run_steps + 1
        bar.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{run_steps * tokens_per_step / max(run_time, 1e-9):,.0f}",
                        lr=f"{lr:.2e}")
        bar.update(1)
        done = step + 1
        if cfg.self_guided and not guides_dropped and guides_done(cfg, done):
            # the guide's share is zero from here on: drop it now, so that an evaluation or checkpoint at this
            # step (the final one too, when the guides fade over the whole run) sees the structured model alone
            raw, model, opt = _drop_guides(raw, opt, cfg, vocab, d, device)
            guides_dropped = True
        if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps:
            row = run_eval(done)
            if d.main:
                bar.write(f"step {done}: val ppl {row['val_ppl']:.2f}, train ppl {row['train_ppl']:.2f}")
        if (cfg.ckpt_every and done % cfg.ckpt_every == 0) or done == cfg.steps:
            save_checkpoint(out, raw, opt, state_at(done), d, cfg.keep_ckpts)
        t_last = time.perf_counter()  # evaluation and checkpoints are not training time
        if on_step is not None:
            on_step(done, loss_val)
    bar.close()
    if start == cfg.steps and history and history[-1]["step"] == cfg.steps and \
            history[-1].get("eval_tokens") != cfg.eval_tokens:
        # a finished run resumed with other evaluation settings: its figures are measured again, so that the
        # report's numbers are those of the settings it records
        history.pop()
        run_eval(cfg.steps)
    report = _report(cfg, raw, history, losses, flops, tokens, elapsed, d, device)
    if d.main:
        atomic_write(out / "report.json", lambda tmp: tmp.write_text(json.dumps(report, indent=1) + "\n"))
    return report


def _drop_guides(raw: nn.Module, opt: torch.optim.Optimizer, cfg: TrainConfig, vocab: int, d: Dist,
                 device: torch.device):
    """End of the guide phase: rebuild model (guides dropped), wrapper and optimizer, carrying weights and AdamW
    state over by parameter name, exactly as a resume from a checkpoint taken here would."""
    msd, osd = _full_state(raw, opt, every_rank=True)
    torch.manual_seed(cfg.seed)
    # shaped as the weights it takes over (BlockShuffle layers resumed from a checkpoint of an earlier shape rule)
    new_raw = build_model(cfg, vocab, guides_dropped=True, state=msd).to(device)
    keep = set(new_raw.state_dict())
    names = {n for n, _ in new_raw.named_parameters()}
    msd = {k: v for k, v in msd.items() if k in keep}
    osd = {"state": {k: v for k, v in osd["state"].items() if k in names},
           "param_groups": [{**g, "params": [p for p in g["params"] if p in names]} for g in osd["param_groups"]]}
    model = wrap(new_raw, cfg, d, device)
    new_opt = make_optimizer(new_raw, cfg, fused=device.type == "cuda" and not cfg.fsdp)
    _load_full_state(new_raw, new_opt, msd, osd)
    return new_raw, model, new_opt


def _ffn_ratio(model: nn.Module) -> float | None:
    """The parameter ratio the structured FFN linears reach (their weights over the dense ones'; the requested
    param_ratio is a target the shape rules meet to within a block or a rank step), None for a dense model."""
    from .layers import StructuredLinear

    layers = [m for m in model.modules() if isinstance(m, StructuredLinear)]
    if not layers:
        return None
    return sum(m.weight_params for m in layers) / sum(m.in_features * m.out_features for m in layers)


def _report(cfg: TrainConfig, model: nn.Module, history: list, losses: list, flops: float, tokens: int,
            elapsed: float, d: Dist, device: torch.device) -> dict:
    last = history[-1] if history else {}
    tail = losses[-max(1, len(losses) // 10):]
    return {
        "val_ppl": last.get("val_ppl"), "train_ppl": last.get("train_ppl"),
        "val_loss": last.get("val_loss"), "train_loss": last.get("train_loss"),
        "train_loss_last10pct": sum(tail) / len(tail) if tail else None,
        "steps": cfg.steps, "tokens": tokens, "train_flops": flops, "wall_s": elapsed,
        "tokens_per_s": tokens / elapsed if elapsed else None,
        "params": sum(p.numel() for p in model.parameters()), "ffn": cfg.ffn, "param_ratio": cfg.param_ratio,
        "ffn_param_ratio": _ffn_ratio(model),
        "self_guided": cfg.self_guided, "world_size": d.world,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "config": asdict(cfg), "history": history, "losses": losses,
    }
