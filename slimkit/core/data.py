"""Calibration and evaluation data: whatever the user has, as one float tensor of inputs (and labels).

Accepted: a tensor or NumPy array of inputs; an (inputs, labels) pair; a list of tensors; a Dataset or
DataLoader yielding tensors or (input, label) pairs; a file (.safetensors, .npy, .npz; never pickles)
holding inputs under "x" / "images" / "inputs" (labels under "y" / "labels"); or a shipped dataset name.
"""
from __future__ import annotations

import numbers
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from ..errors import SlimkitError

INPUT_KEYS = ("x", "images", "inputs", "input", "data", "pixel_values", "image")
LABEL_KEYS = ("y", "labels", "label", "targets")


def _as_tensor(a) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a
    arr = np.asarray(a)
    if arr.dtype.kind in "OUSV":      # Python objects, strings, bytes, records
        raise SlimkitError(f"cannot use a {type(a).__name__} of Python objects or strings as data: give numbers (a "
                           "tensor, an array, or nested lists of numbers)")
    if not arr.dtype.isnative:      # big-endian files (MATLAB, some exporters): torch reads native order only
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return torch.from_numpy(arr)


def _numbers_inside(items: list) -> bool:
    """Whether nested lists hold plain numbers (their first leaf is one): lists of tensors or arrays are
    (input, label) pairs or samples, not one array."""
    leaf = items
    while isinstance(leaf, list) and leaf:
        leaf = leaf[0]
    return isinstance(leaf, numbers.Number) and not isinstance(leaf, bool)


def _pick(mapping: dict, keys: tuple, what: str, source: str, required: bool):
    for k in keys:
        if k in mapping:
            return mapping[k]
    if required and len(mapping) == 1:
        return next(iter(mapping.values()))
    if required:
        raise SlimkitError(f"{source} has no {what} array: name it one of {', '.join(keys)} (found: {', '.join(mapping) or 'nothing'})")
    return None


def load_file(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(inputs, labels or None) from a .safetensors, .npy or .npz file."""
    path = Path(path)
    if not path.exists():
        raise SlimkitError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file as st_load
            arrays = st_load(str(path))
        elif suffix == ".npy":
            arrays = {"x": np.load(path, allow_pickle=False)}
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        elif path.is_dir():
            raise SlimkitError(f"{path} is a folder: give the inputs as one .safetensors, .npy or .npz file (images "
                               "stacked into an array), or pass a tensor / Dataset / DataLoader from Python")
        else:
            raise SlimkitError(f"unsupported data file {path.name}: use .safetensors, .npy or .npz (pickles are never loaded)")
    except SlimkitError:
        raise
    except Exception as e:  # corrupt file, pickled object array, ...
        why = f"{type(e).__name__}: {e}"
        if "pickle" in str(e).lower():
            why = "it is no NumPy array file, or it holds Python objects (never unpickled)"
        raise SlimkitError(f"cannot read data file {path}: {why}") from None
    x = _pick(arrays, INPUT_KEYS, "input", str(path), required=True)
    y = _pick(arrays, LABEL_KEYS, "label", str(path), required=False)
    return _as_tensor(x), (_as_tensor(y) if y is not None else None)


def resolve(data) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(inputs, labels or None) from any accepted form (see the module docstring)."""
    if isinstance(data, (str, Path)):
        if Path(data).exists() or Path(data).suffix in (".npy", ".npz", ".safetensors"):
            return load_file(data)
        from ..models import DATASETS
        from ..models.registry import get_dataset

        if str(data) not in DATASETS:
            raise SlimkitError(f"data {str(data)!r} is neither a file nor a shipped dataset ({', '.join(DATASETS)})")
        data = get_dataset(str(data))
    if isinstance(data, (torch.Tensor, np.ndarray)):
        return _as_tensor(data), None
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(d, (torch.Tensor, np.ndarray)) for d in data):
        return _as_tensor(data[0]), _as_tensor(data[1])
    if isinstance(data, list) and len(data) == 2 and all(isinstance(d, (torch.Tensor, np.ndarray)) for d in data) \
            and data[0].ndim >= 2 and data[1].ndim == 1 and len(data[0]) == len(data[1]):
        return _as_tensor(data[0]), _as_tensor(data[1])     # one DataLoader batch [inputs, labels] (default_collate)
    if isinstance(data, Mapping):       # a dict, or a processor's BatchFeature / a tokenizer's BatchEncoding (UserDicts)
        x = _pick(data, INPUT_KEYS, "input", "the data mapping", required=True)
        y = _pick(data, LABEL_KEYS, "label", "the data mapping", required=False)
        return _as_tensor(x), (_as_tensor(y) if y is not None else None)
    try:
        items = list(data)
    except TypeError:
        raise SlimkitError(f"cannot use {type(data).__name__} as data: give a tensor, an array, (inputs, labels), "
                           "a list of tensors, a Dataset/DataLoader or a .safetensors/.npy/.npz file") from None
    if not items:
        raise SlimkitError("the data is empty: give at least one calibration sample")
    if isinstance(data, list) and all(isinstance(i, list) for i in items) and _numbers_inside(items):
        try:                                # nested lists of plain numbers: one array
            arr = np.asarray(data)
        except (ValueError, TypeError):     # ragged: per-sample items after all
            arr = None
        if arr is not None and arr.dtype.kind in "biuf":
            return _as_tensor(arr), None
    xs, ys = [], []
    for item in items:
        if isinstance(item, Mapping):       # a Hugging Face style sample or batch: {"pixel_values": ..., "labels": ...}
            xs.append(_as_tensor(_pick(item, INPUT_KEYS, "input", "a data sample", required=True)))
            label = _pick(item, LABEL_KEYS, "label", "a data sample", required=False)
            if label is not None:
                ys.append(_as_tensor(label))
        elif isinstance(item, (tuple, list)) and len(item) >= 1:
            xs.append(_as_tensor(item[0]))
            if len(item) > 1:
                ys.append(_as_tensor(item[1]))
        else:
            xs.append(_as_tensor(item))
    batched = isinstance(data, torch.utils.data.DataLoader)  # items are batches, not samples
    shapes = {tuple(x.shape[1:]) if batched else tuple(x.shape) for x in xs}
    if len(shapes) > 1:
        raise SlimkitError(f"data samples have different shapes ({', '.join(map(str, sorted(shapes)))}): give samples of one shape")
    x = torch.cat(xs) if batched else torch.stack(xs)
    y = None
    if ys and len(ys) == len(xs):
        scalar = all(t.numel() == (len(xi) if batched else 1) for t, xi in zip(ys, xs))
        if scalar:          # class labels: one number per sample
            y = torch.cat([t.reshape(-1) for t in ys]) if batched else torch.stack([t.reshape(()) for t in ys])
        elif len({tuple(t.shape[1:]) if batched else tuple(t.shape) for t in ys}) == 1:
            # other targets (one-hot rows, masks) as they are: calibration never reads them, and evaluation
            # refuses them as labels with its own message
            y = torch.cat(ys) if batched else torch.stack(ys)
    return x, y


def input_dtype(model: torch.nn.Module, x: torch.Tensor) -> torch.dtype:
    """The dtype to feed float inputs `x` to `model` in: its own floating dtype (float64 data, NumPy's default,
    runs in the model's precision); x's own for integer inputs or a model without float parameters."""
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return p.dtype if p is not None and torch.is_floating_point(x) else x.dtype


def check_inputs(x: torch.Tensor, what: str) -> None:
    """Model inputs are floating point and finite (what: 'calibration' or 'evaluation', for the message)."""
    if not torch.is_floating_point(x):
        raise SlimkitError(f"{what} inputs must be floating point, got {x.dtype} (scale images to floats first)")
    if not torch.isfinite(x).all():
        raise SlimkitError(f"the {what} data holds NaN or infinite values")


def check_token_ids(vocab_size: int | None, ids, what: str = "calibration token ids") -> None:
    """Token ids must be a non-empty integer tensor (N, L) of ids the model's embedding has (what: whose, for the
    message)."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] == 0 or ids.shape[1] == 0 or \
            ids.dtype not in (torch.int64, torch.int32):
        got = f"{tuple(ids.shape)} {ids.dtype}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise SlimkitError(f"{what} must be a non-empty integer tensor (N, L), got {got}")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or (vocab_size is not None and hi >= vocab_size):
        raise SlimkitError(f"{what} run from {lo} to {hi}, outside the model's vocabulary "
                           f"(0 to {vocab_size - 1 if vocab_size else '?'}): were they made by another tokenizer?")


def calibration_tensor(data, num_samples: int, seed: int = 0) -> torch.Tensor:
    """The float calibration inputs, at most `num_samples` of them (a fixed random subset when more)."""
    x, _ = resolve(data)
    if x.dim() == 0:
        raise SlimkitError("the calibration data is a single number: give samples stacked along a first axis")
    if x.numel() == 0 or x.shape[0] == 0:
        raise SlimkitError("the calibration data is empty: give at least one sample")
    check_inputs(x, "calibration")
    if x.shape[0] > num_samples:
        idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:num_samples]
        x = x[idx.sort().values]
    return x.float().contiguous()
