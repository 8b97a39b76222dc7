"""slimkit.sparsify: exact global sparsity for every allocation, N:M, counted layers, compact save/load, the CLI."""
import json
import warnings

import pytest
import torch
from torch import nn

import slimkit
from slimkit.core.sparsity import is_nm, nm_groups, weight_2d
from slimkit.errors import SlimkitError
from slimkit.sparsify import prunable_layers


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


@pytest.mark.parametrize("method", ["uniform", "global_magnitude", "erk"])
@pytest.mark.parametrize("target", [0.5, 0.7, 0.8, 0.9])
def test_achieved_sparsity_equals_the_target(method, target):
    model = small_cnn()
    sparse = slimkit.sparsify(model, method=method, sparsity=target)
    layers = prunable_layers(sparse)
    total = sum(m.weight.numel() for m in layers.values())
    zeros = sum(int((m.weight == 0).sum()) for m in layers.values())
    assert zeros == round(target * total)                      # exact to one weight, well inside 0.1 point
    s = sparse.slimkit_info["sparsity"]
    assert s["achieved"] == pytest.approx(zeros / total) and set(s["layers"]) == set(layers)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), small_cnn().state_dict().values()))
    for name, layer in layers.items():    # inside a layer the kept weights are the largest
        w0 = model.get_submodule(name).weight.abs()
        kept = layer.weight != 0
        if kept.any() and (~kept).any():
            assert w0[kept].min() >= w0[~kept].max()


def test_erk_keeps_small_layers_denser_than_uniform():
    s = slimkit.sparsify(small_cnn(), method="erk", sparsity=0.8).slimkit_info["sparsity"]["layers"]
    assert s["0"]["rate"] < 0.8 < s["2"]["rate"]


def test_nm_2_4_and_layers_that_do_not_divide():
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    sparse = slimkit.sparsify(model, nm="2:4")
    for layer in prunable_layers(sparse).values():
        assert is_nm(weight_2d(layer) != 0, 2, 4)
    assert sparse.slimkit_info["sparsity"]["achieved"] == pytest.approx(0.5)
    with pytest.raises(SlimkitError, match="divide by 4"):
        slimkit.sparsify(nn.Sequential(nn.Linear(6, 4)), nm="2:4")
    with pytest.raises(SlimkitError, match="0 < N < M"):
        slimkit.sparsify(model, nm="4:4")
    # a convolution's groups run along its input channels at each kernel position (K, C, R, S), as sparse tensor
    # cores take them, not along the flattened C * R * S (mostly neighbouring taps of one channel)
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(8, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 1))
    with pytest.raises(SlimkitError, match=r"0 \(6 input channels\)|2 \(6 input channels\)"):
        slimkit.sparsify(conv, nm="2:4")                      # 6 * 9 would divide by 2, 6 does not by 4
    conv = nn.Sequential(nn.Conv2d(8, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 1))
    sparse = slimkit.sparsify(conv, nm="2:4", exclude=["2"])
    w = sparse[0].weight                                      # (6, 8, 3, 3)
    kept = (w != 0).movedim(1, -1).reshape(6, 3, 3, 2, 4).sum(-1)
    assert (kept == 2).all()
    big = conv[0].weight.detach().abs().movedim(1, -1).reshape(-1, 4)
    mine = (w != 0).movedim(1, -1).reshape(-1, 4)
    assert torch.equal(mine, torch.zeros_like(mine).scatter_(1, torch.argsort(big, dim=1, descending=True, stable=True)[:, :2],
                                                             True))
    with pytest.raises(SlimkitError, match="2:4"):
        slimkit.sparsify(model, nm="two of four")


def test_tied_and_excluded_layers_are_not_counted():
    emb = nn.Embedding(10, 8)
    head = nn.Linear(8, 10, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "body": nn.Linear(8, 8), "head": head, "out": nn.Linear(8, 2)})
    assert set(prunable_layers(model)) == {"body", "out"}
    assert set(prunable_layers(model, exclude=["out"])) == {"body"}
    with pytest.raises(SlimkitError, match="no prunable layers"):
        slimkit.sparsify(model, method="uniform", sparsity=0.5, exclude=["body", "out"])
    with pytest.raises(SlimkitError, match="'bdy' matches no"):     # a typo is an error, not a silent no-op
        prunable_layers(model, exclude=["bdy"])


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_sparsify_learns_under_no_grad_and_inference_mode(mode):
    """FCPTS learns under a caller's no_grad / inference_mode, the result holds ordinary (trainable) tensors, and
    warnings still name the caller's line."""
    x = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(method="fcpts", sparsity=0.5, iters=3, finetune_iters=2, progress=False)
    want = slimkit.sparsify(small_cnn(), x, **kw)
    m = small_cnn()
    with mode():
        got = slimkit.sparsify(m, x, **kw)
        assert not torch.is_grad_enabled()
    assert not any(p.is_inference() for p in got.parameters())
    assert all(torch.equal(a, b) for a, b in zip(got.parameters(), want.parameters()))
    got(x[:2]).sum().backward()          # fine-tunable afterwards
    emb, head = nn.Embedding(10, 8), nn.Linear(8, 10, bias=False)
    head.weight = emb.weight
    with mode(), pytest.warns(UserWarning, match="tied") as caught:
        slimkit.sparsify(nn.ModuleDict({"emb": emb, "head": head, "out": nn.Linear(8, 2)}), method="uniform")
    assert all(w.filename == __file__ for w in caught)


def test_exclude_takes_parent_modules_and_glob_patterns():
    """Depthwise convolutions (9 inputs) cannot be 2:4; one glob pattern leaves all of them dense."""
    def block():
        return nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 8, 1))
    model = nn.Sequential(block(), block(), nn.Flatten(), nn.Linear(8 * 4 * 4, 4))
    assert set(prunable_layers(model, exclude=["0"])) == {"1.0", "1.1", "3"}          # a parent module
    assert set(prunable_layers(model, exclude=["*.0"])) == {"0.1", "1.1", "3"}        # a glob
    with pytest.raises(SlimkitError, match="divide by 4"):
        slimkit.sparsify(model, nm="2:4")
    sparse = slimkit.sparsify(model, nm="2:4", exclude=["*.0"])
    assert set(sparse.slimkit_info["sparsity"]["layers"]) == {"0.1", "1.1", "3"}
    assert torch.equal(sparse[0][0].weight, model[0][0].weight)                        # depthwise left dense


@pytest.mark.parametrize("bad", [-0.1, 1.0, 2, False, float("nan")])
def test_bad_sparsity_is_refused(bad):
    with pytest.raises(SlimkitError, match=r"\[0, 1\)"):
        slimkit.sparsify(small_cnn(), sparsity=bad)
    with pytest.raises(SlimkitError, match="unknown sparsity method"):
        slimkit.sparsify(small_cnn(), method="magic", sparsity=0.5)


def test_sparsify_inputs_and_reports_of_models_already_compressed():
    """NumPy and 0-d torch scalars are targets too; nm= sets method and sparsity, so another of either is refused;
    a quantized model is refused (its float weights are not what runs); the report counts the zeros the weights
    hold, a model pruned before included."""
    import numpy as np

    for target in (np.float32(0.5), torch.tensor(0.5)):
        assert slimkit.sparsify(small_cnn(), method="uniform", sparsity=target).slimkit_info["sparsity"]["target"] == 0.5
    with pytest.raises(SlimkitError, match="sets both the method and the sparsity"):
        slimkit.sparsify(small_cnn(), method="uniform", nm="2:4")
    with pytest.raises(SlimkitError, match="sets both the method and the sparsity"):
        slimkit.sparsify(small_cnn(), sparsity=0.7, nm="2:4")
    q = slimkit.quantize(small_cnn(), torch.randn(8, 3, 8, 8), method="rtn", progress=False)
    with pytest.raises(SlimkitError, match="already quantized"):
        slimkit.sparsify(q, method="uniform", sparsity=0.5)
    half = slimkit.sparsify(small_cnn(), method="uniform", sparsity=0.5)
    again = slimkit.sparsify(half, method="uniform", sparsity=0.3)
    layers = prunable_layers(again)
    zeros = sum(int((m.weight == 0).sum()) for m in layers.values()) / sum(m.weight.numel() for m in layers.values())
    assert again.slimkit_info["sparsity"]["achieved"] == pytest.approx(zeros) and zeros >= 0.5


def test_save_load_restores_the_same_masked_weights(tmp_path):
    model = small_cnn()
    sparse = slimkit.sparsify(model, method="global_magnitude", sparsity=0.8)
    path = slimkit.save(sparse, tmp_path / "art")
    back = slimkit.load(path, model=small_cnn())
    for (k, a), (k2, b) in zip(sparse.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(sparse.eval()(x), back.eval()(x))
    dense_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert (path / "model.safetensors").stat().st_size < 0.45 * dense_bytes     # values + 1 bit a weight
    assert back.slimkit_info["sparsity"]["target"] == 0.8


@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError(28, "No space left on device")])
def test_a_chart_cut_short_leaves_no_partial_png(tmp_path, monkeypatch, error):
    """The per-layer chart goes into the artifact folder after the save: a Ctrl-C or full disk while it is written
    leaves no truncated sparsity.png there (nor a temporary file), and a full disk is a SlimkitError."""
    from PIL import Image

    from slimkit.sparsify import plot_rates

    s = slimkit.sparsify(small_cnn(), method="uniform", sparsity=0.5)

    def cut_short(im, fp, filename, *a, **k):
        fp.write(b"\x89PNG\r\n\x1a\n")
        raise error
    Image.init()
    monkeypatch.setitem(Image.SAVE, "PNG", cut_short)
    with pytest.raises(SlimkitError if isinstance(error, OSError) else KeyboardInterrupt):
        plot_rates(s.slimkit_info, tmp_path / "sparsity.png")
    assert not any(tmp_path.iterdir())
    monkeypatch.undo()
    plot_rates(s.slimkit_info, tmp_path / "sparsity.png")
    assert [p.name for p in tmp_path.iterdir()] == ["sparsity.png"]
    assert (tmp_path / "sparsity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_sparsify_writes_artifact_chart_and_refuses_bad_input(tmp_path):
    from typer.testing import CliRunner

    from slimkit.cli import app

    out = tmp_path / "s"
    r = CliRunner().invoke(app, ["sparsify", "fmnist-resnet", "--out", str(out), "--method", "erk",
                                 "--sparsity", "0.7", "--quiet"])
    assert r.exit_code == 0, r.output
    assert (out / "manifest.json").exists() and (out / "sparsity.png").stat().st_size > 1000
    back = slimkit.load(out)
    layers = prunable_layers(back)
    total = sum(m.weight.numel() for m in layers.values())
    assert sum(int((m.weight == 0).sum()) for m in layers.values()) == round(0.7 * total)
    from slimkit.eval import model_size_bytes
    from slimkit.report import fmt_size
    assert fmt_size(model_size_bytes(back)) in r.output     # the size eval reports too, not the files on disk
    for args in (["--sparsity", "1.2"], ["--method", "magic"], ["--nm", "5:4"], ["--temperature", "0"],
                 ["--method", "erk", "--temperature", "2"], ["--seq-len", "64"], ["--lr", "0"],
                 ["--method", "erk", "--lr", "0.1"]):
        bad = CliRunner().invoke(app, ["sparsify", "fmnist-resnet", "--out", str(tmp_path / "bad"), *args])
        assert bad.exit_code != 0 and not (tmp_path / "bad").exists()
    # the sparse artifact quantizes from the command line too (its model's shipped data by default)
    q = CliRunner().invoke(app, ["quantize", str(out), "--method", "rtn", "--w-bits", "4", "--a-bits", "8",
                                 "--out", str(tmp_path / "sq"), "--quiet"])
    assert q.exit_code == 0, q.output
    assert "FP (sparse)" in q.output          # the float row is the sparse model, not the dense original
    manifest = json.loads((tmp_path / "sq" / "manifest.json").read_text())
    assert manifest["sparsity"]["target"] == 0.7 and all(s.get("w_sparse") for s in manifest["layers"].values())
    # the manifest names the sparse reference as the table does: its figures (and the quantized model's agreement
    # and KL) are not those of the dense original, which `slimkit eval` of the artifact compares with
    assert "fp_sparse" in manifest["metrics"] and "fp" not in manifest["metrics"]
    again = CliRunner().invoke(app, ["quantize", str(tmp_path / "sq"), "--method", "rtn", "--out",
                                     str(tmp_path / "sqq")])
    assert again.exit_code != 0 and "already quantized" in str(again.exception)


# ---------- FCPTS ----------

def test_bridge_gradient_matches_finite_differences_of_the_rate():
    from slimkit.methods.fcpts import SparsityRate
    g = torch.Generator().manual_seed(4)
    absw = torch.randn(200_000, generator=g).abs()
    for t0 in (0.3, 0.8, 1.5):
        t = torch.tensor(t0, requires_grad=True)
        SparsityRate.apply(absw, t).backward()
        h = 0.05
        fd = ((absw < t0 + h).float().mean() - (absw < t0 - h).float().mean()) / (2 * h)
        assert t.grad.item() == pytest.approx(fd.item(), rel=0.05)
        assert SparsityRate.apply(absw, torch.tensor(t0)).item() == pytest.approx((absw < t0).float().mean().item())


def test_distillation_loss_is_the_tempered_kl_and_temperature_is_checked():
    """_kd_loss = T^2 KL(softmax(t/T) || softmax(s/T)), batch-mean over every position; 0 for equal logits; the
    default T is 1 (the predictions as used); a non-positive temperature is refused before any work."""
    from slimkit.methods.fcpts import FCPTSConfig, _kd_loss
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 5, 7, generator=g), torch.randn(3, 5, 7, generator=g)
    for temp in (1.0, 4.0):
        p = (t / temp).softmax(-1)
        want = (p * (p.log() - (s / temp).log_softmax(-1))).sum(-1).mean() * temp ** 2
        assert _kd_loss(s, t, temp).item() == pytest.approx(want.item(), rel=1e-5)
        assert _kd_loss(t, t, temp).item() == pytest.approx(0.0, abs=1e-6)
    assert FCPTSConfig(sparsity=0.5).temperature == 1.0
    teacher, calib, _ = teacher_and_data()
    for bad in (0, -1.0, "4"):
        with pytest.raises(SlimkitError, match="temperature"):
            slimkit.sparsify(teacher, calib, method="fcpts", sparsity=0.5, temperature=bad)


def teacher_and_data():
    torch.manual_seed(5)
    teacher = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    return teacher, torch.randn(512, 16), torch.randn(256, 16)


def test_fcpts_control_term_reaches_the_target_and_the_result_is_exact():
    teacher, calib, _ = teacher_and_data()
    s = slimkit.sparsify(teacher, calib, method="fcpts", sparsity=0.75, iters=150, finetune_iters=0,
                         batch_size=64, progress=False, device="cpu")
    info = s.slimkit_info["sparsity"]
    assert abs(info["fcpts"]["final_global_rate"] - 0.75) < 0.01      # the control term alone gets close
    layers = prunable_layers(s)
    total = sum(m.weight.numel() for m in layers.values())
    assert sum(int((m.weight == 0).sum()) for m in layers.values()) == round(0.75 * total)   # projection: exact
    learned = info["fcpts"]["learned_rates"]
    assert max(learned.values()) - min(learned.values()) > 0.02       # rates differ by layer


def test_fcpts_beats_the_magnitude_baselines_on_a_fixed_seed():
    teacher, calib, held_out = teacher_and_data()
    with torch.no_grad():
        ref = teacher(held_out)

    def error(model):
        with torch.no_grad():
            return float((model(held_out) - ref).pow(2).mean())
    ours = error(slimkit.sparsify(teacher, calib, method="fcpts", sparsity=0.8, iters=150, finetune_iters=50,
                                  progress=False, device="cpu"))
    for method in ("uniform", "global_magnitude", "erk"):
        assert ours < 0.7 * error(slimkit.sparsify(teacher, method=method, sparsity=0.8)), method


def test_fcpts_needs_calibration_data_and_known_options():
    teacher, calib, _ = teacher_and_data()
    with pytest.raises(SlimkitError, match="calibration data"):
        slimkit.sparsify(teacher, method="fcpts", sparsity=0.5)
    with pytest.raises(SlimkitError, match="unknown fcpts option"):
        slimkit.sparsify(teacher, calib, method="fcpts", sparsity=0.5, itres=3)
    with pytest.raises(SlimkitError, match="empty"):
        slimkit.sparsify(teacher, torch.empty(0, 16), method="fcpts", sparsity=0.5)


def test_a_sparse_model_fine_tuned_after_sparsify_saves_the_sparsity_it_has(tmp_path):
    """Fine-tuning a sparse model fills its pruned weights in: save records each layer's zeros as they are now (not
    the figures sparsify left), stores a weight whose bitmask no longer pays as it is, and says which layers
    changed and how to keep them sparse; an untouched layer stays as it was, and the artifact reloads exactly."""
    from safetensors.torch import load_file

    from slimkit.eval import model_size_bytes
    torch.manual_seed(0)
    sparse = slimkit.sparsify(small_cnn(), method="uniform", sparsity=0.5)
    before = json.loads(json.dumps(sparse.slimkit_info["sparsity"]))
    with torch.no_grad():              # as fine-tuning moves every weight of the layers it trains
        for i in (2, 6):
            sparse[i].weight.add_(1e-3 * torch.randn_like(sparse[i].weight))
    with pytest.warns(UserWarning, match=r"2 \(50\.0% -> 0\.0%\), 6 \(50\.0% -> 0\.0%\).*slimkit\.sparsify"):
        path = slimkit.save(sparse, tmp_path / "tuned")
    manifest = json.loads((path / "manifest.json").read_text())
    s = manifest["sparsity"]
    assert s["layers"]["0"] == before["layers"]["0"]
    assert s["layers"]["2"]["pruned"] == s["layers"]["6"]["pruned"] == 0 and s["layers"]["2"]["rate"] == 0
    assert s["achieved"] == pytest.approx(before["layers"]["0"]["pruned"] / s["counted_params"])
    assert s["target"] == 0.5 and sparse.slimkit_info["sparsity"] == before   # the model's own record is left alone
    assert set(manifest["sparse_weights"]) == {"0"}                            # the dense layers stored as they are
    stored = load_file(str(path / "model.safetensors"))
    assert "2.weight" in stored and "2.weight.bitmask" not in stored and "0.weight.bitmask" in stored
    assert model_size_bytes(sparse) < (path / "model.safetensors").stat().st_size < model_size_bytes(sparse) + 4096
    back = slimkit.load(path, model=small_cnn())
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(back.eval()(x), sparse.eval()(x)) and back.slimkit_info["sparsity"] == s
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        slimkit.save(back, tmp_path / "again")                 # its record now matches its weights
    q = slimkit.quantize(sparse, torch.randn(16, 3, 8, 8), method="rtn", w_bits=4, a_bits=8, progress=False)
    with pytest.warns(UserWarning, match=r"2 \(50\.0% -> 0\.0%\)"):     # the masks quantize took from the weights
        manifest = json.loads((slimkit.save(q, tmp_path / "q") / "manifest.json").read_text())
    assert manifest["sparsity"]["layers"]["6"]["pruned"] == 0


def test_sparse_then_quantized_keeps_its_zeros_and_saves_both(tmp_path):
    from slimkit.core.wrap import quant_layers
    torch.manual_seed(6)
    sparse = slimkit.sparsify(small_cnn(), method="global_magnitude", sparsity=0.7)
    calib = torch.randn(64, 3, 8, 8)
    q = slimkit.quantize(sparse, calib, method="qdrop", w_bits=4, a_bits=8, iters=20, num_samples=64,
                         batch_size=16, progress=False, device="cpu")
    assert q.slimkit_info["sparsity"]["target"] == 0.7
    for name, layer in quant_layers(q).items():
        keep = sparse.get_submodule(name).weight != 0
        assert torch.equal(layer.w_mask, keep)
        assert torch.all(layer.quantized_weight()[~keep] == 0)      # AdaRound cannot round a pruned weight up
    path = slimkit.save(q, tmp_path / "sq")
    back = slimkit.load(path, model=small_cnn())
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(q.eval()(x), back.eval()(x))
    for name, layer in quant_layers(back).items():
        assert torch.equal(layer.w_mask, quant_layers(q)[name].w_mask)
    from safetensors.torch import load_file
    stored = load_file(str(path / "model.safetensors"))
    for n, layer in quant_layers(q).items():    # codes of the kept weights only, at the layer's bit width
        kept, bits = int(layer.w_mask.sum()), layer.w_quant.spec.bits
        assert stored[f"{n}.w_packed"].numel() == -(-kept * bits // 8)
        assert stored[f"{n}.w_mask"].numel() == -(-layer.w_mask.numel() // 8)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_fcpts_on_tiny_transformers_counts_block_linears_and_hits_the_target(kind):
    from tiny_hf import VOCAB, tiny_model
    model = tiny_model(kind).eval()
    tokens = torch.randint(3, VOCAB, (16, 24), generator=torch.Generator().manual_seed(0))
    layers = prunable_layers(model)
    assert layers and all(".0." in k or ".1." in k for k in layers)      # block linears only: no head, no embeddings
    s = slimkit.sparsify(model, tokens, method="fcpts", sparsity=0.6, iters=20, finetune_iters=5, batch_size=4,
                         lr=1e-3, progress=False, device="cpu")
    total = sum(m.weight.numel() for m in prunable_layers(s).values())
    zeros = sum(int((m.weight == 0).sum()) for m in prunable_layers(s).values())
    assert zeros == round(0.6 * total)
    with torch.no_grad():
        out = s(tokens[:2])
    assert torch.isfinite(out.logits if hasattr(out, "logits") else out.last_hidden_state).all()


def test_nm_on_gpt2_conv1d_groups_along_the_inputs():
    from tiny_hf import tiny_model
    from slimkit.core.wrap import weight_oi
    s = slimkit.sparsify(tiny_model("gpt2"), nm="2:4")
    for layer in prunable_layers(s).values():
        assert is_nm(weight_oi(layer) != 0, 2, 4)       # (out, in) view: groups of 4 inputs per output


def test_wanda_and_owl_on_a_tiny_llama():
    from tiny_hf import VOCAB, tiny_model
    from slimkit.core.wrap import weight_oi
    model = tiny_model("llama", layers=4).eval()
    tokens = torch.randint(3, VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))
    for method in ("wanda", "owl"):
        s = slimkit.sparsify(model, tokens, method=method, sparsity=0.7, device="cpu")
        layers = prunable_layers(s)
        total = sum(m.weight.numel() for m in layers.values())
        assert sum(int((m.weight == 0).sum()) for m in layers.values()) == round(0.7 * total)
        rates = {k: r["rate"] for k, r in s.slimkit_info["sparsity"]["layers"].items()}
        if method == "wanda":   # each output row drops the same number of weights (+-1)
            for layer in layers.values():
                per_row = (weight_oi(layer) == 0).sum(1)
                assert per_row.max() - per_row.min() <= 1
        else:                   # block-wise rates around the target, within the OWL band
            assert max(rates.values()) - min(rates.values()) > 0.01
            assert all(abs(r - 0.7) <= 0.08 + 0.01 for r in rates.values())
    with pytest.raises(SlimkitError, match="convolution"):
        slimkit.sparsify(small_cnn(), torch.randn(4, 3, 8, 8), method="wanda", sparsity=0.5)
    with pytest.raises(SlimkitError, match="calibration data"):
        slimkit.sparsify(model, method="owl", sparsity=0.5)


def test_wanda_beats_magnitude_when_inputs_have_outlier_channels():
    torch.manual_seed(7)
    layer = nn.Linear(32, 16)
    scale = torch.ones(32)
    scale[:3] = 20.0                                       # three outlier input channels, as LLMs have
    x = torch.randn(256, 32) * scale
    model = nn.Sequential(layer)
    ref = model(x).detach()
    err = {m: float((slimkit.sparsify(model, x, method=m, sparsity=0.6)(x).detach() - ref).pow(2).mean())
           for m in ("wanda", "uniform")}
    assert err["wanda"] < 0.5 * err["uniform"]


def test_sparsegpt_compensates_better_than_wanda_and_hits_the_target():
    from tiny_hf import VOCAB, tiny_model
    torch.manual_seed(8)
    layer = nn.Linear(48, 24)
    x = torch.randn(512, 48) @ torch.randn(48, 48)          # correlated inputs: there is something to compensate
    model = nn.Sequential(layer)
    ref = model(x).detach()
    err = {m: float((slimkit.sparsify(model, x, method=m, sparsity=0.6)(x).detach() - ref).pow(2).mean())
           for m in ("sparsegpt", "wanda", "uniform")}
    assert err["sparsegpt"] < 0.98 * min(err["wanda"], err["uniform"])
    sparse = slimkit.sparsify(model, x, method="sparsegpt", sparsity=0.6)[0]
    keep = sparse.weight != 0
    with torch.no_grad():   # the same mask without the update of the surviving weights
        masked_only = float((x @ (layer.weight * keep).t() + layer.bias - ref).pow(2).mean())
    assert err["sparsegpt"] < 0.85 * masked_only
    llama = tiny_model("llama", layers=3).eval()
    tokens = torch.randint(3, VOCAB, (8, 32), generator=torch.Generator().manual_seed(2))
    s = slimkit.sparsify(llama, tokens, method="sparsegpt", sparsity=0.5, device="cpu")
    layers = prunable_layers(s)
    total = sum(m.weight.numel() for m in layers.values())
    assert sum(int((m.weight == 0).sum()) for m in layers.values()) == round(0.5 * total)
    gpt2 = slimkit.sparsify(tiny_model("gpt2"), tokens, method="sparsegpt", sparsity=0.5, device="cpu")
    assert all(abs(r["rate"] - 0.5) < 0.01 for r in gpt2.slimkit_info["sparsity"]["layers"].values())


def test_sparsegpt_with_more_dead_inputs_than_its_budget_prunes_exactly_the_target():
    """Inputs that never fire (a ReLU FFN's dead neurons) cost nothing to prune: SparseGPT takes them first, and
    where they outnumber a layer's budget the rest keep their weights (they never act), so the layer loses
    exactly its share (the reference zeroes them all and went past the target, which the report then blamed on
    the model)."""
    torch.manual_seed(3)
    layer = nn.Linear(64, 16)
    x = torch.randn(256, 64)
    x[:, :40] = 0                                         # 40 of 64 inputs dead: 62.5% of the weights
    model = nn.Sequential(layer)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        sparse = slimkit.sparsify(model, x, method="sparsegpt", sparsity=0.5)
    w = sparse[0].weight
    assert int((w == 0).sum()) == 16 * 64 // 2
    assert (w[:, 40:] != 0).all()                          # only dead inputs pruned: the live ones untouched
    assert torch.allclose(sparse(x), model(x), atol=1e-5)                # the dead weights never acted


@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen2-sliding"])
def test_sequential_sparsegpt_equals_rerunning_the_pruned_model(kind):
    """Block inputs captured once and carried through each pruned block give what re-running the whole (partly
    pruned) model up to each block gives: the same masks and the same updated weights. Qwen2 with sliding-window
    layers passes those layers another mask than its first (full-attention) layer."""
    import copy

    import transformers as T
    from tiny_hf import VOCAB, tiny_model

    from slimkit.core.families import layout
    from slimkit.core.sparsity import exact_counts, uniform_rates
    from slimkit.methods.sparsegpt import hessians, prune_layer, sparsegpt

    if kind == "qwen2-sliding":
        torch.manual_seed(0)
        model = T.Qwen2ForCausalLM(T.Qwen2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3,
                                                 num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                                 use_sliding_window=True, sliding_window=4,
                                                 max_window_layers=1)).eval()
        assert len(set(model.config.layer_types)) == 2
    else:
        model = tiny_model(kind, layers=3).eval()
    tokens = torch.randint(3, VOCAB, (12, 16), generator=torch.Generator().manual_seed(4))
    sizes = {k: m.weight.numel() for k, m in prunable_layers(model).items()}
    counts = exact_counts(uniform_rates(sizes, 0.5), sizes, 0.5)
    dev = torch.device("cpu")
    seq = copy.deepcopy(model)
    masks = sparsegpt(seq, prunable_layers(seq), layout(seq).blocks, counts, tokens, dev)
    ref = copy.deepcopy(model)
    ref_layers, ref_masks = prunable_layers(ref), {}
    for path in layout(ref).blocks:            # the earlier algorithm: a forward from the start per block
        names = [k for k in ref_layers if k.startswith(path + ".")]
        with torch.no_grad():
            hs = hessians(ref, {k: ref_layers[k] for k in names}, tokens, dev, stop_at=ref.get_submodule(path))
        for k in names:
            ref_masks[k] = prune_layer(ref_layers[k], hs[k], counts[k])
    assert set(masks) == set(ref_masks) == set(sizes)
    for k in masks:
        assert torch.equal(masks[k], ref_masks[k]), k
    for (n, a), (_, b) in zip(seq.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "opt"])
def test_sparse_transformer_saves_and_loads(kind, tmp_path):
    """GPT-2 and OPT tie the output head to the embedding: the artifact stores it once and the reload keeps
    the two tied."""
    from tiny_hf import VOCAB, tiny_model
    s = slimkit.sparsify(tiny_model(kind), method="global_magnitude", sparsity=0.6)
    path = slimkit.save(s, tmp_path / f"{kind}-s60")
    back = slimkit.load(path, model=tiny_model(kind, seed=1))      # other weights: all must come from the file
    tokens = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(s(tokens).logits, back(tokens).logits)
    tied = json.loads((path / "manifest.json").read_text()).get("tied_tensors", {})
    assert bool(tied) == (kind != "llama")
    head, emb = back.get_output_embeddings().weight, back.get_input_embeddings().weight
    assert (head is emb) == (kind != "llama")


class SharedLayerNet(nn.Module):
    """A layer applied twice and a second module holding the same weight: three names, two tensors."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(self.a(x))))))


def test_models_with_shared_weights_save_and_load(tmp_path):
    torch.manual_seed(0)
    model, x = SharedLayerNet().eval(), torch.randn(16, 8)
    s = slimkit.sparsify(model, x, method="fcpts", sparsity=0.5, iters=5, finetune_iters=1, progress=False)
    back = slimkit.load(slimkit.save(s, tmp_path / "s"), model=SharedLayerNet())
    assert torch.equal(back(x), s(x)) and back.a.weight is back.b.weight
    q = slimkit.quantize(s, x, method="rtn", w_bits=8, a_bits=8)
    back = slimkit.load(slimkit.save(q, tmp_path / "q"), model=SharedLayerNet())
    assert torch.equal(back(x), q(x))


@pytest.mark.parametrize("method", ["minmax", "os_plus", "outlier_suppression"])
def test_sparse_transformer_quantized_keeps_zeros_saves_compactly_and_reloads(method, tmp_path):
    from safetensors.torch import load_file
    from tiny_hf import VOCAB, tiny_model
    from slimkit.core.wrap import quant_layers, weight_oi
    s = slimkit.sparsify(tiny_model("llama"), method="global_magnitude", sparsity=0.5)
    tokens = torch.randint(3, VOCAB, (8, 32), generator=torch.Generator().manual_seed(0))
    q = slimkit.quantize(s, tokens, method=method, w_bits=8, a_bits=8, device="cpu", progress=False)
    assert q.slimkit_info["sparsity"]["target"] == 0.5
    layers = quant_layers(q)
    for name, layer in layers.items():
        assert layer.w_mask is not None and layer.w_mask.float().mean() < 0.75      # every counted layer is masked
        assert torch.all(layer.quantized_weight()[~layer.w_mask] == 0)   # pruned stay zero
        assert torch.equal(~layer.w_mask, weight_oi(s.get_submodule(name)) == 0)
    path = slimkit.save(q, tmp_path / "sq")
    stored = load_file(str(path / "slimkit.safetensors"))
    for name, layer in layers.items():      # the kept weights' codes and a bitmask, not every code
        bits = layer.w_quant.spec.bits
        assert stored[f"{name}.w_packed"].numel() == -(-int(layer.w_mask.sum()) * bits // 8)
        assert stored[f"{name}.w_mask"].numel() == -(-layer.w_mask.numel() // 8)
    back = slimkit.load(path)
    for name, layer in quant_layers(back).items():
        assert torch.equal(layer.w_mask, layers[name].w_mask)
        assert torch.equal(layer.w_int[layer.w_mask], layers[name].w_int[layer.w_mask])       # the kept codes
        assert torch.equal(layer.quantized_weight(), layers[name].quantized_weight())
    with torch.no_grad():
        torch.testing.assert_close(back(tokens[:2]).logits, q(tokens[:2]).logits, rtol=1e-5, atol=1e-5)


def test_fcpts_activation_score_beats_magnitude_where_inputs_have_outlier_channels():
    """With a few input channels 30x larger than the rest, |w| alone prunes the weights that carry them; the
    activation-aware score (|w| * input norm) keeps them, on the same seed and steps."""
    torch.manual_seed(7)
    teacher = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    scale = torch.ones(32)
    scale[:3] = 30.0

    def data(n, seed):
        return torch.randn(n, 32, generator=torch.Generator().manual_seed(seed)) * scale
    calib, held_out = data(512, 0), data(256, 1)
    with torch.no_grad():
        ref = teacher(held_out)

    def error(score):
        s = slimkit.sparsify(teacher, calib, method="fcpts", sparsity=0.8, iters=60, finetune_iters=0,
                             score=score, progress=False, device="cpu")
        assert s.slimkit_info["sparsity"]["fcpts"]["score"] == score
        config = s.slimkit_info["sparsity"]["fcpts"]["config"]     # what ran, for the report and the manifest
        assert config["temperature"] == 1.0 and config["iters"] == 60 and config["score"] == score
        with torch.no_grad():
            return float((s(held_out) - ref).pow(2).mean())
    assert error("activation") < 0.7 * error("magnitude")
    with pytest.raises(SlimkitError, match="score"):
        slimkit.sparsify(teacher, calib, method="fcpts", sparsity=0.5, score="gradient")


def test_fcpts_score_auto_is_activation_for_transformers():
    from tiny_hf import VOCAB, tiny_model
    model = tiny_model("llama").eval()
    tokens = torch.randint(3, VOCAB, (8, 16), generator=torch.Generator().manual_seed(0))
    s = slimkit.sparsify(model, tokens, method="fcpts", sparsity=0.5, iters=3, finetune_iters=0, batch_size=4,
                         progress=False, device="cpu")
    assert s.slimkit_info["sparsity"]["fcpts"]["score"] == "activation"
    teacher, calib, _ = teacher_and_data()
    s = slimkit.sparsify(teacher, calib, method="fcpts", sparsity=0.5, iters=3, finetune_iters=0, progress=False,
                         device="cpu")
    assert s.slimkit_info["sparsity"]["fcpts"]["score"] == "magnitude"


def test_fcpts_block_kd_matches_block_outputs_and_removes_its_hooks():
    torch.manual_seed(8)
    model = small_cnn()
    calib = torch.randn(64, 3, 8, 8)
    s = slimkit.sparsify(model, calib, method="fcpts", sparsity=0.6, iters=10, finetune_iters=3, batch_size=16,
                         block_kd=True, progress=False, device="cpu")
    total = sum(m.weight.numel() for m in prunable_layers(s).values())
    assert sum(int((m.weight == 0).sum()) for m in prunable_layers(s).values()) == round(0.6 * total)
    assert all(not m._forward_hooks for m in s.modules())          # no hook left on the returned model
    from slimkit.methods.fcpts import _block_loss
    t = {"a": torch.ones(2, 3), "b": torch.full((4,), 2.0)}
    assert _block_loss(t, t).item() == 0.0
    assert _block_loss({"a": torch.zeros(2, 3), "b": t["b"]}, t).item() == pytest.approx(0.5)   # mean of 1 and 0


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_activation_score_scales_follow_each_layers_input_dimension(kind):
    """|w| * input norm must scale a Linear's columns and GPT-2 Conv1D's rows (its weight is stored (in, out))."""
    from tiny_hf import VOCAB, tiny_model
    from slimkit.core.wrap import is_conv1d
    from slimkit.methods.fcpts import _channel_scales
    from slimkit.methods.owl import input_norms
    model = tiny_model(kind).eval()
    tokens = torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    layers = prunable_layers(model)
    scales = _channel_scales(model, layers, tokens, torch.device("cpu"))
    norms = input_norms(model, layers, tokens, torch.device("cpu"))
    assert set(scales) == set(layers)
    for name, layer in layers.items():
        s, w = scales[name], layer.weight
        assert s.shape == ((w.shape[0], 1) if is_conv1d(layer) else (1, w.shape[1]))
        torch.testing.assert_close(s.flatten(), norms[name] / norms[name].mean())
        assert (w.abs() * s).shape == w.shape


def _conv1d_3d_net():
    torch.manual_seed(2)
    return nn.Sequential(nn.Conv1d(4, 16, 3, padding=1), nn.BatchNorm1d(16), nn.ReLU(),
                         nn.Unflatten(1, (1, 1, 16)), nn.Conv3d(1, 2, (1, 3, 3), padding=(0, 1, 1)), nn.ReLU(),
                         nn.Flatten(), nn.Linear(2 * 16 * 32, 5))


def test_conv1d_and_conv3d_layers_are_counted_pruned_and_saved(tmp_path):
    """1-d and 3-d convolutions count like Conv2d: FCPTS and N:M prune them, the global sparsity is exact, and a
    saved artifact reloads bit for bit."""
    net = _conv1d_3d_net()
    assert list(prunable_layers(net)) == ["0", "4", "7"]
    x = torch.randn(64, 4, 32, generator=torch.Generator().manual_seed(0))
    s = slimkit.sparsify(net, x, method="fcpts", sparsity=0.6, iters=20, finetune_iters=2, progress=False)
    layers = prunable_layers(s)
    total = sum(m.weight.numel() for m in layers.values())
    assert sum(int((m.weight == 0).sum()) for m in layers.values()) == round(0.6 * total)
    assert set(s.slimkit_info["sparsity"]["layers"]) == {"0", "4", "7"}
    uni = prunable_layers(slimkit.sparsify(net, None, method="uniform", sparsity=0.6))
    for k in ("0", "4"):          # every counted layer at the same rate: the convolutions really are pruned
        assert abs(int((uni[k].weight == 0).sum()) - 0.6 * uni[k].weight.numel()) <= 1
    nm = slimkit.sparsify(net, None, nm="2:4", exclude=["4"])     # Conv3d's 2*3*3 = 18 inputs are not a multiple of 4
    assert is_nm(nm_groups(prunable_layers(nm)["0"]) != 0, 2, 4)      # along the input channels, per tap
    slimkit.save(s, tmp_path / "a")
    back = slimkit.load(tmp_path / "a", model=_conv1d_3d_net())
    for k, v in s.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k


def test_fcpts_distils_dict_outputs_and_refuses_what_it_cannot_read():
    class DictOut(nn.Module):
        def __init__(self, key):
            super().__init__()
            self.a, self.b, self.key = nn.Linear(8, 32), nn.Linear(32, 4), key

        def forward(self, x):
            return {self.key: self.b(torch.relu(self.a(x)))}

    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    for key in ("logits", "last_hidden_state"):
        s = slimkit.sparsify(DictOut(key), x, method="fcpts", sparsity=0.5, iters=5, finetune_iters=1, progress=False)
        assert s.slimkit_info["sparsity"]["achieved"] == pytest.approx(0.5, abs=1e-3)
    with pytest.raises(SlimkitError, match="cannot distil.*'scores'"):
        slimkit.sparsify(DictOut("scores"), x, method="fcpts", sparsity=0.5, iters=5, progress=False)


def test_fcpts_sparsegpt_reconstruction_prunes_at_the_learned_rates():
    """reconstruct='sparsegpt': each layer holds exactly the zeros FCPTS's learned rates give it, the surviving
    weights are SparseGPT-updated (not the dense ones), and the global sparsity is exact; CNNs and unknown
    values are refused before any work."""
    teacher, calib, _ = teacher_and_data()
    s = slimkit.sparsify(teacher, calib, method="fcpts", sparsity=0.7, iters=40, finetune_iters=0, progress=False,
                         reconstruct="sparsegpt", device="cpu")
    info = s.slimkit_info["sparsity"]
    layers = prunable_layers(s)
    total = sum(m.weight.numel() for m in layers.values())
    assert sum(int((m.weight == 0).sum()) for m in layers.values()) == round(0.7 * total)
    learned = info["fcpts"]["learned_rates"]
    sizes = {k: m.weight.numel() for k, m in layers.items()}
    from slimkit.core.sparsity import exact_counts
    counts = exact_counts(learned, sizes, 0.7)
    dense = prunable_layers(teacher)
    for k, m in layers.items():
        assert int((m.weight == 0).sum()) == counts[k]
        kept = m.weight != 0
        assert not torch.equal(m.weight[kept], dense[k].weight[kept])      # OBS moved the survivors
    with pytest.raises(SlimkitError, match="reconstruct"):
        slimkit.sparsify(teacher, calib, method="fcpts", sparsity=0.5, reconstruct="adaround")
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    with pytest.raises(SlimkitError, match="convolution"):
        slimkit.sparsify(cnn, torch.randn(8, 3, 8, 8), method="fcpts", sparsity=0.5, reconstruct="sparsegpt")


def test_input_scored_methods_refuse_layers_whose_forward_never_runs():
    """nn.MultiheadAttention reads out_proj.weight without calling out_proj: Wanda / SparseGPT cannot see its
    inputs, so they say which layer and how to leave it out (and then run); weight-only methods prune it; a 1-d
    convolution is refused as a 2-d one is."""
    torch.manual_seed(0)

    from tiny_torch import TorchEncoder

    model, x = TorchEncoder(layers=1).eval(), torch.randn(16, 10, 8)
    for method in ("wanda", "sparsegpt"):
        with pytest.raises(SlimkitError, match=r"out_proj never ran its forward.*exclude"):
            slimkit.sparsify(model, x, method=method, sparsity=0.5)
        s = slimkit.sparsify(model, x, method=method, sparsity=0.5, exclude=["*out_proj"])
        assert "enc.layers.0.self_attn.out_proj" not in s.slimkit_info["sparsity"]["layers"]
    s = slimkit.sparsify(model, None, method="uniform", sparsity=0.5)
    assert float((s.enc.layers[0].self_attn.out_proj.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    with pytest.raises(SlimkitError, match="convolution"):
        slimkit.sparsify(_conv1d_3d_net(), torch.randn(8, 4, 32), method="wanda", sparsity=0.5)


def test_a_dict_output_model_sparsifies_quantizes_and_evaluates():
    """A model returning {"logits": ...} goes through FCPTS, quantization and evaluation like a plain one."""
    from slimkit.eval import evaluate, predict

    class DictNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 32), nn.Linear(32, 4)

        def forward(self, x):
            return {"logits": self.b(torch.relu(self.a(x)))}

    torch.manual_seed(0)
    model, x = DictNet().eval(), torch.randn(64, 8)
    with torch.no_grad():
        assert torch.equal(predict(model, x), model(x)["logits"])
    s = slimkit.sparsify(model, x, method="fcpts", sparsity=0.5, iters=5, finetune_iters=1, progress=False)
    q = slimkit.quantize(s, x, method="rtn", w_bits=8, a_bits=8, progress=False)
    metrics = evaluate(q, x, reference=model)
    assert metrics["agreement"] > 0.5 and metrics["kl"] >= 0


def test_calibration_data_is_checked_before_any_work():
    """Inputs the model cannot take, and token ids that are not (N, L) integers inside the vocabulary, are
    refused up front with the reason; a dict of input_ids (no padding) is taken like the ids alone."""
    from tiny_hf import VOCAB, tiny_model
    with pytest.raises(SlimkitError, match=r"does not accept calibration inputs of shape \(5, 12, 12\)"):
        slimkit.sparsify(small_cnn(), torch.randn(8, 5, 12, 12), method="fcpts", sparsity=0.5, iters=2,
                         finetune_iters=1, progress=False)
    llama = tiny_model("llama")
    ids = torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    for bad, why in ((ids.float(), "integer tensor"), (ids[None], "integer tensor"), (ids[0], "integer tensor"),
                     (ids + VOCAB, "outside the model's vocabulary"), (ids[:0], "non-empty")):
        with pytest.raises(SlimkitError, match=why):
            slimkit.sparsify(llama, bad, method="wanda", sparsity=0.5)
        with pytest.raises(SlimkitError, match=why):
            slimkit.quantize(llama, bad, method="minmax", w_bits=8, a_bits=8, progress=False, device="cpu")
    a = slimkit.sparsify(llama, ids, method="wanda", sparsity=0.5)
    b = slimkit.sparsify(llama, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, method="wanda",
                         sparsity=0.5)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    padded = torch.ones_like(ids)
    padded[0, :3] = 0
    with pytest.raises(SlimkitError, match="unpadded"):
        slimkit.sparsify(llama, {"input_ids": ids, "attention_mask": padded}, method="wanda", sparsity=0.5)
    bert = tiny_model("bert")      # segment ids change the activations, and the methods feed input_ids alone
    plain = slimkit.sparsify(bert, ids, method="wanda", sparsity=0.5)
    zeros = slimkit.sparsify(bert, {"input_ids": ids, "token_type_ids": torch.zeros_like(ids)}, method="wanda",
                             sparsity=0.5)
    assert all(torch.equal(p, q) for p, q in zip(plain.parameters(), zeros.parameters()))
    with pytest.raises(SlimkitError, match="token_type_ids would be ignored"):
        slimkit.sparsify(bert, {"input_ids": ids, "token_type_ids": torch.ones_like(ids)}, method="wanda",
                         sparsity=0.5)


def test_model_size_counts_what_the_artifact_stores(tmp_path):
    """A sparse layer's size is its kept values plus a 1-bit mask, a sparse quantized one its kept codes plus the
    mask: the reported size follows the artifact's weights (the file adds only its safetensors header)."""
    from slimkit.eval import model_size_bytes
    m, x = small_cnn(), torch.randn(32, 3, 8, 8)
    s = slimkit.sparsify(m, method="uniform", sparsity=0.8)
    q = slimkit.quantize(s, x, method="rtn", w_bits=4, a_bits=8, progress=False)
    dense, sparse, both = model_size_bytes(m), model_size_bytes(s), model_size_bytes(q)
    assert sparse < dense / 3 and both < sparse
    for model, size in ((s, sparse), (q, both)):
        path = slimkit.save(model, tmp_path / str(size))
        on_disk = (path / "model.safetensors").stat().st_size
        assert size < on_disk < size + 4096


def test_fcpts_on_a_bf16_transformer():
    from tiny_hf import VOCAB, tiny_model
    model = tiny_model("llama").to(torch.bfloat16).eval()
    tokens = torch.randint(3, VOCAB, (8, 16), generator=torch.Generator().manual_seed(0))
    s = slimkit.sparsify(model, tokens, method="fcpts", sparsity=0.5, iters=4, finetune_iters=2, batch_size=4,
                         progress=False, device="cpu")
    layers = prunable_layers(s)
    assert all(m.weight.dtype == torch.bfloat16 for m in layers.values())
    assert s.slimkit_info["sparsity"]["achieved"] == pytest.approx(0.5, abs=1e-4)


def test_a_sparse_hugging_face_artifact_carries_its_config(tmp_path):
    """The artifact of a sparsified transformers model holds its config, so it loads where the model's source
    folder is gone, to the same outputs."""
    from tiny_hf import VOCAB, tiny_model
    model = tiny_model("gpt2").eval()
    model._slimkit_spec = {"hf": str(tmp_path / "was_here")}        # as load_hf records a model folder
    s = slimkit.sparsify(model, method="uniform", sparsity=0.5)
    slimkit.save(s, tmp_path / "s")
    assert (tmp_path / "s" / "hf_config" / "config.json").exists()
    again = slimkit.load(tmp_path / "s")
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, s(ids).logits)
    other = tiny_model("gpt2")                 # the source folder now holds another model: the artifact's own config
    other.config.activation_function = "relu"
    other.save_pretrained(tmp_path / "was_here")
    with torch.no_grad():
        assert torch.equal(slimkit.load(tmp_path / "s")(ids).logits, s(ids).logits)
    import json
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    layer = next(iter(manifest["sparse_weights"]))
    manifest["sparse_weights"][layer]["shape"][0] *= 2
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(slimkit.SlimkitError, match="corrupt or does not match"):
        slimkit.load(tmp_path / "s")


def test_a_sparse_hugging_face_model_the_user_built_reloads_from_its_config(tmp_path):
    """A transformers model built by the user (not through load_hf) carries its config and class into the
    artifact too: slimkit.load rebuilds it without model=, to the same outputs, as the same class."""
    from tiny_hf import VOCAB, tiny_model
    import transformers as T
    base = T.GPT2Model(tiny_model("gpt2").config).eval()       # a class load_hf would not pick (no LM head)
    s = slimkit.sparsify(base, method="uniform", sparsity=0.5)
    slimkit.save(s, tmp_path / "s")
    again = slimkit.load(tmp_path / "s")
    assert type(again) is T.GPT2Model
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(again(ids).last_hidden_state, s(ids).last_hidden_state)


class _Aliased(nn.Module):
    """A linear held under two names (self.b = self.a), called twice."""

    def __init__(self):
        super().__init__()
        self.inp, self.a, self.out = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 8)
        self.b = self.a

    def forward(self, x):
        return self.out(torch.relu(self.b(torch.relu(self.a(torch.relu(self.inp(x)))))))


@pytest.mark.parametrize("case", ["frozen", "aliased", "float64"])
def test_fcpts_on_frozen_aliased_and_float64_models(case):
    """A model frozen for inference (requires_grad_(False)) still learns (and comes back frozen); a layer held
    under two names is masked at both calls and keeps its parameter (no stale graph across steps); a float64
    model calibrates in float64. Each reaches the target exactly and moves from the ERK start it began at."""
    teacher, calib, _ = teacher_and_data()
    model = _Aliased() if case == "aliased" else teacher
    if case == "frozen":
        model.requires_grad_(False)
    if case == "float64":
        model, calib = model.double(), calib.double()
    s = slimkit.sparsify(model, calib, method="fcpts", sparsity=0.7, iters=30, finetune_iters=5, batch_size=32,
                         progress=False, device="cpu")
    layers = prunable_layers(s)
    total = sum(m.weight.numel() for m in layers.values())
    assert sum(int((m.weight == 0).sum()) for m in layers.values()) == round(0.7 * total)
    assert all(isinstance(m.weight, nn.Parameter) for m in layers.values())
    info = s.slimkit_info["sparsity"]["fcpts"]
    assert info["learned_rates"] != info["init_rates"]
    assert all(p.requires_grad == (case != "frozen") for p in s.parameters())
    if case == "aliased":
        assert s.b is s.a and "b" not in layers
    if case == "float64":
        assert all(p.dtype == torch.float64 for p in s.parameters())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_sparse_half_precision_transformer_reloads_in_its_dtype_bit_for_bit(dtype, tmp_path):
    from tiny_hf import VOCAB, tiny_model
    s = slimkit.sparsify(tiny_model("llama").to(dtype), method="uniform", sparsity=0.5)
    slimkit.save(s, tmp_path / "s")
    back = slimkit.load(tmp_path / "s")
    assert {p.dtype for p in back.parameters()} == {dtype}
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, s(ids).logits)


def test_fcpts_block_kd_on_a_transformer_matches_its_blocks_and_divergence_is_an_error():
    """block_kd on a transformer matches its decoder blocks (not every linear); a learning rate that sends the
    loss to inf stops with a clear error instead of returning NaN weights."""
    from slimkit.methods.fcpts import _block_names
    from tiny_hf import VOCAB, tiny_model
    model = tiny_model("llama")
    ids = torch.randint(3, VOCAB, (8, 16), generator=torch.Generator().manual_seed(1))
    assert _block_names(model, ids[:2]) == ["model.layers.0", "model.layers.1"]
    s = slimkit.sparsify(model, ids, method="fcpts", sparsity=0.5, iters=10, finetune_iters=3, batch_size=4,
                         block_kd=True, progress=False, device="cpu")
    assert all(torch.isfinite(p).all() for p in s.parameters())
    with pytest.raises(SlimkitError, match=r"FCPTS diverged at step \d+.*lr=1e\+06"):
        slimkit.sparsify(model, ids, method="fcpts", sparsity=0.5, iters=10, finetune_iters=3, batch_size=4,
                         lr=1e6, progress=False, device="cpu")


def test_tied_and_fully_pruned_layers_are_named():
    """A layer whose weight another module shares is left dense and out of the count (pruning one would prune the
    other): a warning and the report's 'tied' name it (they were left out silently); a layer pruned to its last
    weight gets a warning (the network is cut there)."""
    torch.manual_seed(0)
    auto = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    auto[2].weight = auto[0].weight
    with pytest.warns(UserWarning, match="0, 2 share its weight with another module"):
        s = slimkit.sparsify(auto, method="global_magnitude", sparsity=0.5)
    assert s.slimkit_info["sparsity"]["tied"] == ["0", "2"]
    assert s.slimkit_info["sparsity"]["counted_params"] == 128
    wide = nn.Sequential(nn.Linear(4, 512), nn.ReLU(), nn.Linear(512, 2))
    with torch.no_grad():
        wide[2].weight.mul_(1e-3)                         # global magnitude takes the small layer first
    with pytest.warns(UserWarning, match="2: every weight pruned"):
        slimkit.sparsify(wide, method="global_magnitude", sparsity=0.4)


def test_sparsify_arguments_are_checked():
    """N:M of whole numbers only, an explicit sparsity that N:M contradicts, a seed that is no integer, infinite
    fcpts settings and a non-positive seq_len are named errors (they were truncated, ignored, or raw errors); a
    layer with no weights (Linear(0, n)) is not counted (it divided by zero)."""
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(32, 16)
    with pytest.raises(SlimkitError, match="whole numbers"):
        slimkit.sparsify(model, nm=(2.5, 4))
    with pytest.raises(SlimkitError, match="sets both the method and the sparsity .75%."):
        slimkit.sparsify(model, nm="1:4", sparsity=0.5)
    assert slimkit.sparsify(model, nm="1:4", sparsity=0.75).slimkit_info["sparsity"]["achieved"] == 0.75
    with pytest.raises(SlimkitError, match="seed must be an integer"):
        slimkit.sparsify(model, x, seed=1.5)
    for name in ("temperature", "control_weight"):
        with pytest.raises(SlimkitError, match=f"{name} must be a number above 0"):
            slimkit.sparsify(model, x, **{name: float("inf")})
    with pytest.raises(SlimkitError, match="seq_len must be a positive integer"):
        slimkit.sparsify(model, x, method="wanda", seq_len=0)
    empty = nn.ModuleDict({"a": nn.Linear(0, 5), "b": nn.Linear(4, 4)})
    s = slimkit.sparsify(empty, method="uniform", sparsity=0.5)
    assert list(s.slimkit_info["sparsity"]["layers"]) == ["b"]


def test_fcpts_keeps_the_parameters_in_their_order():
    """FCPTS swaps masked weights in during its forward; the model's parameters keep their order (they came back
    reordered, so a copy by position gave a different model)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    order = [n for n, _ in model.named_parameters()]
    s = slimkit.sparsify(model, torch.randn(64, 16), sparsity=0.5, iters=5, finetune_iters=2, progress=False)
    assert [n for n, _ in s.named_parameters()] == order
    assert "weight" not in s[0].__dict__


def test_owl_outlier_ratio_is_taken_over_each_block_as_a_whole():
    """OWL's outlier ratio of a block counts the scores above M times the mean of all the block's scores taken
    together (the public code concatenates the block's Wanda metrics before check_outlier_mean), not each layer's
    own mean; the rates follow as min-max normalised, centred ratios around the target."""
    from slimkit.methods.owl import owl_rates, wanda_scores
    torch.manual_seed(4)
    layers = {f"b{i}.{j}": nn.Linear(16, 8 * (j + 1)) for i in range(3) for j in range(2)}
    with torch.no_grad():
        layers["b1.1"].weight[:, :2] *= 30                # one layer of one block with outlier weights
        layers["b2.0"].weight.mul_(5)                     # a block whose layers differ in scale
    norms = {k: torch.rand(16) + 0.5 for k in layers}
    rates = owl_rates(layers, norms, ["b0", "b1", "b2"], target=0.6, m=5.0, lam=0.08)
    ratio = []
    for b in ("b0", "b1", "b2"):
        s = torch.cat([wanda_scores(layers[k], norms[k]).flatten() for k in layers if k.startswith(b + ".")])
        ratio.append(float((s > 5.0 * s.mean()).sum()) / s.numel())
    ratio = torch.tensor(ratio, dtype=torch.float64)
    norm = (ratio - ratio.min()) / (ratio.max() - ratio.min()) * 0.16
    want = 1 - ((1 - 0.6) + (norm - norm.mean()))
    for i, b in enumerate(("b0", "b1", "b2")):
        assert rates[f"{b}.0"] == rates[f"{b}.1"] == pytest.approx(float(want[i]), abs=1e-12)
