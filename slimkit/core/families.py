"""Transformer model families: where the blocks are, and which linears read which activation.

A `Group` is the unit of every channel-wise transform (Gamma Migration, SmoothQuant, OS+): the linears that
read one activation, the module that produces it, and how a per-channel scale/shift of that activation is
folded away so the full-precision function is unchanged:

- "norm":   the activation is a norm's output that feeds only these linears (pre-LN blocks): the norm's
            weight/bias absorb the transform and the linears' weights and biases the inverse.
- "input":  the activation also feeds a residual (post-LN blocks such as BERT): the linears keep a per-channel
            affine on their input (x - shift) / scale, a tiny element-wise op, and absorb the inverse.
- "linear": the activation is (a linear function of) another linear's output: that linear's output rows
            absorb the transform (Llama's up_proj before down_proj: SiLU(gate) * up is linear in up).

An adapter is a function from (model, block index) to its groups; `register_family` adds one for a new
model type. Paths are relative to the model, so they stay valid when layers are wrapped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from ..errors import SlimkitError


@dataclass
class Group:
    """Linears reading one activation, and where a channel transform of it folds."""

    name: str  # "attn_in", "mlp_in", "down_in"
    prev: str | None  # the norm (or linear) producing the activation; Gamma Migration reads its weight
    layers: list[str]  # the consuming linears
    fold: str  # "norm", "input" or "linear" (see the module docstring)
    scope: str  # the module whose call the OS+ search replays (attention, MLP, or a layer)
    compare: str | None = None  # whose input the search compares instead of the scope's output (see os_plus)


@dataclass
class Family:
    name: str
    model_types: tuple[str, ...]
    blocks_suffix: str  # path of the ModuleList of blocks, relative to the base model
    groups: Callable[[str, str, int], list[Group]]  # (base prefix, block prefix, block index) -> groups
    norm: str  # "rms" (no bias: no shift can fold into it) or "layernorm"


def _llama(base: str, p: str, i: int) -> list[Group]:
    return [
        Group("attn_in", f"{p}.input_layernorm", [f"{p}.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj")],
              "norm", f"{p}.self_attn", f"{p}.self_attn.o_proj"),
        Group("mlp_in", f"{p}.post_attention_layernorm", [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"], "norm", f"{p}.mlp",
              f"{p}.mlp.down_proj"),
        Group("down_in", f"{p}.mlp.up_proj", [f"{p}.mlp.down_proj"], "linear", f"{p}.mlp.down_proj"),
    ]


def _opt(base: str, p: str, i: int) -> list[Group]:
    return [
        Group("attn_in", f"{p}.self_attn_layer_norm", [f"{p}.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj")],
              "norm", f"{p}.self_attn", f"{p}.self_attn.out_proj"),
        Group("mlp_in", f"{p}.final_layer_norm", [f"{p}.fc1"], "norm", f"{p}.fc1"),
    ]


def _bloom(base: str, p: str, i: int) -> list[Group]:
    return [
        Group("attn_in", f"{p}.input_layernorm", [f"{p}.self_attention.query_key_value"], "norm", f"{p}.self_attention",
              f"{p}.self_attention.dense"),
        Group("mlp_in", f"{p}.post_attention_layernorm", [f"{p}.mlp.dense_h_to_4h"], "norm", f"{p}.mlp.dense_h_to_4h"),
    ]


def _gpt2(base: str, p: str, i: int) -> list[Group]:
    return [
        Group("attn_in", f"{p}.ln_1", [f"{p}.attn.c_attn"], "norm", f"{p}.attn", f"{p}.attn.c_proj"),
        Group("mlp_in", f"{p}.ln_2", [f"{p}.mlp.c_fc"], "norm", f"{p}.mlp.c_fc"),
    ]


def _post_ln_prev(base: str, i: int, blocks: str) -> str:
    """The LayerNorm whose output enters block i of a post-LN encoder."""
    return f"{base}embeddings.LayerNorm" if i == 0 else f"{base}{blocks}.{i - 1}.output.LayerNorm"


def _bert(base: str, p: str, i: int) -> list[Group]:
    return [
        Group("attn_in", _post_ln_prev(base, i, "encoder.layer"),
              [f"{p}.attention.self.{n}" for n in ("query", "key", "value")], "input", f"{p}.attention.self"),
        Group("mlp_in", f"{p}.attention.output.LayerNorm", [f"{p}.intermediate.dense"], "input", f"{p}.intermediate"),
    ]


def _mpnet(base: str, p: str, i: int) -> list[Group]:
    return [
        Group("attn_in", _post_ln_prev(base, i, "encoder.layer"), [f"{p}.attention.attn.{n}" for n in "qkv"],
              "input", f"{p}.attention.attn"),
        Group("mlp_in", f"{p}.attention.LayerNorm", [f"{p}.intermediate.dense"], "input", f"{p}.intermediate"),
    ]


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> None:
    """Teach slimkit a new model type: where its blocks are and its groups (see the built-in ones below)."""
    FAMILIES[family.name] = family


for _f in (
    Family("llama", ("llama", "qwen2", "mistral"), "layers", _llama, "rms"),
    Family("opt", ("opt",), "decoder.layers", _opt, "layernorm"),
    Family("bloom", ("bloom",), "h", _bloom, "layernorm"),
    Family("gpt2", ("gpt2",), "h", _gpt2, "layernorm"),
    Family("bert", ("bert", "roberta"), "encoder.layer", _bert, "layernorm"),
    Family("mpnet", ("mpnet",), "encoder.layer", _mpnet, "layernorm"),
):
    register_family(_f)


def supported_model_types() -> list[str]:
    return sorted(t for f in FAMILIES.values() for t in f.model_types)


def family_of(model: nn.Module) -> Family:
    """The family adapter for a Hugging Face model, or a clear error listing the supported model types."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for family in FAMILIES.values():
        if model_type in family.model_types:
            if model_type == "opt" and not getattr(model.config, "do_layer_norm_before", True):
                raise SlimkitError("OPT with post-LayerNorm blocks (opt-350m) is not supported: its norms feed the "
                                   "residual; use another OPT size or register an adapter with register_family")
            return family
    what = f"model type {model_type!r}" if model_type else f"{type(model).__name__} (not a Hugging Face model)"
    raise SlimkitError(f"{what} is not a supported transformer family; supported: {', '.join(supported_model_types())}. "
                       "Add an adapter with slimkit.core.families.register_family (blocks path + groups).")


@dataclass
class Layout:
    """A model's blocks as found by its family adapter."""

    family: Family
    base: str  # prefix of the base model ("" or "model." ...), ending in "." when not empty
    blocks: list[str]  # block module paths, in order

    def groups(self, i: int) -> list[Group]:
        return self.family.groups(self.base, self.blocks[i], i)


def layout(model: nn.Module) -> Layout:
    family = family_of(model)
    suffix = family.blocks_suffix
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and (name == suffix or name.endswith("." + suffix)):
            base = name[: -len(suffix)]
            return Layout(family, base, [f"{name}.{i}" for i in range(len(module))])
    raise SlimkitError(f"no block list '{suffix}' found in this {family.name} model ({type(model).__name__})")
