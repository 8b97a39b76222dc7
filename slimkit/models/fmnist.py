"""A small ResNet for Fashion-MNIST, its data (Debian's IDX files) and the weights and subsets slimkit ships.

The model takes float images in [0, 1] shaped (N, 1, 28, 28) and normalises them itself with plain arithmetic
(no buffer), so quantizers never see the normalisation and callers never have to remember it.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

FMNIST_DIR = Path(os.environ.get("SLIMKIT_FMNIST_DIR", "/usr/share/datasets/fashion-mnist"))  # Debian's path
ASSETS = Path(__file__).resolve().parent.parent / "assets"
WEIGHTS_FILE = ASSETS / "fmnist_resnet.safetensors"
SUBSETS_FILE = ASSETS / "fmnist_subsets.safetensors"
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST train-set pixel statistics
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False), nn.BatchNorm2d(cout)


def _shortcut(cin: int, cout: int, stride: int) -> nn.Sequential | None:
    """1x1 conv + BN when the shape changes, else None (identity)."""
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(*_conv_bn(cin, cout, 1, stride))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, ReLU after the add (He et al. 2016)."""

    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(cin, width, 3, stride)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2, self.bn2 = _conv_bn(width, width, 3)
        self.downsample = _shortcut(cin, width, stride)
        self.relu2 = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand (x4), each with BN, plus shortcut; ReLU after the add."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = width * self.expansion
        self.conv1, self.bn1 = _conv_bn(cin, width, 1)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2, self.bn2 = _conv_bn(width, width, 3, stride)
        self.relu2 = nn.ReLU(inplace=False)
        self.conv3, self.bn3 = _conv_bn(width, cout, 1)
        self.downsample = _shortcut(cin, cout, stride)
        self.relu3 = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + identity)


class FashionResNet(nn.Module):
    """Stem conv, three stages of residual blocks (28→14→7), global average pool, linear classifier."""

    def __init__(self, block: str = "basic", widths: tuple[int, ...] = (32, 64, 128),
                 blocks_per_stage: int | tuple[int, ...] = 2, num_classes: int = 10):
        super().__init__()
        blocks = {"basic": BasicBlock, "bottleneck": Bottleneck}
        if block not in blocks:
            raise ValueError(f"block must be 'basic' or 'bottleneck', got {block!r}")
        block_cls = blocks[block]
        depths = (blocks_per_stage,) * len(widths) if isinstance(blocks_per_stage, int) else tuple(blocks_per_stage)
        if len(depths) != len(widths):
            raise ValueError(f"blocks_per_stage {depths} and widths {widths} differ in length")
        self.conv1, self.bn1 = _conv_bn(1, widths[0], 3)
        self.relu = nn.ReLU(inplace=False)
        cin, self.num_stages = widths[0], len(widths)
        for i, (width, depth) in enumerate(zip(widths, depths)):  # layer1, layer2, ... as in torchvision
            layers = []
            for j in range(depth):
                layers.append(block_cls(cin, width, stride=2 if i > 0 and j == 0 else 1))
                cin = width * block_cls.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - MEAN) / STD
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def load_fashion_mnist(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images (N, 28, 28), int64 labels) of the "train" or "test" split from Debian's IDX files."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not FMNIST_DIR.is_dir():
        raise FileNotFoundError(f"Fashion-MNIST not found at {FMNIST_DIR}: install it with "
                                "`apt-get install -y dataset-fashion-mnist` (or `make data`)")
    images = _read_idx(FMNIST_DIR / f"{prefix}-images-idx3-ubyte.gz")
    labels = _read_idx(FMNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz")
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip'd, unsigned-byte payload) as a NumPy array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) or (N, 1, 28, 28) images as float (N, 1, 28, 28) in [0, 1], the model's input."""
    x = images.float().div_(255.0)
    return x.unsqueeze(1) if x.dim() == 3 else x


def fmnist_resnet(pretrained: bool = True) -> FashionResNet:
    """The default FashionResNet in eval mode, with the shipped weights unless pretrained=False."""
    model = FashionResNet()
    if pretrained:
        from safetensors.torch import load_file

        if not WEIGHTS_FILE.exists():
            raise FileNotFoundError(f"{WEIGHTS_FILE} is missing: run scripts/train_fmnist.py to make it")
        model.load_state_dict(load_file(str(WEIGHTS_FILE)))
    model._slimkit_input_shape = (1, 28, 28)
    return model.eval()


def fmnist_subset(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A shipped subset as (float images (N, 1, 28, 28) in [0, 1], int64 labels): "calib" (1024 train
    images) or "eval" (2000 held-out test images), both class-balanced, so slimkit works without the dataset."""
    if name not in ("calib", "eval"):
        raise ValueError(f"subset must be 'calib' or 'eval', got {name!r}")
    from safetensors.torch import load_file

    if not SUBSETS_FILE.exists():
        raise FileNotFoundError(f"{SUBSETS_FILE} is missing: run scripts/train_fmnist.py to make it")
    t = load_file(str(SUBSETS_FILE))
    return to_float(t[f"{name}_x"]), t[f"{name}_y"].long()


def balanced_indices(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n indices drawn with a fixed seed, as evenly over the classes as n allows (the first classes get the
    remainder), in ascending order."""
    classes = labels.unique()
    g = torch.Generator().manual_seed(seed)
    picks = []
    for k, c in enumerate(classes.tolist()):
        idx = (labels == c).nonzero().flatten()
        take = n // len(classes) + (k < n % len(classes))
        picks.append(idx[torch.randperm(len(idx), generator=g)[:take]])
    return torch.cat(picks).sort().values
