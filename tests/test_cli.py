"""The CLI: bad input gets one clear line and exit code 2, and never leaves an output directory behind."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent

FACTORY = textwrap.dedent("""
    import torch
    from torch import nn

    def tiny():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                             nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(4, 3))

    def no_layers():
        return nn.Sequential(nn.ReLU(), nn.Flatten())

    def needs_width(width):
        return nn.Linear(width, width)

    def broken():
        raise RuntimeError("boom")

    def calls_badly():
        return nn.Linear(4)        # a TypeError inside a factory that takes no arguments
""")


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slimkit.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=300)


@pytest.fixture
def work(tmp_path: Path) -> Path:
    (tmp_path / "nets.py").write_text(FACTORY)
    rng = np.random.default_rng(0)
    np.save(tmp_path / "calib.npy", rng.standard_normal((16, 1, 8, 8)).astype(np.float32))
    np.save(tmp_path / "wrong.npy", rng.standard_normal((16, 3, 8, 8)).astype(np.float32))
    np.save(tmp_path / "empty.npy", np.zeros((0, 1, 8, 8), np.float32))
    np.savez(tmp_path / "labelled.npz", x=rng.standard_normal((16, 1, 8, 8)).astype(np.float32),
             y=rng.integers(0, 3, 16))
    np.savez(tmp_path / "onehot.npz", x=rng.standard_normal((16, 1, 8, 8)).astype(np.float32),
             y=np.eye(3)[rng.integers(0, 3, 16)])
    np.save(tmp_path / "scalar.npy", np.float32(3))
    return tmp_path


def expect_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [l for l in result.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.stderr
    for w in words:
        assert w in lines[0], lines[0]


FAST = ["--preset", "fast", "--quiet"]


@pytest.mark.parametrize("args,words", [
    (["--method", "magic"], ["unknown method", "qdrop"]),
    (["--w-bits", "9"], ["w_bits", "2 to 8"]),
    (["--a-bits", "1"], ["a_bits", "2 to 8"]),
    (["--calib", "empty.npy"], ["empty"]),
    (["--calib", "wrong.npy"], ["does not accept", "(3, 8, 8)"]),
    (["--calib", "missing.npy"], ["missing.npy"]),
])
def test_bad_quantize_input_exits_2_and_writes_nothing(work, args, words):
    base = {"--calib": "calib.npy"}
    argv = ["quantize", "nets.py:tiny", "--out", "out", *FAST]
    for k, v in base.items():
        if k not in args:
            argv += [k, v]
    expect_error(run(*argv, *args, cwd=work), *words)
    assert not (work / "out").exists()
    assert not [p for p in work.iterdir() if p.name.startswith(".out")]


def test_model_without_quantizable_layers(work):
    expect_error(run("quantize", "nets.py:no_layers", "--calib", "calib.npy", "--out", "out", *FAST, cwd=work),
                 "no quantizable layers")
    assert not (work / "out").exists()


def test_existing_output_needs_overwrite(work):
    (work / "out").mkdir()
    (work / "out" / "keep.txt").write_text("mine")
    expect_error(run("quantize", "nets.py:tiny", "--calib", "calib.npy", "--out", "out", *FAST, cwd=work),
                 "already exists", "--overwrite")
    assert (work / "out" / "keep.txt").read_text() == "mine"


def test_quantize_save_eval_and_bad_load(work):
    ok = run("quantize", "nets.py:tiny", "--method", "qdrop", "--w-bits", "4", "--a-bits", "4", "--calib", "calib.npy",
             "--eval-data", "labelled.npz", "--out", "out", *FAST, cwd=work)
    assert ok.returncode == 0, ok.stderr
    assert "top-1" in ok.stdout and (work / "out" / "manifest.json").exists()
    ev = run("eval", "out", "--data", "labelled.npz", "--quiet", cwd=work)
    assert ev.returncode == 0, ev.stderr
    assert "agreement" in ev.stdout  # the artifact knows its factory, so FP fidelity is reported
    # quantize reports no inference time for a fake-quantized model (float kernels on dequantized weights), and
    # neither does eval of its artifact
    assert "inference time" not in ok.stdout and "inference time" not in ev.stdout
    # corrupt and foreign directories
    (work / "foreign").mkdir()
    (work / "foreign" / "a.txt").write_text("x")
    expect_error(run("eval", "foreign", "--data", "labelled.npz", cwd=work), "not a slimkit artifact")
    (work / "out" / "manifest.json").write_text("{not json")
    expect_error(run("eval", "out", "--data", "labelled.npz", cwd=work), "corrupt")


def test_help_lists_methods(work):
    r = run("quantize", "--help", cwd=work)
    assert r.returncode == 0
    for m in ("rtn", "adaround", "brecq", "qdrop", "--w-bits", "--a-bits", "--recipe", "--calib", "--out"):
        assert m in r.stdout


def test_recipe_file_sets_fields(work):
    (work / "r.yaml").write_text("method: rtn\nw_bits: 3\na_bits: 5\n")
    ok = run("quantize", "nets.py:tiny", "--recipe", "r.yaml", "--calib", "calib.npy", "--out", "out", "--quiet", cwd=work)
    assert ok.returncode == 0, ok.stderr
    import json

    manifest = json.loads((work / "out" / "manifest.json").read_text())
    assert manifest["method"] == "rtn" and manifest["config"]["w_bits"] == 3 and manifest["config"]["a_bits"] == 5
    ok = run("quantize", "nets.py:tiny", "--recipe", "r.yaml", "--a-bits", "0", "--calib", "calib.npy", "--out", "wo",
             "--quiet", cwd=work)                      # --a-bits 0: weight-only, over the recipe's 5
    assert ok.returncode == 0, ok.stderr
    assert json.loads((work / "wo" / "manifest.json").read_text())["config"]["a_bits"] is None
    assert "rtn W3 (weights only)" in ok.stdout and "A16" not in ok.stdout     # the activations stay float32
    (work / "bad.yaml").write_text("methd: rtn\n")
    expect_error(run("quantize", "nets.py:tiny", "--recipe", "bad.yaml", "--calib", "calib.npy", "--out", "o2", cwd=work),
                 "unknown option", "methd")


def test_options_that_would_be_ignored_are_refused(work):
    """Transformer options on a CNN, --calib for a data-free sparsity method, a recipe that is no text or holds
    an infinite weight, and an output that is a file for the tokenizer: one-line errors, not silent no-ops."""
    expect_error(run("quantize", "nets.py:tiny", "--method", "rtn", "--seq-len", "64", "--attn-quant", "--calib",
                     "calib.npy", "--out", "o1", *FAST, cwd=work), "--seq-len, --attn-quant apply to transformers")
    expect_error(run("quantize", "nets.py:tiny", "--method", "rtn", "--iters", "5", "--drop-prob", "0.3", "--calib",
                     "calib.npy", "--out", "o1", *FAST, cwd=work), "rtn on a CNN does not read --drop-prob, --iters")
    expect_error(run("sparsify", "nets.py:tiny", "--method", "uniform", "--sparsity", "0.5", "--calib", "nope.npy",
                     "--out", "o2", "--quiet", cwd=work), "--calib is not used by uniform")
    (work / "binary.yaml").write_bytes(b"\xff\xfe\x00")
    expect_error(run("quantize", "nets.py:tiny", "--recipe", "binary.yaml", "--calib", "calib.npy", "--out", "o3",
                     cwd=work), "not a text file")
    (work / "inf.yaml").write_text("method: qdrop\niters: 5\nround_weight: .inf\n")
    expect_error(run("quantize", "nets.py:tiny", "--recipe", "inf.yaml", "--calib", "calib.npy", "--out", "o4",
                     cwd=work), "round_weight must be a finite number")
    (work / "corpus").mkdir()
    (work / "corpus" / "a.txt").write_text("some text to tokenise\n" * 50)
    (work / "taken").write_text("a file")
    expect_error(run("tokenize", "corpus", "--out", "taken", cwd=work), "is a file")
    assert not any((work / n).exists() for n in ("o1", "o2", "o3", "o4"))

def test_outputs_and_data_are_checked_before_the_work(work):
    """--overwrite replaces earlier artifacts only (a folder of other files survives); an --out that cannot be
    written, evaluation data that does not fit, factories that cannot build and recipes with wrong types all
    fail at once, with one line, leaving nothing behind."""
    (work / "mine").mkdir()
    (work / "mine" / "notes.txt").write_text("keep me")
    expect_error(run("quantize", "nets.py:tiny", "--calib", "calib.npy", "--out", "mine", "--overwrite", *FAST,
                     cwd=work), "not a slimkit artifact")
    assert (work / "mine" / "notes.txt").read_text() == "keep me"
    (work / "afile").write_text("x")
    expect_error(run("quantize", "nets.py:tiny", "--calib", "calib.npy", "--out", "afile/q", *FAST, cwd=work),
                 "is a file")
    expect_error(run("quantize", "nets.py:tiny", "--calib", "calib.npy", "--out", ".", "--overwrite", *FAST,
                     cwd=work), "current folder")
    expect_error(run("quantize", "nets.py:tiny", "--calib", "calib.npy", "--eval-data", "wrong.npy", "--out", "q",
                     *FAST, cwd=work), "evaluation inputs", "(3, 8, 8)")
    expect_error(run("sparsify", "nets.py:tiny", "--method", "uniform", "--sparsity", "0.5", "--eval-data",
                     "onehot.npz", "--out", "s", "--quiet", cwd=work), "one class index per sample")
    expect_error(run("quantize", "nets.py:needs_width", "--calib", "calib.npy", "--out", "q", *FAST, cwd=work),
                 "without arguments")
    expect_error(run("quantize", "nets.py:broken", "--calib", "calib.npy", "--out", "q", *FAST, cwd=work),
                 "RuntimeError: boom")
    expect_error(run("quantize", "nets.py:calls_badly", "--calib", "calib.npy", "--out", "q", *FAST, cwd=work),
                 "failed while building the model: TypeError")
    expect_error(run("quantize", "nets.py:tiny", "--calib", "scalar.npy", "--out", "q", *FAST, cwd=work),
                 "single number")
    (work / "r.yaml").write_text("method: rtn\nfold_bn: 'no'\n")
    expect_error(run("quantize", "nets.py:tiny", "--recipe", "r.yaml", "--calib", "calib.npy", "--out", "q", *FAST,
                     cwd=work), "fold_bn must be true/false")
    assert not any((work / n).exists() for n in ("q", "s", "afile/q"))
    ok = run("quantize", "nets.py:tiny", "--method", "rtn", "--calib", "calib.npy", "--out", "q", *FAST, cwd=work)
    assert ok.returncode == 0, ok.stderr
    ok = run("quantize", "nets.py:tiny", "--method", "rtn", "--calib", "calib.npy", "--out", "q", "--overwrite",
             *FAST, cwd=work)                                  # an earlier artifact: replaced
    assert ok.returncode == 0, ok.stderr


@pytest.mark.parametrize("args,words", [
    (["train-lm", "--steps", "abc", "--out", "x"], ["Invalid value for '--steps'"]),
    (["train-lm", "--corpus", "."], ["Missing option '--out'"]),
    (["quantize", "--no-such-option"], ["No such option"]),
    (["nosuchcmd"], ["No such command"]),
])
def test_usage_errors_exit_2_without_traceback(args, words, tmp_path):
    """typer bundles its own click: its usage errors are shown as click shows them (Usage / Error lines), exit 2."""
    r = run(*args, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert all(w in r.stderr for w in words), r.stderr


def test_ctrl_c_exits_130(monkeypatch, tmp_path):
    """typer returns Ctrl-C as exit code 130 instead of raising it: main must exit with it, not with 0."""
    import slimkit.structured.data as data
    from slimkit import cli

    def interrupted(*args, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(data, "prepare_corpus", interrupted)
    monkeypatch.setattr(sys, "argv", ["slimkit", "tokenize", str(tmp_path), "--out", str(tmp_path / "t")])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 130


def test_eval_of_a_missing_folder_says_so(tmp_path):
    expect_error(run("eval", "runs/none", cwd=tmp_path), "runs/none does not exist")
    (tmp_path / "model.pt").write_bytes(b"x")
    expect_error(run("eval", "./model.pt", cwd=tmp_path), "is no slimkit artifact or model folder")


def test_eval_weights_go_to_the_artifacts_reference(work):
    """With a saved artifact as MODEL, --weights loads the float reference (a factory's trained weights), so the
    fidelity is measured against the model that was quantized, not a fresh initialisation."""
    import re

    import torch
    from safetensors.torch import save_file
    scope = {}
    exec(FACTORY, scope)
    net = scope["tiny"]()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))          # "trained": far from the factory's own initialisation
    save_file(net.state_dict(), str(work / "trained.safetensors"))
    ok = run("quantize", "nets.py:tiny", "--weights", "trained.safetensors", "--method", "rtn", "--w-bits", "8",
             "--a-bits", "8", "--calib", "calib.npy", "--out", "out", *FAST, cwd=work)
    assert ok.returncode == 0, ok.stderr

    def agreement(*extra):
        r = run("eval", "out", "--data", "labelled.npz", "--reference", "nets.py:tiny", "--quiet", *extra, cwd=work)
        assert r.returncode == 0, r.stderr
        return float(re.search(r"agreement with FP\D+([\d.]+)%", r.stdout).group(1))
    assert agreement("--weights", "trained.safetensors") > 90 > agreement()


def _quantize_then_eval_elsewhere(work, factory, *extra):
    """Quantize `factory` in `work` (W8A8 rtn), then eval the artifact from another folder; both must succeed."""
    ok = run("quantize", factory, *extra, "--method", "rtn", "--w-bits", "8", "--a-bits", "8", "--calib",
             "calib.npy", "--out", "out", *FAST, cwd=work)
    assert ok.returncode == 0, ok.stderr
    elsewhere = work / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    ev = run("eval", str(work / "out"), "--data", str(work / "labelled.npz"), "--quiet", cwd=elsewhere)
    assert ev.returncode == 0, ev.stderr
    return ev


def test_artifact_of_a_factory_model_evaluates_from_another_folder(work):
    """The artifact holds every weight: it rebuilds from any folder, and after its float weights are deleted,
    eval still reports accuracy and says why agreement with FP is missing."""
    from safetensors.torch import save_file
    scope = {}
    exec(FACTORY, scope)
    save_file(scope["tiny"]().state_dict(), str(work / "trained.safetensors"))
    ev = _quantize_then_eval_elsewhere(work, "nets.py:tiny", "--weights", "trained.safetensors")
    assert "agreement" in ev.stdout and "top-1" in ev.stdout
    (work / "trained.safetensors").unlink()
    ev = run("eval", str(work / "out"), "--data", str(work / "labelled.npz"), "--quiet", cwd=work / "elsewhere")
    assert ev.returncode == 0, ev.stderr
    assert "top-1" in ev.stdout and "agreement" not in ev.stdout
    said = "".join(ev.stderr.split())          # rich wraps long paths
    assert "trained.safetensors" in said and "aregone" in said and "--weights" in said


def test_group_size_and_skip_from_the_command_line(work):
    """--w-group-size and --skip reach the recipe fields their error messages name."""
    import json
    bad = run("quantize", "nets.py:tiny", "--method", "rtn", "--w-bits", "4", "--a-bits", "8", "--w-granularity",
              "group", "--w-group-size", "7", "--calib", "calib.npy", "--out", "out", *FAST, cwd=work)
    expect_error(bad, "w_group_size 7 does not divide", "--w-group-size", "--skip")
    ok = run("quantize", "nets.py:tiny", "--method", "rtn", "--w-bits", "4", "--a-bits", "8", "--w-granularity",
             "group", "--w-group-size", "4", "--skip", "0", "--calib", "calib.npy", "--out", "out", *FAST, cwd=work)
    assert ok.returncode == 0, ok.stderr
    manifest = json.loads((work / "out" / "manifest.json").read_text())
    assert manifest["config"]["w_group_size"] == 4 and manifest["config"]["skip"] == ["0"]
    assert "0" not in manifest["layers"] and "3" in manifest["layers"]      # conv 0 has 9 weights a channel
    expect_error(run("quantize", "nets.py:tiny", "--skip", "nope", "--calib", "calib.npy", "--out", "o2", *FAST,
                     cwd=work), "skip names 'nope'", "module path")


def test_artifact_of_a_package_factory_evaluates_from_another_folder(work):
    """A 'package.module:function' factory importable from the folder quantize ran in is found again from any
    folder: the artifact records where it was imported from."""
    (work / "mypkg").mkdir()
    (work / "mypkg" / "__init__.py").write_text("")
    (work / "mypkg" / "nets.py").write_text(FACTORY)
    ev = _quantize_then_eval_elsewhere(work, "mypkg.nets:tiny")
    assert "agreement" in ev.stdout and "top-1" in ev.stdout


def test_a_hugging_face_image_model_folder_quantizes_and_evaluates(tmp_path):
    """A saved transformers ResNet (no tokenizer) loads as an image model, quantizes on the CNN path, and its
    artifact evaluates against the float model rebuilt from the folder."""
    import torch
    import transformers as T

    torch.manual_seed(0)
    cfg = T.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                         num_labels=10)
    T.ResNetForImageClassification(cfg).save_pretrained(tmp_path / "resnet")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype("float32"))
    r = run("quantize", "resnet", "--method", "rtn", "--w-bits", "8", "--a-bits", "8", "--calib", "x.npy",
            "--out", "q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run("eval", "q", "--data", "x.npy", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "agreement with FP" in r.stdout
    (tmp_path / "resnet").rename(tmp_path / "moved")    # the artifact carries the config: it still loads
    r = run("eval", "q", "--data", "x.npy", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "is gone" in r.stdout + r.stderr and "size" in r.stdout


def test_python_m_slimkit_is_the_slimkit_command():
    """`python -m slimkit` runs the same command line as the `slimkit` script (a bad command: exit code 2)."""
    ok = subprocess.run([sys.executable, "-m", "slimkit", "--help"], capture_output=True, text=True, cwd=REPO)
    assert ok.returncode == 0 and "train-lm" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "slimkit", "no-such-command"], capture_output=True, text=True,
                         cwd=REPO)
    assert bad.returncode == 2
