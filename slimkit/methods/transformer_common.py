"""What the transformer methods share: the method record the block-wise pipeline calls."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


def _nothing(ctx) -> None:
    return None


@dataclass(frozen=True)
class TransformerMethod:
    """A transformer PTQ method: a function-preserving transform of each block before its linears are wrapped,
    and an optional step after the activation ranges are calibrated (clipping search, range learning)."""

    description: str
    transform: Callable = _nothing
    after_calibration: Callable = _nothing
