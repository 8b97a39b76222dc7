"""Structured FFNs inside a model: the time of one training step (forward, backward, fused AdamW update) of a GPT
whose FFNs are dense, low-rank, BlockShuffle or BlockDense, eager and through the cuBLASLt GELU epilogues, against
the dense GPT in the same run. Where structured_ffn_speed.py times one FFN alone, synchronised per call, here the
FFNs sit between attention blocks and the host runs ahead of the GPU as in training, so the figure is what a
training run sees; the FFN's share of the step bounds what any FFN speed-up can give.

    python bench/structured_gpt_step.py --device cuda            # d 2048, 4 layers, 16 x 1024 tokens, bf16
    python bench/structured_gpt_step.py                          # CPU smoke run (tiny, fp32)

Rows (bench/results/<name>.json): model "gpt-d<d>-L<layers>", method dense | lowrank | blockshuffle | blockdense,
"-lt" for set_ffn_kernel(model, "cublaslt"), setting "r=0.32 d=2048 T=16384" (T: tokens per step), metric
step_speedup (dense step time / this step time) with step_ms and dense_ms; metric ffn_share on the dense row: the
share of the dense step spent in its FFNs (the dense step time less the same model's without FFNs, over the step).
Timing: CUDA events around --iters back-to-back steps after warm-up, median of --loops (wall clock on the CPU).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_results  # noqa: E402
from structured_ffn_speed import loop_ms  # noqa: E402
from slimkit.structured import epilogue, replace_ffn  # noqa: E402
from slimkit.structured.gpt import GPT, GPTConfig, set_ffn_kernel  # noqa: E402


class NoFFN(torch.nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


def step_ms(model, idx, tgt, device, iters: int, loops: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda" or None)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(idx, tgt)[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        return loop_ms(step, iters, loops, warmup=3)
    for _ in range(3):
        step()
    times = []
    for _ in range(loops):
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        times.append((time.perf_counter() - t0) * 1e3 / iters)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--name", default=None, help="results name (default structured_gpt_step, _cpu on the CPU)")
    ap.add_argument("--d", type=int, default=None, help="d_model (GPU 2048, CPU 64)")
    ap.add_argument("--layers", type=int, default=None, help="blocks (GPU 4, CPU 2)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (GPU 1024, CPU 32)")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (GPU 16, CPU 4)")
    ap.add_argument("--ratios", default="0.32,0.25")
    ap.add_argument("--kinds", default="lowrank,blockdense")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--loops", type=int, default=5)
    ap.add_argument("--append", action="store_true", help="keep the rows of an earlier run that this one does not redo "
                    "(the dense rows are measured again: each row's dense_ms is its own run's)")
    args = ap.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    d, layers = args.d or (2048 if gpu else 64), args.layers or (4 if gpu else 2)
    seq, batch = args.seq_len or (1024 if gpu else 32), args.batch or (16 if gpu else 4)
    iters = args.iters or (10 if gpu else 2)
    name = args.name or ("structured_gpt_step" if gpu else "structured_gpt_step_cpu")
    cfg = GPTConfig(vocab_size=8192, n_layer=layers, n_head=d // 128 if gpu else 2, d_model=d, seq_len=seq,
                    ffn="gelu_tanh")
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(device)
    tgt = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(device)
    lt = gpu and epilogue.lt is not None
    model_name, tokens = f"gpt-d{d}-L{layers}", batch * seq
    rows = []

    def build(kind: str, ratio: float, kernel: str = "eager") -> torch.nn.Module:
        torch.manual_seed(0)
        m = GPT(cfg).to(device)           # replace_ffn builds the structured layers (their SVD init) there too
        if kind != "dense":
            replace_ffn(m, kind, ratio)
        return set_ffn_kernel(m, kernel)

    t0 = time.time()
    dense_ms = step_ms(build("dense", 1.0), idx, tgt, device, iters, args.loops)
    bare = build("dense", 1.0)
    for block in bare.blocks:
        block.mlp = NoFFN()
    bare_ms = step_ms(bare, idx, tgt, device, iters, args.loops)
    rows.append({"model": model_name, "method": "dense", "setting": f"r=1 d={d} T={tokens}", "metric": "step_speedup",
                 "value": 1.0, "step_ms": dense_ms, "dense_ms": dense_ms, "seconds": round(time.time() - t0, 2)})
    rows.append({"model": model_name, "method": "dense", "setting": f"r=1 d={d} T={tokens}", "metric": "ffn_share",
                 "value": round((dense_ms - bare_ms) / dense_ms, 4), "step_ms": bare_ms, "dense_ms": dense_ms,
                 "seconds": 0.0})
    print(f"dense {dense_ms:.3f} ms/step, without FFNs {bare_ms:.3f}")
    runs = [("dense", 1.0, "-lt", "cublaslt")] if lt else []
    for ratio in (float(r) for r in args.ratios.split(",")):
        for kind in args.kinds.split(","):
            runs += [(kind, ratio, "", "eager")] + ([(kind, ratio, "-lt", "cublaslt")] if lt else [])
    for kind, ratio, suffix, kernel in runs:
        t0 = time.time()
        ms = step_ms(build(kind, ratio, kernel), idx, tgt, device, iters, args.loops)
        rows.append({"model": model_name, "method": kind + suffix, "setting": f"r={ratio:g} d={d} T={tokens}",
                     "metric": "step_speedup", "value": round(dense_ms / ms, 4), "step_ms": ms, "dense_ms": dense_ms,
                     "seconds": round(time.time() - t0, 2)})
        print(f"{kind + suffix} r={ratio:g}: {ms:.3f} ms/step, x{dense_ms / ms:.3f}")
    notes = [f"GPT d_model {d}, {layers} blocks, {cfg.n_head} heads, GELU (tanh) FFN 4d, vocab 8192; {batch} x {seq} "
             f"tokens a step; {'bf16 autocast, fused AdamW' if gpu else 'fp32, AdamW'}. step: forward, loss, backward, "
             f"optimizer step; {'CUDA events around' if gpu else 'wall clock of'} {iters} back-to-back steps after 3 "
             f"warm-up steps, median of {args.loops}.",
             "ffn_share: (dense step - the same GPT with its FFNs removed) / dense step."]
    write_results(name, args.device, rows, notes,
                  columns=("model", "method", "setting", "metric", "value", "step_ms", "dense_ms", "seconds"),
                  append=args.append)


if __name__ == "__main__":
    main()
