"""slimkit.core.sparsity: exact allocations, masks (unstructured and N:M), compact storage."""
import math

import pytest
import torch

from slimkit.core.sparsity import (apply_mask, erk_rates, exact_counts, global_magnitude_counts, is_nm, magnitude_mask,
                                   nm_mask, pack_sparse, uniform_rates, unpack_sparse)
from slimkit.errors import SlimkitError

SIZES = {"conv1": 3 * 16 * 9, "conv2": 16 * 32 * 9, "fc": 32 * 10, "tiny": 7}


@pytest.mark.parametrize("target", [0.0, 0.5, 0.7, 0.8, 0.9, 0.987])
def test_exact_counts_hit_the_target_to_one_weight_for_any_rates(target):
    g = torch.Generator().manual_seed(0)
    total = sum(SIZES.values())
    for rates in (uniform_rates(SIZES, target), {k: float(torch.rand(1, generator=g)) for k in SIZES},
                  {k: 0.0 for k in SIZES}, {k: 1.0 for k in SIZES}):
        counts = exact_counts(rates, SIZES, target)
        assert sum(counts.values()) == round(target * total)
        assert all(0 <= counts[k] <= SIZES[k] for k in SIZES)


def test_exact_counts_keep_the_order_of_the_rates():
    rates = {"conv1": 0.2, "conv2": 0.9, "fc": 0.6, "tiny": 0.4}
    counts = exact_counts(rates, SIZES, 0.7)
    share = {k: counts[k] / SIZES[k] for k in SIZES if k != "tiny"}
    assert share["conv1"] < share["fc"] < share["conv2"]


def test_erk_rates_meet_the_target_and_favour_small_layers():
    shapes = {"conv1": (16, 3, 3, 3), "conv2": (32, 16, 3, 3), "fc": (10, 32)}
    rates = erk_rates(shapes, 0.8)
    sizes = {k: math.prod(s) for k, s in shapes.items()}
    pruned = sum(rates[k] * sizes[k] for k in sizes)
    assert pruned == pytest.approx(0.8 * sum(sizes.values()))
    assert rates["conv1"] < rates["conv2"] and all(0 <= r < 1 for r in rates.values())
    dense = erk_rates({"first": (4, 3, 1, 1), "big": (256, 256)}, 0.5)   # the small layer would exceed density 1
    assert dense["first"] == 0.0 and dense["big"] > 0.5


def test_global_magnitude_prunes_the_smallest_weights_of_the_model():
    g = torch.Generator().manual_seed(1)
    w = {"a": torch.randn(20, 10, generator=g) * 0.1, "b": torch.randn(30, 10, generator=g)}
    counts = global_magnitude_counts(w, 0.5)
    assert sum(counts.values()) == 250 and counts["a"] > counts["b"]
    kept_min = min(w[k].abs().flatten().sort().values[counts[k]:].min() for k in w if counts[k] < w[k].numel())
    gone_max = max(w[k].abs().flatten().sort().values[:counts[k]].max() for k in w if counts[k] > 0)
    assert gone_max <= kept_min


def test_magnitude_mask_is_exact_and_deterministic_with_ties():
    w = torch.tensor([[0.5, -0.1, 0.1], [0.0, 2.0, -0.1]])
    keep = magnitude_mask(w, 3)
    assert keep.sum() == 3
    assert keep.tolist() == [[True, False, False], [False, True, True]]  # ties at |0.1|: lower index pruned first
    with pytest.raises(SlimkitError):
        magnitude_mask(w, 7)


def test_nm_masks_really_are_n_of_m():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(8, 16, generator=g)
    keep = nm_mask(w, 2, 4)
    assert is_nm(keep, 2, 4) and keep.sum() == 8 * 16 // 2
    groups = w.abs().reshape(8, 4, 4)
    kept = keep.reshape(8, 4, 4)
    assert torch.all(groups.masked_fill(~kept, float("inf")).min(-1).values >=
                     groups.masked_fill(kept, -1).max(-1).values)     # the kept are the largest of each group
    with pytest.raises(SlimkitError, match="multiple of 4"):
        nm_mask(torch.randn(4, 6), 2, 4)
    for n, m in ((4, 4), (0, 4), (3, 2)):
        with pytest.raises(SlimkitError, match="0 < N < M"):
            nm_mask(w, n, m)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, "0.5"])
def test_sparsity_outside_0_1_is_refused(bad):
    with pytest.raises(SlimkitError, match=r"\[0, 1\)"):
        exact_counts({"a": 0.5}, {"a": 10}, bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pack_unpack_is_bit_exact(dtype):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(13, 7, 3, generator=g).to(dtype)
    keep = magnitude_mask(w, 200)
    w = apply_mask(w, keep)
    packed = pack_sparse(w, keep)
    assert packed["bitmask"].dtype == torch.uint8 and packed["bitmask"].numel() == math.ceil(w.numel() / 8)
    back, keep2 = unpack_sparse(packed["values"], packed["bitmask"], tuple(w.shape))
    assert back.dtype == dtype and torch.equal(keep2, keep)
    assert torch.equal(back.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       w.view(torch.int16 if dtype != torch.float32 else torch.int32))
    with pytest.raises(SlimkitError, match="corrupt"):
        unpack_sparse(packed["values"][:-1], packed["bitmask"], tuple(w.shape))
