"""The LM training stack on CPU: token files, batches as a pure function of step, a falling loss, exact resume
after a kill, gradient accumulation, and `slimkit train-lm` end to end. Tiny configs; one thread (the CI box is
small and 2 threads fighting another process are 30x slower than one)."""
from __future__ import annotations

import gzip
import json
import os
import random

import numpy as np
import pytest
import torch

from slimkit.errors import SlimkitError
from slimkit.structured.data import BatchSampler, eval_windows, load_tokenizer, load_tokens, prepare_corpus
from slimkit.structured.gpt import GPT, GPTConfig
from slimkit.structured.train import TrainConfig, ckpt_dirs, load_model, read_checkpoint, train

torch.set_num_threads(1)

WORDS = ("the kernel driver maps a page of memory into the user space and the scheduler wakes a task when the "
         "lock is free so that every process sees a consistent view of the file system cache").split()


def _text(rng: random.Random, n_sentences: int) -> str:
    lines = []
    for _ in range(n_sentences):
        start = rng.randrange(len(WORDS) - 8)
        lines.append(" ".join(WORDS[start:start + rng.randint(5, 8)]).capitalize() + ".")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder of a dozen small text files (one gzipped, one in a subfolder), tokenised once for the module."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for i in range(10):
        (root / f"doc{i}.txt").write_text(_text(rng, 120))
    (root / "sub").mkdir()
    (root / "sub" / "notes.rst").write_text(_text(rng, 120))
    with gzip.open(root / "sub" / "packed.rst.gz", "wt") as f:
        f.write(_text(rng, 120))
    (root / "image.png").write_bytes(b"\x89PNG not text")
    data = tmp_path_factory.mktemp("tokens")
    c = prepare_corpus(root, data, tokenizer="bpe", vocab_size=320, progress=False)
    return root, data, c


class Killed(Exception):
    """A run stopped from its on_step callback, as a kill would stop it."""


def kill_at(n: int, error: type[BaseException] = Killed):
    """An on_step callback that stops the run after step n (with `error`: KeyboardInterrupt for Ctrl-C)."""
    def on_step(step, loss):
        if step == n:
            raise error
    return on_step


def tiny(out, data_dir, **kw) -> TrainConfig:
    base = dict(out=str(out), data_dir=str(data_dir), d_model=32, n_layer=2, n_head=2, seq_len=32, batch_size=8,
                steps=10, lr=3e-3, warmup=3, eval_every=0, eval_tokens=512, ckpt_every=0, device="cpu",
                progress=False, seed=0)
    return TrainConfig(**{**base, **kw})


def test_tokenise_round_trip_and_files(corpus):
    root, data, c = corpus
    tok = load_tokenizer(data)
    text = "The scheduler wakes a task.\n  Ünïcode — and bytes: \t{x: 1}\n"
    assert tok.decode(tok.encode(text, add_special_tokens=False).ids) == text  # byte-level BPE: exact
    meta_train = json.loads((data / "train.json").read_text())
    meta_val = json.loads((data / "val.json").read_text())
    for meta, name in ((meta_train, "train"), (meta_val, "val")):
        assert meta["dtype"] == "uint16" and meta["vocab_size"] == tok.get_vocab_size() <= 320
        assert meta["tokenizer"] == "bpe" and len(meta["source_hash"]) == 64 and meta["n_files"] == 12
        tokens = load_tokens(data / f"{name}.bin")
        assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16 and tokens.size == meta["n_tokens"] > 0
        assert (data / f"{name}.bin").stat().st_size == 2 * meta["n_tokens"]
    # split by file, disjoint, every text file (the .gz and the subfolder too, not the .png) in exactly one split
    assert sorted(meta_train["files"] + meta_val["files"]) == sorted(
        [f"doc{i}.txt" for i in range(10)] + ["sub/notes.rst", "sub/packed.rst.gz"])
    assert meta_val["files"] and not set(meta_train["files"]) & set(meta_val["files"])
    # documents end with the EOT token, and decoding the first one gives back its file
    eot = meta_train["eot_id"]
    first = np.asarray(c.train)
    first = first[:np.flatnonzero(first == eot)[0]]
    assert tok.decode(first.tolist()) == (root / meta_train["files"][0]).read_text()
    # a second call reuses the files (same source hash); no temporary files are left behind
    mtime = (data / "train.bin").stat().st_mtime_ns
    prepare_corpus(root, data, tokenizer="bpe", vocab_size=320, progress=False)
    assert (data / "train.bin").stat().st_mtime_ns == mtime
    assert not [p for p in data.iterdir() if p.name.startswith(".")]


def test_small_bpe_vocab_refused_before_any_work(tmp_path, capsys):
    """A BPE vocabulary that cannot hold the 256 bytes and the end-of-text token is refused before the corpus is
    read or the 'training a BPE' progress line is printed."""
    (tmp_path / "a.txt").write_text("some text " * 50)
    with pytest.raises(SlimkitError, match="vocab_size > 257"):
        prepare_corpus(tmp_path, tmp_path / "out", vocab_size=100, progress=True)
    assert "training" not in capsys.readouterr().out and not (tmp_path / "out").exists()


def test_empty_corpus_errors(tmp_path):
    with pytest.raises(SlimkitError, match="holds no non-empty text files"):
        prepare_corpus(tmp_path, tmp_path / "out", progress=False)
    (tmp_path / "a.bin").write_bytes(b"\0\1")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(SlimkitError, match=str(tmp_path)):
        prepare_corpus(tmp_path, tmp_path / "out", progress=False)
    with pytest.raises(SlimkitError, match="does not exist"):
        prepare_corpus(tmp_path / "nope", progress=False)
    (tmp_path / "blank.md").write_text("\n  \n")
    with pytest.raises(SlimkitError, match="blank"):
        prepare_corpus(tmp_path, tmp_path / "out", progress=False)


def test_sampler_is_a_pure_function_of_step(corpus):
    _, _, c = corpus
    a, b = BatchSampler(c.train, 32, 8, seed=1), BatchSampler(c.train, 32, 8, seed=1)
    later = [b.batch(s) for s in (7, 3)]  # out of order, on another instance
    assert torch.equal(a.batch(3)[0], later[1][0]) and torch.equal(a.batch(7)[0], later[0][0])
    x, y = a.batch(3)
    assert x.shape == y.shape == (8, 32) and torch.equal(x[:, 1:], y[:, :-1])
    # a batch split in parts (ranks, accumulation) is the whole batch
    assert torch.equal(torch.cat([a.batch(5, 0, 3)[0], a.batch(5, 3, 5)[0]]), a.batch(5)[0])
    # one epoch visits every window once
    n = a.n_windows
    starts = np.concatenate([a.starts(s) for s in range(n // 8)])
    assert len(set(starts.tolist())) == len(starts)
    assert not torch.equal(BatchSampler(c.train, 32, 8, seed=2).batch(3)[0], x)
    assert eval_windows(c.val, 32, 64).shape == (2, 33)


def test_gpt_shapes_and_flops():
    for pos, ffn, norm in (("rope", "gelu", "layernorm"), ("learned", "swiglu", "rmsnorm")):
        cfg = GPTConfig(vocab_size=64, n_layer=2, n_head=2, d_model=32, seq_len=16, pos=pos, ffn=ffn, norm=norm)
        m = GPT(cfg)
        logits, loss = m(torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16)))
        assert logits.shape == (2, 16, 64) and abs(loss.item() - np.log(64)) < 0.5
        names = {n for n, _ in m.named_modules()}
        assert {"blocks.0.mlp.fc1", "blocks.0.mlp.fc2"} <= names and ("blocks.0.mlp.gate" in names) == (ffn == "swiglu")
        weights = 64 * 32 + 2 * (4 * 32 * 32 + (3 if ffn == "swiglu" else 2) * 32 * cfg.d_ff)
        assert m.matmul_params() == weights and m.flops_per_token() == 6 * weights + 12 * 2 * 16 * 32
    with pytest.raises(SlimkitError, match="divisible"):
        GPTConfig(d_model=30, n_head=4)


def test_rmsnorm_gpt_computes_the_same_function_in_float64():
    """RMSNorm's eps followed the dtype (float32's 1.2e-7, float64's 2.2e-16): at the residual stream's small
    initial scale a float64 copy of an rmsnorm GPT differed from its float32 self by ~4e-4, not ~1e-6."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=64, n_layer=2, n_head=2, d_model=64, seq_len=32, norm="rmsnorm")).eval()
    x = torch.randint(0, 64, (2, 16))
    ref = m.double()(x)[0]
    err = (m.float()(x)[0].double() - ref).abs().max() / ref.std()
    assert err < 2e-5, err


@pytest.mark.parametrize("kw,match", [({"rope_base": 0.0}, "rope_base"), ({"rope_base": -5.0}, "rope_base"),
                                      ({"rope_base": float("nan")}, "rope_base"), ({"n_layer": 1.5}, "n_layer"),
                                      ({"vocab_size": 64.0}, "vocab_size"), ({"d_ff": 64.5}, "d_ff"),
                                      ({"d_model": float("nan")}, "d_model"), ({"dropout": None}, "dropout"),
                                      ({"dropout": "0.1"}, "dropout"), ({"tie_embeddings": "false"}, "tie_embeddings")])
def test_gpt_config_refuses_bad_values(kw, match):
    """A rope_base <= 0 or NaN made rotary tables of NaN that the model ran on silently; fractional sizes failed
    deep inside the layers' constructors."""
    with pytest.raises(SlimkitError, match=f"GPTConfig.{match} must be"):
        GPT(GPTConfig(**{**dict(vocab_size=64, n_layer=1, n_head=2, d_model=32, seq_len=16), **kw}))
    assert torch.isfinite(GPT(GPTConfig(vocab_size=64, n_layer=1, n_head=2, d_model=32, seq_len=16,
                                        rope_base=500)).rope_cos).all()


def test_loss_falls(corpus, tmp_path):
    _, data, _ = corpus
    r = train(tiny(tmp_path / "run", data, steps=30, eval_every=15))
    assert np.mean(r["losses"][-5:]) < r["losses"][0] - 1.0
    assert len(r["history"]) == 2 and r["history"][1]["val_loss"] < r["history"][0]["val_loss"]
    assert r["val_ppl"] == pytest.approx(np.exp(r["val_loss"])) and r["train_ppl"] < 320
    assert r["tokens"] == 30 * 8 * 32 and r["train_flops"] == pytest.approx(r["tokens"] * load_model(
        tmp_path / "run").flops_per_token())
    assert json.loads((tmp_path / "run" / "report.json").read_text())["val_ppl"] == r["val_ppl"]


def test_report_figures_match_the_settings_it_records(corpus, tmp_path):
    """A finished run resumed with other evaluation settings measures again, so report.json's figures are those
    of the eval_tokens it records; the report gives the parameter ratio the FFNs reach besides the requested one."""
    _, data, _ = corpus
    first = train(tiny(tmp_path / "run", data, steps=4, ffn="lowrank", param_ratio=0.32, eval_tokens=256))
    assert first["history"][-1]["eval_tokens"] == 256
    fc1 = load_model(tmp_path / "run").blocks[0].mlp.fc1                 # rank 8 of 32 -> 128: 0.3125
    assert first["param_ratio"] == 0.32 and first["ffn_param_ratio"] == pytest.approx(fc1.param_ratio) == 0.3125
    again = train(tiny(tmp_path / "run", data, steps=4, ffn="lowrank", param_ratio=0.32, eval_tokens=128,
                       resume=True))
    assert again["losses"] == first["losses"] and len(again["history"]) == len(first["history"])
    assert again["history"][-1]["eval_tokens"] == 128 and again["config"]["eval_tokens"] == 128
    assert again["val_loss"] != first["val_loss"]
    same = train(tiny(tmp_path / "run", data, steps=4, ffn="lowrank", param_ratio=0.32, eval_tokens=128,
                      resume=True))
    assert same["val_loss"] == again["val_loss"]
    assert json.loads((tmp_path / "run" / "report.json").read_text())["history"][-1]["eval_tokens"] == 128
    assert train(tiny(tmp_path / "dense", data, steps=1))["ffn_param_ratio"] is None

def test_kill_and_resume_is_exact(corpus, tmp_path):
    _, data, _ = corpus
    full = train(tiny(tmp_path / "full", data, ckpt_every=5, dropout=0.1))

    with pytest.raises(Killed):
        train(tiny(tmp_path / "killed", data, ckpt_every=5, dropout=0.1), on_step=kill_at(7))
    assert [p.name for p in ckpt_dirs(tmp_path / "killed")] == ["step_000005"]
    with pytest.raises(SlimkitError, match="--resume"):
        train(tiny(tmp_path / "killed", data, ckpt_every=5, dropout=0.1))
    with pytest.raises(SlimkitError, match=r"lr \(0.003 saved, 0.001 now\)"):
        train(tiny(tmp_path / "killed", data, ckpt_every=5, dropout=0.1, lr=1e-3, resume=True))
    with pytest.raises(SlimkitError, match=r"grad_accum with dropout \(8 x 1 saved, 4 x 2 now"):   # same global batch
        train(tiny(tmp_path / "killed", data, ckpt_every=5, dropout=0.1, batch_size=4, grad_accum=2, resume=True))
    resumed = train(tiny(tmp_path / "killed", data, ckpt_every=5, dropout=0.1, resume=True))
    assert resumed["losses"][5:] == full["losses"][5:]  # steps 6..10, bitwise
    assert resumed["losses"][:5] == full["losses"][:5] and resumed["val_loss"] == full["val_loss"]
    assert resumed["tokens"] == full["tokens"] and resumed["train_flops"] == full["train_flops"]
    # the checkpoint holds no pickle: safetensors and JSON only, optimizer state by parameter name
    ckpt = ckpt_dirs(tmp_path / "killed")[-1]
    assert sorted(p.name for p in ckpt.iterdir()) == ["model.safetensors", "optimizer.safetensors", "state.json"]
    msd, osd, meta = read_checkpoint(ckpt)
    assert meta["step"] == 10 and meta["aliases"] == {"lm_head.weight": "tok_emb.weight"}
    assert set(osd["state"]["tok_emb.weight"]) == {"step", "exp_avg", "exp_avg_sq"}


def test_self_guided_resume_across_the_guide_drop(corpus, tmp_path):
    """Low-rank FFNs guided for the first 5 of 10 steps: killed before the drop (step 4, resumed from 3) and after
    it (step 8, resumed from 6), the losses match an uninterrupted run; the guides' FLOPs are counted."""
    _, data, _ = corpus
    kw = dict(ffn="lowrank", param_ratio=0.5, self_guided=True, guide_fraction=0.5, ckpt_every=3)
    full = train(tiny(tmp_path / "full", data, **kw))

    with pytest.raises(KeyboardInterrupt):
        train(tiny(tmp_path / "run", data, **kw), on_step=kill_at(4, KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        train(tiny(tmp_path / "run", data, resume=True, **kw), on_step=kill_at(8, KeyboardInterrupt))
    assert [p.name for p in ckpt_dirs(tmp_path / "run")] == ["step_000003", "step_000006"]
    resumed = train(tiny(tmp_path / "run", data, resume=True, **kw))
    assert resumed["losses"] == full["losses"]
    meta = read_checkpoint(ckpt_dirs(tmp_path / "run")[-1])[2]
    assert meta["guides_dropped"] and meta["config"]["self_guided"]
    plain = train(tiny(tmp_path / "plain", data, **{**kw, "self_guided": False}))
    model = load_model(tmp_path / "plain")
    assert plain["train_flops"] == pytest.approx(model.flops_per_token() * plain["tokens"])
    # the guided run paid 5 steps of dense FFN matmuls on top (fc1 and fc2: 2 * d_model * d_ff weights a layer)
    guide = 6 * 2 * (2 * 32 * 128) * 5 * 8 * 32
    assert full["train_flops"] == pytest.approx(plain["train_flops"] + guide)


def test_flop_conventions_agree():
    from slimkit.structured import train_flops_per_token

    m = GPT(GPTConfig(vocab_size=64, n_layer=2, n_head=2, d_model=32, seq_len=16, tie_embeddings=False))
    assert m.flops_per_token() == train_flops_per_token(m) + m.attention_flops_per_token()


def test_grad_accumulation_equals_full_batch(corpus, tmp_path):
    _, data, _ = corpus
    one = train(tiny(tmp_path / "one", data, steps=2, batch_size=8, grad_accum=1))
    two = train(tiny(tmp_path / "two", data, steps=2, batch_size=4, grad_accum=2))
    assert two["losses"] == pytest.approx(one["losses"], abs=1e-5)
    a, b = load_model(tmp_path / "one").state_dict(), load_model(tmp_path / "two").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)


def test_cli_train_lm(corpus, tmp_path):
    from typer.testing import CliRunner

    from slimkit.cli import app

    root, _, _ = corpus
    out = tmp_path / "cli"
    args = ["train-lm", "--corpus", str(root), "--data-dir", str(tmp_path / "tok"), "--out", str(out),
            "--vocab-size", "300", "--d-model", "32", "--n-layer", "1", "--n-head", "2", "--seq-len", "16",
            "--batch-size", "4", "--steps", "4", "--warmup", "1", "--eval-every", "2", "--eval-tokens", "256",
            "--ckpt-every", "2", "--device", "cpu", "--act", "swiglu", "--pos", "learned", "--quiet"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert "val ppl" in r.output
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 4 and len(report["history"]) == 2 and report["config"]["act"] == "swiglu"
    assert [p.name for p in ckpt_dirs(out)] == ["step_000002", "step_000004"]
    r = CliRunner().invoke(app, ["train-lm", "--corpus", str(tmp_path / "missing"), "--out", str(tmp_path / "x")])
    assert isinstance(r.exception, SlimkitError) and "does not exist" in str(r.exception)


def test_tanh_gelu_and_the_cublaslt_ffn_kernel(monkeypatch, corpus, tmp_path):
    """ffn='gelu_tanh' is GELU's tanh approximation; set_ffn_kernel('cublaslt') routes every GPT FFN through
    fused_ffn(matmul='cublaslt'), which (here with the epilogues' PyTorch definitions standing in for cuBLASLt)
    gives the eager model's loss and gradients, dense and low-rank; an exact-GELU model refuses the kernel."""
    import torch.nn.functional as F

    import slimkit.structured.epilogue as EP
    from slimkit.structured import replace_ffn
    from slimkit.structured.gpt import set_ffn_kernel

    cfg = GPTConfig(vocab_size=64, n_layer=2, n_head=2, d_model=32, seq_len=16, ffn="gelu_tanh")
    torch.manual_seed(0)
    m = GPT(cfg)
    x = torch.randn(3, 32)
    mlp = m.blocks[0].mlp
    torch.testing.assert_close(mlp(x), mlp.fc2(F.gelu(mlp.fc1(x), approximate="tanh")), rtol=0, atol=0)
    assert not torch.allclose(mlp(x), mlp.fc2(F.gelu(mlp.fc1(x))), atol=1e-7)
    monkeypatch.setattr(EP, "available", lambda t: True)
    monkeypatch.setattr(EP, "_matmul", EP.reference_matmul)
    idx, tgt = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    for kind in ("dense", "lowrank"):
        torch.manual_seed(0)
        m = GPT(cfg) if kind == "dense" else replace_ffn(GPT(cfg), "lowrank", 0.5)
        grads = []
        for kernel in ("eager", "cublaslt"):
            set_ffn_kernel(m, kernel)
            m.zero_grad()
            loss = m(idx, tgt)[1]
            loss.backward()
            grads.append([loss.detach()] + [p.grad.clone() for p in m.parameters()])
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(SlimkitError, match="gelu_tanh"):
        set_ffn_kernel(GPT(GPTConfig(vocab_size=64, n_layer=1, n_head=2, d_model=32, seq_len=16)), "cublaslt")
    with pytest.raises(SlimkitError, match="ffn kernel"):
        set_ffn_kernel(m, "triton")
    _, data, _ = corpus
    with pytest.raises(SlimkitError, match="gelu_tanh"):
        tiny(tmp_path / "a", data, ffn_kernel="cublaslt")
    with pytest.raises(SlimkitError, match="compile"):
        tiny(tmp_path / "a", data, ffn_kernel="cublaslt", act="gelu_tanh", compile=True)
    with pytest.raises(SlimkitError, match="ffn_kernel"):
        tiny(tmp_path / "a", data, ffn_kernel="fast")
    r = train(tiny(tmp_path / "run", data, steps=3, act="gelu_tanh", ffn="lowrank", ffn_kernel="cublaslt"))
    assert r["config"]["ffn_kernel"] == "eager" and np.isfinite(r["val_loss"])     # on the CPU: what ran


def test_resume_skips_a_corrupt_latest_checkpoint(corpus, tmp_path):
    """A damaged newest checkpoint is skipped for the one before (same losses as an unbroken run); when none
    reads back, one clear error."""
    _, data, _ = corpus
    full = train(tiny(tmp_path / "full", data, ckpt_every=3))

    with pytest.raises(KeyboardInterrupt):
        train(tiny(tmp_path / "run", data, ckpt_every=3), on_step=kill_at(8, KeyboardInterrupt))
    older, newest = ckpt_dirs(tmp_path / "run")
    (newest / "model.safetensors").write_bytes(b"\0" * 16)
    resumed = train(tiny(tmp_path / "run", data, ckpt_every=3, resume=True))
    assert resumed["losses"] == full["losses"]
    for ck in ckpt_dirs(tmp_path / "run"):
        (ck / "state.json").write_text("{not json")
    with pytest.raises(SlimkitError, match="corrupt.*no earlier checkpoint"):
        train(tiny(tmp_path / "run", data, ckpt_every=3, resume=True))


def test_a_full_disk_while_writing_is_one_clear_error_and_the_run_resumes(corpus, tmp_path, monkeypatch):
    """ENOSPC while writing a checkpoint, report.json or the token files: a SlimkitError naming the file (the CLI's
    one line, not a traceback), no temporary file left, the earlier checkpoint intact and --resume exact."""
    import errno

    import safetensors.torch

    root, data, _ = corpus
    full = train(tiny(tmp_path / "full", data, ckpt_every=3))
    save_file, calls = safetensors.torch.save_file, []

    def full_disk(*a, **k):
        calls.append(a)
        if len(calls) == 3:            # the second checkpoint's model.safetensors
            raise OSError(errno.ENOSPC, "No space left on device")
        return save_file(*a, **k)
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(SlimkitError, match="could not write the checkpoint .*step_000006: No space left.*--resume"):
        train(tiny(tmp_path / "run", data, ckpt_every=3))
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    assert sorted(p.name for p in (tmp_path / "run" / "ckpt").iterdir()) == ["step_000003"]
    assert train(tiny(tmp_path / "run", data, ckpt_every=3, resume=True))["losses"] == full["losses"]

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    (tmp_path / "run" / "report.json").unlink()
    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(SlimkitError, match="could not write .*report.json: No space left"):
        train(tiny(tmp_path / "run", data, ckpt_every=3, resume=True))
    with pytest.raises(SlimkitError, match="could not write .*tokenizer.json: No space left"):
        prepare_corpus(root, tmp_path / "tok", tokenizer="bpe", vocab_size=320, progress=False)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["ckpt"]
    assert not any((tmp_path / "tok").iterdir())


def test_load_model_restores_the_guides_share(corpus, tmp_path):
    """A checkpoint taken while the dense guides still mix in loads with the share its last step trained and
    evaluated with, not the guide alone (share 1); guided for the whole run, the final model has its guides
    dropped (their share has reached zero)."""
    from slimkit.structured import SelfGuidedSchedule
    from slimkit.structured.self_guided import self_guided_modules

    _, data, _ = corpus
    train(tiny(tmp_path / "g", data, steps=6, ffn="lowrank", param_ratio=0.5, self_guided=True, guide_fraction=1.0,
               ckpt_every=4, keep_ckpts=3))
    steps = [p.name for p in ckpt_dirs(tmp_path / "g")]
    assert steps == ["step_000004", "step_000006"]
    middle = load_model(tmp_path / "g" / "ckpt" / "step_000004")
    shares = {m.share for m in self_guided_modules(middle)}
    assert shares == {SelfGuidedSchedule(1.0).share(3, 6)} and 0 < shares.pop() < 1
    final = load_model(tmp_path / "g")
    assert all(m.guide is None for m in self_guided_modules(final))
    assert read_checkpoint(ckpt_dirs(tmp_path / "g")[-1])[2]["guides_dropped"]


def test_guides_draw_no_random_numbers(corpus, tmp_path):
    """Building the dense guides draws nothing from the generator: guided for 0% of the run, training is the
    plain structured run's, loss for loss."""
    _, data, _ = corpus
    kw = dict(steps=4, ffn="lowrank", param_ratio=0.5)
    plain = train(tiny(tmp_path / "plain", data, **kw))
    guided = train(tiny(tmp_path / "guided", data, self_guided=True, guide_fraction=0.0, **kw))
    assert guided["losses"] == plain["losses"]


def test_a_refused_resume_leaves_the_data_folder_alone(corpus, tmp_path):
    root, _, _ = corpus
    data = tmp_path / "tokens"
    train(tiny(tmp_path / "run", data, corpus=str(root), tokenizer="bpe", vocab_size=300, steps=2))
    before = {p.name: p.read_bytes() for p in data.iterdir() if p.is_file()}
    with pytest.raises(SlimkitError, match=r"vocab_size \(300 saved, 400 now\)"):
        train(tiny(tmp_path / "run", data, corpus=str(root), tokenizer="bpe", vocab_size=400, steps=4, resume=True))
    assert {p.name: p.read_bytes() for p in data.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("kw,match", [({"lr": -1e-3}, "lr must be a positive"), ({"lr": float("nan")}, "lr must"),
                                      ({"guide_fraction": 5}, "guide_fraction is a share"),
                                      ({"ffn": "lowrank", "self_guided": True, "guide_curve": "cos"},
                                       "self-guided curve must be one of"),
                                      ({"weight_decay": float("nan")}, "weight_decay must"),
                                      ({"grad_clip": -1.0}, "grad_clip must"), ({"beta2": 1.0}, r"beta2 must be in"),
                                      ({"dropout": 1.5}, "dropout must"), ({"val_percent": 100}, "val_percent must"),
                                      ({"seed": -1}, "seed must be"), ({"d_ff": 0}, "d_ff must be"),
                                      ({"eval_tokens": 0}, "eval_tokens must be >= 1"),
                                      ({"eval_tokens": 16}, r"eval_tokens \(16\) is below seq_len \(32\)"),
                                      ({"device": "meta"}, "device must be"), ({"device": "foo"}, "device must be"),
                                      ({"ffn": "lowrank", "param_ratio": 1.5}, r"fc1 \(32 -> 128\): lowrank: param_ratio"),
                                      ({"ffn": "blockdense", "nblocks": 3}, r"fc1 \(32 -> 128\): blockdense: nblocks=3")])
def test_bad_training_settings(kw, match, tmp_path):
    with pytest.raises(SlimkitError, match=match):
        tiny(tmp_path / "x", tmp_path, **kw)


def test_bad_corpus_files_and_out(tmp_path):
    good = "some plain text, long enough to train a small tokenizer on. " * 20
    for name, write in [("cut.txt.gz", lambda p: p.write_bytes(gzip.compress(good.encode())[:40])),
                        ("junk.txt.gz", lambda p: p.write_bytes(b"not gzip at all")),
                        ("utf16.txt", lambda p: p.write_bytes(good.encode("utf-16"))),
                        ("binary.txt", lambda p: p.write_bytes(bytes(range(256)) * 4))]:
        root = tmp_path / name.replace(".", "_")
        root.mkdir()
        (root / "ok.txt").write_text(good)
        write(root / name)
        with pytest.raises(SlimkitError, match=f"(cannot read|looks binary).*{name}|{name}.*(cannot read|looks binary)"):
            prepare_corpus(root, tmp_path / "out", vocab_size=300, progress=False)
        assert not (tmp_path / "out").exists()
    latin1 = tmp_path / "latin1"              # not UTF-8: refused, not trained on as U+FFFD
    latin1.mkdir()
    (latin1 / "ok.txt").write_text(good)
    (latin1 / "es.txt").write_bytes(("el señor toma café con niños en el jardín. " * 40).encode("latin-1"))
    with pytest.raises(SlimkitError, match=r"es\.txt is not UTF-8 text \(\d+ of its \d+ characters .*iconv"):
        prepare_corpus(latin1, tmp_path / "out", vocab_size=300, progress=False)
    (latin1 / "es.txt").write_bytes((good * 3).encode() + "caf\xe9".encode("latin-1"))    # one stray byte: a warning
    with pytest.warns(UserWarning, match=r"es\.txt: 1 byte sequence\(s\) that are not UTF-8"):
        prepare_corpus(latin1, tmp_path / "out", vocab_size=300, progress=False)
    odd = tmp_path / "odd_names"               # a file name that is not UTF-8 (bytes of Latin-1) splits and reads
    odd.mkdir()
    (odd / "a.txt").write_text(good)
    (odd / os.fsdecode(b"caf\xe9.txt")).write_text(good)
    prepare_corpus(odd, tmp_path / "out_odd", vocab_size=300, progress=False)
    with pytest.raises(SlimkitError, match="is a file: give the folder"):
        prepare_corpus(root / "ok.txt", tmp_path / "out", progress=False)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SlimkitError, match="is a file: give a folder"):
        train(tiny(tmp_path / "afile", tmp_path))


def test_cpu_runs_say_what_they_cannot_do(corpus, tmp_path, capsys):
    """--fsdp in one process and --ffn-kernel cublaslt on the CPU are said, and the report records what ran."""
    _, data, _ = corpus
    report = train(tiny(tmp_path / "run", data, steps=2, fsdp=True, ffn_kernel="cublaslt", act="gelu_tanh"))
    err = capsys.readouterr().err
    assert "--fsdp" in err and "unsharded" in err and "cublaslt runs on CUDA only" in err
    assert report["config"]["ffn_kernel"] == "eager"


def test_blockshuffle_checkpoints_of_an_earlier_shape_rule_load_and_resume(corpus, tmp_path, monkeypatch):
    """A BlockShuffle run saved when 25% at d -> 4d meant 4 blocks (one count for both factors) loads and resumes
    with today's rule (2 and 8 blocks): the layers take the checkpoint's block counts."""
    import slimkit.structured.layers as L

    _, data, _ = corpus
    kw = dict(ffn="blockshuffle", param_ratio=0.25, ckpt_every=4, steps=8)
    new_rule = L.blockshuffle_shape
    old_rule = lambda i, o, r, nblocks=None, nblocks2=None, rel_tol=L.REL_TOL: (4, 4)   # noqa: E731
    monkeypatch.setattr(L, "blockshuffle_shape", old_rule)
    full = train(tiny(tmp_path / "full", data, **kw))

    with pytest.raises(Killed):
        train(tiny(tmp_path / "run", data, **kw), on_step=kill_at(6))
    monkeypatch.setattr(L, "blockshuffle_shape", new_rule)
    assert new_rule(32, 128, 0.25) == (2, 8)
    model = load_model(tmp_path / "full")
    fc1 = model.blocks[0].mlp.fc1
    assert (fc1.nblocks, fc1.nblocks2) == (4, 4)
    resumed = train(tiny(tmp_path / "run", data, resume=True, **kw))
    assert resumed["losses"] == full["losses"]


def test_self_guided_blockshuffle_of_an_earlier_shape_rule_resumes_across_the_guide_drop(corpus, tmp_path,
                                                                                        monkeypatch):
    """A self-guided BlockShuffle run saved under the earlier shape rule, resumed before the guides are dropped:
    the model rebuilt at the drop keeps the checkpoint's block counts (it was rebuilt with today's rule, whose
    shapes the carried weights do not fit)."""
    import slimkit.structured.layers as L

    _, data, _ = corpus
    kw = dict(ffn="blockshuffle", param_ratio=0.25, ckpt_every=2, steps=6, self_guided=True, guide_fraction=0.5)
    new_rule = L.blockshuffle_shape
    monkeypatch.setattr(L, "blockshuffle_shape", lambda i, o, r, nblocks=None, nblocks2=None, rel_tol=L.REL_TOL: (4, 4))
    full = train(tiny(tmp_path / "full", data, **kw))
    with pytest.raises(Killed):
        train(tiny(tmp_path / "run", data, **kw), on_step=kill_at(2))
    monkeypatch.setattr(L, "blockshuffle_shape", new_rule)
    resumed = train(tiny(tmp_path / "run", data, resume=True, **kw))        # guides dropped after step 3
    assert resumed["losses"] == full["losses"]


def test_folders_written_by_two_preparations_at_once_are_told(corpus, tmp_path):
    """Each preparation stamps its files with one id and its tokenizer's hash: a folder whose val split comes
    from another preparation (two runs writing it at once) is refused, and the default cache folder names every
    setting, so runs that differ in val_percent do not share one."""
    import shutil

    from slimkit.structured.data import default_data_dir, open_corpus
    root, data, _ = corpus
    other = tmp_path / "other"
    prepare_corpus(root, other, tokenizer="bpe", vocab_size=384, progress=False)
    mixed = tmp_path / "mixed"
    shutil.copytree(data, mixed)
    for name in ("val.json", "val.bin"):
        shutil.copy(other / name, mixed / name)
    with pytest.raises(SlimkitError, match="mixes the files of two preparations"):
        open_corpus(mixed)
    shutil.copy(other / "tokenizer.json", tmp_path / "tok.json")
    shutil.copytree(data, tmp_path / "tok")
    shutil.copy(other / "tokenizer.json", tmp_path / "tok" / "tokenizer.json")
    with pytest.raises(SlimkitError, match="mixes"):
        open_corpus(tmp_path / "tok")
    assert open_corpus(data).vocab_size == 320
    assert default_data_dir(root, "bpe", 320, 10) != default_data_dir(root, "bpe", 320, 30)


def test_run_folders_and_devices_are_checked_before_any_work(corpus, tmp_path, monkeypatch):
    """--out or --data-dir under a file, and CUDA asked for where there is none (under torchrun too): one clear
    error before the data is touched or a process group is joined."""
    from slimkit.structured.train import _dedupe, setup_dist
    _, data, _ = corpus
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SlimkitError, match=r"--out .*afile is a file"):
        train(tiny(tmp_path / "afile" / "sub", data))
    with pytest.raises(SlimkitError, match=r"--data-dir .*afile is a file"):
        train(tiny(tmp_path / "run", tmp_path / "afile" / "dd"))
    (tmp_path / "r1").mkdir()
    (tmp_path / "r1" / "ckpt").write_text("x")           # where the checkpoints folder goes
    with pytest.raises(SlimkitError, match="holds a file named ckpt"):
        train(tiny(tmp_path / "r1", data))
    (tmp_path / "r2" / "report.json").mkdir(parents=True)  # the report would fail only after the whole run
    with pytest.raises(SlimkitError, match="holds a folder named report.json"):
        train(tiny(tmp_path / "r2", data))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SlimkitError, match="CUDA is not available"):
        setup_dist("cuda")
    # FSDP's gathered state dict holds a tied weight as two copies: the model's tie still stores it once
    m = GPT(GPTConfig(vocab_size=64, n_layer=1, n_head=2, d_model=32, seq_len=16))
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    tensors, aliases = _dedupe(sd, m)
    assert aliases == {"lm_head.weight": "tok_emb.weight"} and "lm_head.weight" not in tensors
    assert _dedupe(sd)[1] == {}


def test_settings_a_run_does_not_read_neither_pass_the_cli_nor_block_a_resume(corpus, tmp_path):
    """--param-ratio without a structured --ffn (or --guide-fraction without --self-guided) is refused by the CLI;
    through the API they are ignored, and resuming without them is allowed."""
    from typer.testing import CliRunner

    from slimkit.cli import app

    root = corpus[0]
    for extra, needs in ((["--param-ratio", "0.5"], "--ffn"), (["--guide-fraction", "0.9"], "--self-guided")):
        r = CliRunner().invoke(app, ["train-lm", "--corpus", str(root), "--out", str(tmp_path / "cli"), *extra])
        assert isinstance(r.exception, SlimkitError) and f"has no effect without {needs}" in str(r.exception)
    _, data, _ = corpus
    with pytest.raises(Killed):
        train(tiny(tmp_path / "run", data, steps=4, ckpt_every=2, param_ratio=0.5, guide_fraction=0.9),
              on_step=kill_at(3))
    resumed = train(tiny(tmp_path / "run", data, steps=4, ckpt_every=2, resume=True))
    assert resumed["losses"] == train(tiny(tmp_path / "full", data, steps=4))["losses"]


def _gloo() -> bool:
    import torch.distributed as dist
    return dist.is_available() and dist.is_gloo_available()


_RANK = """
import json, sys, torch
import torch.distributed as dist
torch.set_num_threads(1)
from slimkit.errors import SlimkitError
from slimkit.structured.train import TrainConfig, train
try:
    train(TrainConfig(**json.loads(sys.argv[1])))
except SlimkitError as e:
    print("SlimkitError:", e, flush=True)
    print("process group left:", not dist.is_initialized(), flush=True)
    sys.exit(3)
print("process group left:", not dist.is_initialized(), flush=True)
"""


def run_ranks(configs: list, timeout: float = 120, cwds: list | None = None) -> list[tuple[int, str]]:
    """train(configs[r]) as rank r of a gloo process group, one process each, as torchrun starts them (in folder
    cwds[r], as on a node of its own): [(exit code, output)] per rank (exit code 3: a SlimkitError). A hang fails
    the test."""
    import socket
    import subprocess
    import sys
    from dataclasses import asdict
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = str(Path(__file__).resolve().parents[1])
    procs = []
    for r, cfg in enumerate(configs):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(len(configs)),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
        procs.append(subprocess.Popen([sys.executable, "-c", _RANK, json.dumps(asdict(cfg))], env=env, text=True,
                                      cwd=None if cwds is None else cwds[r], stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT))
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"the {len(procs)} ranks hung for {timeout} s")
    return [(p.returncode, o) for p, o in zip(procs, outs)]


@pytest.mark.skipif(not _gloo(), reason="needs torch.distributed with gloo")
def test_under_torchrun_train_leaves_its_process_group(corpus, tmp_path):
    """An error under torchrun (here an empty corpus) is raised on every rank, and the process group train()
    joined is left as it raises (and as it returns): a rank exiting with gloo's group alive aborted in teardown
    now and then ('terminate called without an active exception', SIGABRT in torchrun's summary)."""
    _, data, _ = corpus
    (tmp_path / "empty").mkdir()
    bad = tiny(tmp_path / "bad", tmp_path / "tok", corpus=str(tmp_path / "empty"), batch_size=4)
    for rc, out in run_ranks([bad, bad]):
        assert rc == 3 and "holds no non-empty text files" in out and "process group left: True" in out, out
    ok = tiny(tmp_path / "ok", data, steps=2, batch_size=4)
    for rc, out in run_ranks([ok, ok]):
        assert rc == 0 and "process group left: True" in out, out


@pytest.mark.skipif(not _gloo(), reason="needs torch.distributed with gloo")
def test_ranks_that_see_different_checkpoints_are_refused_on_every_rank(corpus, tmp_path):
    """--out on each node's own disk: rank 0 sees the checkpoint it wrote, rank 1 none. Resuming, rank 1 started
    from step 0 while rank 0 resumed (gradients of different steps averaged, then a gloo abort; a hang under FSDP):
    every rank now refuses the run, naming --out."""
    from dataclasses import replace

    _, data, _ = corpus
    with pytest.raises(Killed):
        train(tiny(tmp_path / "node0", data, steps=4, ckpt_every=2), on_step=kill_at(3))
    cfgs = [tiny(tmp_path / f"node{r}", data, steps=4, ckpt_every=2, batch_size=4, resume=True) for r in (0, 1)]
    for fsdp in (False, True):
        for rc, out in run_ranks([replace(c, fsdp=fsdp) for c in cfgs]):
            assert rc == 3 and "ranks see different checkpoints in --out" in out, out
    assert [p.name for p in ckpt_dirs(tmp_path / "node0")] == ["step_000002"] and not (tmp_path / "node1").exists()
    # one folder for both ranks: the 2-process resume matches the uninterrupted 1-process run
    for rc, out in run_ranks([replace(cfgs[0], out=str(tmp_path / "node0"))] * 2):
        assert rc == 0, out
    full = train(tiny(tmp_path / "full", data, steps=4))
    resumed = json.loads((tmp_path / "node0" / "report.json").read_text())
    assert resumed["world_size"] == 2 and resumed["losses"] == pytest.approx(full["losses"], abs=1e-5)


@pytest.mark.skipif(not _gloo(), reason="needs torch.distributed with gloo")
def test_ranks_that_cannot_read_rank_0s_token_folder_are_refused_on_every_rank(corpus, tmp_path):
    """A --data-dir on each node's own disk: rank 1 opened the folder of that name where it runs, which was
    missing (rank 1 failed, rank 0 was left in a collective) or held other tokens (rank 1 trained on them, with no
    word). Every rank now refuses the run."""
    root, _, _ = corpus
    for r in (0, 1):
        (tmp_path / f"node{r}").mkdir()
    cfg = tiny("run", "tok", corpus=str(root), vocab_size=320, batch_size=4, steps=2)
    for rc, out in run_ranks([cfg, cfg], cwds=[tmp_path / "node0", tmp_path / "node1"]):
        assert rc == 3 and "rank 1 cannot read the token folder tok that rank 0 prepared" in out, out
    prepare_corpus(root, tmp_path / "node1" / "tok", tokenizer="bpe", vocab_size=300, progress=False)
    for rc, out in run_ranks([cfg, cfg], cwds=[tmp_path / "node0", tmp_path / "node1"]):
        assert rc == 3 and "it holds other tokens there" in out, out
    assert not (tmp_path / "node1" / "run").exists()


def _decoding_model(pos: str, act: str, ffn: str | None) -> tuple[GPT, torch.Tensor]:
    """A tiny eval-mode GPT (structured FFNs at half the weights where ffn names a kind) and 3 x 14 token ids."""
    from slimkit.structured import replace_ffn
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=61, n_layer=2, n_head=2, d_model=32, seq_len=24, pos=pos, ffn=act))
    if ffn:
        replace_ffn(model, ffn, 0.5)
    return model.eval(), torch.randint(0, 61, (3, 14))


@pytest.mark.parametrize("pos,act,ffn", [("rope", "gelu", None), ("learned", "swiglu", None), ("rope", "gelu", "lowrank"),
                                         ("learned", "gelu_tanh", "blockshuffle")])
def test_kv_cache_decoding_equals_the_full_forward(pos, act, ffn):
    """A prompt read into a KVCache, then one token, then a chunk of three, then one by one: each step's logits
    equal the full forward's at those positions (the cached keys and values, the positions offset, the mask of a
    chunk that continues a cache); generate's greedy tokens equal an argmax loop over full forwards."""
    from slimkit.structured.gpt import KVCache
    model, idx = _decoding_model(pos, act, ffn)
    with torch.no_grad():
        full = model(idx)[0]
        cache = KVCache(2, 24)
        got, at = [], 0
        for n in (5, 1, 3, 1, 1, 1, 2):
            got.append(model(idx[:, at:at + n], cache=cache)[0])
            at += n
        assert cache.length == 14
        torch.testing.assert_close(torch.cat(got, 1), full, rtol=1e-5, atol=1e-5)
        greedy = model.generate(idx[:, :6], 8, temperature=0)
        loop = idx[:, :6]
        for _ in range(8):
            loop = torch.cat([loop, model(loop)[0][:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(greedy, loop)


@pytest.mark.parametrize("pos,act,ffn", [("rope", "gelu", None), ("learned", "swiglu", "blockdense"),
                                         ("rope", "gelu_tanh", "lowrank"), ("learned", "gelu", "blockshuffle")])
def test_static_kv_cache_and_graph_decoding_equal_the_eager_cache(pos, act, ffn):
    """A static KVCache (positions from a tensor, the whole zero-filled buffer read under a mask), fed chunk by
    chunk, gives the full forward's logits; generate(cuda_graph=True), which on the CPU runs that static step
    eagerly, samples exactly the tokens of the eager cache, greedy and seeded; the step's capture-safe path
    never advances the cache's Python length."""
    from slimkit.structured.gpt import KVCache
    model, idx = _decoding_model(pos, act, ffn)
    with torch.no_grad():
        full = model(idx)[0]
        cache = KVCache(2, 20, static=True)
        got, at = [], 0
        for n in (5, 1, 3, 1, 1, 1, 2):
            cache.pos = torch.tensor([at])
            got.append(model(idx[:, at:at + n], cache=cache)[0])
            at += n
        assert cache.length == 0 and cache.k[0].shape[2] == 20
        torch.testing.assert_close(torch.cat(got, 1), full, rtol=1e-5, atol=1e-5)
    for temperature, top_k in ((0.0, None), (1.0, 7)):
        a, b = (model.generate(idx[:, :6], 9, temperature, top_k, torch.Generator().manual_seed(5), vocab_size=55,
                               cuda_graph=g) for g in (True, False))
        assert torch.equal(a, b) and a.shape == (3, 15) and int(a[:, 6:].max()) < 55
    assert torch.equal(model.generate(idx[:, :6], 1, temperature=0, cuda_graph=True),
                       model.generate(idx[:, :6], 1, temperature=0, cuda_graph=False))


def test_generate_keeps_its_decode_step_for_the_next_call():
    """generate(cuda_graph=True) keeps its step and static cache for the next call of the same batch and rounded
    length (a shorter prompt then reads past the last call's keys, masked: the same tokens as the eager cache);
    in-place weight updates keep it, a replaced parameter or another batch captures anew, release_decode_graph
    and the model's deletion free it."""
    import gc

    from torch import nn

    from slimkit.structured import gpt as G
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=40, n_layer=2, n_head=2, d_model=16, seq_len=32)).eval()
    idx = torch.randint(0, 40, (2, 9))
    model.generate(idx, 12, temperature=0, cuda_graph=True)
    kept = G._DECODE_GRAPHS[model]
    assert kept[1].cache.max_len == 32     # 21 tokens rounded up to GRAPH_LEN_STEP, at most seq_len
    for prompt, new in ((3, 6), (9, 2)):
        got = model.generate(idx[:, :prompt], new, temperature=0, cuda_graph=True)
        assert torch.equal(got, model.generate(idx[:, :prompt], new, temperature=0, cuda_graph=False))
        assert G._DECODE_GRAPHS[model] is kept
    with torch.no_grad():
        model.blocks[0].attn.proj.weight.mul_(2)
    model.generate(idx, 3, temperature=0, cuda_graph=True)
    assert G._DECODE_GRAPHS[model] is kept
    model.generate(idx, 3, temperature=0.5, cuda_graph=True)      # sampling settings are part of the graph
    assert G._DECODE_GRAPHS[model] is not kept
    model.generate(idx, 3, temperature=0, cuda_graph=True)
    kept = G._DECODE_GRAPHS[model]
    model.blocks[0].attn.proj.weight = nn.Parameter(model.blocks[0].attn.proj.weight.detach().clone())
    got = model.generate(idx, 3, temperature=0, cuda_graph=True)
    assert G._DECODE_GRAPHS[model] is not kept
    assert torch.equal(got, model.generate(idx, 3, temperature=0, cuda_graph=False))
    kept = G._DECODE_GRAPHS[model]
    model.generate(idx[:1], 3, cuda_graph=True)
    assert G._DECODE_GRAPHS[model] is not kept and len(G._DECODE_GRAPHS) >= 1
    model.release_decode_graph()
    assert model not in G._DECODE_GRAPHS
    with torch.inference_mode():             # its tensors are made outside inference mode: reusable after it
        a = model.generate(idx, 4, temperature=1.0, generator=torch.Generator().manual_seed(1), cuda_graph=True)
    b = model.generate(idx, 4, temperature=1.0, generator=torch.Generator().manual_seed(1), cuda_graph=True)
    assert torch.equal(a, b)
    n = len(G._DECODE_GRAPHS)
    del model
    gc.collect()
    assert len(G._DECODE_GRAPHS) == n - 1


def test_generate_kept_step_follows_module_settings_and_forgets_non_finite_keys():
    """The kept step is captured anew when what a capture bakes in changes without touching modules or storage:
    a self-guided layer's share (set_progress, in place during training) or a forward hook; and a kept cache
    that an overflowed call filled with inf/NaN keys does not poison later calls (masked is not ignored)."""
    from slimkit.structured import gpt as G
    from slimkit.structured import replace_ffn
    from slimkit.structured.self_guided import set_progress
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=40, n_layer=2, n_head=2, d_model=16, seq_len=32)).eval()
    replace_ffn(model, "lowrank", 0.5, self_guided=True)
    idx = torch.randint(0, 40, (2, 9))
    model.generate(idx, 4, temperature=0, cuda_graph=True)
    kept = G._DECODE_GRAPHS[model]
    set_progress(model, 3, 10)
    model.generate(idx, 4, temperature=0, cuda_graph=True)
    assert G._DECODE_GRAPHS[model] is not kept
    kept = G._DECODE_GRAPHS[model]
    handle = model.blocks[0].mlp.register_forward_hook(lambda m, a, y: y * 0)
    model.generate(idx, 4, temperature=0, cuda_graph=True)
    assert G._DECODE_GRAPHS[model] is not kept
    handle.remove()
    good = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.blocks[1].attn.qkv.weight.fill_(float("inf"))
    model.generate(idx, 20, temperature=0, cuda_graph=True)        # keys and values past 9 tokens: NaN
    kept = G._DECODE_GRAPHS[model]
    model.load_state_dict(good)                                     # in place: the same kept step
    got = model.generate(idx[:, :3], 6, temperature=0, cuda_graph=True)
    assert G._DECODE_GRAPHS[model] is kept
    assert torch.equal(got, model.generate(idx[:, :3], 6, temperature=0, cuda_graph=False))


def test_static_kv_cache_errors():
    from slimkit.structured.gpt import KVCache
    model = GPT(GPTConfig(vocab_size=20, n_layer=1, n_head=2, d_model=16, seq_len=8)).eval()
    with torch.no_grad(), pytest.raises(SlimkitError, match="cache.pos"):
        model(torch.zeros(1, 2, dtype=torch.long), cache=KVCache(1, 8, static=True))
    cache = KVCache(1, 9, static=True)
    cache.pos = torch.zeros(1, dtype=torch.long)
    with torch.no_grad(), pytest.raises(SlimkitError, match="seq_len 8"):
        model(torch.zeros(1, 2, dtype=torch.long), cache=cache)
    with pytest.raises(SlimkitError, match="cuda_graph"):
        model.generate(torch.zeros(1, 2, dtype=torch.long), 2, cuda_graph="yes")


def test_generate_samples_reproducibly_and_checks_its_arguments():
    torch.manual_seed(1)
    model = GPT(GPTConfig(vocab_size=50, n_layer=1, n_head=2, d_model=16, seq_len=12)).train()
    idx = torch.randint(0, 50, (2, 4))
    a = model.generate(idx, 6, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(3))
    b = model.generate(idx, 6, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (2, 10) and torch.equal(a[:, :4], idx) and model.training
    assert torch.equal(model.generate(idx, 5, top_k=1), model.generate(idx, 5, temperature=0))   # top-1 is greedy
    with torch.no_grad():       # top_k keeps the k most likely: every sampled token is among them
        logits = model.eval()(idx)[0][:, -1]
    for seed in range(5):
        first = model.generate(idx, 1, temperature=2.0, top_k=3, generator=torch.Generator().manual_seed(seed))[:, -1]
        assert all(int(t) in logits[i].topk(3).indices.tolist() for i, t in enumerate(first))
    assert torch.equal(model.generate(idx, 0), idx)
    tiny_t = model.generate(idx, 3, temperature=1e-40, generator=torch.Generator().manual_seed(0))
    assert torch.equal(tiny_t, model.generate(idx, 3, temperature=0))        # a tiny temperature is greedy, no NaN
    for kw, match in [({"max_new_tokens": 9}, "seq_len 12"), ({"max_new_tokens": -1}, "max_new_tokens"),
                      ({"max_new_tokens": 2, "temperature": -1.0}, "temperature"),
                      ({"max_new_tokens": 2, "top_k": 0}, "top_k")]:
        with pytest.raises(SlimkitError, match=match):
            model.generate(idx, **kw)
    for bad in (idx.float(), idx[0], torch.full((1, 2), 50)):
        with pytest.raises(SlimkitError, match="generate"):
            model.generate(bad, 1)


def test_cli_generate_lm(corpus, tmp_path):
    """`slimkit generate-lm RUN` continues a prompt with the run's latest checkpoint and its tokenizer: the text
    starts with the prompt (byte-level BPE decodes exactly), greedy sampling repeats itself, and a prompt too long
    for the model's positions is one clear error."""
    from typer.testing import CliRunner

    from slimkit.cli import app
    from slimkit.structured.train import run_tokenizer

    root, _, _ = corpus
    out = tmp_path / "run"
    args = ["train-lm", "--corpus", str(root), "--data-dir", str(tmp_path / "tok"), "--out", str(out),
            "--vocab-size", "300", "--d-model", "32", "--n-layer", "1", "--n-head", "2", "--seq-len", "16",
            "--batch-size", "4", "--steps", "2", "--warmup", "1", "--eval-every", "0", "--eval-tokens", "64",
            "--ckpt-every", "0", "--device", "cpu", "--quiet"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert run_tokenizer(out).get_vocab_size() == 300
    gen = ["generate-lm", str(out), "--prompt", "The kernel", "--max-new-tokens", "6", "--temperature", "0",
           "--device", "cpu"]
    r1, r2 = CliRunner().invoke(app, gen), CliRunner().invoke(app, gen)
    assert r1.exit_code == 0, r1.output + repr(r1.exception)
    assert r1.output.startswith("The kernel") and r1.output == r2.output
    r = CliRunner().invoke(app, gen[:2] + ["--num-samples", "2", "--max-new-tokens", "3", "--device", "cpu"])
    assert r.exit_code == 0 and r.output.count("--- sample") == 2
    sampled = gen[:2] + ["--num-samples", "3", "--max-new-tokens", "8", "--temperature", "0.9", "--seed", "4",
                         "--device", "cpu"]
    r1, r2 = (CliRunner().invoke(app, sampled + [flag]) for flag in ("--cuda-graph", "--no-cuda-graph"))
    assert r1.exit_code == 0 and r1.output == r2.output      # the static-cache step samples what the eager one does
    r = CliRunner().invoke(app, gen[:2] + ["--prompt", "the kernel " * 20, "--device", "cpu"])
    assert isinstance(r.exception, SlimkitError) and "seq_len" not in str(r.exception) and "positions" in str(r.exception)
    r = CliRunner().invoke(app, gen[:2] + ["--data-dir", str(tmp_path / "nowhere"), "--device", "cpu"])
    assert isinstance(r.exception, SlimkitError) and "tokenizer" in str(r.exception)
    r = CliRunner().invoke(app, gen[:2] + ["--device", "foo"])     # one clear error, not torch's traceback
    assert isinstance(r.exception, SlimkitError) and "foo" in str(r.exception)


def test_run_tokenizer_finds_the_default_data_dir_from_another_working_directory(corpus, tmp_path, monkeypatch):
    """A run trained on a relative --corpus into the default (cache) data folder: its tokenizer is found from any
    working directory (the folder the run read is recorded; the corpus path, resolved again elsewhere, would name
    another cache folder)."""
    import dataclasses

    from slimkit.structured.train import run_tokenizer

    root, _, _ = corpus
    monkeypatch.setenv("SLIMKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(root.parent)
    cfg = tiny(tmp_path / "run", tmp_path / "unused", corpus=root.name, vocab_size=300, seq_len=16, batch_size=4,
               steps=2, eval_tokens=64)
    train(dataclasses.replace(cfg, data_dir=None))   # the default: a cache folder named after the resolved corpus
    monkeypatch.chdir(tmp_path)
    assert run_tokenizer(tmp_path / "run").get_vocab_size() == 300


def test_generate_samples_only_the_tokenizers_ids_of_a_padded_vocabulary():
    """train-lm pads the model's vocabulary to a multiple of 64 (a 300-token BPE: 320 ids); the padding's ids
    decode to nothing (the tokenizer drops them silently), so generate(vocab_size=) never samples them."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, n_layer=1, n_head=2, d_model=16, seq_len=32))
    idx = torch.randint(0, 50, (4, 2))
    free = model.generate(idx, 30, temperature=5.0, generator=torch.Generator().manual_seed(0))
    assert int(free.max()) >= 50        # without the limit the padding is sampled
    for kw in ({"temperature": 5.0}, {"temperature": 5.0, "top_k": 60}, {"temperature": 0}):
        out = model.generate(idx, 30, vocab_size=50, generator=torch.Generator().manual_seed(0), **kw)
        assert int(out.max()) < 50
    for bad in (0, 65, 2.0, True):
        with pytest.raises(SlimkitError, match="vocab_size"):
            model.generate(idx, 1, vocab_size=bad)


def test_corpus_settings_without_a_corpus_are_refused_and_do_not_block_a_resume(corpus, tmp_path):
    """--vocab-size, --tokenizer and --val-percent say how a corpus is tokenised: with a prepared --data-dir
    alone they change nothing, so the CLI refuses them (they were silently ignored), and a resume does not compare
    them (the saved run's tokens, not these settings, told its data)."""
    from typer.testing import CliRunner

    from slimkit.cli import app

    _, data, _ = corpus
    for extra, name in ((["--vocab-size", "4096"], "--vocab-size"), (["--tokenizer", "smollm2"], "--tokenizer"),
                        (["--val-percent", "30"], "--val-percent")):
        r = CliRunner().invoke(app, ["train-lm", "--data-dir", str(data), "--out", str(tmp_path / name), *extra,
                                     "--d-model", "32", "--n-layer", "1", "--n-head", "2", "--seq-len", "16",
                                     "--batch-size", "2", "--steps", "1", "--eval-tokens", "32", "--device", "cpu",
                                     "--quiet"])
        assert isinstance(r.exception, SlimkitError) and f"{name} has no effect without --corpus" in str(r.exception)
        assert not (tmp_path / name).exists()
    with pytest.raises(Killed):
        train(tiny(tmp_path / "run", data, steps=4, ckpt_every=2, vocab_size=4096), on_step=kill_at(3))
    resumed = train(tiny(tmp_path / "run", data, steps=4, ckpt_every=2, resume=True))
    assert resumed["losses"] == train(tiny(tmp_path / "full", data, steps=4))["losses"]


def test_a_data_folder_tokenised_again_is_told_on_resume_and_by_generate(corpus, tmp_path):
    """A run's data folder tokenised again with another tokenizer (here a 300-token BPE over the 320-token one:
    the padded model vocabulary stays 320, so the weights still load) must not be read as the run's: a resume and
    run_tokenizer (generate-lm) refuse it instead of going on with other token ids."""
    import shutil

    from slimkit.structured.train import run_tokenizer

    root, data, _ = corpus
    mine = tmp_path / "tok"
    shutil.copytree(data, mine)
    with pytest.raises(Killed):
        train(tiny(tmp_path / "run", mine, steps=4, ckpt_every=2), on_step=kill_at(3))
    assert run_tokenizer(tmp_path / "run").get_vocab_size() == load_tokenizer(data).get_vocab_size()
    prepare_corpus(root, mine, tokenizer="bpe", vocab_size=300, progress=False)
    with pytest.raises(SlimkitError, match="the tokenizer"):
        train(tiny(tmp_path / "run", mine, steps=4, ckpt_every=2, resume=True))
    with pytest.raises(SlimkitError, match="is not the tokenizer"):
        run_tokenizer(tmp_path / "run")
    assert run_tokenizer(tmp_path / "run", data).get_vocab_size() == load_tokenizer(data).get_vocab_size()


def test_load_model_tells_a_damaged_or_foreign_checkpoint(corpus, tmp_path):
    """A checkpoint's state.json from another slimkit version (a setting this one lacks), missing a field, or
    describing another model than its weights: one SlimkitError each, not a TypeError, KeyError or RuntimeError."""
    _, data, _ = corpus
    train(tiny(tmp_path / "run", data, steps=2))
    assert isinstance(load_model(tmp_path / "run"), GPT)
    state = ckpt_dirs(tmp_path / "run")[-1] / "state.json"
    good = json.loads(state.read_text())
    for edit, match in ((lambda m: m["config"].update(new_setting=1), "another slimkit version"),
                        (lambda m: m.pop("vocab_size"), "incomplete or corrupt.*vocab_size"),
                        (lambda m: m.pop("data"), "incomplete or corrupt.*data"),
                        (lambda m: m.update(step="2"), "incomplete or corrupt.*step"),
                        (lambda m: m["config"].update(d_model=64), "weights do not fit")):
        meta = json.loads(json.dumps(good))
        edit(meta)
        state.write_text(json.dumps(meta))
        with pytest.raises(SlimkitError, match=match):
            load_model(tmp_path / "run")
    meta = json.loads(json.dumps(good))
    del meta["global_batch"]
    state.write_text(json.dumps(meta))
    with pytest.raises(SlimkitError, match="incomplete or corrupt"):     # a resume reads it too
        train(tiny(tmp_path / "run", data, steps=2, resume=True))


def test_unwritable_folders_are_told_before_any_work(corpus, tmp_path, monkeypatch):
    """--out or a token folder that cannot be written (a read-only mount, another user's folder: faked through
    os.access, as these tests may run as root) fails before any work: not at the first checkpoint, hours in, nor
    after the tokenizer is trained."""
    from pathlib import Path

    from slimkit.structured import data as data_mod

    root, data, _ = corpus
    real_access = os.access
    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != tmp_path / "ro" and real_access(p, mode))
    calls = []
    monkeypatch.setattr(data_mod, "train_bpe", lambda *a: calls.append(a))
    with pytest.raises(SlimkitError, match="cannot write in .*ro"):
        train(tiny(tmp_path / "ro" / "run", data, steps=2))
    with pytest.raises(SlimkitError, match="cannot write the token files"):
        prepare_corpus(root, tmp_path / "ro" / "tok", vocab_size=300, progress=False)
    assert not calls and not (tmp_path / "ro" / "run").exists()


def test_a_checkpoint_write_that_fails_is_one_clear_error(corpus, tmp_path, monkeypatch):
    """A full disk while a checkpoint is written: safetensors raises its own SafetensorError (no OSError), which
    is told as the SlimkitError naming the checkpoint and --resume, and no partial checkpoint is left."""
    from safetensors import SafetensorError

    import safetensors.torch

    _, data, _ = corpus

    def full_disk(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(SlimkitError, match="could not write the checkpoint .*No space left.*--resume"):
        train(tiny(tmp_path / "full", data, steps=2))
    assert not ckpt_dirs(tmp_path / "full") and not list((tmp_path / "full" / "ckpt").iterdir())


def test_token_folder_write_errors_name_the_file(tmp_path, monkeypatch):
    """A tokenizer that cannot be saved (the tokenizers library raises a bare Exception for a read-only folder or
    a full disk) is a SlimkitError naming tokenizer.json; and atomic_write's clean-up in a read-only folder (EROFS
    even for no file) does not replace the error with its own OSError."""
    import errno
    from pathlib import Path

    from slimkit.io.atomic import atomic_write
    from slimkit.structured.data import _save_tokenizer

    class ReadOnlyTokenizer:
        def save(self, path):
            raise Exception("Read-only file system (os error 30)")
    with pytest.raises(SlimkitError, match="could not write .*tokenizer.json: Read-only"):
        atomic_write(tmp_path / "tokenizer.json", lambda tmp: _save_tokenizer(ReadOnlyTokenizer(), tmp))

    def erofs(self, missing_ok=False):
        raise OSError(errno.EROFS, "Read-only file system", str(self))
    monkeypatch.setattr(Path, "unlink", erofs)

    def write(tmp):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp))
    with pytest.raises(SlimkitError, match="could not write .*x.json: Read-only"):
        atomic_write(tmp_path / "x.json", write)
