"""The CLI on Hugging Face model directories: quantize with text calibration, save, reload, eval."""
import subprocess
import sys

import pytest

from tiny_hf import tiny_corpus, tiny_model, tiny_tokenizer


def run(*args):
    return subprocess.run([sys.executable, "-m", "slimkit.cli", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    tok = tiny_tokenizer()
    for kind in ("llama", "bert"):
        tiny_model(kind).save_pretrained(root / kind)
        tok.save_pretrained(root / kind)
    (root / "corpus.txt").write_text(tiny_corpus())
    return root


@pytest.mark.parametrize("kind, metric", [("llama", "perplexity"), ("bert", "embedding cosine")])
def test_quantize_eval_round_trip(model_dirs, kind, metric, tmp_path):
    corpus = str(model_dirs / "corpus.txt")
    out = tmp_path / "q"
    r = run("quantize", str(model_dirs / kind), "--method", "os_plus", "--w-bits", "6", "--a-bits", "6",
            "--calib", corpus, "--eval-data", corpus, "--num-samples", "4", "--seq-len", "16", "--out", str(out),
            "--max-tokens", "400", "--quiet", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert metric in r.stdout and (out / "config.json").exists() and (out / "manifest.json").exists()
    r = run("eval", str(out), "--data", corpus, "--max-tokens", "400", "--quiet",
            *(["--reference", str(model_dirs / kind)] if kind == "bert" else []))
    assert r.returncode == 0, r.stderr
    assert metric in r.stdout


def test_bad_transformer_inputs(model_dirs, tmp_path):
    d = str(model_dirs / "llama")
    r = run("quantize", d, "--method", "qdrop", "--calib", str(model_dirs / "corpus.txt"), "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "for a transformer choose one of" in r.stderr
    assert not (tmp_path / "x").exists()
    short = tmp_path / "short.txt"
    short.write_text("the cat")
    r = run("quantize", d, "--method", "os_plus", "--calib", str(short), "--seq-len", "64", "--out", str(tmp_path / "y"))
    assert r.returncode == 2 and "shorter sequences (seq_len, --seq-len)" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "y").exists()
    r = run("quantize", d, "--method", "os_plus", "--w-bits", "9", "--out", str(tmp_path / "z"))
    assert r.returncode == 2 and "w_bits must be" in r.stderr
    r = run("quantize", d, "--method", "minmax", "--weights", str(short), "--out", str(tmp_path / "w"))
    assert r.returncode == 2 and "drop --weights" in r.stderr and "Traceback" not in r.stderr
    r = run("eval", d, "--data", str(model_dirs / "corpus.txt"), "--max-tokens", "-5")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    r = run("eval", d, "--data", str(model_dirs / "corpus.txt"), "--reference", str(model_dirs / "bert"))
    assert r.returncode == 2 and "drop --reference" in r.stderr
    r = run("eval", str(model_dirs / "bert"), "--data", str(model_dirs / "corpus.txt"), "--reference", "fmnist-resnet")
    assert r.returncode == 2 and "not a transformer encoder" in r.stderr and "Traceback" not in r.stderr


def test_sparsify_takes_the_calibration_sequence_length(model_dirs, tmp_path):
    corpus = str(model_dirs / "corpus.txt")
    r = run("sparsify", str(model_dirs / "llama"), "--method", "wanda", "--sparsity", "0.5", "--calib", corpus,
            "--num-samples", "4", "--seq-len", "16", "--eval-data", corpus, "--max-tokens", "200", "--quiet",
            "--device", "cpu", "--out", str(tmp_path / "s"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "s" / "manifest.json").exists()
    r = run("sparsify", str(model_dirs / "llama"), "--method", "wanda", "--calib", corpus, "--seq-len", "100000",
            "--out", str(tmp_path / "t"), "--quiet")
    assert r.returncode == 2 and "longer than the model's context" in r.stderr and not (tmp_path / "t").exists()
