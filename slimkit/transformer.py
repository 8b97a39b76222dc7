"""Post-training quantization of Hugging Face transformers, one block at a time.

model + token blocks -> capture the first block's inputs -> for each block: (1) run it in full precision,
recording per-channel statistics of every group's input and one call of each group's scope; (2) the method's
function-preserving transform (Gamma Migration, SmoothQuant, OS+ shift/scale); (3) wrap every linear of the
block (weights per channel or group; inputs per tensor static or per token dynamic); (4) calibrate the
activation ranges on the inputs that the already-quantized blocks produce (Token-Wise Clipping for Outlier
Suppression); (5) pass those inputs on. Only the block in hand sits on the compute device; the rest stays
where the model is (CPU memory for models larger than the GPU). The input model is left untouched unless
`inplace=True`.
"""
from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import QuantConfig
from .core import attention
from .core.families import Group, Layout, layout
from .core.fingerprint import reference_digest
from .core.quantizer import QuantSpec
from .core.data import check_token_ids
from .core.wrap import LayerPlan, layer_modules, mask_pruned, quant_layers, quantizers, working_copy, wrap_layers
from .errors import SlimkitError, warn


ATTN_QUANT_FAMILIES = ("llama", "opt", "gpt2", "bert")


def is_transformer(model) -> bool:
    """A Hugging Face model (it has a config with a model_type) that reads tokens or features, i.e. whose main
    input is not `pixel_values`: vision models (ResNet, ConvNext, MobileNet, ViT ...) take slimkit's generic path
    for any nn.Module (the CNN methods, block by block), as a user's own network would."""
    return (isinstance(model, nn.Module) and getattr(getattr(model, "config", None), "model_type", None) is not None
            and getattr(model, "main_input_name", "input_ids") != "pixel_values")


class _Stop(Exception):
    pass


@dataclass
class ChannelStats:
    """Per-channel statistics of one activation over the calibration tokens."""

    absmax: torch.Tensor | None = None
    cmax: torch.Tensor | None = None
    cmin: torch.Tensor | None = None
    tokens: int = 0

    def update(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        hi, lo = rows.amax(0), rows.amin(0)
        if self.cmax is None:
            self.cmax, self.cmin = hi, lo
        else:
            self.cmax, self.cmin = torch.maximum(self.cmax, hi), torch.minimum(self.cmin, lo)
        self.absmax = torch.maximum(self.cmax.abs(), self.cmin.abs())
        self.tokens += rows.shape[0]


@dataclass
class BlockContext:
    """What a method sees of the block in hand."""

    model: nn.Module
    block: nn.Module
    index: int
    groups: list[Group]
    stats: dict[str, ChannelStats]  # group name -> statistics of its input (full precision)
    scope_calls: dict[str, tuple]  # group name -> (args, kwargs) of one call of its scope module
    cfg: QuantConfig
    device: torch.device
    family_norm: str
    inputs: list = field(default_factory=list)  # the quantized stream's block inputs (hidden, args, kwargs)
    targets: list = field(default_factory=list)  # the full-precision block outputs for those inputs
    notes: dict = field(default_factory=dict)  # what the method records for the manifest


def block_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def run_block(block: nn.Module, inputs: list, device: torch.device) -> list[torch.Tensor]:
    outs = []
    with torch.no_grad():
        for hidden, args, kwargs in inputs:
            outs.append(block_output(block(hidden.to(device), *args, **kwargs)))
    return outs


# float16 rounds 8x finer than bfloat16 (11 significant bits against 8), and its transforms change a block by about
# 8x less (SmolLM2-135M, per-block maxima: fp16 8.6e-4 SmoothQuant, 6.3e-4 OS+; bf16 5.7e-3 and 5.1e-3), while a
# Gemma norm under a Llama adapter changed fp16 blocks by 0.7-2.9%, under bf16's 3e-2. Its limit, 1e-2, keeps a
# tenfold margin over that rounding for models larger than those measured (a 7B model in fp16 was not)
PRESERVED_TOL = {torch.float64: 1e-3, torch.float32: 1e-3, torch.float16: 1e-2}   # other dtypes: HALF_PRESERVED_TOL
HALF_PRESERVED_TOL = 3e-2
TF32_PRESERVED_TOL = 1e-2    # float32 with reduced-precision matmuls (TF32: 10 mantissa bits), 0.2% measured


def preserved_tol(dtype: torch.dtype) -> float:
    """The relative change _check_preserved allows a block output of this dtype: rounding's. float32 under
    torch.set_float32_matmul_precision('high' / 'medium') (allow_tf32 sets 'high') rounds every matmul input to
    TF32 or bf16, so the rescaled weights' products differ by more: a 7B Llama block under OS+ on an H100 with TF32
    changed by 0.2%, which the float32 limit refused."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return TF32_PRESERVED_TOL
    return PRESERVED_TOL.get(dtype, HALF_PRESERVED_TOL)


def _check_preserved(block: nn.Module, inputs: list, outputs: list, device: torch.device, method: str, family: str,
                     path: str, tol: float | None = None) -> None:
    """The method's transform (migrated scales, shifts) must leave the float block's output as it was: a clear
    error where it does not, as with a norm that does not scale by its weight the way the family says (Gemma's
    x * (1 + w) registered as Llama's x * w), instead of a silently wrong model. The relative change allowed is
    rounding's (preserved_tol): 1e-3 in float32 (the transforms are exact up to it, ~1e-7 measured), 1e-2 in float32
    with TF32 matmuls, 1e-2 in fp16 and 3e-2 in bf16, whose rescaled weights are rounded again; a Gemma norm taken
    for a Llama one changed OS+'s block outputs by 0.8-2.5%, under the 5% this check once allowed (in bf16 such a
    change can still pass: its rounding alone reaches 0.6%)."""
    after = run_block(block, inputs, device)
    if not all(bool(torch.isfinite(a).all()) for a in after):     # (the float outputs are: _check_finite)
        dtype = str(outputs[0].dtype).removeprefix("torch.")
        raise SlimkitError(f"{method}'s transform made {path}'s float output NaN or inf before any quantization: "
                           f"its rescaled weights or activations overflow {dtype}; quantize the model in float32 "
                           "(model.float()), or use method='minmax', which moves nothing")
    rel = max(((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item() for a, b in zip(after, outputs))
    if tol is None:
        tol = preserved_tol(outputs[0].dtype)
    if not rel <= tol:
        raise SlimkitError(f"{method}'s transform changed {path}'s float output by {rel:.1%} before any quantization: "
                           f"the {family} family's norms or linears do not compute what its adapter says (a norm "
                           "that scales by (1 + weight), as Gemma's, is not a Llama-style norm). Register an "
                           "adapter that matches the model (slimkit.core.families.register_family), or use "
                           "method='minmax', which moves nothing")


def _check_finite(model: nn.Module, path: str, outputs: list) -> None:
    """The float block's outputs on the calibration input must be finite, or every range and statistic the methods
    take is NaN (and the transform check would blame the family's adapter): NaN / inf weights, or a forward that
    overflows its dtype (float16), are named as such."""
    if all(bool(torch.isfinite(o).all()) for o in outputs):
        return
    with torch.no_grad():
        bad = [n for n, p in model.named_parameters() if p.is_floating_point() and not bool(torch.isfinite(p).all())]
    if bad:
        raise SlimkitError(f"the model's weights are not all finite (NaN or inf in {', '.join(bad[:3])}"
                           f"{' ...' if len(bad) > 3 else ''}): a quantization grid cannot hold them; fix the model "
                           "first")
    dtype = str(outputs[0].dtype).removeprefix("torch.")
    raise SlimkitError(f"{path}'s float output is NaN or inf on the calibration input, before any transform, though "
                       f"the weights are finite: the model's {dtype} forward overflows on this text; quantize it in "
                       "float32 (model.float()) or bfloat16, or calibrate on other text")


def _move_outside_blocks(model: nn.Module, lay: Layout, device: torch.device) -> None:
    """Move every parameter and buffer that is not inside a block (embeddings, rotary tables, heads). A parameter
    that two modules hold (an output head tied to the embedding) is moved once and stays one parameter: each
    module taking its own copy would untie them (two tensors on the GPU, and after the move back)."""
    blocks = tuple(b + "." for b in lay.blocks)
    moved: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}     # id -> (the parameter, kept alive; its move)
    for name, module in model.named_modules():
        if any((name + ".").startswith(b) for b in blocks):
            continue
        for key, p in list(module._parameters.items()):
            if p is not None:
                if id(p) not in moved:
                    moved[id(p)] = (p, nn.Parameter(p.data.to(device), p.requires_grad))
                module._parameters[key] = moved[id(p)][1]
        for key, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[key] = b.to(device)


def _passthrough(*args, **kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _block_inputs(model: nn.Module, lay: Layout, index: int, batches: list[dict], device: torch.device) -> list:
    """(hidden_states, extra args, kwargs) that block `index` receives for each calibration batch; the blocks
    before it pass their input through unrun, so this costs no block compute."""
    captured = []

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, tuple(args[1:]), kwargs))
        raise _Stop

    skipped = [model.get_submodule(p) for p in lay.blocks[:index]]
    for block in skipped:
        block.forward = _passthrough
    handle = model.get_submodule(lay.blocks[index]).register_forward_pre_hook(hook, with_kwargs=True)
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    model(**{k: v.to(device) for k, v in batch.items()})
                except _Stop:
                    pass
    finally:
        handle.remove()
        for block in skipped:
            del block.forward
        if use_cache is not None:
            model.config.use_cache = use_cache
    return captured


def first_block_inputs(model: nn.Module, lay: Layout, batches: list[dict], device: torch.device) -> list:
    """(hidden_states, extra args, kwargs) of the first block for each calibration batch."""
    captured = _block_inputs(model, lay, 0, batches, device)
    if len(captured) != len(batches):
        raise SlimkitError("the model's forward never reached its first block: is the family adapter right?")
    return captured


def layer_types(model: nn.Module, lay: Layout) -> list[str] | None:
    """The blocks' attention kinds when they differ (transformers' config.layer_types: Qwen2 with sliding-window
    layers mixes "full_attention" and "sliding_attention", and passes each kind its own mask); else None."""
    types = getattr(getattr(model, "config", None), "layer_types", None)
    if not types or len(types) != len(lay.blocks) or len(set(types)) < 2:
        return None
    return list(types)


def inputs_by_layer_type(model: nn.Module, lay: Layout, batches: list[dict], device: torch.device,
                         types: list[str]) -> dict[str, list[tuple]]:
    """(extra args, kwargs) that the first block of each attention kind receives, per calibration batch (from
    _block_inputs). Block-by-block passes give each block its own kind's arguments, which the first block's alone
    are not."""
    return {kind: [(args, kwargs) for _, args, kwargs in _block_inputs(model, lay, types.index(kind), batches, device)]
            for kind in dict.fromkeys(types)}


def with_layer_arguments(inputs: list, block: int, types: list[str] | None, by_type: dict | None) -> list:
    """inputs [(hidden, args, kwargs), ...] with block `block`'s own extra arguments where kinds differ."""
    if types is None:
        return inputs
    return [(h, *by_type[types[block]][b]) for b, (h, _, _) in enumerate(inputs)]


def _record_block(ctx: BlockContext, fp_inputs: list) -> list[torch.Tensor]:
    """Run the float block, recording each group's input statistics and one call of its scope."""
    handles = []
    for group in ctx.groups:
        stats = ctx.stats.setdefault(group.name, ChannelStats())
        consumer = ctx.model.get_submodule(group.layers[0])
        handles.append(consumer.register_forward_pre_hook(lambda m, a, s=stats: s.update(a[0])))
        scope = ctx.model.get_submodule(group.scope)

        def grab(m, args, kwargs, name=group.name):
            ctx.scope_calls.setdefault(name, (args, dict(kwargs)))

        handles.append(scope.register_forward_pre_hook(grab, with_kwargs=True))
    try:
        return run_block(ctx.block, fp_inputs, ctx.device)
    finally:
        for h in handles:
            h.remove()


def specs(cfg: QuantConfig) -> tuple[QuantSpec, QuantSpec | None]:
    """The weight spec (per output channel / group) and activation spec (None: float) of a config."""
    w_spec = QuantSpec(cfg.w_bits, cfg.w_symmetric, cfg.w_granularity, cfg.w_group_size, ch_axis=0)
    a_spec = None if cfg.a_bits is None else QuantSpec(cfg.a_bits, cfg.a_symmetric, cfg.a_granularity,
                                                       cfg.w_group_size, ch_axis=-1)
    return w_spec, a_spec


def _check_skip(model: nn.Module, lay, skip: list[str]) -> None:
    """Each skip entry names a block linear: by its path, or by its path inside a block (then in every block)."""
    full, inner = set(), set()
    for path in lay.blocks:
        for name in layer_modules(model.get_submodule(path)):
            full.add(f"{path}.{name}")
            inner.add(name)
    unknown = [s for s in skip if s not in full and s not in inner]
    if unknown:
        example = sorted(full)[0] if full else "model.layers.0.mlp.down_proj"
        raise SlimkitError(f"skip names {unknown[0]!r}, which is no linear of the model's blocks (only they are "
                           f"quantized): give a path such as {example!r}, or one inside a block such as "
                           f"{example.removeprefix(lay.blocks[0] + '.')!r} to keep it float in every block")


def _check_adapter(model: nn.Module, lay: Layout) -> None:
    """Every module the family's adapter names (norms, linears, scopes) must be in the model: a registered adapter
    whose paths miss (fused q/k/v, a mixture-of-experts MLP) is named before any block is run."""
    for i in range(len(lay.blocks)):
        for group in lay.groups(i):
            for name in (group.prev, *group.layers, group.scope, group.compare):
                if name is None:
                    continue
                try:
                    model.get_submodule(name)
                except AttributeError:
                    raise SlimkitError(f"the {lay.family.name} family's adapter names {name} (group {group.name!r}), "
                                       f"which this {type(model).__name__} does not have: its blocks are not laid out "
                                       "as the adapter says; register an adapter that matches the model "
                                       "(slimkit.core.families.register_family)") from None


def _plans(block_prefix: str, block: nn.Module, cfg: QuantConfig) -> dict[str, LayerPlan]:
    w_spec, a_spec = specs(cfg)
    return {f"{block_prefix}.{name}": LayerPlan(w_spec, a_spec, cfg.w_observer, cfg.a_observer)
            for name in layer_modules(block) if f"{block_prefix}.{name}" not in cfg.skip and name not in cfg.skip}


def block_act_quantizers(block: nn.Module) -> list:
    """The block's activation quantizers: linear inputs and, with attn_quant, the attention matmul inputs."""
    acts = list(quantizers(block, "act"))
    for quant in attention.attention_quantizers(block).values():
        acts += [quant.q, quant.k, quant.v]
    return acts


def calibrate_block(ctx: BlockContext) -> None:
    """Observe the block's activation quantizers on the quantized stream, then set their ranges."""
    acts = block_act_quantizers(ctx.block)
    for q in acts:
        q.observing = True
    try:
        run_block(ctx.block, ctx.inputs, ctx.device)
    finally:
        for q in acts:
            q.observing = False
    for q in acts:
        if not q.dynamic:
            q.compute_qparams()
            q.observer = None


def model_vocab(model: nn.Module) -> int | None:
    """The vocabulary size in a Hugging Face model's config, or None."""
    return getattr(getattr(model, "config", None), "vocab_size", None)


def _batches(calib, cfg: QuantConfig, vocab_size: int | None = None) -> list[dict]:
    """Calibration input as a list of model-input dicts (input_ids, attention_mask)."""
    if isinstance(calib, Mapping):
        calib = {k: v for k, v in calib.items() if isinstance(v, torch.Tensor)}
        if "input_ids" not in calib:
            raise SlimkitError("calibration dict needs 'input_ids' (and optionally 'attention_mask')")
        ids = calib["input_ids"]
    elif isinstance(calib, torch.Tensor):
        ids, calib = calib, {"input_ids": calib}
    else:
        raise SlimkitError("transformer calibration data must be token ids (N, L), a dict of input_ids / "
                           "attention_mask, or text with a tokenizer (pass tokenizer=...)")
    check_token_ids(vocab_size, ids)
    mask = calib.get("attention_mask")
    if mask is not None and bool((mask == 0).any()):
        raise SlimkitError(f"the calibration attention_mask marks {int((mask == 0).sum())} padded positions: their "
                           "activations would enter every range and statistic the methods take (the model never "
                           "attends to them, yet their values can be anything). Give sequences without padding: "
                           "token ids (N, L) of one length, or text with a tokenizer (slimkit cuts it into windows)")
    n = ids.shape[0]
    bs = max(1, cfg.lm_batch_size)
    return [{k: v[i: i + bs] for k, v in calib.items()} for i in range(0, n, bs)]


def context_length(model: nn.Module) -> int:
    """The longest sequence the model's position embeddings cover (2048 when its config does not say). RoBERTa
    and MPNet count positions from padding_idx + 1, so they hold that many fewer tokens than their table."""
    config = getattr(model, "config", None)
    n = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048
    for name, m in model.named_modules():
        if name.endswith("position_embeddings") and isinstance(m, nn.Embedding) and m.padding_idx is not None:
            return min(n, m.num_embeddings - m.padding_idx - 1)
    return n


def lm_calibration(model: nn.Module, calib, cfg: QuantConfig, tokenizer=None):
    """Token ids or an encoder batch from any accepted calibration form (text needs a tokenizer)."""
    n = cfg.num_samples or 128
    max_pos = context_length(model)
    if isinstance(calib, Mapping):      # a tokenizer's BatchEncoding too (a UserDict, not a dict)
        calib = dict(calib)
        ids = calib.get("input_ids")
        if ids is not None and not isinstance(ids, torch.Tensor):
            raise SlimkitError(f"calibration input_ids must be a tensor (N, L), got {type(ids).__name__}: tokenize "
                               "with return_tensors='pt' (sequences of one length), or pass the text and tokenizer=")
        calib = {k: v for k, v in calib.items() if isinstance(v, torch.Tensor)}    # the model inputs
        for key in ("attention_mask", "token_type_ids", "position_ids"):
            if ids is not None and key in calib and calib[key].shape != ids.shape:
                raise SlimkitError(f"the calibration {key} has shape {tuple(calib[key].shape)} but input_ids "
                                   f"{tuple(ids.shape)}: give one {key} value per token")
    if isinstance(calib, (torch.Tensor, dict)):
        ids = calib.get("input_ids") if isinstance(calib, dict) else calib
        if isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.shape[1] > max_pos:
            raise SlimkitError(f"calibration sequences of {ids.shape[1]} tokens are longer than the model's context "
                               f"({max_pos} positions): cut them to {max_pos} or less")
        if getattr(cfg, "seq_len", None) is not None:
            warn(f"seq_len={cfg.seq_len} is not read for token-id calibration: the sequences are used at their own "
                 "length (seq_len sets the window for calibration text)")
        return calib[:n] if isinstance(calib, torch.Tensor) else {k: v[:n] for k, v in calib.items()}
    if not (isinstance(calib, (str, os.PathLike)) or
            (isinstance(calib, (list, tuple)) and (not calib or any(isinstance(t, str) for t in calib)))):
        raise SlimkitError(f"transformer calibration data must be token ids (an integer tensor (N, L)), a dict of "
                           f"input_ids / attention_mask, or text (a file, a folder, a shipped corpus or a list of "
                           f"strings), got {type(calib).__name__}: stack token ids into one tensor (torch.cat of a "
                           f"DataLoader's batches, torch.from_numpy of an array)")
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "_slimkit_tokenizer", None)
    if tokenizer is None:
        raise SlimkitError("calibration text needs the model's tokenizer: pass tokenizer=... (slimkit.load_hf "
                           "returns one), or give token ids")
    from . import text
    from .models import TEXT_DATASETS
    from .models.registry import get_dataset

    texts = get_dataset(calib) if isinstance(calib, str) and calib in TEXT_DATASETS else text.read_texts(calib)
    if cfg.seq_len is not None and cfg.seq_len > max_pos:
        raise SlimkitError(f"seq_len {cfg.seq_len} is longer than the model's context ({max_pos} positions): give "
                           f"--seq-len {max_pos} or less")
    if is_encoder(model):
        return encoder_blocks(texts, tokenizer, n, cfg.seq_len or min(128, max_pos), cfg.seed)
    length = cfg.seq_len or min(2048, max_pos)
    return text.token_blocks(texts, tokenizer, n, length, seed=cfg.seed)


def encoder_blocks(texts, tokenizer, n: int, length: int, seed: int = 0) -> torch.Tensor:
    """Encoder calibration without padding: windows of running text framed by the tokenizer's [CLS] ... [SEP].
    Padded batches would let the padding positions' (never attended) activations into every range statistic."""
    from . import text

    cls_id, sep_id = getattr(tokenizer, "cls_token_id", None), getattr(tokenizer, "sep_token_id", None)
    specials = [t for t in (cls_id, sep_id) if t is not None]
    if length - len(specials) < 1:
        raise SlimkitError(f"seq_len {length} leaves no room for text between the tokenizer's {len(specials)} "
                           f"special tokens: give seq_len {len(specials) + 1} or more")
    blocks = text.token_blocks(texts, tokenizer, n, length - len(specials), seed=seed)
    head = torch.full((n, 1), cls_id, dtype=blocks.dtype) if cls_id is not None else blocks[:, :0]
    tail = torch.full((n, 1), sep_id, dtype=blocks.dtype) if sep_id is not None else blocks[:, :0]
    return torch.cat([head, blocks, tail], dim=1)


def is_encoder(model: nn.Module) -> bool:
    """An encoder (BERT-style) rather than a causal LM."""
    return layout(model).family.name in ("bert", "mpnet")


def quantize_transformer(model: nn.Module, calib, cfg: QuantConfig, device: torch.device,
                         inplace: bool = False) -> nn.Module:
    """Quantize a Hugging Face model block by block with the method in `cfg` (see the module docstring)."""
    from .methods import TRANSFORMER_METHODS

    method = TRANSFORMER_METHODS[cfg.method]
    t0 = time.perf_counter()
    digest = reference_digest(model)        # now: with inplace=True the model itself is about to change
    lay = layout(model)
    if not lay.blocks:
        raise SlimkitError(f"this {lay.family.name} model has no blocks (its {lay.family.blocks_suffix} list is "
                           "empty): only the blocks' linears are quantized, so there is nothing to quantize")
    if cfg.method != "minmax" and getattr(model.config, "apply_residual_connection_post_layernorm", False):
        raise SlimkitError(f"{cfg.method} folds channel transforms into the norms, and this model's norms' outputs "
                           "are its residual stream (apply_residual_connection_post_layernorm=True), which would "
                           "change; use method='minmax'")
    if cfg.token_clipping and cfg.method != "os_plus":
        raise SlimkitError(f"token_clipping sets OS+'s activation ranges; {cfg.method} does not use it: drop it or "
                           "choose method os_plus")
    if cfg.a_bits is not None and cfg.a_granularity not in ("tensor", "token"):
        raise SlimkitError(f"a_granularity {cfg.a_granularity!r}: a transformer's activations are quantized per "
                           "tensor (static ranges) or per token (dynamic): pick tensor or token")
    if cfg.first_last_bits not in (None, 8):
        raise SlimkitError("first_last_bits sets a CNN's first and last layer; a transformer's block linears all "
                           "take w_bits (its embeddings and head stay float): drop first_last_bits")
    _check_adapter(model, lay)
    _check_skip(model, lay, cfg.skip)
    batches = _batches(calib, cfg, model_vocab(model))
    q_model = working_copy(model, inplace)
    q_model.eval()
    home = next(q_model.parameters()).device
    if cfg.attn_quant:
        if cfg.a_bits is None:
            raise SlimkitError("attn_quant quantizes the attention matmul inputs at a_bits, and a_bits is None "
                               "(weight-only, --a-bits 0): give activation bits, or drop attn_quant")
        if lay.family.name not in ATTN_QUANT_FAMILIES:
            raise SlimkitError(f"attn_quant needs a family whose attention goes through transformers' attention "
                               f"interface ({', '.join(ATTN_QUANT_FAMILIES)}); this is {lay.family.name}: drop "
                               "attn_quant")
        attention.use_quantized_attention(q_model)
    _move_outside_blocks(q_model, lay, device)
    q_inputs = first_block_inputs(q_model, lay, batches, device)
    fp_inputs = q_inputs
    types = layer_types(q_model, lay)
    by_type = inputs_by_layer_type(q_model, lay, batches, device, types) if types else None
    stats_out = {}
    sparsity = (getattr(model, "slimkit_info", None) or {}).get("sparsity")   # a sparsified model's report
    from .quantize import check_groups

    for path in lay.blocks:       # before any block is quantized: a bad group size is reported at once
        block = q_model.get_submodule(path)
        check_groups({f"{path}.{n}": m for n, m in layer_modules(block).items()}, _plans(path, block, cfg))
    bar = tqdm(lay.blocks, desc=f"{cfg.method} W{cfg.w_bits}A{cfg.a_bits or 16}", disable=not cfg.progress)
    for i, path in enumerate(bar):
        t_block = time.perf_counter()
        fp_inputs = with_layer_arguments(fp_inputs, i, types, by_type)
        q_inputs = with_layer_arguments(q_inputs, i, types, by_type)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        block = q_model.get_submodule(path).to(device)
        ctx = BlockContext(q_model, block, i, lay.groups(i), {}, {}, cfg, device, lay.family.norm)
        fp_outputs = _record_block(ctx, fp_inputs)
        _check_finite(q_model, path, fp_outputs)
        method.transform(ctx)
        _check_preserved(block, fp_inputs[:4], fp_outputs[:4], device, cfg.method, lay.family.name, path)
        mask_pruned(wrap_layers(q_model, _plans(path, block, cfg)), sparsity)
        if cfg.attn_quant:
            scope = next(g.scope for g in ctx.groups if g.name == "attn_in")
            attention.attach(q_model.get_submodule(scope), specs(cfg)[1])
        ctx.inputs, ctx.targets = q_inputs, fp_outputs
        calibrate_block(ctx)
        method.after_calibration(ctx)
        q_outputs = run_block(block, q_inputs, device)
        err = sum(((q - f) ** 2).mean().item() for q, f in zip(q_outputs, fp_outputs)) / len(fp_outputs)
        stats_out[path] = {"output_mse": err, "seconds": time.perf_counter() - t_block, **ctx.notes}
        if device.type == "cuda":
            stats_out[path]["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        bar.set_postfix(mse=f"{err:.3g}")
        fp_inputs = [(o, a, k) for o, (_, a, k) in zip(fp_outputs, fp_inputs)]
        q_inputs = [(o, a, k) for o, (_, a, k) in zip(q_outputs, q_inputs)]
        q_model.get_submodule(path).to(home)
    _move_outside_blocks(q_model, lay, home)
    for layer in quant_layers(q_model).values():
        if not layer.frozen:
            layer.freeze()
    q_model.slimkit_info = {
        "method": cfg.method,
        "config": cfg.applied(transformer=True),
        "family": lay.family.name,
        "model_type": model.config.model_type,
        "layers": {name: layer.settings() for name, layer in quant_layers(q_model).items()},
        "attn_quant": {name: q.q.spec.to_dict() for name, q in attention.attention_quantizers(q_model).items()},
        "blocks": stats_out,
        "calibration": {"sequences": sum(len(b["input_ids"]) for b in batches),
                        "tokens": int(sum(b["input_ids"].numel() for b in batches))},
        "model_spec": getattr(model, "_slimkit_spec", None),
        "reference_digest": digest,
        "seconds": {"total": time.perf_counter() - t0},
        "device": str(device),
    }
    if sparsity is not None:
        q_model.slimkit_info["sparsity"] = sparsity
    return q_model
