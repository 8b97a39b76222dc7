"""Channel transforms keep the full-precision function of every supported family (to 1e-5 relative)."""
import copy

import pytest
import torch

from slimkit.core.families import family_of, layout
from slimkit.core.migrate import apply_transform, can_shift, gamma_scale, smoothquant_scale, weight_absmax_in
from slimkit.core.wrap import float_layer, weight_oi
from slimkit.errors import SlimkitError

from tiny_hf import FAMILY_MODELS, output, tiny_inputs, tiny_model


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def random_transform(model, groups, g, shift=True):
    for group in groups:
        width = weight_oi(float_layer(model.get_submodule(group.layers[0]))).shape[1]
        scale = torch.empty(width).uniform_(0.2, 5.0, generator=g) * torch.where(torch.rand(width, generator=g) < 0.1, -1.0, 1.0)
        z = torch.randn(width, generator=g) if shift and can_shift(model, group) else None
        apply_transform(model, group, scale, z)


@pytest.mark.parametrize("kind", FAMILY_MODELS)
def test_random_scale_and_shift_preserve_function(kind):
    model = tiny_model(kind)
    inputs = tiny_inputs(kind)
    ref = output(model, inputs)
    lay = layout(model)
    assert len(lay.blocks) == 2
    g = torch.Generator().manual_seed(0)
    for i in range(len(lay.blocks)):
        random_transform(model, lay.groups(i), g)
    assert rel_err(output(model, inputs), ref) < 1e-5
    # the transform changed the weights for real
    first = model.get_submodule(lay.groups(0)[0].layers[0])
    assert not torch.allclose(first.weight, tiny_model(kind).get_submodule(lay.groups(0)[0].layers[0]).weight)


@pytest.mark.parametrize("kind", FAMILY_MODELS)
def test_gamma_migration_preserves_function_and_removes_gamma(kind):
    model = tiny_model(kind)
    inputs = tiny_inputs(kind)
    ref = output(model, inputs)
    lay = layout(model)
    for i in range(len(lay.blocks)):
        for group in lay.groups(i):
            s = gamma_scale(model, group)
            if s is not None:
                apply_transform(model, group, s)
                if group.fold == "norm":  # the norm no longer scales: gamma is 1 where it was migrated
                    assert torch.allclose(model.get_submodule(group.prev).weight, torch.ones_like(s))
    assert rel_err(output(model, inputs), ref) < 1e-5


@pytest.mark.parametrize("kind", ["llama", "opt", "bert"])
def test_smoothquant_scales_balance_ranges(kind):
    model = tiny_model(kind)
    inputs = tiny_inputs(kind)
    ref = output(model, inputs)
    lay = layout(model)
    group = lay.groups(0)[0]
    act = torch.rand(weight_absmax_in(model, group).shape) * 10
    s = smoothquant_scale(act, weight_absmax_in(model, group), alpha=0.5)
    apply_transform(model, group, s)
    # after migration max|X_j| / s_j == max|W_j| * s_j: activation and weight ranges meet in the middle
    assert torch.allclose(act / s, weight_absmax_in(model, group), rtol=1e-4)
    assert rel_err(output(model, inputs), ref) < 1e-5


def test_composed_input_transforms():
    model = tiny_model("bert")
    inputs = tiny_inputs("bert")
    ref = output(model, inputs)
    lay = layout(model)
    g = torch.Generator().manual_seed(3)
    for _ in range(2):  # two transforms of the same activation compose
        random_transform(model, lay.groups(1), g)
    assert rel_err(output(model, inputs), ref) < 1e-5


def test_rmsnorm_refuses_shift():
    model = tiny_model("llama")
    group = layout(model).groups(0)[0]
    assert not can_shift(model, group)
    with pytest.raises(SlimkitError, match="cannot fold into .*without bias"):
        apply_transform(model, group, torch.ones(32), torch.ones(32))


def test_unsupported_family_lists_supported():
    import transformers as T

    model = T.GPTNeoXForCausalLM(T.GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                 num_attention_heads=4, intermediate_size=64))
    with pytest.raises(SlimkitError, match="supported: .*llama.*register_family"):
        family_of(model)
    with pytest.raises(SlimkitError, match="not a Hugging Face model"):
        family_of(torch.nn.Linear(2, 2))


def test_refused_shift_leaves_model_untouched():
    model = tiny_model("llama")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(SlimkitError):
        apply_transform(model, layout(model).groups(0)[0], torch.full((32,), 2.0), torch.ones(32))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_norms_without_weights_take_the_transform_at_the_linears_input():
    """OPT with layer_norm_elementwise_affine=False: no gamma to migrate (gamma_scale gives None) and no weight
    to fold a scale into, so scales and shifts stay at the linears' input; the function holds (float64: exactly)."""
    import transformers as T

    torch.manual_seed(0)
    cfg = T.OPTConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                      word_embed_proj_dim=32, layer_norm_elementwise_affine=False)
    model = T.OPTForCausalLM(cfg).eval().double()
    ids = {"input_ids": torch.randint(4, 96, (2, 12))}
    with torch.no_grad():
        ref = model(**ids).logits
    lay = layout(model)
    g = torch.Generator().manual_seed(3)
    for i in range(len(lay.blocks)):
        for group in lay.groups(i):
            if group.fold == "norm":
                assert gamma_scale(model, group) is None and can_shift(model, group)
        random_transform(model, lay.groups(i), g)
    with torch.no_grad():
        assert rel_err(model(**ids).logits, ref) < 1e-12
