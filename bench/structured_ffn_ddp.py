"""Multi-GPU training with `slimkit train-lm`: the same run on one GPU (gradient accumulation over N micro-batches)
and data-parallel on N GPUs through torchrun (DDP, and FSDP2 with --fsdp), with the same global batch, updates and
data order; held-out perplexity and tokens/s of each.

    python bench/structured_ffn_ddp.py --device cuda --gpus 2 --data-dir DIR       # 2 GPUs of one host
    python bench/structured_ffn_ddp.py --device cpu --data-dir DIR --preset cpu    # smoke run: 2 gloo processes

DIR is a prepared token folder (`slimkit tokenize`, or bench/structured_ffn_train.py --prepare-only). Every run
is a subprocess running the CLI exactly as a user would (torchrun: python -m torch.distributed.run --standalone).
Rows (bench/results/<name>.json, DESIGN.md's shape): model "gpt-<params>", method "<ffn>[-sg]", setting
"1x<accum> accum" | "ddp x<N>" | "fsdp x<N>", metric val_ppl and tokens_per_s; seconds: the run's wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_results  # noqa: E402

PRESETS = {  # d_model, layers, heads, seq_len, per-process batch, steps
    "gpu": dict(d_model=512, n_layer=6, n_head=8, seq_len=512, batch=16, steps=300),
    "cpu": dict(d_model=64, n_layer=2, n_head=2, seq_len=64, batch=4, steps=8),
}
KINDS = {"dense": ["--ffn", "dense"], "lowrank-sg": ["--ffn", "lowrank", "--param-ratio", "0.32", "--self-guided"]}


def run(cmd: list[str], out: Path, timeout: float) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    report = json.loads((out / "report.json").read_text())
    report["seconds"] = time.perf_counter() - t0
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--gpus", type=int, default=2, help="processes for the data-parallel runs")
    ap.add_argument("--data-dir", required=True, help="prepared token folder (train.bin, val.bin, tokenizer.json)")
    ap.add_argument("--preset", choices=tuple(PRESETS), default=None, help="default: gpu on cuda, cpu on cpu")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--modes", default="single,ddp,fsdp")
    ap.add_argument("--runs-dir", default="runs/structured_ffn_ddp")
    ap.add_argument("--name", default=None)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    args = ap.parse_args()
    preset = PRESETS[args.preset or ("gpu" if args.device == "cuda" else "cpu")]
    n = args.gpus
    name = args.name or ("structured_ffn_ddp" if args.device == "cuda" else "structured_ffn_ddp_cpu")
    shape = ["--d-model", str(preset["d_model"]), "--n-layer", str(preset["n_layer"]), "--n-head", str(preset["n_head"]),
             "--seq-len", str(preset["seq_len"]), "--batch-size", str(preset["batch"]), "--steps", str(preset["steps"]),
             "--warmup", str(max(1, preset["steps"] // 10)), "--eval-every", "0", "--ckpt-every", "0",
             "--device", args.device, "--data-dir", args.data_dir, "--quiet", "--seed", "0"]
    rows = []
    for kind in args.kinds.split(","):
        for mode in args.modes.split(","):
            out = Path(args.runs_dir) / f"{kind}-{mode}"
            shutil.rmtree(out, ignore_errors=True)    # the bench's own run folder: always a fresh run
            cli = ["-m", "slimkit.cli", "train-lm", "--out", str(out), "--no-resume", *KINDS[kind], *shape]
            if mode == "single":     # one process, the same global batch through gradient accumulation
                cmd, setting = [sys.executable, *cli, "--grad-accum", str(n)], f"1x{n} accum"
            else:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *cli]
                cmd += ["--fsdp"] if mode == "fsdp" else []
                setting = f"{mode} x{n}"
            rep = run(cmd, out, args.timeout)
            model = f"gpt-{round(rep['params'] / 1e6)}m"
            for metric in ("val_ppl", "tokens_per_s"):
                rows.append({"model": model, "method": kind, "setting": setting, "metric": metric,
                             "value": round(rep[metric], 3 if metric == "val_ppl" else 0),
                             "seconds": round(rep["seconds"], 1), "world_size": rep["world_size"],
                             "steps": rep["steps"], "tokens": rep["tokens"]})
            print(f"{kind} {setting}: val_ppl {rep['val_ppl']:.3f}, {rep['tokens_per_s']:,.0f} tok/s, "
                  f"{rep['seconds']:.0f} s", flush=True)
    p = preset
    notes = [
        f"GPT d_model {p['d_model']}, {p['n_layer']} layers, {p['n_head']} heads, seq_len {p['seq_len']}, "
        f"{p['batch']} sequences per micro-batch per process, {p['steps']} updates, global batch {p['batch'] * n} "
        f"sequences in every setting: one process accumulates {n} micro-batches, the data-parallel runs take one "
        f"each on {n} processes. bf16 autocast on CUDA. lowrank-sg: low-rank FFNs at 0.32 with self-guided training.",
        "Each run is the CLI as users run it: `slimkit train-lm` (python -m slimkit.cli), data-parallel under "
        "`torchrun --standalone` (DDP; --fsdp: FSDP2). Same seed, same batches: the data-parallel losses should "
        "match the single-process ones up to reduction order. tokens_per_s: training tokens per second over all "
        "processes; seconds: the whole run (start-up, training, final evaluation).",
    ]
    notes.append(f"{n} processes{' (one GPU each)' if args.device == 'cuda' else ' (gloo, on the CPU)'}.")
    write_results(name, args.device, rows,
                  notes=notes, columns=("model", "method", "setting", "metric", "value", "seconds", "world_size",
                                        "steps", "tokens"))


if __name__ == "__main__":
    main()
