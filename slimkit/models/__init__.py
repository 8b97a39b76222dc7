"""The shipped models and datasets by name, so recipes, the CLI and saved artifacts can refer to them."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .efficientnet_lite import efficientnet_lite0, natural_images
from .fmnist import fmnist_resnet, fmnist_subset, load_fashion_mnist, to_float


def _fmnist_test() -> tuple[torch.Tensor, torch.Tensor]:
    """The full 10000-image Fashion-MNIST test split, as model inputs and labels."""
    x, y = load_fashion_mnist("test")
    return to_float(x), y


MODELS: dict[str, Callable[[], nn.Module]] = {
    "fmnist-resnet": fmnist_resnet,
    "efficientnet-lite0": efficientnet_lite0,
}

DATASETS: dict[str, Callable[[], tuple[torch.Tensor, torch.Tensor] | torch.Tensor]] = {
    "fmnist-calib": lambda: fmnist_subset("calib"),
    "fmnist-eval": lambda: fmnist_subset("eval"),
    "fmnist-test": _fmnist_test,
    "natural-calib": lambda: natural_images("calib"),
    "natural-eval": lambda: natural_images("eval"),
}


def _text_split(split: str) -> list[str]:
    from ..text import get_corpus

    return get_corpus("python-docs", split)


# Hugging Face transformers models (slimkit.models.hf.load_hf gives the tokenizer too) and text corpora (lists of
# strings: slimkit.text.token_blocks / corpus_tokens turn them into tokens for a given tokenizer).
HF_MODELS: tuple[str, ...] = ("smollm2-135m", "minilm-l6")
TEXT_DATASETS: dict[str, Callable[[], list[str]]] = {
    "python-docs-calib": lambda: _text_split("calib"),
    "python-docs-eval": lambda: _text_split("eval"),
}


from .registry import default_data, get_dataset, get_model  # noqa: E402  (clear errors, user factories)


__all__ = ["MODELS", "DATASETS", "HF_MODELS", "TEXT_DATASETS", "get_model", "get_dataset", "fmnist_resnet",
           "fmnist_subset", "efficientnet_lite0", "natural_images", "load_fashion_mnist", "to_float", "default_data"]
