"""slimkit.structured on Hugging Face causal LMs in the settings a training or evaluation script sets up around
it: a model built on the meta device (to size it), a half-precision default dtype, inference mode, autocast.
CPU, seconds, fixed seeds."""
from __future__ import annotations

import pytest
import torch
import transformers as T

from slimkit.structured import (SelfGuided, load_structured, make_linear, premerge, replace_ffn, save_structured,
                                train_flops_per_token)
from tests.tiny_hf import VOCAB, tiny_inputs, tiny_model

KINDS = ("lowrank", "blockshuffle", "blockdense")


def _llama_config() -> T.LlamaConfig:
    return T.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128)


def _train_step(model) -> None:
    """One optimizer step on the model's own loss: what fails on inference tensors (saved for backward, updated
    in place)."""
    inputs = tiny_inputs("llama")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)


@pytest.mark.parametrize("kind", KINDS)
def test_replace_ffn_on_a_meta_model_counts_runs_and_merges(kind):
    """A model built on the meta device (sized for its FLOPs before any weight exists) takes every kind, self-guided
    too, and its structured FFNs run and merge there: BlockShuffle's guide init and the block-diagonal products asked
    meta for its autocast state, which raised."""
    with torch.device("meta"):
        model = T.LlamaForCausalLM(_llama_config())
    replace_ffn(model, kind, 0.32, self_guided=True)
    assert train_flops_per_token(model) > 0
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp.up_proj, SelfGuided)
    y = mlp(torch.randn(2, 3, 32, device="meta"))
    assert y.shape == (2, 3, 32) and y.device.type == "meta"
    assert premerge(mlp.up_proj, 1, always=True).weight.device.type == "meta"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_structured_layers_under_a_half_precision_default_dtype(kind, dtype):
    """Under torch.set_default_dtype(bf16 / fp16), as for nn.Linear, the layers are built in that dtype; their
    initial SVDs run in float32 (there is none in half precision on the CPU: replace_ffn raised from
    torch.linalg.svd)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        layer = make_linear(kind, 32, 64, 0.32)
        assert {p.dtype for p in layer.parameters()} == {dtype}
        torch.manual_seed(0)
        model = T.LlamaForCausalLM(_llama_config())
        replace_ffn(model, kind, 0.32, self_guided=True)
    finally:
        torch.set_default_dtype(before)
    assert {p.dtype for p in model.parameters()} == {dtype}
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits.float()).all()


@pytest.mark.parametrize("kind", KINDS)
def test_init_keeps_full_precision_under_autocast(kind):
    """A layer built inside an autocast region is the one built outside it, in float32 (the ortho init's U @ Vh was
    autocast to bf16: BlockShuffle's and BlockDense's factors came out bf16, or rounded to it)."""
    torch.manual_seed(0)
    plain = make_linear(kind, 32, 64, 0.32)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = make_linear(kind, 32, 64, 0.32)
    for (name, p), q in zip(plain.named_parameters(), under.parameters()):
        assert q.dtype == torch.float32 and torch.equal(p, q), name


@pytest.mark.parametrize("kind", KINDS)
def test_replace_and_load_under_inference_mode_give_trainable_layers(kind, tmp_path):
    """replace_ffn and load_structured called under torch.inference_mode (an evaluation script's decorator) still
    make ordinary parameters: the model trains afterwards, as premerge's merged layers do. They were inference
    tensors, and the first training step raised."""
    model = tiny_model("llama")
    with torch.inference_mode():
        replace_ffn(model, kind, 0.32, self_guided=True)
    assert not any(p.is_inference() for p in model.parameters())
    _train_step(model)
    model.eval()
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        ref = model(**inputs).logits
    save_structured(model, tmp_path / "sk")
    back = tiny_model("llama", seed=3)
    with torch.inference_mode():
        load_structured(back, tmp_path / "sk").eval()
        assert torch.equal(back(**inputs).logits, ref)
    assert not any(p.is_inference() for p in back.parameters())
    _train_step(back)


@pytest.mark.parametrize("self_guided", [False, True])
def test_a_premerged_gpt2_saves_and_reloads_as_a_plain_gpt2(self_guided, tmp_path):
    """GPT-2's FFN linears are Conv1D (weight stored (in, out)): premerge gives back Conv1D layers, so the premerged
    model is a plain GPT-2 that save_pretrained writes and GPT2LMHeadModel.from_pretrained reloads with the same
    logits (an nn.Linear there stored its weight transposed, which from_pretrained refused). The same through
    load_structured on a fresh GPT-2."""
    from transformers.pytorch_utils import Conv1D

    from slimkit.structured import drop_guides

    model = tiny_model("gpt2")
    replace_ffn(model, "lowrank", 0.32, self_guided=self_guided)
    if self_guided:
        drop_guides(model)
    save_structured(model, tmp_path / "structured")
    inputs = tiny_inputs("gpt2")
    with torch.no_grad():
        want = model(**inputs).logits
    merged = premerge(model, 1, always=True)
    mlp = merged.transformer.h[0].mlp
    assert isinstance(mlp.c_fc, Conv1D) and isinstance(mlp.c_proj, Conv1D)
    with torch.no_grad():
        got = merged(**inputs).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    merged.save_pretrained(tmp_path / "plain")
    again = T.GPT2LMHeadModel.from_pretrained(tmp_path / "plain").eval()
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, got)
    loaded = load_structured(tiny_model("gpt2", seed=1), tmp_path / "structured")
    assert isinstance(premerge(loaded, 1, always=True).transformer.h[1].mlp.c_proj, Conv1D)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, want, atol=1e-5, rtol=1e-5)
