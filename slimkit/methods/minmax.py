"""MinMax: the plain baseline. No transform; weights per channel and activations per tensor from their ranges."""
from .transformer_common import TransformerMethod

METHOD = TransformerMethod("static min-max ranges: activations per tensor, weights per channel, no transform")
