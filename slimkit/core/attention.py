"""Quantized attention matmul inputs: Q and K (of Q K^T) and V (of P V), for the transformer families whose
attention goes through transformers' attention interface (Llama, Qwen2, Mistral, OPT, GPT-2, BERT).

slimkit registers one attention function, "slimkit_qattn": it fake-quantizes query, key and value with the
quantizers attached to the calling attention module (`slimkit_attn_quant`), then runs PyTorch's scaled dot
product attention exactly as the "sdpa" implementation does. Modules without quantizers pass through.
"""
from __future__ import annotations

from torch import nn

from ..errors import SlimkitError
from .quantizer import QuantSpec, Quantizer

ATTN_IMPL = "slimkit_qattn"


class AttentionQuant(nn.Module):
    """The three activation quantizers of one attention module's matmul inputs."""

    def __init__(self, spec: QuantSpec, observer: str = "minmax"):
        super().__init__()
        self.q = Quantizer(spec, observer)
        self.k = Quantizer(spec, observer)
        self.v = Quantizer(spec, observer)

    def forward(self, query, key, value):
        return self.q(query), self.k(key), self.v(value)


def _quantized_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    quant = getattr(module, "slimkit_attn_quant", None)
    if quant is not None:
        query, key, value = quant(query, key, value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def use_quantized_attention(model: nn.Module) -> None:
    """Route the model's attention through slimkit's function (a pass-through until quantizers are attached)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(ATTN_IMPL, _quantized_attention)
    # the mask too: for an attention function it does not know, transformers builds no mask at all (and SDPA
    # then runs plain causal attention: no padding, no sliding window)
    AttentionMaskInterface.register(ATTN_IMPL, sdpa_mask)
    try:
        model.set_attn_implementation(ATTN_IMPL)
    except (ValueError, AttributeError, NotImplementedError) as e:
        raise SlimkitError(f"{type(model).__name__} does not use transformers' attention interface, so its attention "
                           f"matmuls cannot be quantized (attn_quant): {str(e).splitlines()[0]}") from None


def attach(module: nn.Module, spec: QuantSpec, observer: str = "minmax") -> AttentionQuant:
    quant = AttentionQuant(spec, observer).to(next(module.parameters()).device)
    module.slimkit_attn_quant = quant
    return quant


def attention_quantizers(model: nn.Module) -> dict[str, AttentionQuant]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AttentionQuant)}
