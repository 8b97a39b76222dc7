"""Structured FFN quality: a dense GPT and its low-rank and BlockDense twins at 32% FFN parameters, each with and
without self-guided training, trained on the same token data at two model sizes; held-out perplexity, training
FLOPs and wall time, and a picture of loss against training FLOPs (the scaling picture).

    python bench/structured_ffn_train.py --device cuda --deadline 540     # GPU preset, one H100/H200 (~7 min)
    python bench/structured_ffn_train.py --preset cpu --name structured_ffn_train_cpu \
        --corpus /usr/share/doc/python3.11/html/_sources                  # smoke scale, CPU (~1 min)
    python bench/structured_ffn_train.py --preset gpu --plan              # the grid, its FLOPs, a time estimate

Through the device tool (its machine has neither doc package): prepare the tokens here, carry them there.
    apt-get install -y linux-doc-6.1 python3.11-doc; echo /.gpu_data/ >> .git/info/exclude
    python bench/structured_ffn_train.py --preset gpu --prepare-only --data-dir .gpu_data/linux-bpe8192
    # run(carry=[".gpu_data"]):
    SLIMKIT_GIT=<commit> PYTHONUNBUFFERED=1 timeout 590 python bench/structured_ffn_train.py --device cuda \
        --data-dir .gpu_data/linux-bpe8192 --deadline 540 --quiet; cp bench/results/structured_ffn_train.* \
        bench/results/structured_ffn_train_{curves.json,loss.png} $OUT/

Corpus: the Linux kernel docs (Debian linux-doc-6.1) when installed, else the Python docs (python3.11-doc;
$SLIMKIT_PYDOCS_DIR overrides), or --corpus DIR. Tokenised once by slimkit.structured.data.prepare_corpus (a
byte-level BPE trained on the train split by default) into --data-dir (default: slimkit's cache). When the
training text is not the Python docs, the Python docs are a second held-out corpus (metric ppl_pydocs), encoded
with the same tokenizer and cached next to the training tokens as pydocs.bin. A prepared --data-dir works without
its source folders (the device machine has neither package): prepare it here with --prepare-only, carry it.

Rows (bench/results/<name>.json, DESIGN.md's shape): model "gpt-<params>" (the dense twin's parameter count),
method dense | lowrank | blockdense (| blockshuffle), "-sg" for self-guided, setting "r=0.32 steps=N", metric
val_ppl (and ppl_pydocs), value, seconds (wall time of the run: build, training, evaluations, checkpoint), plus
train_flops, params, ffn_params, tokens and the run's shape. Budget: every run trains the same steps on the same
batches (so structured runs use fewer FLOPs), or with --equal-flops the structured runs train for more steps to
reach the dense run's FLOPs, as the paper compares. Loss logs go to <name>_curves.json; <name>_loss.png plots them.
--sizes / --kinds run a subset and --append merges it into an earlier run's results (bench/common.merge_rows).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, device_name, merge_rows, write_results  # noqa: E402
from slimkit.errors import SlimkitError  # noqa: E402
from slimkit.structured import drop_guides  # noqa: E402
from slimkit.structured.data import (encode_texts, eval_windows, load_tokens, open_corpus,  # noqa: E402
                                     prepare_corpus, source_hash, write_tokens)
from slimkit.structured.train import (Dist, TrainConfig, build_model, evaluate, flops_per_token,  # noqa: E402
                                      guide_schedule, load_model, train)
from slimkit.text import _read as read_text  # noqa: E402
from slimkit.text import pydocs_dir, text_files  # noqa: E402

LINUX_DOCS = Path("/usr/share/doc/linux-doc-6.1/Documentation")
METHODS = ("dense", "lowrank", "lowrank-sg", "blockdense", "blockdense-sg")
EXTRA_METHODS = ("blockshuffle", "blockshuffle-sg")
# Sizes: name -> (d_model, n_layer, n_head). GELU FFN of 4 * d_model, rotary positions, tied embeddings.
PRESETS = {
    "gpu": dict(sizes={"small": (512, 6, 8), "medium": (768, 8, 12)}, steps=600, batch=32, seq_len=512, lr=1e-3,
                vocab_size=8192, eval_tokens=262144, evals=4, threads=0),
    "cpu": dict(sizes={"small": (64, 2, 2), "medium": (96, 2, 2)}, steps=60, batch=16, seq_len=64, lr=3e-3,
                vocab_size=2048, eval_tokens=16384, evals=3, threads=1),
}
WARMUP_FRACTION = 0.1
# The reference throughput for --plan: a dense d_model 384, 6-layer GPT, seq 512, batch 32, bf16, one H100.
REF_SHAPE, REF_TOK_S = (384, 6, 6), 0.89e6
# --plan's pessimistic step times, in dense steps: a structured step 1.1 (BlockDense at 0.32, d_model 1024, 16384
# tokens ran forward+backward at 0.89x dense in structured_ffn_speed), a guided step that plus the dense FFN (~0.65)
SLOW_STRUCTURED, SLOW_GUIDED = 1.1, 1.75
COLUMNS = ("model", "method", "setting", "metric", "value", "vs_dense", "seconds", "train_flops", "params",
           "ffn_params", "tokens")


# --- data -------------------------------------------------------------------------------------------------------

def default_corpus() -> Path | None:
    if LINUX_DOCS.is_dir():
        return LINUX_DOCS
    return pydocs_dir() if pydocs_dir().is_dir() else None


def load_corpus(args):
    """The prepared training corpus: --corpus tokenised into --data-dir (or reused from there when made from the
    same files), else a corpus already prepared in --data-dir, else the default corpus tokenised (cached)."""
    if args.corpus is None and args.data_dir and (Path(args.data_dir) / "train.json").exists():
        return open_corpus(args.data_dir)  # prepared earlier, maybe elsewhere: its source need not be here
    corpus = Path(args.corpus) if args.corpus else default_corpus()
    if corpus is not None and corpus.is_dir():
        return prepare_corpus(corpus, args.data_dir, args.tokenizer, args.vocab_size, progress=True)
    raise SlimkitError(f"no training text: {corpus or LINUX_DOCS} is missing and no prepared --data-dir was given. "
                       "Install linux-doc-6.1 or python3.11-doc, pass --corpus DIR, or --data-dir of a corpus "
                       "prepared with --prepare-only")


def second_corpus(corpus, args):
    """(tokens, meta) of the Python docs encoded with the training corpus's tokenizer, or None when the training
    text is the Python docs itself or they are absent. Cached as pydocs.bin in the corpus folder."""
    if args.no_second:
        return None
    root = Path(args.pydocs)
    target = corpus.dir / "pydocs.bin"
    if corpus.meta["source"] == str(root.resolve()):
        return None
    if root.is_dir():
        files = [p for p in text_files(root) if p.stat().st_size > 0]
        want = {"source": str(root.resolve()), "source_hash": source_hash(root, files),
                "tokenizer_sha256": hashlib.sha256((corpus.dir / "tokenizer.json").read_bytes()).hexdigest()}
        if want["source_hash"] == corpus.meta["source_hash"]:
            return None  # the training text is a copy of the Python docs
        side = target.with_suffix(".json")
        if side.exists():
            meta = json.loads(side.read_text())
            if all(meta.get(k) == v for k, v in want.items()):
                return load_tokens(target), meta
        print(f"encoding the second corpus {root} ({len(files)} files) with the training tokenizer", flush=True)
        ids = encode_texts(corpus.tokenizer(), [read_text(p) for p in files])
        write_tokens(target, ids, {**want, "vocab_size": corpus.vocab_size, "n_files": len(files)})
        return load_tokens(target), json.loads(side.read_text())
    if target.exists():  # prepared earlier, its source folder absent here
        return load_tokens(target), json.loads(target.with_suffix(".json").read_text())
    return None


def corpus_label(source: str) -> str:
    if "linux-doc" in source:
        return f"the Linux kernel docs (linux-doc-6.1, {source})"
    if source.rstrip("/").endswith("_sources") and "python3" in source:
        return f"the Python 3.11 docs (python3.11-doc, {source})"
    return source


def ffn_shape_of(model) -> str:
    """The first block's FFN linears as built: "dense", or e.g. "fc1 lowrank rank=128; fc2 lowrank rank=128"."""
    mlp = model.blocks[0].mlp
    parts = []
    for name in ("gate", "fc1", "fc2"):
        layer = getattr(mlp, name, None)
        if layer is None or isinstance(layer, torch.nn.Linear):
            continue
        spec = layer.spec()
        parts.append(f"{name} {spec['kind']} " + " ".join(f"{k}={spec[k]}" for k in ("rank", "nblocks") if k in spec))
    return "; ".join(parts) or "dense"


# --- the grid ---------------------------------------------------------------------------------------------------

def parse_size(name: str, preset: dict) -> tuple[str, tuple[int, int, int]]:
    """A preset size name, or a custom DxL or DxLxH (heads default to d_model / 64, at least 2)."""
    if name in preset["sizes"]:
        return name, preset["sizes"][name]
    try:
        parts = [int(v) for v in name.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (2, 3):
        raise SlimkitError(f"unknown size {name!r}: use {', '.join(preset['sizes'])} or DxL / DxLxH "
                           "(d_model x layers x heads)")
    heads = parts[2] if len(parts) == 3 else max(2, parts[0] // 64)
    return name, (parts[0], parts[1], heads)


def method_parts(method: str) -> tuple[str, bool]:
    kind, _, sg = method.partition("-")
    if kind not in ("dense", "lowrank", "blockdense", "blockshuffle") or sg not in ("", "sg") or method == "dense-sg":
        raise SlimkitError(f"unknown method {method!r}: use {', '.join(METHODS + EXTRA_METHODS)}")
    return kind, sg == "sg"


def base_config(args, shape, **kw) -> TrainConfig:
    d, n_layer, n_head = shape
    return TrainConfig(data_dir=args.data_dir or "unused", tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                       d_model=d, n_layer=n_layer, n_head=n_head, seq_len=args.seq_len, batch_size=args.batch,
                       lr=args.lr, param_ratio=args.param_ratio, seed=args.seed, **kw)


def flop_profile(cfg: TrainConfig, vocab: int) -> tuple[float, float, int]:
    """(FLOPs per token while the self-guided guide is active, FLOPs per token after, guided steps) as the trainer
    counts them, from the model built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        model = build_model(cfg, vocab)
    guided = flops_per_token(model, cfg)
    if not cfg.self_guided:
        return guided, guided, 0
    drop_guides(model)
    return guided, flops_per_token(model, cfg), guide_schedule(cfg).guided_steps(cfg.steps)


def run_flops(fg: float, fp: float, steps: int, guide_fraction: float, sg: bool, tokens_per_step: int) -> float:
    t_g = int(guide_fraction * steps) if sg else 0
    return tokens_per_step * (t_g * fg + (steps - t_g) * fp)


def equal_flop_steps(target: float, fg: float, fp: float, guide_fraction: float, sg: bool, tps: int) -> int:
    """The step count whose training FLOPs come nearest the target (the guide fades over the same fraction)."""
    n = max(1, round(target / (tps * (guide_fraction * fg + (1 - guide_fraction) * fp if sg else fp))))
    cands = range(max(1, n - 3), n + 4)
    return min(cands, key=lambda s: abs(run_flops(fg, fp, s, guide_fraction, sg, tps) - target))


def plan_runs(args, sizes, methods, vocab: int) -> list[dict]:
    """Every run of the grid with its config, step count and exact training FLOPs."""
    runs = []
    tps = args.batch * args.seq_len
    for size_name, shape in sizes:
        dense_cfg = base_config(args, shape, steps=args.steps)
        with torch.device("meta"):
            dense_model = build_model(dense_cfg, vocab)
        n_params = dense_model.num_params()
        label = f"gpt-{n_params / 1e6:.0f}m" if n_params >= 1e7 else (
            f"gpt-{n_params / 1e6:.1f}m" if n_params >= 1e6 else f"gpt-{n_params / 1e3:.0f}k")
        dense_flops = run_flops(*flop_profile(dense_cfg, vocab)[:2], args.steps, 0.5, False, tps)
        for method in methods:
            kind, sg = method_parts(method)
            cfg = base_config(args, shape, steps=args.steps, ffn=kind, self_guided=sg)
            fg, fp, _ = flop_profile(cfg, vocab)
            steps = args.steps
            if args.equal_flops and kind != "dense":
                steps = equal_flop_steps(dense_flops, fg, fp, cfg.guide_fraction, sg, tps)
            runs.append({"size": size_name, "shape": shape, "label": label, "method": method, "kind": kind, "sg": sg,
                         "steps": steps, "fg": fg, "fp": fp, "guide_fraction": cfg.guide_fraction,
                         "flops": run_flops(fg, fp, steps, cfg.guide_fraction, sg, tps), "dense_params": n_params})
    return runs


def ref_flop_rate(args, vocab: int) -> float:
    """FLOP/s of the reference measurement (dense d384 6-layer, seq 512, batch 32 at REF_TOK_S tokens/s)."""
    cfg = TrainConfig(data_dir="unused", d_model=REF_SHAPE[0], n_layer=REF_SHAPE[1], n_head=REF_SHAPE[2],
                      seq_len=512)
    return REF_TOK_S * flop_profile(cfg, 64 * math.ceil(8192 / 64))[0]


def print_plan(args, runs, vocab):
    rate = ref_flop_rate(args, vocab)
    tps = args.batch * args.seq_len
    total, worst = 0.0, 0.0
    dense_step = {}
    print(f"{'model':>10} {'method':>14} {'steps':>6} {'tokens':>8} {'TFLOPs':>9} {'est s':>7}  "
          f"(at {rate / 1e12:.0f} TFLOP/s, the reference run's rate)")
    for r in runs:
        est = r["flops"] / rate
        if r["kind"] == "dense":
            dense_step[r["size"]] = est / r["steps"]
        t_g = int(r["guide_fraction"] * r["steps"]) if r["sg"] else 0
        slow = 1.0 if r["kind"] == "dense" else SLOW_STRUCTURED
        w = dense_step.get(r["size"], est / r["steps"]) * (slow * (r["steps"] - t_g) + SLOW_GUIDED * t_g)
        total, worst = total + est, worst + w
        print(f"{r['label']:>10} {r['method']:>14} {r['steps']:>6} {r['steps'] * tps / 1e6:>7.1f}M "
              f"{r['flops'] / 1e12:>9.1f} {est:>7.0f}")
    print(f"training time at a constant FLOP rate: {total:.0f} s; pessimistic (a structured step {SLOW_STRUCTURED} "
          f"dense steps, a guided one {SLOW_GUIDED}): {worst:.0f} s; plus start-up, evaluations and checkpoints")


def estimate_seconds(r: dict, done: dict) -> float:
    """A run's wall time from the first finished run of its size (seconds per step, a guided step counted as 1.5),
    else from another size's by the FLOP ratio, with 15% to spare."""
    t_g = int(r["guide_fraction"] * r["steps"]) if r["sg"] else 0
    if r["size"] in done:
        seconds, steps, _ = done[r["size"]]
        return 1.15 * seconds / steps * (r["steps"] + 0.5 * t_g)
    seconds, _, flops = next(iter(done.values()))
    return 1.15 * seconds * r["flops"] / flops


# --- results ----------------------------------------------------------------------------------------------------

def curves_path(name: str) -> Path:
    return RESULTS / f"{name}_curves.json"


def row_key(r: dict) -> str:
    return f"{r['model']}|{r['method']}|{r['setting']}"


def add_vs_dense(rows: list[dict]) -> list[dict]:
    """vs_dense: value minus the dense twin's (same model and metric): the dense run of the same steps (equal
    steps) or else the one nearest in training FLOPs (equal FLOPs), as a results file can hold several."""
    dense = [r for r in rows if r["method"] == "dense"]
    for r in rows:
        twins = [d for d in dense if (d["model"], d["metric"]) == (r["model"], r["metric"])]
        same = [d for d in twins if d["setting"].split()[-1] == r["setting"].split()[-1]]
        ref = same or sorted(twins, key=lambda d: abs(math.log(d["train_flops"] / r["train_flops"])))
        r["vs_dense"] = round(r["value"] - ref[0]["value"], 4) if ref else None
    return rows


def notes_for(rows: list[dict], args, skipped: list[str]) -> list[str]:
    notes = []
    if args.preset == "cpu":
        notes.append("Smoke-scale run: tiny models trained for a few dozen steps on the CPU in fp32, to check the "
                     "benchmark end to end. Its perplexities are measured but are not the evidence for the issue's "
                     "quality claims; the GPU preset's results (structured_ffn_train.json) are.")
    by_model: dict[str, list[dict]] = {}
    for r in rows:
        if r["metric"] == "val_ppl":
            by_model.setdefault(r["model"], []).append(r)
    for model, rs in by_model.items():
        r0 = rs[0]
        steps = ", ".join(f"{r['method']} {r['steps']}" for r in rs)
        notes.append(f"{model}: d_model {r0['d_model']}, {r0['n_layer']} layers, {r0['n_head']} heads, GELU FFN "
                     f"{4 * r0['d_model']}, rotary positions, tied embeddings, vocab {r0['vocab']}; seq_len "
                     f"{r0['seq_len']}, batch {r0['batch']} sequences ({r0['batch'] * r0['seq_len']:,} tokens a step); "
                     f"AdamW lr {r0['lr']:g} (weight decay 0.1, betas 0.9/0.95, clip 1.0), {WARMUP_FRACTION:.0%} "
                     f"linear warm-up then cosine to 10%; {r0['dtype']}; steps: {steps}.")
    corpora = sorted({(r["corpus"], r["corpus_files"], r["train_tokens"], r["val_tokens"], r["tokenizer"])
                      for r in rows})
    for src, nfiles, ntrain, nval, tok in corpora:
        notes.append(f"Training text: {corpus_label(src)}, {nfiles} files, split by file (10% held out): "
                     f"{ntrain:,} train and {nval:,} val tokens. Tokenizer: {tok}, trained on the train split by "
                     "slimkit.structured.data.prepare_corpus. Every run sees the same batches (a pure function of "
                     "seed and step).")
    evals = sorted({r["eval_tokens"] for r in rows})
    notes.append(f"val_ppl: perplexity at the end of training on {', '.join(f'{e:,}' for e in evals)} held-out "
                 "tokens of the val split (non-overlapping seq_len windows spread evenly over it).")
    pyd = sorted({(r["pydocs_source"], r["pydocs_tokens"]) for r in rows if r["metric"] == "ppl_pydocs"})
    if pyd:
        for src, n in pyd:
            notes.append(f"ppl_pydocs: perplexity on the Python 3.11 docs ({src}, {n:,} tokens with the training "
                         "tokenizer; the same number of evenly spread windows as val_ppl), a second corpus the "
                         "models never trained on.")
    else:
        notes.append("No ppl_pydocs rows: the training text is the Python docs itself (or they are absent), so "
                     "there is no second held-out corpus; install linux-doc-6.1 for the two-corpus comparison.")
    budgets = sorted({r["budget"] for r in rows})
    if "equal-steps" in budgets:
        notes.append("Equal steps: every model of a size trains for the same steps on the same batches, so the "
                     "structured models spend fewer training FLOPs than dense (train_flops); compare them along "
                     "the FLOP axis of structured_ffn_train_loss.png." if args.preset != "cpu" else
                     "Equal steps: every model of a size trains for the same steps on the same batches, so the "
                     "structured models spend fewer training FLOPs than dense (train_flops).")
    if "equal-flops" in budgets:
        notes.append("Equal FLOPs (--equal-flops): structured runs train for more steps, chosen so that their "
                     "training FLOPs (guide included) match the dense run's, as the paper compares.")
    shapes = sorted({(r["model"], r["method"].removesuffix("-sg"), r.get("ffn_shape", "?"), r["ffn_ratio"]) for r in rows
                     if r["method"] != "dense"})
    notes.append(f"Structured runs: both FFN linears of every block replaced at param_ratio {args.param_ratio:g} by "
                 "slimkit.structured.replace_ffn, freshly initialised (the paper's init); as built: "
                 + "; ".join(f"{m} {k}: {sh} (FFN weights {ra:.3f} of dense)" for m, k, sh, ra in shapes)
                 + ". '-sg': self-guided training, a dense guide mixed in with a share decaying on a cosine over "
                 "the first 50% of the steps, then dropped; its FLOPs are counted in train_flops.")
    notes.append("train_flops: 6 x matmul weights per token (output head included, active guides included) plus "
                 "attention's 12 x layers x seq_len x d_model, times tokens. vs_dense: value minus the dense run's. "
                 "seconds: wall time of the whole run (build, training, evaluations, checkpoint, second corpus); "
                 "train_s: the training steps alone.")
    notes += [f"not run: {s}" for s in skipped]
    return notes


def plot(name: str, curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"dense": "black", "lowrank": "tab:blue", "lowrank-sg": "tab:cyan", "blockdense": "tab:red",
              "blockdense-sg": "tab:orange", "blockshuffle": "tab:green", "blockshuffle-sg": "tab:olive"}
    models = sorted({c["model"] for c in curves.values()}, key=lambda m: min(c["dense_params"] for c in
                                                                              curves.values() if c["model"] == m))
    styles = ["--", "-", ":", "-."]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    order = {m: i for i, m in enumerate(METHODS + EXTRA_METHODS)}
    for key, c in sorted(curves.items(), key=lambda kv: (models.index(kv[1]["model"]),
                                                          order.get(kv[1]["method"], 99), kv[1]["steps"])):
        losses = np.asarray(c["losses"], dtype=np.float64)
        fl = np.cumsum(np.where(np.arange(len(losses)) < c["guided_steps"], c["fg"], c["fp"])) * c["tokens_per_step"]
        span = max(1, len(losses) // 25)
        smooth = np.convolve(losses, np.ones(span) / span, mode="valid")
        ls = styles[models.index(c["model"]) % len(styles)]
        color = colors.get(c["method"], "gray")
        lab = f"{c['model']} {c['method']} ({c['steps']} steps)"
        ax1.plot(fl[span - 1:], smooth, ls, color=color, lw=1.3, label=lab)
        h = c["history"]
        ax2.plot([p["train_flops"] for p in h], [p["val_loss"] for p in h], ls, marker="o", ms=3, color=color,
                 lw=1.3, label=lab)
    for ax, title in ((ax1, "training loss (running mean over 1/25 of the steps)"),
                      (ax2, "held-out (val) loss at the evaluations")):
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
    lows = [p["val_loss"] for c in curves.values() for p in c["history"]]
    if lows:
        ax2.set_ylim(min(lows) - 0.1, np.percentile(lows, 90) + 0.3)
        tail = [v for c in curves.values() for v in c["losses"][len(c["losses"]) // 10:]]
        ax1.set_ylim(min(tail) - 0.1, np.percentile(tail, 95) + 0.3)
    ax2.legend(fontsize=7, loc="upper right")
    fig.suptitle(f"{name}: dense vs structured FFNs at 32% FFN parameters (line style = model size)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- main -------------------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=tuple(PRESETS), default=None,
                    help="gpu (default where CUDA is available) or cpu (tiny models, smoke scale)")
    ap.add_argument("--device", default=None, help="default cuda when available, else cpu")
    ap.add_argument("--name", default=None, help="results name (default structured_ffn_train, _cpu for the cpu preset)")
    ap.add_argument("--sizes", default=None, help="preset size names (gpu/cpu: small,medium) or DxL / DxLxH")
    ap.add_argument("--kinds", default=",".join(METHODS), help=f"methods, of {', '.join(METHODS + EXTRA_METHODS)}")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None, help="sequences per step")
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--param-ratio", type=float, default=0.32)
    ap.add_argument("--equal-flops", action="store_true",
                    help="structured runs train for more steps, to match the dense run's training FLOPs")
    ap.add_argument("--corpus", default=None, help=f"training text folder (default {LINUX_DOCS} if present, else "
                    "the Python docs)")
    ap.add_argument("--pydocs", default=None, help="second held-out corpus (default $SLIMKIT_PYDOCS_DIR or "
                    "/usr/share/doc/python3.11/html/_sources)")
    ap.add_argument("--no-second", action="store_true", help="skip the second corpus")
    ap.add_argument("--data-dir", default=None, help="prepared token folder (default: slimkit's cache)")
    ap.add_argument("--tokenizer", default="bpe", choices=("bpe", "smollm2"))
    ap.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary (gpu 8192, cpu 2048)")
    ap.add_argument("--eval-tokens", type=int, default=None)
    ap.add_argument("--prepare-only", action="store_true", help="tokenise the corpora into --data-dir and stop")
    ap.add_argument("--plan", action="store_true", help="print the grid, its FLOPs and a time estimate; train nothing")
    ap.add_argument("--runs-dir", default=None, help="run folders (default runs/<name>)")
    ap.add_argument("--keep-runs", action="store_true", help="keep each run's final checkpoint")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds: skip a run that would end after this (estimated from the runs done)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the models")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (cpu preset: 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--append", action="store_true", help="keep the rows of an earlier run that this one does not redo")
    args = ap.parse_args()
    t_start = time.perf_counter()

    cuda = torch.cuda.is_available()
    args.preset = args.preset or ("gpu" if cuda else "cpu")
    preset = PRESETS[args.preset]
    args.device = args.device or ("cuda" if cuda else "cpu")
    args.name = args.name or ("structured_ffn_train" if args.preset == "gpu" else "structured_ffn_train_cpu")
    for k in ("steps", "batch", "seq_len", "lr", "vocab_size", "eval_tokens"):
        if getattr(args, k) is None:
            setattr(args, k, preset[k])
    args.pydocs = args.pydocs or str(pydocs_dir())
    threads = args.threads if args.threads is not None else preset["threads"]
    if threads:
        torch.set_num_threads(threads)
    sizes = [parse_size(s, preset) for s in (args.sizes or ",".join(preset["sizes"])).split(",")]
    methods = [m for m in args.kinds.split(",") if m]
    for m in methods:
        method_parts(m)

    if args.plan:
        vocab = 64 * math.ceil(args.vocab_size / 64)
        print_plan(args, plan_runs(args, sizes, methods, vocab), vocab)
        return
    corpus = load_corpus(args)
    args.data_dir = str(corpus.dir)
    second = second_corpus(corpus, args)
    print(f"corpus {corpus.meta['source']}: {corpus.train.size:,} train / {corpus.val.size:,} val tokens; "
          f"second corpus: {'none' if second is None else f'{second[0].size:,} tokens'}", flush=True)
    if args.prepare_only:
        print(f"prepared in {corpus.dir}")
        return
    vocab = 64 * math.ceil(corpus.vocab_size / 64)  # as the trainer pads it
    runs = plan_runs(args, sizes, methods, vocab)
    runs_dir = Path(args.runs_dir or Path("runs") / args.name)
    dtype = "bf16 autocast" if args.device.startswith("cuda") else "fp32"
    tps = args.batch * args.seq_len
    evals = preset["evals"]

    rows, skipped = [], []
    old_curves = json.loads(curves_path(args.name).read_text())["runs"] if (
        args.append and curves_path(args.name).exists()) else {}
    curves = dict(old_curves)
    done_time: dict[str, tuple[float, int, float]] = {}  # size -> (seconds, steps, flops) of its first run
    for r in runs:
        kind, sg, steps = r["kind"], r["sg"], r["steps"]
        setting = f"r={1 if kind == 'dense' else args.param_ratio:g} steps={steps}"
        if args.deadline is not None and done_time:
            est = estimate_seconds(r, done_time)
            if time.perf_counter() - t_start + est > args.deadline:
                skipped.append(f"{r['label']} {r['method']} {setting} (estimated {est:.0f} s would pass the "
                               f"--deadline of {args.deadline:.0f} s)")
                print(f"skipping: {skipped[-1]}", flush=True)
                continue
        out = runs_dir / f"{r['label']}-{r['method']}-{steps}"
        shutil.rmtree(out, ignore_errors=True)  # this benchmark's own run folder: always a fresh run
        cfg = base_config(args, r["shape"], out=str(out), steps=steps, ffn=kind, self_guided=sg,
                          warmup=max(1, round(WARMUP_FRACTION * steps)), eval_every=max(1, steps // evals),
                          eval_tokens=args.eval_tokens, ckpt_every=0, keep_ckpts=1, device=args.device,
                          compile=args.compile, progress=not args.quiet)
        print(f"== {r['label']} {r['method']} {setting}: {r['flops'] / 1e12:.2f} TFLOPs planned", flush=True)
        t0 = time.perf_counter()
        rep = train(cfg)
        model = load_model(out, args.device)
        ffn_params = sum(p.numel() for n, p in model.named_parameters() if ".mlp." in n)
        ffn_shape = ffn_shape_of(model)
        dense_ffn = 2 * r["shape"][0] * 4 * r["shape"][0] * r["shape"][1]
        metrics = {"val_ppl": rep["val_ppl"]}
        if second is not None:  # as the trainer evaluates: bf16 autocast on CUDA, fp32 on the CPU
            dev = torch.device(args.device)
            windows = eval_windows(second[0], args.seq_len, args.eval_tokens)

            def autocast():
                return (torch.autocast(dev.type, dtype=torch.bfloat16) if dev.type == "cuda"
                        else contextlib.nullcontext())

            metrics["ppl_pydocs"] = math.exp(evaluate(model, windows, args.batch, dev, autocast, Dist()))
        del model
        seconds = time.perf_counter() - t0
        if not args.keep_runs:
            shutil.rmtree(out / "ckpt", ignore_errors=True)
        if abs(rep["train_flops"] - r["flops"]) > 1e-6 * r["flops"]:
            print(f"warning: the trainer counted {rep['train_flops']:.4g} FLOPs, the plan {r['flops']:.4g}", flush=True)
        done_time.setdefault(r["size"], (seconds, steps, rep["train_flops"]))
        base = {"model": r["label"], "method": r["method"], "setting": setting,
                "train_flops": rep["train_flops"], "params": rep["params"], "ffn_params": ffn_params,
                "ffn_ratio": round(ffn_params / dense_ffn, 4), "ffn_shape": ffn_shape, "tokens": rep["tokens"], "seconds": round(seconds, 1),
                "train_s": round(rep["wall_s"], 1), "tokens_per_s": round(rep["tokens_per_s"] or 0),
                "steps": steps, "budget": "equal-flops" if args.equal_flops and kind != "dense" else "equal-steps",
                "d_model": r["shape"][0], "n_layer": r["shape"][1], "n_head": r["shape"][2], "seq_len": args.seq_len,
                "batch": args.batch, "lr": args.lr, "vocab": vocab, "dtype": dtype, "device": args.device,
                "val_loss": round(rep["val_loss"], 5), "train_ppl": round(rep["train_ppl"], 4),
                "eval_tokens": args.eval_tokens, "corpus": corpus.meta["source"],
                "corpus_files": corpus.meta["n_files"], "train_tokens": int(corpus.train.size),
                "val_tokens": int(corpus.val.size), "tokenizer": f"{corpus.meta['tokenizer_name']}, "
                f"{corpus.vocab_size} tokens", "seed": args.seed}
        for metric, value in metrics.items():
            row = {**base, "metric": metric, "value": round(value, 4)}
            if metric == "ppl_pydocs":
                row.update(pydocs_source=second[1]["source"], pydocs_tokens=int(second[0].size))
            rows.append(row)
        curves[row_key(rows[-1])] = {
            "model": r["label"], "method": r["method"], "steps": steps, "tokens_per_step": tps,
            "fg": r["fg"], "fp": r["fp"], "guided_steps": int(r["guide_fraction"] * steps) if sg else 0,
            "dense_params": r["dense_params"], "losses": [round(v, 4) for v in rep["losses"]],
            "history": [{k: h[k] for k in ("step", "train_flops", "val_loss", "train_loss")} for h in rep["history"]]}
        print(f"   {r['label']} {r['method']}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items())
              + f" ({seconds:.0f} s, {rep['tokens_per_s'] or 0:,.0f} tok/s)", flush=True)
        all_rows = add_vs_dense(merge_rows(args.name, rows) if args.append else rows)
        keys = {row_key(x) for x in all_rows}
        write_results(args.name, args.device, all_rows, notes=notes_for(all_rows, args, skipped), columns=COLUMNS)
        curves_path(args.name).write_text(json.dumps({"runs": {k: v for k, v in curves.items() if k in keys}}))
        plot(args.name, {k: v for k, v in curves.items() if k in keys}, RESULTS / f"{args.name}_loss.png")
    if skipped and rows:
        all_rows = add_vs_dense(merge_rows(args.name, rows) if args.append else rows)
        write_results(args.name, args.device, all_rows, notes=notes_for(all_rows, args, skipped), columns=COLUMNS)
    print(f"done in {time.perf_counter() - t_start:.0f} s on {device_name(args.device)}: bench/results/{args.name}.json")


if __name__ == "__main__":
    main()
