"""The public verbs on small models: quantize, save/load bit-exactness, configs, clear errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import slimkit
from slimkit.core.wrap import QuantLayer, quant_layers


class BasicBlock(nn.Module):
    """A residual block named like torchvision's, so the adapter groups it."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(x + self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), BasicBlock(8), BasicBlock(8),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.2, 0.2)
    return m.eval()


@pytest.fixture(scope="module")
def data():
    return torch.randn(96, 1, 10, 10, generator=torch.Generator().manual_seed(1))


def test_quantize_leaves_input_model_untouched(data):
    m = tiny_net()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    q = slimkit.quantize(m, data, method="rtn", w_bits=4, a_bits=4, progress=False)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert not any(isinstance(x, QuantLayer) for x in m.modules())
    assert len(quant_layers(q)) == 6


def test_first_and_last_layer_at_8_bits(data):
    q = slimkit.quantize(tiny_net(), data, method="rtn", w_bits=3, a_bits=4, progress=False)
    layers = quant_layers(q)
    bits = {n: (l.w_quant.spec.bits, l.a_quant.spec.bits if l.a_quant else None) for n, l in layers.items()}
    assert bits["0"] == (8, None) and bits["7"] == (8, 8)     # the image input is not quantized (QDrop's code)
    # a block's second entry-less layer reads the block's shared input quantizer, held by its conv1
    assert all(b == (3, 4) for n, b in bits.items() if n not in ("0", "7"))
    q = slimkit.quantize(tiny_net(), data, method="rtn", w_bits=3, a_bits=4, first_last_bits=None, progress=False)
    assert all(l.w_quant.spec.bits == 3 for l in quant_layers(q).values())


@pytest.mark.parametrize("method", ["rtn", "adaround", "brecq", "qdrop"])
def test_save_load_reproduces_outputs_exactly(tmp_path, data, method):
    m = tiny_net()
    q = slimkit.quantize(m, data, method=method, w_bits=3, a_bits=4, preset="fast", progress=False)
    out = slimkit.save(q, tmp_path / "art")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == method and manifest["config"]["w_bits"] == 3
    assert manifest["layers"]["3.conv1"]["weight"]["bits"] == 3
    loaded = slimkit.load(out, model=tiny_net())
    x = torch.randn(20, 1, 10, 10)
    with torch.no_grad():
        assert torch.equal(q(x), loaded(x))
    # no pickle: the directory holds exactly the safetensors file and the JSON manifest
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.safetensors"]


def test_load_into_a_twin_of_another_dtype_takes_the_saved_dtypes(tmp_path, data):
    """A half-precision twin given to slimkit.load (the model a user deploys in fp16) gets the artifact's float32
    weights and biases alike: no layer is left half fp16 and half fp32, and the outputs are the saved model's."""
    q = slimkit.quantize(tiny_net(), data, method="rtn", w_bits=4, a_bits=4, progress=False)
    back = slimkit.load(slimkit.save(q, tmp_path / "art"), model=tiny_net().half())
    assert {p.dtype for p in back.parameters()} == {torch.float32}
    x = torch.randn(4, 1, 10, 10)
    with torch.no_grad():
        assert torch.equal(back(x), q(x))


def test_block_inputs_are_quantized_once_and_shared(tmp_path, data):
    """As in QDrop's quantized ResNets, what flows between blocks is one quantized tensor: a block's shortcut and
    its first layer read the same quantized input (its conv1 holds the quantizer, which a pre-hook applies to the
    block's input), and a reload keeps that."""
    def check(model):
        layers = quant_layers(model)
        for b in ("3", "4"):
            conv1, conv2 = layers[f"{b}.conv1"], layers[f"{b}.conv2"]
            assert conv1.entry_block == b and conv1.a_quant is not None and conv2.entry_block is None
            block, seen = model.get_submodule(b), {}
            h1 = block.register_forward_pre_hook(lambda m, a: seen.__setitem__("raw", a[0]), prepend=True)
            h2 = block.register_forward_pre_hook(lambda m, a: seen.__setitem__("block", a[0]))
            h3 = conv1.register_forward_pre_hook(lambda m, a: seen.__setitem__("conv1", a[0]))
            with torch.no_grad():
                model(data[:8])
            for h in (h1, h2, h3):
                h.remove()
            q = conv1.a_quant
            assert torch.equal(seen["block"], q(seen["raw"])) and torch.equal(seen["conv1"], seen["block"])
            codes = seen["block"] / q.scale + q.zero_point          # on the quantizer's grid, whole block input
            assert (codes - codes.round()).abs().max() < 1e-3 and not torch.equal(seen["raw"], seen["block"])
        return layers

    q = slimkit.quantize(tiny_net(), data, method="rtn", w_bits=4, a_bits=4, progress=False)
    check(q)
    out = slimkit.save(q, tmp_path / "art")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["layers"]["3.conv1"]["act_at"] == "3" and "act_at" not in manifest["layers"]["3.conv2"]
    loaded = slimkit.load(out, model=tiny_net())
    check(loaded)
    with torch.no_grad():
        assert torch.equal(q(data), loaded(data))
    w = slimkit.quantize(tiny_net(), data, method="rtn", w_bits=4, a_bits=None, progress=False)
    assert all(l.entry_block is None for l in quant_layers(w).values())        # weight-only: nothing to share


def test_qdrop_block_input_mixes_its_quantized_input_with_the_float_one():
    """QDrop's block input: torch.where(rand < p, quantized input, float input), once (no second drop inside)."""
    from slimkit.core.quantizer import QuantSpec, Quantizer
    from slimkit.core.reconstruct import block_input

    g = torch.Generator().manual_seed(0)
    q_x = torch.randn(100_000, generator=g)
    fp_x = q_x + 0.3 * torch.randn(100_000, generator=g)
    quant = Quantizer(QuantSpec(4, False, "tensor"), "minmax")
    quant.observing = True
    quant(q_x)
    quant.observing = False
    quant.compute_qparams()
    torch.manual_seed(0)
    x = block_input(q_x, fp_x, quant, 0.5)
    quantized, floats = x == quant(q_x), x == fp_x
    assert bool((quantized | floats).all())
    assert abs(quantized.float().mean().item() - 0.5) < 0.01 and abs(floats.float().mean().item() - 0.5) < 0.01
    assert torch.equal(block_input(q_x, None, quant, 1.0), quant(q_x))          # BRECQ: quantized input only
    assert torch.equal(block_input(q_x, None, None, 1.0), q_x)


def test_packed_weights_are_small(tmp_path, data):
    q = slimkit.quantize(tiny_net(), data, method="rtn", w_bits=2, a_bits=4, first_last_bits=None, progress=False)
    slimkit.save(q, tmp_path / "a")
    from safetensors.torch import load_file

    t = load_file(str(tmp_path / "a" / "model.safetensors"))
    w = q.get_submodule("3.conv1").layer.weight
    assert t["3.conv1.w_packed"].dtype == torch.uint8
    assert t["3.conv1.w_packed"].numel() == (w.numel() * 2 + 7) // 8


def test_qdrop_beats_rtn_on_tiny_model(data):
    """Reconstruction lowers the output error that RTN leaves (on held-out inputs), at W2A4."""
    m = tiny_net()
    x_test = torch.randn(200, 1, 10, 10, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = m(x_test)
    errs = {}
    for method in ("rtn", "qdrop"):
        q = slimkit.quantize(m, data, method=method, w_bits=2, a_bits=4, preset="fast", iters=300, progress=False)
        with torch.no_grad():
            errs[method] = (q(x_test) - ref).pow(2).mean().item()
    assert errs["qdrop"] < 0.8 * errs["rtn"], errs


def test_errors_are_clear(tmp_path, data):
    m = tiny_net()
    with pytest.raises(slimkit.SlimkitError, match="unknown method"):
        slimkit.quantize(m, data, method="gptq")
    with pytest.raises(slimkit.SlimkitError, match="2 to 8"):
        slimkit.quantize(m, data, w_bits=1)
    with pytest.raises(slimkit.SlimkitError, match="empty"):
        slimkit.quantize(m, torch.zeros(0, 1, 10, 10))
    with pytest.raises(slimkit.SlimkitError, match="does not accept"):
        slimkit.quantize(m, torch.zeros(4, 3, 10, 10))
    with pytest.raises(slimkit.SlimkitError, match="no quantizable layers"):
        slimkit.quantize(nn.Sequential(nn.ReLU()), data)
    with pytest.raises(slimkit.SlimkitError, match="not a slimkit artifact"):
        slimkit.load(tmp_path)
    with pytest.raises(slimkit.SlimkitError, match="not produced by slimkit"):
        slimkit.save(m, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    q = slimkit.quantize(m, data, method="rtn", progress=False)
    slimkit.save(q, tmp_path / "y")
    with pytest.raises(slimkit.SlimkitError, match="already exists"):
        slimkit.save(q, tmp_path / "y")
    import shutil
    shutil.copytree(tmp_path / "y", tmp_path / "bits")
    manifest = json.loads((tmp_path / "y" / "manifest.json").read_text())
    name = next(n for n, s in manifest["layers"].items() if s["weight"]["bits"] == 4)
    manifest["layers"][name]["weight"]["bits"] = 2          # the codes would be misread at 2 bits
    (tmp_path / "bits" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(slimkit.SlimkitError, match="edited after saving"):
        slimkit.load(tmp_path / "bits")
    manifest.pop("layers_digest")                            # an artifact saved before manifests kept the digest
    (tmp_path / "bits" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(slimkit.SlimkitError, match="bit width or shape does not match the stored codes|not whole"):
        slimkit.load(tmp_path / "bits", model=tiny_net())
    from safetensors.torch import load_file, save_file
    shutil.copytree(tmp_path / "y", tmp_path / "nan")
    tensors = load_file(str(tmp_path / "nan" / "model.safetensors"))
    key = next(k for k in tensors if k.endswith("w_quant.scale"))
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(tmp_path / "nan" / "model.safetensors"))
    with pytest.raises(slimkit.SlimkitError, match="not finite positive numbers in " + key.replace(".", r"\.")):
        slimkit.load(tmp_path / "nan", model=tiny_net())
    (tmp_path / "y" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(slimkit.SlimkitError, match="corrupt"):
        slimkit.load(tmp_path / "y", model=tiny_net())


def test_options_are_checked_up_front_and_mean_what_they_say(data):
    """a_bits=None is weight-only (as in a recipe); a single skip path may be a string; a group size that does not
    divide a layer, a non-positive one and a block path that is no module are SlimkitErrors naming the problem."""
    m = tiny_net()
    q = slimkit.quantize(m, data, method="rtn", a_bits=None, progress=False)
    assert all(layer.a_quant is None for layer in quant_layers(q).values())
    assert q.slimkit_info["config"]["a_bits"] is None
    q = slimkit.quantize(m, data, method="rtn", progress=False)           # a_bits left out: the default 4
    assert {layer.a_quant.spec.bits for layer in quant_layers(q).values() if layer.a_quant} == {4, 8}
    q = slimkit.quantize(m, data, method="rtn", skip="3.conv1", progress=False)
    assert "3.conv1" not in quant_layers(q)
    with pytest.raises(slimkit.SlimkitError, match=r"w_group_size 5 does not divide layer 0's 9 weights"):
        slimkit.quantize(m, data, method="rtn", w_granularity="group", w_group_size=5, progress=False)
    with pytest.raises(slimkit.SlimkitError, match="w_group_size must be a positive integer"):
        slimkit.quantize(m, data, method="rtn", w_granularity="group", w_group_size=0, progress=False)
    with pytest.raises(slimkit.SlimkitError, match="blocks names 'nope'"):
        slimkit.quantize(m, data, method="qdrop", iters=2, blocks=["nope"], progress=False)
    with pytest.raises(slimkit.SlimkitError, match="fcpts iters must be an integer of at least 1"):
        slimkit.sparsify(m, data, method="fcpts", sparsity=0.5, iters=-5)
    for bad, why in ((dict(fold_bn="no"), "fold_bn must be true/false"), (dict(iters="ten"), "iters must be an "
                     "integer"), (dict(warmup=5), "warmup"), (dict(a_bits=4.5), "a_bits must be an integer or none")):
        with pytest.raises(slimkit.SlimkitError, match=why):
            slimkit.quantize(m, data, method="rtn", progress=False, **bad)


def test_evaluation_labels_are_checked(data):
    from slimkit.eval import evaluate
    m = tiny_net()
    labels = torch.arange(len(data)) % 5
    assert 0.0 <= evaluate(m, data, labels)["top1"] <= 1.0
    for bad, why in ((torch.nn.functional.one_hot(labels), "one class index per sample"), (labels[:5], "one class"),
                     (labels.float(), "integer class indices"), (labels + 5, "out of range: the model scores 5"),
                     (labels - 1, "from 0")):
        with pytest.raises(slimkit.SlimkitError, match=why):
            evaluate(m, data, bad)
    with pytest.raises(slimkit.SlimkitError, match=r"evaluation inputs of shape \(3, 10, 10\)"):
        evaluate(m, torch.zeros(4, 3, 10, 10))
    for bad in (labels.numpy(), labels.tolist()):      # an AttributeError from inside before
        with pytest.raises(slimkit.SlimkitError, match="labels must be a tensor of class indices"):
            evaluate(m, data, bad)
    from slimkit.eval import check_data          # what the CLI runs before compressing: the class count too
    check_data(m, data, labels)
    with pytest.raises(slimkit.SlimkitError, match="out of range: the model scores 5"):
        check_data(m, data, labels + 5)


def test_evaluation_inputs_are_checked_like_calibration_inputs(data, tmp_path):
    """NaN or integer (raw uint8 image) evaluation inputs are refused as calibration inputs are (they gave a report
    without a word); float64 ones (NumPy's default) and big-endian files evaluate as float32 would."""
    import numpy as np

    from slimkit.core.data import resolve
    from slimkit.eval import evaluate
    m = tiny_net()
    labels = torch.arange(len(data)) % 5
    ref = evaluate(m, data, labels, reference=m)
    nan = data.clone()
    nan[:3] = float("nan")
    with pytest.raises(slimkit.SlimkitError, match="evaluation data holds NaN"):
        evaluate(m, nan, labels)
    with pytest.raises(slimkit.SlimkitError, match="evaluation inputs must be floating point, got torch.uint8"):
        evaluate(m, (data * 50 + 128).clamp(0, 255).to(torch.uint8), labels)
    as64 = evaluate(m, data.double(), labels, reference=m)
    assert as64["top1"] == ref["top1"] and as64["agreement"] == 1.0
    np.save(tmp_path / "big.npy", data.numpy().astype(">f4"))
    x, _ = resolve(tmp_path / "big.npy")
    assert torch.equal(x, data)


def test_report_figures_say_what_they_measure(data):
    """evaluate's seconds are the model's own (not its reference's); sizes print in SI units; a cosine short of 1
    does not print as 1; a manifest records the settings its method applied, not the CNN or transformer ones
    it ignored; reconstruction with zero iterations is refused rather than titled as a run."""
    import time

    from slimkit.eval import evaluate
    from slimkit.report import fmt_metric, fmt_size

    class Slow(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            time.sleep(0.3)
            return self.inner(x)

    m = tiny_net()
    assert evaluate(m, data, reference=Slow(m))["seconds"] < 0.3
    assert evaluate(Slow(m), data)["seconds"] >= 0.3
    assert fmt_size(2_793_248) == "2.79 MB" and fmt_size(999) == "999 B" and fmt_size(352_900) == "352.90 KB"
    assert fmt_metric("cosine", 0.9999984) == "0.999998" and fmt_metric("cosine", 1.0) == "1"
    rtn = slimkit.quantize(m, data, method="rtn", progress=False).slimkit_info["config"]
    assert "iters" not in rtn and "drop_prob" not in rtn and "alpha" not in rtn and "seq_len" not in rtn
    assert rtn["w_bits"] == 4 and rtn["fold_bn"] is True
    qd = slimkit.quantize(m, data, method="qdrop", iters=2, batch_size=8, num_samples=16,
                          progress=False).slimkit_info["config"]
    assert qd["iters"] == 2 and qd["drop_prob"] == 0.5 and "twc_iters" not in qd
    with pytest.raises(slimkit.SlimkitError, match="iters of at least 1.*method rtn"):
        slimkit.quantize(m, data, method="qdrop", iters=0, progress=False)

def test_config_takes_devices_and_numpy_numbers(data):
    import numpy as np
    from slimkit.config import QuantConfig
    cfg = QuantConfig.build(device=torch.device("cpu"), seed=np.int64(3), drop_prob=np.float32(0.5), iters=np.int32(7))
    assert cfg.device == "cpu" and cfg.seed == 3 and cfg.iters == 7


def test_check_output_on_links_and_folders(tmp_path, monkeypatch):
    from slimkit.io.artifact import check_output
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "loopa").symlink_to(tmp_path / "loopb")
    (tmp_path / "loopb").symlink_to(tmp_path / "loopa")
    with pytest.raises(slimkit.SlimkitError, match="broken symbolic link"):
        check_output("dangling/x")
    with pytest.raises(slimkit.SlimkitError, match="cannot write loopa"):
        check_output("loopa/x")
    with pytest.raises(slimkit.SlimkitError, match="current folder"):
        check_output(".", overwrite=True)
    assert check_output("new/deeper/x") == Path("new/deeper/x")


def test_inputs_in_many_forms(data):
    m = tiny_net()
    ds = torch.utils.data.TensorDataset(data, torch.zeros(len(data)))
    loader = torch.utils.data.DataLoader(ds, batch_size=10)
    for form in (data, data.numpy(), (data, torch.zeros(len(data))), list(data), ds, loader):
        q = slimkit.quantize(m, form, method="rtn", progress=False)
        assert q.slimkit_info["input_shape"] == [1, 10, 10]
        assert q.slimkit_info["calibration"] == {"samples": len(data)}   # all of them: fewer than num_samples
    q = slimkit.quantize(m, data, method="rtn", num_samples=7, progress=False)
    assert q.slimkit_info["calibration"] == {"samples": 7} and q.slimkit_info["config"]["num_samples"] == 7
    from slimkit.core.data import resolve      # one batch of that loader is a list [inputs, labels] (was refused)
    x, y = resolve(next(iter(torch.utils.data.DataLoader(ds, batch_size=len(data)))))
    assert torch.equal(x, data) and torch.equal(y, torch.zeros(len(data)))


def test_recipe_dict_and_override(data):
    q = slimkit.quantize(tiny_net(), data, recipe={"method": "rtn", "w_bits": 5, "a_bits": 6}, w_bits=3, progress=False)
    cfg = q.slimkit_info["config"]
    assert cfg["method"] == "rtn" and cfg["w_bits"] == 3 and cfg["a_bits"] == 6


def test_shipped_recipes_by_name_or_file_name(tmp_path, monkeypatch):
    from slimkit.config import load_recipe
    monkeypatch.chdir(tmp_path)          # no file of that name here: the shipped one
    assert load_recipe("qdrop-w4a4") == load_recipe("qdrop-w4a4.yaml") == load_recipe("qdrop-w4a4.yml")
    assert load_recipe("qdrop-w4a4")["method"] == "qdrop"
    with pytest.raises(slimkit.SlimkitError, match=r"recipe 'qdrop-w3a3' not found.*qdrop-w2a4, qdrop-w4a4, rtn-w8a8"):
        load_recipe("qdrop-w3a3")
    (tmp_path / "qdrop-w4a4.yaml").write_text("method: rtn\n")     # a file of that name wins
    assert load_recipe("qdrop-w4a4.yaml")["method"] == "rtn"


def test_recipe_numbers_in_exponent_form_are_numbers(tmp_path):
    """YAML 1.1 reads 1e-3 (no dot) as a string: a recipe's `lr_round: 1e-3` was refused as one."""
    from slimkit.config import QuantConfig, load_recipe
    (tmp_path / "r.yaml").write_text("method: qdrop\nlr_round: 1e-3\nlr_act: 4E-5\niters: 200\nnote: e5\n")
    r = load_recipe(tmp_path / "r.yaml")
    assert r["lr_round"] == 1e-3 and r["lr_act"] == 4e-5 and r["iters"] == 200 and r["note"] == "e5"
    r.pop("note")
    assert QuantConfig(**r).lr_round == 1e-3


def test_models_built_from_torch_transformer_encoder_layers_quantize(tmp_path):
    """nn.TransformerEncoderLayer reads its linears' weights for a fused inference fast path, and
    nn.MultiheadAttention uses out_proj's weight without calling it: the linears that run are quantized (the fast
    path stays off, so the quantization is in effect), out_proj stays float, and the artifact reloads exactly."""
    from tiny_torch import TorchEncoder as Encoder

    torch.manual_seed(0)
    model, x = Encoder().eval(), torch.randn(32, 10, 8)
    for method, kw in (("rtn", {}), ("qdrop", {"iters": 10})):
        q = slimkit.quantize(model, x, method=method, w_bits=4, a_bits=8, progress=False, **kw)
        names = set(quant_layers(q))
        assert {"enc.layers.0.linear1", "enc.layers.1.linear2", "emb", "head"} <= names
        assert not any("out_proj" in n for n in names)
        with torch.no_grad():
            out, ref = q(x), model(x)
            before = torch.backends.mha.get_fastpath_enabled()
            torch.backends.mha.set_fastpath_enabled(False)
            try:
                slow = q(x)
            finally:
                torch.backends.mha.set_fastpath_enabled(before)
        assert torch.equal(out, slow) and not torch.allclose(out, ref, atol=1e-4)
    slimkit.save(q, tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(slimkit.load(tmp_path / "q", model=Encoder())(x), out)


def test_size_of_a_quantized_layer_sharing_its_weight_with_a_float_one():
    """A weight one quantized layer and one float layer share is stored packed for the first and in float for
    the second; a float weight two layers share is counted once."""
    from slimkit.eval import model_size_bytes

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8, bias=False)
            self.b.weight = self.a.weight          # quantized a, float b: both forms are needed

        def forward(self, x):
            return self.c(self.b(torch.relu(self.a(x))))

    torch.manual_seed(0)
    q = slimkit.quantize(Shared(), torch.randn(32, 8), method="rtn", w_bits=4, a_bits=8, skip=["b"],
                         progress=False)
    layers = quant_layers(q)
    assert set(layers) == {"a", "c"}
    floats = 64 * 4 + 8 * 4 + 8 * 4           # the shared weight once in float, a's and b's biases
    packed = sum((64 * m.w_quant.spec.bits + 7) // 8 + 2 * m.w_quant.scale.numel() * 4 for m in layers.values())
    act = sum(t.numel() * t.element_size() for m in layers.values() if m.a_quant is not None for t in m.a_quant.buffers())
    assert model_size_bytes(q) == floats + packed + act
    with torch.device("meta"):                 # meta tensors have no storage to share: each counts
        meta = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    assert model_size_bytes(meta) == 2 * (16 + 4) * 4


def _hf_vision(kind: str) -> nn.Module:
    import transformers as T

    torch.manual_seed(0)
    if kind == "resnet":
        cfg = T.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                             layer_type="basic", num_labels=10)
        return T.ResNetForImageClassification(cfg).eval()
    cfg = T.MobileNetV2Config(num_channels=3, image_size=32, depth_multiplier=0.25, num_labels=10)
    model = T.MobileNetV2ForImageClassification(cfg).eval()
    for m in model.modules():     # its own init leaves logits near 1e-27 at this depth: scale to unit activations
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)
    return model


@pytest.mark.parametrize("kind", ["resnet", "mobilenetv2"])
def test_hugging_face_vision_cnns_take_the_cnn_path(tmp_path, kind):
    """A Hugging Face CNN (config.model_type set, main input pixel_values) is quantized and sparsified like any
    module: its BatchNorms fold although it returns a ModelOutput, MobileNetV2's padding reads its quantized convs'
    stride, and the artifact reloads exactly."""
    from slimkit.transformer import is_transformer

    model, x = _hf_vision(kind), torch.randn(12, 3, 32, 32)
    assert not is_transformer(model)
    q = slimkit.quantize(model, x, method="rtn", w_bits=8, a_bits=8, progress=False)
    assert q.slimkit_info["folded_bn"]
    with torch.no_grad():
        out, ref = q(x).logits, model(x).logits
    # W8A8 on random weights, ~50 layers deep for MobileNetV2 (depthwise convs, per-tensor activations)
    assert ((out - ref).norm() / ref.norm()).item() < (0.05 if kind == "resnet" else 0.25)
    slimkit.save(q, tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(slimkit.load(tmp_path / "q", model=_hf_vision(kind))(x).logits, out)
    s = slimkit.sparsify(model, None, method="uniform", sparsity=0.5)
    assert abs(s.slimkit_info["sparsity"]["achieved"] - 0.5) < 1e-3


def test_calibration_data_forms_with_other_targets():
    """Targets that are not one class per sample (one-hot rows, masks) do not stop calibration, and evaluation
    refuses them as labels; samples given as dicts (Hugging Face datasets style) are read by their input key;
    arrays of Python objects are refused."""
    from slimkit.core.data import resolve

    x = torch.randn(6, 1, 4, 4)
    onehot = torch.nn.functional.one_hot(torch.arange(6) % 3, 3)
    ds = torch.utils.data.TensorDataset(x, onehot)
    got, labels = resolve(ds)
    assert torch.equal(got, x) and torch.equal(labels, onehot)
    got, labels = resolve(torch.utils.data.DataLoader(ds, batch_size=4))
    assert torch.equal(got, x) and torch.equal(labels, onehot)
    q = slimkit.quantize(tiny_net(), torch.utils.data.TensorDataset(torch.randn(8, 1, 10, 10), onehot[:1].repeat(8, 1)),
                         method="rtn", progress=False)           # calibration reads no targets
    with pytest.raises(slimkit.SlimkitError, match="class index"):
        slimkit.evaluate(q, *resolve(ds))
    got, labels = resolve([{"pixel_values": x[i], "labels": i % 3} for i in range(6)])
    assert torch.equal(got, x) and labels.tolist() == [0, 1, 2, 0, 1, 2]
    from transformers import BatchFeature     # an image processor's output: a Mapping, not a dict (was refused)
    got, labels = resolve(BatchFeature({"pixel_values": x, "labels": torch.arange(6) % 3}))
    assert torch.equal(got, x) and labels.tolist() == [0, 1, 2, 0, 1, 2]
    with pytest.raises(slimkit.SlimkitError, match="Python objects"):
        resolve([[1, "a"], [2, "b"]])


def test_quantize_refuses_quantized_and_non_float32_models(data):
    q = slimkit.quantize(tiny_net(), data, method="rtn", progress=False)
    with pytest.raises(slimkit.SlimkitError, match="already quantized"):
        slimkit.quantize(q, data, method="rtn", progress=False)
    with pytest.raises(slimkit.SlimkitError, match=r"float64.*model.float\(\)"):
        slimkit.quantize(tiny_net().double(), data.double(), method="rtn", progress=False)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_quantize_learns_under_no_grad_and_inference_mode(data, mode):
    """A caller's no_grad / inference_mode (how models are usually run) neither stops reconstruction from learning
    nor leaves the result made of inference tensors; the caller's mode is as it was afterwards."""
    want = slimkit.quantize(tiny_net(), data, method="qdrop", w_bits=4, a_bits=4, iters=4, num_samples=32,
                            progress=False)
    m = tiny_net()
    with mode():
        q = slimkit.quantize(m, data, method="qdrop", w_bits=4, a_bits=4, iters=4, num_samples=32,
                             progress=False)
        assert not torch.is_grad_enabled()
    assert not any(t.is_inference() for t in list(q.parameters()) + list(q.buffers()))
    x = torch.randn(4, 1, 10, 10)
    with torch.no_grad():
        assert torch.equal(q(x), want(x))
    with mode():
        m = tiny_net()          # a model built (or loaded) under the mode: its weights are inference tensors there
    q = slimkit.quantize(m, data, method="qdrop", w_bits=4, a_bits=4, iters=4, num_samples=32, progress=False)
    with torch.no_grad():
        assert torch.equal(q(x), want(x))


def test_load_state_dict_into_a_quantized_model_that_has_run_takes_the_new_weights(data, tmp_path):
    """A checkpoint (state_dict) loaded into a quantized model that has already run: its forward computed with the
    dequantized weight cached from the old codes, silently (0.02 off)."""
    q = slimkit.quantize(tiny_net(), data, method="rtn", w_bits=4, a_bits=4, progress=False)
    other = tiny_net()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.2)
    target = slimkit.load(slimkit.save(slimkit.quantize(other, data, method="rtn", w_bits=4, a_bits=4,
                                                        progress=False), tmp_path / "other"), model=tiny_net())
    x = torch.randn(4, 1, 10, 10)
    with torch.no_grad():
        target(x)                       # warm
        target.load_state_dict(q.state_dict())
        assert torch.equal(target(x), q(x))


def test_a_compiled_compressed_model_saves_an_artifact_that_loads(data, tmp_path):
    """torch.compile(qmodel) is how a compressed model is often run: saving the compiled wrapper writes the model it
    wraps (its state's keys carried "_orig_mod.", an artifact load refused)."""
    q = slimkit.quantize(tiny_net(), data, method="rtn", w_bits=4, a_bits=4, progress=False)
    x = torch.randn(4, 1, 10, 10)
    compiled = torch.compile(q, backend="eager")
    with torch.no_grad():
        want = compiled(x)
    loaded = slimkit.load(slimkit.save(compiled, tmp_path / "q"), model=tiny_net())
    with torch.no_grad():
        assert torch.equal(loaded(x), want)
    sparse = slimkit.sparsify(tiny_net(), method="uniform", sparsity=0.5, progress=False)
    loaded = slimkit.load(slimkit.save(torch.compile(sparse, backend="eager"), tmp_path / "s"), model=tiny_net())
    with torch.no_grad():
        assert torch.equal(loaded(x), sparse(x))


class _Functional(nn.Module):
    """Weights a custom forward uses through torch.nn.functional, beside a Conv2d."""

    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(1, 8, 3, padding=1)
        self.w = nn.Parameter(torch.randn(8, 8, 3, 3) * 0.1)
        self.fw = nn.Parameter(torch.randn(5, 8) * 0.1)
        self.pos = nn.Parameter(torch.randn(1, 8, 10, 10) * 0.1)    # additive, as a ViT's position embedding

    def forward(self, x):
        x = torch.relu(nn.functional.conv2d(torch.relu(self.c0(x)) + self.pos, self.w, padding=1))
        return nn.functional.linear(x.mean((2, 3)), self.fw)


def test_compiled_models_quantize_and_functional_weights_are_named(data):
    """A torch.compile'd model quantizes as the model it wraps (its graph hid the layers' calls); weights used
    through F.conv2d / F.linear stay float with a warning that names them (and not an additive parameter)."""
    q = slimkit.quantize(torch.compile(tiny_net()), data, method="rtn", w_bits=4, a_bits=4, progress=False)
    assert len(quant_layers(q)) == 6
    with pytest.warns(UserWarning, match=r"2 weight tensor\(s\) outside .*\(w, fw\)"):
        q = slimkit.quantize(_Functional().eval(), data, method="rtn", w_bits=4, a_bits=8, progress=False)
    assert list(quant_layers(q)) == ["c0"]


def test_method_defaults_sit_below_recipes_and_explicit_options():
    """'minmax' computes min-max ranges; Outlier Suppression learns its ranges at the public code's lr 1e-5; a
    recipe or an explicit option still overrides either."""
    from slimkit.config import QuantConfig
    mm = QuantConfig.build(method="minmax")
    assert (mm.w_observer, mm.a_observer) == ("minmax", "minmax")
    assert QuantConfig.build(method="minmax", a_observer="mse").a_observer == "mse"
    assert QuantConfig.build({"method": "minmax", "w_observer": "percentile"}).w_observer == "percentile"
    assert QuantConfig.build(method="outlier_suppression").lr_act == 1e-5
    assert QuantConfig.build(method="outlier_suppression", lr_act=3e-5).lr_act == 3e-5
    assert QuantConfig.build(method="qdrop").lr_act == 4e-5 and QuantConfig.build().w_observer == "mse"


def test_a_layer_held_twice_is_quantized_at_both_uses_and_saves(data, tmp_path):
    """A conv held under two names runs quantized at both calls (one QuantLayer), and the artifact reloads
    bit for bit."""
    from test_fold_and_wrap import Aliased
    torch.manual_seed(0)
    x = torch.randn(16, 3, 8, 8)
    q = slimkit.quantize(Aliased().eval(), x, method="rtn", w_bits=2, a_bits=8, progress=False)
    assert isinstance(q.c2, QuantLayer) and q.c2 is q.c1
    slimkit.save(q, tmp_path / "a")
    back = slimkit.load(tmp_path / "a", model=Aliased())
    assert back.c2 is back.c1 and torch.equal(back(x), q(x))


def _weight_normed() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()
    for i in (0, 2, 6):
        nn.utils.parametrizations.weight_norm(m[i])
    return m


def test_parametrized_weights_are_compressed_and_the_input_model_is_untouched(data):
    """Layers under torch.nn.utils.parametrizations (weight_norm here) are pruned and quantized as plain
    layers holding the parametrized weight: the zeros are really in the weights the forward uses, and the
    user's model keeps its parametrizations and its outputs. The old hook-based weight_norm gets a clear error."""
    model = _weight_normed()
    with torch.no_grad():
        before = model(data[:4])
    sparse = slimkit.sparsify(model, method="erk", sparsity=0.5)
    counted = [sparse[i].weight for i in (0, 2, 6)]
    zeros = sum(int((w == 0).sum()) for w in counted)
    assert zeros == round(0.5 * sum(w.numel() for w in counted)) and sparse.slimkit_info["sparsity"]["achieved"] == 0.5
    assert not any(nn.utils.parametrize.is_parametrized(m) for m in sparse.modules())
    q = slimkit.quantize(model, data, method="rtn", w_bits=4, a_bits=8, progress=False)
    assert [type(q[i]).__name__ for i in (0, 2, 6)] == ["QuantLayer"] * 3
    assert all(nn.utils.parametrize.is_parametrized(model[i]) for i in (0, 2, 6))
    with torch.no_grad():
        assert torch.equal(model(data[:4]), before)
    old = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
    nn.utils.weight_norm(old[0])
    for call in (lambda: slimkit.sparsify(old, method="erk", sparsity=0.5),
                 lambda: slimkit.quantize(old, data, method="rtn", w_bits=4, a_bits=8, progress=False)):
        with pytest.raises(slimkit.SlimkitError, match=r"layer '0' uses the old torch.nn.utils.weight_norm.*remove_weight_norm"):
            call()


class _Versioned(nn.Conv2d):
    """A layer that, like torchvision's MNASNet, reads its state-dict version when loading."""
    _version = 2

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):
        assert local_metadata.get("version") == 2, "version should be set to 2"
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


def test_artifacts_reload_layers_that_check_their_state_version_and_batchnorm_act(data, tmp_path):
    """slimkit.load hands load_state_dict the model's own state metadata (versions), and a folded BatchNormAct
    comes back as its activation, not as nothing: both reload bit for bit."""
    from test_fold_and_wrap import BatchNormAct, _randomize_bn

    def build():
        torch.manual_seed(0)
        return nn.Sequential(_Versioned(1, 8, 3, padding=1), BatchNormAct(8), nn.Conv2d(8, 8, 3, padding=1),
                             nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    model = build()
    _randomize_bn(model, 2)
    q = slimkit.quantize(model.eval(), data, method="rtn", w_bits=4, a_bits=8, progress=False)
    assert q.slimkit_info["folded_bn"] == [["0", "1"]]
    slimkit.save(q, tmp_path / "q")
    back = slimkit.load(tmp_path / "q", model=build())
    assert isinstance(back[1], nn.Sequential) and torch.equal(back(data[:8]), q(data[:8]))


def test_damaged_quantization_parameters_and_manifests_are_refused(tmp_path, data):
    """A saved model whose zero points leave their grid, whose per-channel steps were cut to one, whose layer
    settings were edited after saving, or whose manifest fields have the wrong type, is refused by name: each of
    these had loaded into a different model (or crashed with a traceback)."""
    import shutil

    from safetensors.torch import load_file, save_file
    q = slimkit.quantize(tiny_net(), data, method="rtn", w_bits=4, a_bits=8)
    slimkit.save(q, tmp_path / "art")
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    name = next(n for n, s in manifest["layers"].items()
                if s["weight"]["granularity"] == "channel" and s["weight"]["bits"] == 4 and s["act"])

    def tensors(tag, change, why):
        bad = tmp_path / tag
        shutil.copytree(tmp_path / "art", bad)
        t = load_file(bad / "model.safetensors")
        change(t)
        save_file(t, bad / "model.safetensors", metadata={"format": "slimkit"})
        with pytest.raises(slimkit.SlimkitError, match=why):
            slimkit.load(bad, model=tiny_net())

    def edited(tag, change, why):
        bad = tmp_path / tag
        shutil.copytree(tmp_path / "art", bad)
        m = json.loads(json.dumps(manifest))
        change(m)
        (bad / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(slimkit.SlimkitError, match=why):
            slimkit.load(bad, model=tiny_net())
    zp = f"{name}.w_quant.zero_point"
    tensors("zp_nan", lambda t: t.__setitem__(zp, t[zp] * float("nan")), "not whole numbers on the 4-bit")
    tensors("zp_far", lambda t: t.__setitem__(zp, t[zp] + 1000), "not whole numbers on the 4-bit asymmetric grid")
    tensors("zp_half", lambda t: t.__setitem__(zp, t[zp] + 0.5), "not whole numbers")
    sc = f"{name}.w_quant.scale"
    tensors("one_step", lambda t: (t.__setitem__(sc, t[sc][:1]), t.__setitem__(zp, t[zp][:1])),
            "1 scales where its channel granularity has 8 groups")
    edited("bits", lambda m: m["layers"][name]["act"].update(bits=4), "edited after saving")
    edited("axis", lambda m: m["layers"][name]["weight"].update(ch_axis=1), "edited after saving")
    edited("spec", lambda m: m.update(model_spec="fmnist-resnet"), "its 'model_spec' is a str, not a dict")
    edited("version", lambda m: m.update(version="1"), "damaged: its version is '1'")
    edited("newer", lambda m: m.update(version=99), "upgrade slimkit")
    assert torch.equal(slimkit.load(tmp_path / "art", model=tiny_net())(data[:4]), q(data[:4]))


def test_overwrite_never_deletes_files_the_artifact_did_not_write(tmp_path, data):
    """--overwrite replaces an artifact, not a folder of the user's: files slimkit did not write there (notes,
    another artifact saved inside) are named and the save refused; a chart slimkit sparsify adds is the
    artifact's. A save killed mid-way leaves a temporary folder named after its process; the next save to that
    path removes it once the process is gone."""
    q = slimkit.quantize(tiny_net(), data, method="rtn", w_bits=8, a_bits=8)
    art = slimkit.save(q, tmp_path / "art")
    (art / "sparsity.png").write_bytes(b"png")
    slimkit.save(q, art, overwrite=True)
    (art / "NOTES.md").write_text("mine")
    slimkit.save(q, art / "inner")
    with pytest.raises(slimkit.SlimkitError, match=r"did not write \(NOTES.md, inner\)"):
        slimkit.save(q, art, overwrite=True)
    assert (art / "NOTES.md").exists() and (art / "inner" / "manifest.json").exists()
    stale = tmp_path / ".art2.tmp-999999999-x1"          # no such process
    live = tmp_path / ".art2.tmp-1-x2"                   # pid 1 always runs
    for d in (stale, live):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half")
    slimkit.save(q, tmp_path / "art2")
    assert not stale.exists() and live.exists()


@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError(28, "No space left on device")])
def test_an_overwrite_that_fails_while_renaming_keeps_the_old_artifact(tmp_path, data, monkeypatch, error):
    """The old artifact steps aside before the new one is renamed into place: a failure (Ctrl-C, a full disk)
    between the two renames puts it back, rather than leaving the destination empty and the old artifact hidden."""
    import os
    from slimkit.io import artifact
    q = slimkit.quantize(tiny_net(), data, method="rtn", w_bits=8, a_bits=8)
    art = slimkit.save(q, tmp_path / "art")
    before = (art / "model.safetensors").read_bytes()
    calls, replace = [], os.replace

    def second_fails(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise error
        replace(src, dst)
    monkeypatch.setattr(artifact.os, "replace", second_fails)
    with pytest.raises(slimkit.SlimkitError if isinstance(error, OSError) else KeyboardInterrupt):
        slimkit.save(q, art, overwrite=True)
    monkeypatch.setattr(artifact.os, "replace", replace)
    assert len(calls) >= 2 and sorted(p.name for p in tmp_path.iterdir()) == ["art"]
    assert (art / "model.safetensors").read_bytes() == before
    slimkit.load(art, model=tiny_net())


def test_a_factory_that_calls_sys_exit_is_named(tmp_path):
    """sys.exit() in a model factory, or at its module's import, ended the CLI with no message at all."""
    from slimkit.models.factory import build_from_factory
    (tmp_path / "f1.py").write_text("import sys\ndef build():\n    sys.exit(3)\n")
    (tmp_path / "f2.py").write_text("import sys\nsys.exit(5)\ndef build():\n    pass\n")
    with pytest.raises(slimkit.SlimkitError, match=r"called sys.exit\(3\) while building the model"):
        build_from_factory(f"{tmp_path / 'f1.py'}:build")
    with pytest.raises(slimkit.SlimkitError, match=r"calls sys.exit\(5\) when imported"):
        build_from_factory(f"{tmp_path / 'f2.py'}:build")


def test_an_artifact_knows_the_float_model_it_was_made_from(tmp_path, data):
    """The fingerprint of the float weights travels with what slimkit makes (through a sparse model quantized
    after): slimkit eval compares an artifact with a rebuilt float model only when the weights are the same ones
    (a factory building new random weights on each call had been reported as 92% agreement)."""
    from slimkit.cli import _checked_reference
    from slimkit.core.fingerprint import weights_digest
    m = tiny_net()
    m._slimkit_spec = {"builder": "nets.py:tiny", "kwargs": {}}      # as a factory-built model carries it
    sparse = slimkit.sparsify(m, sparsity=0.3, method="global_magnitude")
    q = slimkit.quantize(sparse, data, method="rtn", w_bits=8, a_bits=8)
    digest = weights_digest(m)
    assert sparse.slimkit_info["reference_digest"] == digest == q.slimkit_info["reference_digest"]
    slimkit.save(q, tmp_path / "art")
    again = slimkit.load(tmp_path / "art", model=tiny_net())
    assert _checked_reference(again, tiny_net(), explicit=False) is not None
    other = tiny_net()
    with torch.no_grad():
        other[0].weight.mul_(1.01)
    assert weights_digest(other) != digest
    assert _checked_reference(again, other, explicit=False) is None        # fidelity to another model: not reported
    assert _checked_reference(again, other, explicit=True) is other        # the user's own choice, with a note
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert weights_digest(tiny_net()) == digest
    finally:
        torch.set_num_threads(threads)


def test_artifact_messages_and_strict_json(tmp_path, data):
    """A path that does not exist is named so; a structured-FFN save points at load_structured; a NaN metric is
    saved as null (a bare NaN is not JSON to jq or JavaScript)."""
    q = slimkit.quantize(tiny_net(), data, method="rtn", w_bits=8, a_bits=8)
    art = slimkit.save(q, tmp_path / "art", metrics={"kl": float("nan"), "top1": 0.5})
    metrics = json.loads((art / "manifest.json").read_text(), parse_constant=lambda c: pytest.fail(c))["metrics"]
    assert metrics["kl"] is None and metrics["top1"] == 0.5
    with pytest.raises(slimkit.SlimkitError, match="does not exist"):
        slimkit.load(tmp_path / "nowhere")
    (tmp_path / "ffn").mkdir()
    (tmp_path / "ffn" / "structured.json").write_text("{}")
    with pytest.raises(slimkit.SlimkitError, match="load_structured"):
        slimkit.load(tmp_path / "ffn")


def test_settings_the_method_never_reads_are_refused_or_warned(data):
    """Options a method never reads changed nothing and were recorded nowhere: a warning from the API (one bundle
    may serve a sweep over methods), an error for the command line's own flags."""
    from slimkit.config import QuantConfig
    from slimkit.quantize import check_unread
    with pytest.warns(UserWarning, match="options drop_prob, iters are not read by rtn on a CNN"):
        slimkit.quantize(tiny_net(), data, method="rtn", iters=50, drop_prob=0.3)
    with pytest.raises(slimkit.SlimkitError, match="rtn on a CNN does not read --drop-prob, --iters"):
        check_unread(QuantConfig.build(None, method="rtn", iters=50, drop_prob=0.3), False, strict=True)
    with pytest.raises(slimkit.SlimkitError, match="does not read --w-group-size"):
        check_unread(QuantConfig.build(None, method="rtn", w_granularity="tensor", w_group_size=4), False,
                     strict=True)
    with pytest.raises(slimkit.SlimkitError, match="minmax on a transformer does not read --iters"):
        check_unread(QuantConfig.build(None, method="minmax", iters=5), True, strict=True)
    with pytest.warns(UserWarning, match="the recipe's settings alpha, iters are not read by rtn on a CNN"):
        slimkit.quantize(tiny_net(), data, recipe={"method": "rtn", "iters": 50, "alpha": 0.5})
    q = slimkit.quantize(tiny_net(), data, method="rtn", preset="fast")     # a preset's fields are defaults
    assert "iters" not in q.slimkit_info["config"]


def test_api_arguments_of_the_wrong_kind_are_named(tmp_path, data):
    """load(model=<a name>), save(metrics=<not a dict>) and quantize(recipe=<a list>) were raw TypeErrors; a sparse
    model asked for less sparsity than it already has says so."""
    q = slimkit.quantize(tiny_net(), data, method="rtn", w_bits=8, a_bits=8)
    with pytest.raises(slimkit.SlimkitError, match="metrics must be a dict"):
        slimkit.save(q, tmp_path / "a", metrics="abc")
    art = slimkit.save(q, tmp_path / "b")
    with pytest.raises(slimkit.SlimkitError, match="model= takes a float instance"):
        slimkit.load(art, model="fmnist-resnet")
    with pytest.raises(slimkit.SlimkitError, match="recipe must be a dict"):
        slimkit.quantize(tiny_net(), data, recipe=["rtn"])
    half = slimkit.sparsify(tiny_net(), sparsity=0.5, method="global_magnitude")
    with pytest.warns(UserWarning, match="held that many zero weights already"):
        again = slimkit.sparsify(half, sparsity=0.3, method="global_magnitude")
    assert again.slimkit_info["sparsity"]["achieved"] >= 0.49


class _Twice(nn.Module):
    """One block (and one conv) called twice in the forward: shared modules."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.block = BasicBlock(8)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))

    def forward(self, x):
        return self.head(self.block(self.block(self.stem(x))))


def test_options_and_models_that_were_taken_silently(data):
    """Settings and models slimkit used to take without a word (helper stress test): each now says so."""
    x = data[:32]
    # nested Python lists are one array (they had been split into (input, label) pairs)
    q_list = slimkit.quantize(tiny_net(), x.tolist(), method="rtn", w_bits=8, a_bits=8, progress=False)
    q_tensor = slimkit.quantize(tiny_net(), x, method="rtn", w_bits=8, a_bits=8, progress=False)
    assert q_list.slimkit_info["input_shape"] == [1, 10, 10]
    torch.testing.assert_close(q_list(x), q_tensor(x))
    # per-token weights, per-token conv activations: refused
    with pytest.raises(slimkit.SlimkitError, match="w_granularity 'token' is for activations"):
        slimkit.quantize(tiny_net(), x, method="rtn", w_granularity="token", progress=False)
    with pytest.raises(slimkit.SlimkitError, match="conv's input"):
        slimkit.quantize(tiny_net(), x, method="rtn", a_granularity="token", progress=False)
    # a shared block and conv: reconstruction and BN folding name what they leave out
    with pytest.warns(UserWarning) as record:
        slimkit.quantize(_Twice().eval(), x, method="qdrop", w_bits=4, a_bits=4, iters=2, progress=False)
    text = " ".join(str(w.message) for w in record)
    assert "keep round-to-nearest codes: block.conv1, block.conv2" in text
    assert "block.conv1 -> block.bn1" in text and "run more than once" in text
    # blocks= that overlap, name the whole model, or hold no layer
    for blocks, match in ((["3", "3.conv1"], "overlap"), ([""], "whole model"), (["3.bn1"], "no quantizable layer")):
        with pytest.raises(slimkit.SlimkitError, match=match):
            slimkit.quantize(tiny_net(), x, method="brecq", iters=2, blocks=blocks, progress=False)
    # options a method never reads: warned
    for opts, name in ((dict(method="adaround", lr_act=0.5), "lr_act"),
                       (dict(method="qdrop", a_bits=None, a_observer="mse"), "a_observer")):
        with pytest.warns(UserWarning, match=f"option {name} is not read"):
            slimkit.quantize(tiny_net(), x, w_bits=4, iters=2, progress=False, **opts)
    with pytest.warns(UserWarning, match="inplace= is for transformers"):
        slimkit.quantize(tiny_net(), x, method="rtn", inplace=True, progress=False)
    # skipping the first layer promotes no other to 8 bits
    q = slimkit.quantize(tiny_net(), x, method="rtn", w_bits=4, a_bits=4, skip=["0"], progress=False)
    assert {n: l.w_quant.spec.bits for n, l in quant_layers(q).items() if n != "7"} == \
        {n: 4 for n in quant_layers(q) if n != "7"}
    # non-finite weights: refused
    bad = tiny_net()
    with torch.no_grad():
        bad[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(slimkit.SlimkitError, match="not all finite"):
        slimkit.quantize(bad, x, method="rtn", progress=False)
    # the caller's random state is left alone
    net = tiny_net()                      # (which seeds torch itself)
    torch.manual_seed(123)
    slimkit.quantize(net, x, method="qdrop", iters=2, progress=False)
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(3))


def test_evaluate_checks_its_arguments_and_keeps_the_model_mode(data):
    m = tiny_net().train()
    x = data[:8]
    with pytest.raises(slimkit.SlimkitError, match="batch_size must be a positive integer"):
        slimkit.evaluate(m, x, batch_size=0)
    with pytest.raises(slimkit.SlimkitError, match="reference must be a model"):
        slimkit.evaluate(m, x, reference="model.safetensors")
    with pytest.raises(slimkit.SlimkitError, match="reference logits have shape"):
        slimkit.evaluate(m, x, reference=torch.zeros(7, 5))
    with pytest.raises(slimkit.SlimkitError, match="must be a tensor"):
        slimkit.evaluate(m, x.numpy())
    with pytest.raises(slimkit.SlimkitError, match="'cpu' or 'cuda'"):
        slimkit.evaluate(m, x, device="meta")
    assert slimkit.evaluate(m, x)["samples"] == 8 and m.training      # its mode given back


class _DictOut(nn.Module):
    """A model returning a dict (as torchvision's segmentation models do), with a -inf class mask."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = tiny_net()

    def forward(self, x):
        out = self.net(x)
        return {"out": out, "masked": out.masked_fill(torch.arange(5) == 4, float("-inf"))}


class _Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = tiny_net()

    def forward(self, x):
        return self.net(x).masked_fill(torch.arange(5) == 4, float("-inf"))


def test_the_review_cases_still_quantize(data):
    """What the first versions of the checks above refused or misread (a review of them): QDrop's drop settings
    are read without activation bits; dict outputs and a -inf class mask pass the finiteness check; a layer may
    be named as its own block; lists of [tensor, label] are still pairs; NumPy batch sizes are sizes; a
    warning from deep inside names the caller's line."""
    import numpy as np
    import warnings
    x = data[:16]
    q = slimkit.quantize(tiny_net(), x, method="qdrop", w_bits=4, a_bits=None, drop_prob=0.5, iters=2,
                         progress=False)
    assert q.slimkit_info["config"]["drop_prob"] == 0.5
    for model in (_DictOut().eval(), _Masked().eval()):
        slimkit.quantize(model, x, method="rtn", w_bits=8, a_bits=8, progress=False)
    slimkit.quantize(tiny_net(), x, method="brecq", iters=2, blocks=["0", "3", "4", "7"], progress=False)
    pairs = [[x[i], torch.tensor(i % 5)] for i in range(8)]
    from slimkit.core.data import resolve
    xs, ys = resolve(pairs)
    assert xs.shape == (8, 1, 10, 10) and ys.tolist() == [i % 5 for i in range(8)]
    assert slimkit.evaluate(tiny_net(), x, batch_size=np.int64(4))["samples"] == 16
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        slimkit.quantize(_Twice().eval(), x, method="rtn", progress=False)
    folds = [w for w in record if "BatchNorm folding" in str(w.message)]
    assert folds and all(w.filename == __file__ for w in folds)


def test_a_parametrized_model_reloads_from_its_artifact(tmp_path, data):
    """A model under torch.nn.utils.parametrizations is compressed as the plain weights it computes, and the
    float instance the user passes to slimkit.load (the same class: with its parametrizations) takes them: the
    reload refused every such artifact ('missing ... parametrizations.weight.original0')."""
    q = slimkit.quantize(_weight_normed(), data, method="rtn", w_bits=4, a_bits=8, progress=False)
    slimkit.save(q, tmp_path / "q")
    sparse = slimkit.sparsify(_weight_normed(), method="erk", sparsity=0.5)
    slimkit.save(sparse, tmp_path / "s")
    x = data[:8]
    with torch.no_grad():
        assert torch.equal(slimkit.load(tmp_path / "q", model=_weight_normed())(x), q(x))
        assert torch.equal(slimkit.load(tmp_path / "s", model=_weight_normed())(x), sparse(x))
    assert nn.utils.parametrize.is_parametrized(_weight_normed()[0])       # (the caller's instances keep theirs)


class _Tokens(nn.Module):
    """Linear layers on (N, L, D) tokens, as in a ViT or a ConvNeXt's channels-last MLP."""

    def __init__(self):
        super().__init__()
        self.inp, self.mid, self.out = nn.Linear(6, 12), nn.Linear(12, 12), nn.Linear(12, 4)

    def forward(self, x):
        return self.out(torch.relu(self.mid(torch.relu(self.inp(x)))).mean(1))


def test_per_channel_activation_steps_of_a_linear_layer_are_per_feature(tmp_path):
    """a_granularity 'channel' gives a linear layer one step per input feature (its last axis), not one per token
    position (axis 1 of (N, L, D)), which tied the model to the calibration sequence length; a conv's stay per
    channel (axis 1)."""
    torch.manual_seed(0)
    model, x = _Tokens().eval(), torch.randn(64, 5, 6)
    q = slimkit.quantize(model, x, method="qdrop", w_bits=4, a_bits=4, a_granularity="channel", iters=5,
                         first_last_bits=None, progress=False)
    assert q.mid.a_quant.scale.numel() == 12 and q.out.a_quant.scale.numel() == 12
    longer = torch.randn(3, 9, 6)
    with torch.no_grad():
        out = q(longer)             # another length runs (the steps were one per position, 5 of them)
    slimkit.save(q, tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(slimkit.load(tmp_path / "q", model=_Tokens())(longer), out)
    conv = slimkit.quantize(tiny_net(), torch.randn(32, 1, 10, 10), method="rtn", a_granularity="channel",
                            progress=False)
    assert conv[3].conv2.a_quant.scale.numel() == 8 and conv[7].a_quant.scale.numel() == 8


def test_nonfinite_batchnorm_statistics_are_refused_before_the_work(tmp_path, data):
    """A BatchNorm whose running statistics are NaN / inf or whose running_var is negative made NaN weights (folded)
    or NaN activations: quantize returned a model slimkit.save wrote and slimkit.load then refused as corrupt."""
    def broken(value, name="running_var"):
        m = tiny_net()
        getattr(m[3].bn1, name)[0] = value
        return m

    for model in (broken(float("nan")), broken(-1.0), broken(float("inf"), "running_mean")):
        with pytest.raises(slimkit.SlimkitError, match=r"BatchNorm 3\.bn1 has running statistics that are not "
                                                       r"finite.*folded into 3\.conv1"):
            slimkit.quantize(model, data, method="rtn", progress=False)
    with pytest.raises(slimkit.SlimkitError, match=r"the input of layer 3\.conv2 is not finite on the calibration"):
        slimkit.quantize(broken(float("nan")), data, method="rtn", fold_bn=False, progress=False)


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.attn, self.head = nn.Linear(6, 8), nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 3)
        self.unused = nn.Linear(8, 8)

    def forward(self, x):
        h = self.emb(x)
        return self.head(self.attn(h, h, h, need_weights=False)[0].mean(1))


def test_layers_never_called_are_named_as_float(data):
    """nn.MultiheadAttention's out_proj (whose weight the attention reads) and a layer the forward never calls stay
    float: every method says so, and the reconstruction methods no longer claim they 'keep round-to-nearest
    codes'."""
    import warnings
    torch.manual_seed(0)
    x = torch.randn(32, 5, 6)
    for method in ("rtn", "adaround", "qdrop"):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            q = slimkit.quantize(_Attention().eval(), x, method=method, iters=2, progress=False)
        messages = [str(w.message) for w in record]
        assert "attn.out_proj" not in quant_layers(q) and "unused" not in quant_layers(q)
        assert any("2 Linear/Conv2d layer(s) never run their forward" in m and "attn.out_proj, unused" in m
                   and "MultiheadAttention" in m for m in messages), messages
        assert not any("round-to-nearest" in m for m in messages), messages


def test_accuracy_of_a_dense_output_is_refused_clearly():
    """Labels with a model whose output is no (N, classes) row per sample (a segmentation map) get a clear error,
    not a broadcasting RuntimeError from inside evaluate (and `slimkit quantize --eval-data` fails before the
    work)."""
    torch.manual_seed(0)
    seg = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    x, y = torch.randn(6, 1, 10, 10), torch.randint(0, 2, (6,))
    from slimkit.eval import check_data
    with pytest.raises(slimkit.SlimkitError, match=r"top-1 accuracy needs one row of class scores per sample.*"
                                                   r"\(2, 10, 10\) per sample"):
        check_data(seg, x, y)
    with pytest.raises(slimkit.SlimkitError, match=r"top-1 accuracy needs one row"):
        slimkit.evaluate(seg, x, y)
    assert slimkit.evaluate(seg, x, reference=seg)["agreement"] == 1.0      # without labels: fidelity as before
