"""Models and datasets by name: the shipped ones, and users' factories ('file.py:function')."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import SlimkitError
from .factory import build_from_factory, is_factory

# Shipped model -> its calibration and evaluation sets.
DEFAULT_DATA = {
    "fmnist-resnet": {"calib": "fmnist-calib", "eval": "fmnist-eval"},
    "efficientnet-lite0": {"calib": "natural-calib", "eval": "natural-eval"},
}


def get_model(name: str, weights: str | Path | None = None, **kwargs) -> nn.Module:
    """A shipped model by name, or a user's model from a factory spec ('file.py:function')."""
    if is_factory(name):
        return build_from_factory(name, weights or kwargs.get("weights"))
    from . import MODELS

    if name not in MODELS:
        raise SlimkitError(f"unknown model {name!r}: use a shipped model ({', '.join(MODELS)}), a saved slimkit "
                           "directory, or a factory 'file.py:function'")
    try:
        model = MODELS[name]()
    except (ImportError, FileNotFoundError) as e:
        raise SlimkitError(str(e)) from None
    if weights is not None:
        from .factory import load_weights

        load_weights(model, weights)
    model._slimkit_spec = {"builder": name}
    return model


def get_dataset(name: str):
    from . import DATASETS

    if name not in DATASETS:
        raise SlimkitError(f"unknown dataset {name!r}: shipped datasets are {', '.join(DATASETS)}")
    try:
        return DATASETS[name]()
    except (ImportError, FileNotFoundError) as e:
        raise SlimkitError(str(e)) from None


def default_data(model: str, split: str) -> str | None:
    """The shipped calibration / evaluation set of a shipped model, None for others."""
    return DEFAULT_DATA.get(model, {}).get(split)
