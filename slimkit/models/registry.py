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
    "smollm2-135m": {"calib": "python-docs-calib", "eval": "python-docs-eval"},
    "minilm-l6": {"calib": "python-docs-calib", "eval": "python-docs-eval"},
}


def get_model(name: str, weights: str | Path | None = None, **kwargs) -> nn.Module:
    """A shipped model by name, or a user's model from a factory spec ('file.py:function')."""
    if is_factory(name):
        return build_from_factory(name, weights or kwargs.get("weights"), kwargs.get("root"))
    from . import HF_MODELS, MODELS

    if name in HF_MODELS:  # a transformers model; its tokenizer: slimkit.models.hf.load_hf(name)
        from .hf import load_hf

        if weights is not None:
            raise SlimkitError(f"{name} is a Hugging Face model: give weights as a model folder, not weights=")
        return load_hf(name)[0]
    if name not in MODELS:
        if "/" in name or "\\" in name or name.startswith("."):
            what = "is no slimkit artifact or model folder" if Path(name).exists() else "does not exist"
            raise SlimkitError(f"{name} {what}: give the folder of a saved slimkit artifact or of a Hugging "
                               f"Face model, a shipped model ({', '.join([*MODELS, *HF_MODELS])}), or a factory "
                               "'file.py:function'")
        raise SlimkitError(f"unknown model {name!r}: use a shipped model ({', '.join([*MODELS, *HF_MODELS])}), a saved "
                           "slimkit directory, or a factory 'file.py:function'")
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
    """A shipped dataset: tensors (inputs, labels) for the vision sets, a list of strings for the text corpora."""
    from . import DATASETS, TEXT_DATASETS

    if name not in DATASETS and name not in TEXT_DATASETS:
        raise SlimkitError(f"unknown dataset {name!r}: shipped datasets are {', '.join([*DATASETS, *TEXT_DATASETS])}")
    try:
        return DATASETS[name]() if name in DATASETS else TEXT_DATASETS[name]()
    except (ImportError, FileNotFoundError) as e:
        raise SlimkitError(str(e)) from None


def default_data(model: str, split: str) -> str | None:
    """The shipped calibration / evaluation set of a shipped model, None for others."""
    return DEFAULT_DATA.get(model, {}).get(split)
