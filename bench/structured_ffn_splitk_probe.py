"""Two changes to the '-lt' FFN backward, measured piece by piece and in the whole step, GPU only.

- Split-K for small block-diagonal weight gradients (layers.split_bmm): BlockDense's first factor at d_model 2048
  and 25% is 4 blocks of 128 x 512 summed over 16384 tokens, 16 output tiles for an H100's 132 SMs. split_bmm cuts
  the tokens into chunks (one bmm per block with fp32 outputs, then one fp32 sum).
- fc1's bias gradient from a ones column with no copy (epilogue.ones_buffer): where fc1 has a head (low-rank,
  BlockDense), the head's matmul writes h into a buffer whose next column is ones, so dpre^T @ [h, 1, 0...] carries
  the bias gradient; with_ones copied h for that, and only at ranks where the column stayed in the last tile.

Rows, in one run on one GPU:
- 'gpu_ms' (model ffn-fc1-blocks): the first factor's weight gradient dw (4, q, p) = dh^T x per block, plain bmm
  against split_bmm at a forced number of chunks S, and the number split_k picks; errors against fp32;
- 'fwbw_speedup' (model ffn): one forward+backward step captured as a CUDA graph and replayed (GPU time alone),
  through fused_ffn(matmul='cublaslt'), over the dense step graphed likewise, for each variant: '-lt' both
  changes, '-lt-nosplit' without split-K, '-lt-noones' with the bias gradient as a separate sum, '-lt-neither'.
  Variants alternate over --rounds rounds and each keeps its fastest median.

    python bench/structured_ffn_splitk_probe.py
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_results  # noqa: E402
from structured_ffn_speed import LtFFN, build, events_ms, graphed_step  # noqa: E402

from slimkit.structured import epilogue as EP  # noqa: E402
from slimkit.structured import layers as L  # noqa: E402


def no_ones(shape, like):
    """The bias gradient as a separate sum: no ones column beside h."""
    return None, like.new_empty(shape)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--ratios", default="0.25,0.32")
    ap.add_argument("--kinds", default="blockdense,lowrank")
    ap.add_argument("--align", type=int, default=64)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    dev = torch.device("cuda")
    if not torch.cuda.is_available() or not EP.available(torch.empty(1, device=dev)):
        sys.exit("needs a CUDA GPU and nvmath-python (pip install slimkit[cublaslt])")
    torch.manual_seed(0)
    d, T, dt = args.d, args.tokens, torch.bfloat16
    rows = []

    # the piece: BlockDense's first-factor weight gradient at each ratio
    split_k = L.split_k
    for ratio in map(float, args.ratios.split(",")):
        ffn, _ = build("blockdense", d, ratio, dev, dt, args.align)
        nb, q, p = ffn.fc1.blocks.shape
        dh = torch.randn(T, nb, q, device=dev, dtype=dt)
        x = torch.randn(T, nb, p, device=dev, dtype=dt)
        a, b = dh.transpose(0, 1).transpose(1, 2), x.transpose(0, 1)
        ref = torch.bmm(a.float(), b.float())
        setting = f"r={ratio:g} d={d} T={T} blocks {nb}x{q}x{p}"
        picked = split_k(nb, q, p, T, dev)
        for s in (1, 2, 4, 8, 16, 32):
            L.split_k = lambda *_, s=s: s
            try:
                fn = (lambda: torch.bmm(a, b)) if s == 1 else (lambda: L.split_bmm(a, b))
                err = ((fn().float() - ref).norm() / ref.norm()).item()
                ms = min(events_ms(fn, dev, args.reps) for _ in range(args.rounds))
            finally:
                L.split_k = split_k
            rows.append({"model": "ffn-fc1-blocks", "method": "bmm" if s == 1 else f"split{s}", "setting": setting,
                         "metric": "gpu_ms", "value": round(ms, 4), "rel_err": round(err, 5), "picked": picked})
            print(rows[-1], flush=True)

    # the whole step, graphed
    x = torch.randn(T, d, device=dev, dtype=dt)
    grad = torch.randn_like(x)
    dense, _ = build("dense", d, 1.0, dev, dt)
    dense_step = graphed_step(dense, x, grad)
    base = min(events_ms(dense_step, dev, args.reps) for _ in range(args.rounds))
    rows.append({"model": "ffn", "method": "dense-graph", "setting": f"r=1 d={d} T={T}", "metric": "fwbw_ms",
                 "value": round(base, 4), "ms": round(base, 4), "ratio": 1.0})
    ones = EP.ones_buffer
    variants = {"-lt": (split_k, ones), "-lt-nosplit": (lambda *_: 1, ones), "-lt-noones": (split_k, no_ones),
                "-lt-neither": (lambda *_: 1, no_ones)}
    for ratio in map(float, args.ratios.split(",")):
        for kind in args.kinds.split(","):
            ffn, real = build(kind, d, ratio, dev, dt, args.align)
            lt = LtFFN(ffn.fc1, ffn.fc2)
            steps = {}
            for name, (sk, ob) in variants.items():       # each variant captured with its own code path
                L.split_k, EP.ones_buffer = sk, ob
                try:
                    steps[name] = graphed_step(lt, x, grad)
                finally:
                    L.split_k, EP.ones_buffer = split_k, ones
            best = {}
            for _ in range(args.rounds):
                for name, step in steps.items():
                    ms = events_ms(step, dev, args.reps)
                    best[name] = min(best.get(name, ms), ms)
            for name, ms in best.items():
                rows.append({"model": "ffn", "method": kind + name + "-graph", "setting": f"r={ratio:g} d={d} T={T}",
                             "metric": "fwbw_speedup", "value": round(base / ms, 3), "ms": round(ms, 4),
                             "ratio": round(real, 4), "rank": ffn.fc1.rank})
                print(rows[-1], flush=True)
            del steps
    again = min(events_ms(dense_step, dev, args.reps) for _ in range(args.rounds))
    rows.append({"model": "ffn", "method": "dense-graph-again", "setting": f"r=1 d={d} T={T}", "metric": "fwbw_ms",
                 "value": round(again, 4), "ms": round(again, 4), "ratio": 1.0})
    print(rows[-1], flush=True)
    notes = [
        "bf16, one GPU. 'gpu_ms' rows: BlockDense's first-factor weight gradient alone, CUDA events, L2 flushed "
        f"before each call, median of {args.reps}, fastest of {args.rounds} rounds; 'bmm' the plain torch.bmm, "
        "'splitS' layers.split_bmm cut into S token chunks; 'picked': the S layers.split_k chooses; rel_err "
        "against fp32.",
        "'fwbw_speedup' rows: the FFN d -> 4d -> GELU(tanh) -> d with bias, one forward+backward step through "
        "fused_ffn(matmul='cublaslt') captured as a CUDA graph and replayed (GPU time alone), value = the dense "
        "step's graphed time (dense-graph) / this one's. '-lt': split-K and the copy-free ones column; "
        "'-lt-nosplit': no split-K; '-lt-noones': the bias gradient as a separate sum; '-lt-neither': neither. "
        "'rank': fc1's.",
    ]
    write_results("structured_ffn_splitk_probe", str(dev), rows, notes,
                  columns=("model", "method", "setting", "metric", "value", "ms", "ratio", "rank", "rel_err",
                           "picked"))


if __name__ == "__main__":
    main()
