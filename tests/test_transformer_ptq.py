"""Transformer PTQ: the block-wise pipeline, its four methods, and their errors (tiny random models, CPU)."""
import copy

import pytest
import torch

import slimkit
from slimkit.core.wrap import quant_layers
from slimkit.core.families import layout
from slimkit.methods.os_plus import channel_scale, compared_value
from slimkit.methods.outlier_suppression import clip_range

from tiny_hf import output, tiny_inputs, tiny_model

OPTS = dict(progress=False, device="cpu", twc_iters=10)


def err(q, ref, inputs):
    return ((output(q, inputs) - ref) ** 2).mean().item()


@pytest.fixture(scope="module")
def llama_runs():
    model = tiny_model("llama")
    calib, ev = tiny_inputs("llama", 8, 16, seed=1), tiny_inputs("llama", 4, 16, seed=2)
    ref = output(model, ev)
    errs = {m: err(slimkit.quantize(model, calib, method=m, w_bits=4, a_bits=4, **OPTS), ref, ev)
            for m in ("minmax", "smoothquant", "outlier_suppression", "os_plus")}
    return errs


def test_outlier_methods_beat_minmax_at_w4a4(llama_runs):
    # the papers' ordering on a model whose norms carry outlier channels (fixed seed)
    assert llama_runs["os_plus"] < llama_runs["smoothquant"] < llama_runs["minmax"]
    assert llama_runs["outlier_suppression"] < llama_runs["minmax"]


@pytest.mark.parametrize("kind", ["opt", "gpt2", "bert"])
def test_os_plus_beats_minmax(kind):
    model = tiny_model(kind)
    calib, ev = tiny_inputs(kind, 8, 16, seed=1, pad=False), tiny_inputs(kind, 4, 16, seed=2)
    ref = output(model, ev)
    e_mm = err(slimkit.quantize(model, calib, method="minmax", w_bits=4, a_bits=4, **OPTS), ref, ev)
    e_os = err(slimkit.quantize(model, calib, method="os_plus", w_bits=4, a_bits=4, **OPTS), ref, ev)
    assert e_os < e_mm


def test_every_block_linear_is_quantized_and_input_model_untouched():
    model = tiny_model("qwen2")
    before = copy.deepcopy(model.state_dict())
    q = slimkit.quantize(model, tiny_inputs("qwen2", 4, 16), method="os_plus", w_bits=8, a_bits=8, **OPTS)
    names = set(quant_layers(q))
    expected = {f"model.layers.{i}.{p}" for i in range(2) for p in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert names == expected  # lm_head and embeddings stay in float
    assert all(l.frozen and l.a_quant is not None for l in quant_layers(q).values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    info = q.slimkit_info
    assert info["family"] == "llama" and info["calibration"]["tokens"] == 64


def test_w8a8_is_close_to_full_precision():
    model = tiny_model("gpt2")
    ev = tiny_inputs("gpt2", 4, 16, seed=2)
    ref = output(model, ev)
    q = slimkit.quantize(model, tiny_inputs("gpt2", 8, 16, seed=1), method="smoothquant", w_bits=8, a_bits=8, **OPTS)
    assert ((output(q, ev) - ref).abs().max() / ref.abs().max()).item() < 0.05
    cfg = q.slimkit_info["config"]          # what was applied: no CNN settings, no other method's
    assert cfg["alpha"] == 0.5 and cfg["w_bits"] == 8 and cfg["seq_len"] is None
    assert not {"first_last_bits", "iters", "drop_prob", "fold_bn", "search_steps", "twc_iters"} & set(cfg)


def test_per_token_dynamic_activations():
    model = tiny_model("llama")
    q = slimkit.quantize(model, tiny_inputs("llama", 4, 16), method="os_plus", w_bits=4, a_bits=4,
                         a_granularity="token", **OPTS)
    layer = next(iter(quant_layers(q).values()))
    assert layer.a_quant.dynamic
    x = torch.randn(3, 5, 32)
    y = layer.a_quant(x)
    for row_x, row_y in zip(x.reshape(-1, 32), y.reshape(-1, 32)):  # each token on its own 16-level grid
        step = (row_x.max() - row_x.min()) / 15
        assert len(torch.unique(row_y)) <= 16
        assert (row_y - row_x).abs().max() <= step * 0.5 + 1e-6 + step * 0.5  # rounding + zero-point rounding
        levels = (row_y - row_y.min()) / step
        assert torch.allclose(levels, levels.round(), atol=1e-4)


def test_token_wise_clip_range_drops_outlier_tokens():
    token_max = torch.tensor([1.0, 1.2, 0.9, 1.1, 50.0, 1.05, 0.95, 1.0, 1.15, 1.0])
    token_min = -token_max
    lo, hi = clip_range(token_max, token_min, 0.9)
    assert hi.item() == pytest.approx(1.2) and lo.item() == pytest.approx(-1.2)
    lo, hi = clip_range(token_max, token_min, 1.0)
    assert hi.item() == pytest.approx(50.0)


@pytest.mark.parametrize("kind", ["llama", "opt", "bloom", "gpt2", "bert", "mpnet"])
def test_os_plus_search_compares_the_output_projections_input(kind):
    """As the public code's migration functions: q/k/v are judged by the attention output before its output
    projection, LLaMA's gate/up by act(gate) * up; the value compared is exactly what that module reads."""
    model = tiny_model(kind)
    lay = layout(model)
    groups = [g for i in range(len(lay.blocks)) for g in lay.groups(i)]
    named = [g for g in groups if g.compare]
    assert {g.name for g in named} >= ({"attn_in", "mlp_in"} if kind == "llama" else
                                       {"attn_in"} if kind in ("opt", "bloom", "gpt2") else set())
    for g in named:
        scope, compare = model.get_submodule(g.scope), model.get_submodule(g.compare)
        calls, outs = [], []
        hook = scope.register_forward_pre_hook(lambda m, a, k: calls.append((a, dict(k))), with_kwargs=True)
        with torch.no_grad():    # no KV cache, which a replayed attention call would extend
            model(**tiny_inputs(kind, 2, 12), **({} if kind in ("bert", "mpnet") else {"use_cache": False}))
        hook.remove()
        hook = compare.register_forward_hook(lambda m, a, y: outs.append(y))
        with torch.no_grad():
            value = compared_value(scope, compare, *calls[0])
        hook.remove()
        assert value.shape[-1] == (compare.weight.shape[0] if kind == "gpt2" else compare.in_features)
        assert len(outs) == 1
        with torch.no_grad():
            torch.testing.assert_close(compare(value), outs[0].float(), atol=1e-5, rtol=1e-5)


def test_os_plus_channel_scale():
    cmax, cmin = torch.tensor([1.0, 8.0, 2.0]), torch.tensor([-1.0, -2.0, -12.0])
    s = channel_scale(cmax, cmin, 4.0)
    assert torch.equal(s, torch.tensor([1.0, 2.0, 3.0]))  # channels beyond [-4, 4] squeezed into it
    assert (cmax / s).max() <= 4.0 and (cmin / s).min() >= -4.0


def test_method_family_mismatch_errors():
    with pytest.raises(slimkit.SlimkitError, match="is for CNNs"):
        slimkit.quantize(tiny_model("llama"), tiny_inputs("llama", 2, 8), method="qdrop", **OPTS)
    cnn = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(slimkit.SlimkitError, match="is for Hugging Face transformers"):
        slimkit.quantize(cnn, torch.randn(8, 4), method="os_plus", **OPTS)


@pytest.mark.parametrize("calib, match", [
    (["some text"], "needs the model's tokenizer"),
    (torch.zeros(0, 8, dtype=torch.long), "non-empty integer tensor"),
    (torch.randn(2, 8), "non-empty integer tensor"),
])
def test_bad_calibration_errors(calib, match):
    with pytest.raises(slimkit.SlimkitError, match=match):
        slimkit.quantize(tiny_model("llama"), calib, method="minmax", **OPTS)


def test_calibration_forms_that_are_no_text_are_named():
    """Token ids in a DataLoader, a list of tensors, an array or a generator were all taken for text and asked for
    a tokenizer (and given one, 'text source must be a file ...')."""
    from tiny_hf import tiny_tokenizer
    model, ids = tiny_model("llama"), tiny_inputs("llama", 4, 12, pad=False)["input_ids"]
    for calib in (torch.utils.data.DataLoader(ids, batch_size=2), list(ids), ids.numpy(), (r for r in ids),
                  [{"input_ids": ids}]):
        for tok in (None, tiny_tokenizer()):
            with pytest.raises(slimkit.SlimkitError, match=f"must be token ids .* got {type(calib).__name__}"):
                slimkit.quantize(model, calib, method="minmax", tokenizer=tok, **OPTS)
        with pytest.raises(slimkit.SlimkitError, match=f"must be token ids .* got {type(calib).__name__}"):
            slimkit.sparsify(model, calib, method="wanda", sparsity=0.5, progress=False)


@pytest.mark.parametrize("kind", ["llama", "opt", "bloom", "gpt2", "bert", "mpnet"])
def test_save_load_exact_and_transformers_reload(kind, tmp_path):
    import transformers

    from slimkit.core.wrap import quantizers

    model = tiny_model(kind)
    q = slimkit.quantize(model, tiny_inputs(kind, 8, 16, seed=1, pad=False), method="os_plus", w_bits=4, a_bits=6, **OPTS)
    ev = tiny_inputs(kind, 4, 16, seed=2)
    slimkit.save(q, tmp_path / "art")
    again = slimkit.load(tmp_path / "art")
    assert torch.equal(output(again, ev), output(q, ev))  # bit-exact, activation quantizers included
    # transformers alone reloads the directory as the weight-quantized float model
    arch = transformers.AutoConfig.from_pretrained(tmp_path / "art").architectures[0]
    plain = getattr(transformers, arch).from_pretrained(tmp_path / "art").eval()
    assert type(plain) is type(model)
    for a in quantizers(q, "act"):
        a.enabled = False
    ref = output(q, ev)
    assert ((output(plain, ev) - ref).abs().max() / ref.abs().max()).item() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_load_into_a_given_float_instance_takes_the_saved_state(dtype, tmp_path):
    """slimkit.load(DIR, model=twin): the twin's own norms and embeddings are not the artifact's (OS+ folded its
    transform into them): the loaded model holds the saved state in the saved dtype, and the twin is untouched."""
    q = slimkit.quantize(tiny_model("llama").to(dtype), tiny_inputs("llama", 8, 16, seed=1, pad=False),
                         method="os_plus", w_bits=8, a_bits=8, **OPTS)
    slimkit.save(q, tmp_path / "art")
    twin = tiny_model("llama", seed=3)          # float32, other weights
    before = {k: v.clone() for k, v in twin.state_dict().items()}
    back = slimkit.load(tmp_path / "art", model=twin)
    ev = tiny_inputs("llama", 4, 16, seed=2)
    assert back is not twin and next(back.parameters()).dtype == dtype
    assert torch.equal(output(back, ev), output(q, ev))
    assert not quant_layers(twin) and all(torch.equal(before[k], v) for k, v in twin.state_dict().items())
    with pytest.raises(slimkit.SlimkitError, match="does not match the model= given"):
        slimkit.load(tmp_path / "art", model=tiny_model("gpt2"))


def test_load_rejects_corrupt_hf_artifact(tmp_path):
    q = slimkit.quantize(tiny_model("llama"), tiny_inputs("llama", 4, 8), method="minmax", **OPTS)
    slimkit.save(q, tmp_path / "art")
    (tmp_path / "art" / "slimkit.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(slimkit.SlimkitError, match="corrupt"):
        slimkit.load(tmp_path / "art")
    with pytest.raises(slimkit.SlimkitError, match="already exists"):
        slimkit.save(q, tmp_path / "art")


def test_a_damaged_tokenizer_in_an_hf_artifact_is_refused_not_dropped(tmp_path):
    """An artifact saved with its tokenizer whose tokenizer files are cut short or partly missing is corrupt: one
    SlimkitError saying so, not a model that silently loads without a tokenizer (which `slimkit eval` then calls
    "no tokenizer files"). One saved without a tokenizer still loads."""
    from tiny_hf import tiny_tokenizer

    q = slimkit.quantize(tiny_model("llama"), tiny_inputs("llama", 4, 8), method="minmax", **OPTS)
    slimkit.save(q, tmp_path / "bare")
    assert getattr(slimkit.load(tmp_path / "bare"), "_slimkit_tokenizer", None) is None
    q._slimkit_tokenizer = tiny_tokenizer()
    slimkit.save(q, tmp_path / "art")
    assert slimkit.load(tmp_path / "art")._slimkit_tokenizer is not None
    text = (tmp_path / "art" / "tokenizer.json").read_text()
    (tmp_path / "art" / "tokenizer.json").write_text(text[: len(text) // 2])
    with pytest.raises(slimkit.SlimkitError, match="corrupt: its tokenizer files do not read back"):
        slimkit.load(tmp_path / "art")
    (tmp_path / "art" / "tokenizer.json").unlink()
    with pytest.raises(slimkit.SlimkitError, match="corrupt: its tokenizer files do not read back"):
        slimkit.load(tmp_path / "art")


def test_a_damaged_hf_manifest_is_refused_not_misread(tmp_path):
    """A layer dropped from the manifest (it would run in float), an activation quantizer removed, a bit width
    changed (the codes would be misread) or a damaged config: each a clear error, never a different model."""
    import json
    import shutil
    q = slimkit.quantize(tiny_model("llama"), tiny_inputs("llama", 4, 8), method="minmax", w_bits=4, a_bits=8,
                         **OPTS)
    slimkit.save(q, tmp_path / "art")
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    name = next(iter(manifest["layers"]))

    def damaged(tag, change, why, digest=False):
        bad = tmp_path / tag
        shutil.copytree(tmp_path / "art", bad)
        m = json.loads(json.dumps(manifest))
        change(m)
        if not digest:      # as an artifact saved before manifests kept a digest of their layers: deeper checks
            m.pop("layers_digest")
        (bad / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(slimkit.SlimkitError, match=why):
            slimkit.load(bad)
    for tag, change in (("sym", lambda m: m["layers"][name]["weight"].update(symmetric=True)),
                        ("abits", lambda m: m["layers"][name]["act"].update(bits=4))):
        damaged(tag, change, "edited after saving", digest=True)
    damaged("sym_old", lambda m: m["layers"][name]["weight"].update(symmetric=True), "not whole numbers on the 4-bit "
            "symmetric grid|symmetric quantizer with nonzero zero points")
    damaged("dropped", lambda m: m["layers"].pop(name), "tensors its manifest does not name")
    damaged("no_act", lambda m: m["layers"][name].update(act=None), "tensors its manifest does not name")
    damaged("bits", lambda m: m["layers"][name]["weight"].update(bits=2), "bit width or shape does not match|not whole numbers on the 2-bit")
    shutil.copytree(tmp_path / "art", tmp_path / "cfg")
    config = json.loads((tmp_path / "cfg" / "config.json").read_text())
    (tmp_path / "cfg" / "config.json").write_text(json.dumps({**config, "hidden_size": 2 * config["hidden_size"]}))
    with pytest.raises(slimkit.SlimkitError, match="could not load the model directory"):
        slimkit.load(tmp_path / "cfg")
    # transformers would initialise what the files lack at random and carry on: a weight dropped from
    # model.safetensors, or config.json asking for one more layer, is refused
    from safetensors.torch import load_file, save_file
    shutil.copytree(tmp_path / "art", tmp_path / "norm")
    weights = load_file(tmp_path / "norm" / "model.safetensors")
    weights.pop("model.norm.weight")
    save_file(weights, tmp_path / "norm" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(slimkit.SlimkitError, match="missing from model.safetensors: model.norm.weight"):
        slimkit.load(tmp_path / "norm")
    shutil.copytree(tmp_path / "art", tmp_path / "layers")
    (tmp_path / "layers" / "config.json").write_text(
        json.dumps({**config, "num_hidden_layers": config["num_hidden_layers"] + 1}))
    with pytest.raises(slimkit.SlimkitError, match="corrupt: its model.safetensors does not match"):
        slimkit.load(tmp_path / "layers")


@pytest.mark.parametrize("kind", ["llama", "opt", "gpt2", "bert"])
def test_attention_matmul_inputs_quantized(kind, tmp_path):
    from slimkit.core.attention import attention_quantizers

    model = tiny_model(kind)
    q = slimkit.quantize(model, tiny_inputs(kind, 8, 16, seed=1, pad=False), method="minmax", w_bits=8, a_bits=4,
                         attn_quant=True, **OPTS)
    quants = attention_quantizers(q)
    assert len(quants) == 2
    seen = []
    for quant in quants.values():  # the quantizers really sit on the attention path, on their 16-level grid
        quant.register_forward_hook(lambda m, a, out: seen.append(out))
    ev = tiny_inputs(kind, 2, 16, seed=2)
    y = output(q, ev)
    assert len(seen) == 2
    for qq, kk, vv in seen:
        assert len(torch.unique(qq)) <= 16 and len(torch.unique(vv)) <= 16
    slimkit.save(q, tmp_path / "art")
    assert torch.equal(output(slimkit.load(tmp_path / "art"), ev), y)


@pytest.mark.parametrize("kind", ["llama", "mistral", "opt", "gpt2", "bert"])
def test_attention_pass_through_keeps_masks(kind):
    """Routed through slimkit's attention function with no quantizers attached, a model computes what it did
    before, bit for bit, with a left-padded row and (Mistral) a sliding window shorter than the sequence:
    the attention mask reaches the new function."""
    import transformers as T

    from slimkit.core.attention import use_quantized_attention
    from tiny_hf import VOCAB

    if kind == "mistral":
        torch.manual_seed(0)
        model = T.MistralForCausalLM(T.MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                     max_position_embeddings=128, sliding_window=8)).eval()
    else:
        model = tiny_model(kind)
    model.set_attn_implementation("sdpa")
    tokens = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, :7] = 0                                    # row 1 left-padded
    routed = copy.deepcopy(model)
    use_quantized_attention(routed)
    with torch.no_grad():
        want = model(tokens, attention_mask=mask)[0]
        got = routed(tokens, attention_mask=mask)[0]
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1, 7:], want[1, 7:], rtol=0, atol=0)


def test_attention_quant_refused_for_families_without_the_interface():
    with pytest.raises(slimkit.SlimkitError, match="attn_quant needs"):
        slimkit.quantize(tiny_model("bloom"), tiny_inputs("bloom", 2, 8), method="minmax", attn_quant=True, **OPTS)


def test_per_group_weights(tmp_path):
    model = tiny_model("llama")
    q = slimkit.quantize(model, tiny_inputs("llama", 4, 16), method="os_plus", w_bits=4, a_bits=8,
                         w_granularity="group", w_group_size=16, **OPTS)
    layer = q.get_submodule("model.layers.0.self_attn.q_proj")
    w = layer.quantized_weight()
    groups = w.reshape(-1, 16)  # each run of 16 input weights of a row has its own 16-level grid
    assert layer.w_quant.scale.numel() == groups.shape[0]
    steps = layer.w_quant.scale.reshape(-1, 1)
    codes = groups / steps + layer.w_quant.zero_point.reshape(-1, 1)
    assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.min() > -1e-3 and codes.max() < 15 + 1e-3
    slimkit.save(q, tmp_path / "g")
    assert torch.equal(slimkit.load(tmp_path / "g").get_submodule("model.layers.0.self_attn.q_proj").quantized_weight(), w)


def test_os_plus_token_clipping_sets_ranges_by_token_wise_clipping():
    """token_clipping: OS+'s transform, then Outlier Suppression's token-wise clipping of the activation ranges
    (recorded per block); without it no clipping runs and the transform is the same."""
    model = tiny_model("bert")
    calib, ev = tiny_inputs("bert", 8, 16, seed=1, pad=False), tiny_inputs("bert", 4, 16, seed=2)
    ref = output(model, ev)
    plain = slimkit.quantize(model, calib, method="os_plus", w_bits=4, a_bits=4, **OPTS)
    clipped = slimkit.quantize(model, calib, method="os_plus", w_bits=4, a_bits=4, token_clipping=True, **OPTS)
    for name, block in clipped.slimkit_info["blocks"].items():
        assert "twc_ratio" in block and "twc_ratio" not in plain.slimkit_info["blocks"][name]
        assert block["os_plus"] == plain.slimkit_info["blocks"][name]["os_plus"]  # same shift/scale search
    assert clipped.slimkit_info["config"]["token_clipping"] is True
    assert torch.isfinite(output(clipped, ev)).all() and err(clipped, ref, ev) != err(plain, ref, ev)
    with pytest.raises(slimkit.SlimkitError, match="minmax does not use it"):
        slimkit.quantize(model, calib, method="minmax", token_clipping=True, **OPTS)


@pytest.mark.parametrize("kind, methods", [("llama", ("minmax", "os_plus")), ("gpt2", ("smoothquant",))])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_quantize_and_reload(dtype, kind, methods, tmp_path):
    """A model loaded in bf16 / fp16 quantizes in its own dtype (the fp32 scales do not promote it), stays close
    to its float outputs, and reloads from the artifact in that dtype with the same outputs, bit for bit (GPT-2's
    Conv1D codes are a transposed view: the dequantized weight takes one layout, else fp16 CPU matmuls differ)."""
    import transformers as T
    tiny_model(kind).save_pretrained(tmp_path / "src")
    model = T.AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=dtype).eval()
    ids = tiny_inputs(kind, 8, 16)["input_ids"]
    for method in methods:
        q = slimkit.quantize(model, ids, method=method, w_bits=8, a_bits=8, **OPTS)
        with torch.no_grad():
            got, ref = q(ids[:2]).logits, model(ids[:2]).logits
        assert got.dtype == dtype and torch.isfinite(got).all()
        assert ((got.float() - ref.float()).norm() / ref.float().norm()) < 0.05
        back = slimkit.load(slimkit.save(q, tmp_path / method))
        assert next(back.parameters()).dtype == dtype
        with torch.no_grad():
            assert torch.equal(back(ids[:2]).logits, got)
    # cast in memory (.to(dtype)) instead: its rotary frequencies, a buffer no checkpoint stores, are half precision
    # too, and the reload casts them back (the manifest records their dtype)
    q = slimkit.quantize(tiny_model(kind).to(dtype).eval(), ids, method=methods[0], w_bits=8, a_bits=8, **OPTS)
    back = slimkit.load(slimkit.save(q, tmp_path / "cast"))
    with torch.no_grad():
        assert torch.equal(back(ids[:2]).logits, q(ids[:2]).logits)


def test_context_of_models_counting_positions_after_padding():
    """MPNet (like RoBERTa) numbers positions from padding_idx + 1: its 130-entry table holds 128 tokens."""
    from slimkit.transformer import context_length
    model = tiny_model("mpnet")
    assert context_length(model) == 128 and context_length(tiny_model("bert")) == 128
    ids = torch.randint(3, 100, (2, 129), generator=torch.Generator().manual_seed(0))
    with pytest.raises(slimkit.SlimkitError, match="longer than the model's context \\(128 positions\\)"):
        slimkit.quantize(model, ids, method="minmax", w_bits=8, a_bits=8, **OPTS)


def test_size_counts_a_tied_embedding_once_in_memory_and_after_reload(tmp_path):
    """A head tied to the embedding (transformer PTQ leaves the head in float) is stored once: the size reported
    after quantize equals the size of the reloaded artifact and the count by hand."""
    from slimkit.eval import model_size_bytes

    model = tiny_model("llama")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    q = slimkit.quantize(model, tiny_inputs("llama", 8, 16, seed=1), method="minmax", w_bits=4, a_bits=8, **OPTS)
    layers = quant_layers(q)
    slimkit.save(q, tmp_path / "art")
    again = slimkit.load(tmp_path / "art")
    packed = {t.data_ptr() for m in layers.values() for t in (m.layer.weight, m.w_int, m.w_quant.scale,
                                                             m.w_quant.zero_point)}
    stored = list(q.parameters()) + [b for n, b in q.named_buffers() if n in q.state_dict()]   # not inv_freq
    by_hand = sum(t.numel() * t.element_size() for ptr, t in {p.data_ptr(): p for p in stored}.items()
                  if ptr not in packed)
    by_hand += sum((m.layer.weight.numel() * 4 + 7) // 8 + 2 * m.w_quant.scale.numel() * 4 for m in layers.values())
    assert model_size_bytes(q) == model_size_bytes(again) == by_hand


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_size_is_what_the_artifact_stores_not_the_buffers_the_model_recomputes(kind, tmp_path):
    """Non-persistent buffers (BERT's position_ids / token_type_ids, rotary inv_freq) are in no file: the size
    reported for the float and the quantized model leaves them out, and equals the artifact's stored tensors
    (slimkit.safetensors plus the float tensors of transformers' part that slimkit.safetensors does not hold)."""
    from safetensors.torch import load_file

    from slimkit.eval import model_size_bytes

    model = tiny_model(kind)
    state = model.state_dict()
    assert model_size_bytes(model) == sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in
                                                                                  state.values()}.values())
    q = slimkit.quantize(model, tiny_inputs(kind, 8, 16, seed=1, pad=False), method="minmax", w_bits=4, a_bits=8,
                         **OPTS)
    slimkit.save(q, tmp_path / "art")
    ours, theirs = load_file(str(tmp_path / "art" / "slimkit.safetensors")), load_file(str(tmp_path / "art" /
                                                                                          "model.safetensors"))
    layers = quant_layers(q)
    rest = [t for k, t in theirs.items() if not any(k.startswith(n + ".") for n in layers)]
    assert model_size_bytes(q) == sum(t.numel() * t.element_size() for t in list(ours.values()) + rest)


def test_blocks_of_another_attention_kind_get_their_own_arguments():
    """Qwen2 with sliding-window layers gives those layers another mask than the first (full) one: the
    block-by-block passes take each kind's arguments from a forward in which earlier blocks are not run, and they
    equal what the real forward passes."""
    import transformers as T

    from slimkit.core.families import layout
    from slimkit.transformer import first_block_inputs, inputs_by_layer_type, layer_types, with_layer_arguments

    torch.manual_seed(0)
    model = T.Qwen2ForCausalLM(T.Qwen2Config(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                             num_key_value_heads=2, intermediate_size=64, use_sliding_window=True,
                                             sliding_window=4, max_window_layers=1)).eval()
    lay = layout(model)
    types = layer_types(model, lay)
    assert types == ["full_attention", "sliding_attention", "sliding_attention"]
    batches = [{"input_ids": torch.randint(1, 96, (2, 12))} for _ in range(2)]
    real = {}
    hooks = [model.get_submodule(p).register_forward_pre_hook(
        lambda m, a, k, i=i: real.setdefault(i, []).append(k["attention_mask"]), with_kwargs=True)
        for i, p in enumerate(lay.blocks)]
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in hooks:
        h.remove()
    inputs = first_block_inputs(model, lay, batches, torch.device("cpu"))
    by_type = inputs_by_layer_type(model, lay, batches, torch.device("cpu"), types)
    def same(a, b):
        return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))

    for i in range(3):
        got = with_layer_arguments(inputs, i, types, by_type)
        for b, (_, _, kwargs) in enumerate(got):
            assert same(kwargs["attention_mask"], real[i][b])
    assert not same(real[0][0], real[1][0])      # the kinds' masks differ
    assert layer_types(tiny_model("llama"), layout(tiny_model("llama"))) is None


def test_calibration_options_and_models_the_transforms_cannot_take():
    """A tokenizer's BatchEncoding calibrates; a skip entry naming no block linear, first_last_bits (a CNN
    setting) and BLOOM's residual-from-the-norm variant (for the transform methods) are refused clearly."""
    import transformers as T

    model, calib = tiny_model("llama"), tiny_inputs("llama", 4, 12)
    enc = T.BatchEncoding({"input_ids": calib["input_ids"], "attention_mask": torch.ones_like(calib["input_ids"])})
    q = slimkit.quantize(model, enc, method="minmax", w_bits=8, a_bits=8, **OPTS)
    assert quant_layers(q)
    q = slimkit.quantize(model, calib, method="minmax", skip=["mlp.down_proj"], **OPTS)
    assert not any(n.endswith("mlp.down_proj") for n in quant_layers(q))       # a block-relative name: every block
    with pytest.raises(slimkit.SlimkitError, match="skip names 'model.layers.0.mlp.down_prj', which is no linear"):
        slimkit.quantize(model, calib, method="minmax", skip=["model.layers.0.mlp.down_prj"], **OPTS)
    with pytest.raises(slimkit.SlimkitError, match="first_last_bits sets a CNN's"):
        slimkit.quantize(model, calib, method="minmax", first_last_bits=4, **OPTS)
    bloom = tiny_model("bloom")
    bloom.config.apply_residual_connection_post_layernorm = True
    with pytest.raises(slimkit.SlimkitError, match="apply_residual_connection_post_layernorm"):
        slimkit.quantize(bloom, tiny_inputs("bloom", 2, 8), method="os_plus", **OPTS)


def test_a_quantized_transformer_is_refused_with_a_clear_error():
    q = slimkit.quantize(tiny_model("llama"), tiny_inputs("llama", 2, 8), method="minmax", w_bits=8, a_bits=8, **OPTS)
    with pytest.raises(slimkit.SlimkitError, match="already quantized"):
        slimkit.quantize(q, tiny_inputs("llama", 2, 8), method="minmax", w_bits=8, a_bits=8, **OPTS)


class _OffsetRMSNorm(torch.nn.Module):
    """Gemma's norm: x_hat * (1 + w), where a Llama adapter expects x_hat * w."""

    def __init__(self, norm):
        super().__init__()
        self.weight, self.eps = norm.weight, norm.variance_epsilon

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight.float())).to(x.dtype)


@pytest.mark.parametrize("method", ["smoothquant", "outlier_suppression", "os_plus"])
def test_a_transform_that_changes_the_float_model_is_refused(method):
    """A norm that does not scale by its weight the way the family's adapter says (Gemma's (1 + w) in a Llama
    layout): migrating scales into it would silently change the model; slimkit stops with a clear error. The
    built-in families' transforms pass the same check (the other tests)."""
    model = tiny_model("llama")
    for block in model.model.layers:
        block.input_layernorm = _OffsetRMSNorm(block.input_layernorm)
        block.post_attention_layernorm = _OffsetRMSNorm(block.post_attention_layernorm)
    with pytest.raises(slimkit.SlimkitError, match=r"transform changed model\.layers\.0's float output .*register_family"):
        slimkit.quantize(model, tiny_inputs("llama", 4, 12), method=method, w_bits=8, a_bits=8, **OPTS)


def test_the_transform_check_allows_tf32_rounding_and_still_refuses_a_wrong_norm():
    """float32 with reduced-precision matmuls (allow_tf32, set_float32_matmul_precision('high')) rounds the rescaled
    weights' products more: the check allows 1e-2 there (a 7B Llama block under OS+ with TF32 on an H100 changed by
    0.2% and was refused at the float32 limit), 1e-3 otherwise; a wrong norm is refused either way."""
    from slimkit.transformer import preserved_tol
    before = torch.get_float32_matmul_precision()
    assert preserved_tol(torch.float32) == 1e-3 and preserved_tol(torch.bfloat16) == 3e-2
    try:
        torch.set_float32_matmul_precision("high")
        assert preserved_tol(torch.float32) == 1e-2 and preserved_tol(torch.float64) == 1e-3
        model = tiny_model("llama")
        for block in model.model.layers:
            block.input_layernorm = _OffsetRMSNorm(block.input_layernorm)
            block.post_attention_layernorm = _OffsetRMSNorm(block.post_attention_layernorm)
        with pytest.raises(slimkit.SlimkitError, match=r"transform changed model\.layers\.0's float output"):
            slimkit.quantize(model, tiny_inputs("llama", 4, 12), method="os_plus", w_bits=8, a_bits=8, **OPTS)
    finally:
        torch.set_float32_matmul_precision(before)
    assert preserved_tol(torch.float32) == 1e-3


def test_a_source_folder_missing_weights_is_named(tmp_path):
    """A model folder without some of its weights loads (transformers initialises them at random), with a warning
    that names them: compressing such a model is rarely what was meant."""
    import shutil

    from safetensors.torch import load_file, save_file

    from slimkit.models.hf import load_hf
    tiny_model("llama").save_pretrained(tmp_path / "src")
    shutil.copytree(tmp_path / "src", tmp_path / "part")
    weights = load_file(tmp_path / "part" / "model.safetensors")
    weights.pop("model.norm.weight")
    save_file(weights, tmp_path / "part" / "model.safetensors", metadata={"format": "pt"})
    from tiny_hf import tiny_tokenizer
    tiny_tokenizer().save_pretrained(tmp_path / "part")
    tiny_tokenizer().save_pretrained(tmp_path / "src")
    with pytest.warns(UserWarning, match="initialised at random by transformers .model.norm.weight"):
        load_hf(str(tmp_path / "part"))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        load_hf(str(tmp_path / "src"))


def test_a_half_precision_folder_loads_in_its_own_dtype(tmp_path):
    """load_hf (what the CLI runs) keeps a checkpoint's dtype: an fp16 folder was upcast to fp32, so its sparse or
    quantized copy was saved in fp32, larger than the user's file, and reported against the upcast's size."""
    from slimkit.models.hf import load_hf
    from tiny_hf import tiny_tokenizer
    tiny_model("gpt2").half().save_pretrained(tmp_path / "f16")
    tiny_tokenizer().save_pretrained(tmp_path / "f16")
    model, _ = load_hf(str(tmp_path / "f16"))
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert {p.dtype for p in load_hf(str(tmp_path / "f16"), dtype=torch.float32)[0].parameters()} == {torch.float32}


def test_the_float_fingerprint_is_taken_before_an_inplace_run():
    """With inplace=True the model itself changes: the fingerprint of the float model it came from is taken
    first, so slimkit eval still recognises the rebuilt float model."""
    from slimkit.core.fingerprint import weights_digest
    model = tiny_model("llama")
    model._slimkit_spec = {"hf": "somewhere"}
    before = weights_digest(model)
    q = slimkit.quantize(model, tiny_inputs("llama", 4, 8), method="smoothquant", w_bits=8, a_bits=8,
                         inplace=True, **OPTS)
    assert q.slimkit_info["reference_digest"] == before != weights_digest(q)
    dense = tiny_model("llama")
    dense._slimkit_spec = {"hf": "somewhere"}
    before = weights_digest(dense)
    s = slimkit.sparsify(dense, method="uniform", sparsity=0.5, inplace=True)
    assert s.slimkit_info["reference_digest"] == before != weights_digest(s)


def test_activation_granularity_padding_and_seq_len_settings():
    """Settings that used to be taken and then misread (helper stress test): per-channel / per-group activations
    on a transformer are refused (they crashed, or tied scales to calibration token positions); padded calibration
    is refused (padding entered every range); seq_len with token ids warns and the manifest does not claim it."""
    model, calib = tiny_model("llama"), tiny_inputs("llama", 4, 12)
    for gran, match in (("channel", "per tensor .* or per token"), ("group", "is for weights")):
        with pytest.raises(slimkit.SlimkitError, match=match):
            slimkit.quantize(model, calib, method="minmax", w_bits=8, a_bits=8, a_granularity=gran, **OPTS)
    padded = {k: v.clone() for k, v in calib.items()}
    padded["attention_mask"][1, -3:] = 0
    with pytest.raises(slimkit.SlimkitError, match="3 padded positions"):
        slimkit.quantize(model, padded, method="minmax", w_bits=8, a_bits=8, **OPTS)
    for key, bad in (("attention_mask", torch.ones(4, 10, dtype=torch.long)),     # were taken without a word
                     ("attention_mask", torch.ones(2, 12, dtype=torch.long)),
                     ("token_type_ids", torch.zeros(4, 10, dtype=torch.long))):
        with pytest.raises(slimkit.SlimkitError, match=f"calibration {key} has shape"):
            slimkit.quantize(model, {**calib, key: bad}, method="minmax", w_bits=8, a_bits=8, **OPTS)
        with pytest.raises(slimkit.SlimkitError, match=f"calibration {key} has shape"):
            slimkit.sparsify(model, {**calib, key: bad}, method="wanda", sparsity=0.5, progress=False)
    listed = {"input_ids": calib["input_ids"].tolist()}    # a tokenizer's output without return_tensors="pt"
    with pytest.raises(slimkit.SlimkitError, match="input_ids must be a tensor .* got list: tokenize with return"):
        slimkit.quantize(model, listed, method="minmax", w_bits=8, a_bits=8, **OPTS)
    q = slimkit.quantize(model, {**calib, "length": 12}, method="minmax", w_bits=8, a_bits=8, **OPTS)  # a TypeError
    assert q.slimkit_info["calibration"]["tokens"] == 48
    with pytest.warns(UserWarning, match="seq_len=4 is not read for token-id calibration"):
        q = slimkit.quantize(model, calib, method="minmax", w_bits=8, a_bits=8, seq_len=4, **OPTS)
    assert q.slimkit_info["config"]["seq_len"] is None and q.slimkit_info["calibration"]["tokens"] == 48


def test_os_plus_token_clipping_reads_its_clipping_settings():
    """OS+ with token_clipping runs Outlier Suppression's clipping, so twc_iters and lr_act are read (and recorded),
    lr_act at the clipping's 1e-5; without token_clipping they are reported unread."""
    import warnings
    model, calib = tiny_model("llama"), tiny_inputs("llama", 4, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # no "not read" warning
        q = slimkit.quantize(model, calib, method="os_plus", w_bits=8, a_bits=8, token_clipping=True,
                             progress=False, device="cpu", twc_iters=5)
    assert q.slimkit_info["config"]["twc_iters"] == 5 and q.slimkit_info["config"]["lr_act"] == 1e-5
    with pytest.warns(UserWarning, match="twc_iters is not read by os_plus"):
        slimkit.quantize(model, calib, method="os_plus", w_bits=8, a_bits=8, **OPTS)


def test_outlier_suppression_weight_only_moves_nothing():
    """Without activation quantization Gamma Migration has no range to shrink: weight-only Outlier Suppression
    migrates nothing and equals min-max weight-only."""
    model, calib = tiny_model("opt"), tiny_inputs("opt", 4, 12)
    ev = tiny_inputs("opt", 2, 12, seed=3)
    os_q = slimkit.quantize(model, calib, method="outlier_suppression", w_bits=4, a_bits=None, **OPTS)
    assert all(b["gamma_migrated"] == [] for b in os_q.slimkit_info["blocks"].values())
    mm = slimkit.quantize(model, calib, method="minmax", w_bits=4, a_bits=None, w_observer=os_q.slimkit_info["config"]["w_observer"],
                          progress=False, device="cpu")
    torch.testing.assert_close(output(os_q, ev), output(mm, ev))


def _gemma_as_llama(monkeypatch):
    """A tiny Gemma (norms x * (1 + w), weights small offsets) registered under a Llama adapter (x * w): a family
    whose norms do not compute what its adapter says."""
    import transformers as T

    from slimkit.core import families
    monkeypatch.setitem(families.FAMILIES, "gemma_as_llama",
                        families.Family("gemma_as_llama", ("gemma",), "layers", families._llama, "rms"))
    torch.manual_seed(0)
    cfg = T.GemmaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=8, intermediate_size=64, max_position_embeddings=128)
    model = T.GemmaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn(p.shape) * 0.1)
    return model


def test_a_small_change_to_the_float_model_is_refused_too(monkeypatch):
    """Gemma's norm scales by (1 + w) and its stored weights are small offsets: registered with a Llama adapter,
    OS+'s shifts and scales change its float blocks by ~1-3%, which a 5% tolerance let through (final logits 24x
    further off than min-max's); float32 transforms are exact to rounding, so a 1e-3 check refuses it."""
    model = _gemma_as_llama(monkeypatch)
    ids = torch.randint(4, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(slimkit.SlimkitError, match=r"transform changed model\.layers\.\d's float output by [0-4]\.\d%"):
        slimkit.quantize(model, ids, method="os_plus", w_bits=8, a_bits=8, search_steps=10, progress=False,
                         device="cpu")


@pytest.mark.parametrize("method", ["smoothquant", "os_plus"])
def test_half_precision_encoder_keeps_its_dtype_through_the_input_affine(method):
    """A post-LN encoder keeps its migrated scales as an input affine on the linears (fp32 buffers): in a bf16 model
    the affine computes in bf16, as the quantized layer does (the float forward had promoted the input to fp32
    and failed in the next bf16 linear)."""
    model = tiny_model("bert").to(torch.bfloat16)
    calib, ev = tiny_inputs("bert", 8, 16, seed=1, pad=False), tiny_inputs("bert", 4, 16, seed=2)
    q = slimkit.quantize(model, calib, method=method, w_bits=8, a_bits=8, **OPTS)
    got, ref = output(q, ev), output(model, ev)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert ((got.float() - ref.float()).norm() / ref.float().norm()).item() < 0.1


@pytest.mark.parametrize("method", ["smoothquant", "os_plus"])
def test_save_load_bias_less_linears_behind_weight_less_norms(method, tmp_path):
    # OPT without biases and without norm affines: the transform stays an input scale on bias-less linears;
    # the saved transformers state must not grow biases the architecture lacks (load refused it as corrupt)
    import transformers as T

    torch.manual_seed(0)
    model = T.OPTForCausalLM(T.OPTConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=128,
                                         pad_token_id=1, enable_bias=False,
                                         layer_norm_elementwise_affine=False)).eval()
    ids = torch.randint(4, 96, (4, 16))
    q = slimkit.quantize(model, ids, method=method, w_bits=8, a_bits=8, **OPTS)
    slimkit.save(q, tmp_path / "art")
    again = slimkit.load(tmp_path / "art")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, q(ids).logits)


def test_inplace_refuses_a_model_of_inference_tensors():
    """A transformer built under torch.inference_mode() holds weights no one can change in place: inplace=True is
    refused with what to do (it was a raw error from deep inside), and a copy (inplace=False) quantizes."""
    with torch.inference_mode():
        model = tiny_model("llama")
    ids = tiny_inputs("llama", 4, 8)
    with pytest.raises(slimkit.SlimkitError, match=r"inference tensors .*\(inplace=False\)"):
        slimkit.quantize(model, ids, method="minmax", w_bits=8, a_bits=8, inplace=True, **OPTS)
    q = slimkit.quantize(model, ids, method="minmax", w_bits=8, a_bits=8, **OPTS)
    assert quant_layers(q)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_a_quantized_model_cast_to_another_dtype_saves_and_reloads_bit_for_bit(dtype, tmp_path):
    """.half() / .to(bfloat16) / .double() after quantizing: the quantizers' steps stay float32 (cast with the model,
    they were rounded to its dtype and the reloaded model, whose steps are float32, gave other outputs: 0.03-0.1)."""
    from slimkit.core.wrap import quantizers

    q = slimkit.quantize(tiny_model("llama"), tiny_inputs("llama", 8, 16, seed=1, pad=False), method="minmax",
                         w_bits=4, a_bits=6, attn_quant=True, **OPTS)
    ev = tiny_inputs("llama", 4, 16, seed=2)
    cast = copy.deepcopy(q).to(dtype)
    assert all(t.dtype == torch.float32 for a in quantizers(cast) for t in (a.scale, a.zero_point))
    want = output(cast, ev)
    assert want.dtype == dtype
    assert torch.equal(output(slimkit.load(slimkit.save(cast, tmp_path / "art")), ev), want)


def test_save_pretrained_of_a_quantized_model_is_refused_with_what_to_do(tmp_path):
    """model.save_pretrained(DIR) wrote the quantized layers' state under names transformers does not know, and
    from_pretrained(DIR) initialised those linears at random (logits 1.5 off) with only its own load report."""
    import io

    q = slimkit.quantize(tiny_model("llama"), tiny_inputs("llama", 8, 16, seed=1, pad=False), method="minmax",
                         w_bits=4, a_bits=8, **OPTS)
    buf = io.BytesIO()
    torch.save(q, buf)
    buf.seek(0)
    saved = slimkit.save(q, tmp_path / "art")         # slimkit.save still writes transformers' part
    for model in (q, copy.deepcopy(q), torch.load(buf, weights_only=False), slimkit.load(saved)):
        with pytest.raises(slimkit.SlimkitError, match=r"save_pretrained .*slimkit\.save\(model, DIR\)"):
            model.save_pretrained(tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    assert (saved / "config.json").exists() and (saved / "model.safetensors").exists()


def test_a_head_tied_to_the_embedding_stays_tied_through_quantization():
    """The embedding and heads are moved to the compute device and back as each parameter once: a head tied to the
    embedding stays that one parameter (moved per module, it became two, and on a GPU two copies), so a later
    .to() keeps it one tensor."""
    model = tiny_model("llama")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    q = slimkit.quantize(model, tiny_inputs("llama", 4, 16, seed=1), method="minmax", w_bits=8, a_bits=8, **OPTS)
    assert q.lm_head.weight is q.model.embed_tokens.weight
    q = q.to(torch.float64)
    assert q.lm_head.weight.data_ptr() == q.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("method", ["minmax", "os_plus"])
def test_nan_weights_are_named_not_blamed_on_the_family_adapter(method):
    """A NaN weight makes the float block output NaN: the error says so (as for CNNs), not that the family's norms
    do not compute what its adapter says ('changed ... by nan%')."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(slimkit.SlimkitError, match=r"weights are not all finite \(NaN or inf in "
                                                   r"model\.layers\.0\.mlp\.up_proj\.weight\)"):
        slimkit.quantize(model, tiny_inputs("llama", 4, 12), method=method, w_bits=8, a_bits=8, search_steps=5,
                         **OPTS)


def test_float16_overflow_is_named_not_blamed_on_the_family_adapter():
    """A float16 forward that overflows (finite weights) and a transform whose rescaled weights overflow float16 are
    each refused as such, not as a wrong adapter."""
    model = tiny_model("llama").half()
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.fill_(6e4)
    with pytest.raises(slimkit.SlimkitError, match=r"model\.layers\.0's float output is NaN or inf .* weights are "
                                                   r"finite: the model's float16 forward overflows"):
        slimkit.quantize(model, tiny_inputs("llama", 4, 12), method="minmax", w_bits=8, a_bits=8, **OPTS)
    model = tiny_model("llama").half()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0].fill_(6e4)
    with pytest.raises(slimkit.SlimkitError, match=r"os_plus's transform made model\.layers\.0's float output NaN "
                                                   r"or inf .* overflow float16"):
        slimkit.quantize(model, tiny_inputs("llama", 4, 12), method="os_plus", w_bits=8, a_bits=8, search_steps=5,
                         **OPTS)


def test_attn_quant_without_activation_bits_says_so():
    """attn_quant on a family that has it, with a_bits None: the error names a_bits, not the family list (which
    holds this family)."""
    with pytest.raises(slimkit.SlimkitError, match="a_bits is None"):
        slimkit.quantize(tiny_model("llama"), tiny_inputs("llama", 2, 8), method="minmax", a_bits=None,
                         attn_quant=True, **OPTS)


def test_a_model_without_blocks_is_refused_with_a_clear_error():
    """num_hidden_layers=0: nothing to quantize, said so (it was an IndexError from the first block's capture)."""
    model = tiny_model("llama", layers=0)
    with pytest.raises(slimkit.SlimkitError, match="has no blocks"):
        slimkit.quantize(model, tiny_inputs("llama", 2, 8), method="minmax", w_bits=8, a_bits=8, **OPTS)


def test_a_wrong_adapter_is_refused_in_float16_too(monkeypatch):
    """float16 rounds 8x finer than bfloat16 and its transforms are checked at 1e-2 (bf16: 3e-2): Gemma's norm under
    a Llama adapter changed this fp16 model's blocks by 0.8% and 2.5%, which the shared half-precision 3e-2 let
    through (final logits 13x further from the float model's than min-max's)."""
    from slimkit.transformer import preserved_tol
    assert preserved_tol(torch.float16) == 1e-2 and preserved_tol(torch.bfloat16) == 3e-2
    model = _gemma_as_llama(monkeypatch)
    model = model.half()
    ids = torch.randint(4, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(slimkit.SlimkitError, match=r"transform changed model\.layers\.1's float output by 2\.\d%"):
        slimkit.quantize(model, ids, method="os_plus", w_bits=8, a_bits=8, search_steps=10, progress=False,
                         device="cpu")


def test_an_adapter_naming_modules_the_model_lacks_is_refused_with_a_clear_error(monkeypatch):
    """A registered adapter whose paths are not the model's (Phi-3's fused qkv_proj under a Llama adapter) is named
    before any block runs (it was an AttributeError from deep inside the first block's statistics)."""
    import transformers as T

    from slimkit.core import families
    monkeypatch.setitem(families.FAMILIES, "phi3_as_llama",
                        families.Family("phi3_as_llama", ("phi3",), "layers", families._llama, "rms"))
    torch.manual_seed(0)
    model = T.Phi3ForCausalLM(T.Phi3Config(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                                           pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval()
    with pytest.raises(slimkit.SlimkitError, match=r"adapter names model\.layers\.0\.self_attn\.q_proj .*register_"):
        slimkit.quantize(model, tiny_inputs("llama", 2, 8), method="minmax", w_bits=8, a_bits=8, **OPTS)
