"""How many cuBLASLt algorithms the '-lt' FFN path should time per matmul plan, GPU only.

slimkit.structured.epilogue plans each epilogue matmul once: the heuristic proposes up to CANDIDATES algorithms,
each is timed TUNE_ITERS times on the first operands and the fastest kept. This probe re-plans with other values
and times, in one run on one GPU:

- 'gpu_ms' (model ffn-middle): the epilogue matmuls alone at BlockDense 25%, d_model 2048, 16384 tokens: fc1's
  last factor with GELU_AUX_BIAS, and fc2's block-diagonal DGELU backward (four per-block calls);
- 'fwbw_speedup' (model ffn): the whole FFN's training step captured as a CUDA graph and replayed, over the dense
  step graphed likewise.

Variants alternate over --rounds rounds; each keeps its fastest median.

    python bench/structured_ffn_candidates_probe.py
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--ratios", default="0.25,0.32")
    ap.add_argument("--kinds", default="blockdense,lowrank")
    ap.add_argument("--variants", default="8x3,32x3,32x10", help="CANDIDATESxTUNE_ITERS list")
    ap.add_argument("--align", type=int, default=64)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    dev = torch.device("cuda")
    if not torch.cuda.is_available() or not EP.available(torch.empty(1, device=dev)):
        sys.exit("needs a CUDA GPU and nvmath-python (pip install slimkit[cublaslt])")
    torch.manual_seed(0)
    d, T, dt = args.d, args.tokens, torch.bfloat16
    variants = [tuple(map(int, v.split("x"))) for v in args.variants.split(",")]
    default = (EP.CANDIDATES, EP.TUNE_ITERS)
    rows = []

    def planned(variant, fn):
        """fn run once under `variant` with no plans cached (so that its plans are made with it), then kept."""
        EP.CANDIDATES, EP.TUNE_ITERS = variant
        EP._PLANS.clear()
        try:
            return fn()
        finally:
            EP.CANDIDATES, EP.TUNE_ITERS = default

    # the pieces, BlockDense 25%
    ffn, _ = build("blockdense", d, 0.25, dev, dt, args.align)
    k, n = ffn.fc1.v.shape[1], ffn.fc1.v.shape[0]
    blocks = ffn.fc2.blocks.detach()
    h = torch.randn(T, k, device=dev, dtype=dt)
    w, b = ffn.fc1.v.detach(), torch.randn(n, device=dev, dtype=dt)
    dz = torch.randn(T, blocks.shape[0], blocks.shape[1], device=dev, dtype=dt)
    pre = torch.randn(T, n, device=dev, dtype=dt)
    pieces = {"up GELU_AUX_BIAS": lambda: EP.linear_gelu(h, w, b),
              "down DGELU x4": lambda: EP.dgelu_block_diag(dz, blocks, pre)}
    for name, fn in pieces.items():
        best = {}
        for _ in range(args.rounds):
            for variant in variants:
                planned(variant, fn)                       # plans made and tuned with this variant
                ms = events_ms(fn, dev, args.reps)
                best[variant] = min(best.get(variant, ms), ms)
        for variant, ms in best.items():
            rows.append({"model": "ffn-middle", "method": f"candidates{variant[0]}-iters{variant[1]}",
                         "setting": f"{name} r=0.25 d={d} T={T}", "metric": "gpu_ms", "value": round(ms, 4)})
            print(rows[-1], flush=True)

    # the whole step, graphed
    x = torch.randn(T, d, device=dev, dtype=dt)
    grad = torch.randn_like(x)
    dense, _ = build("dense", d, 1.0, dev, dt)
    dense_step = graphed_step(dense, x, grad)
    base = min(events_ms(dense_step, dev, args.reps) for _ in range(args.rounds))
    rows.append({"model": "ffn", "method": "dense-graph", "setting": f"r=1 d={d} T={T}", "metric": "fwbw_ms",
                 "value": round(base, 4)})
    for ratio in map(float, args.ratios.split(",")):
        for kind in args.kinds.split(","):
            ffn, real = build(kind, d, ratio, dev, dt, args.align)
            lt = LtFFN(ffn.fc1, ffn.fc2)
            steps = {v: planned(v, lambda: graphed_step(lt, x, grad)) for v in variants}
            best = {}
            for _ in range(args.rounds):
                for v, step in steps.items():
                    ms = events_ms(step, dev, args.reps)
                    best[v] = min(best.get(v, ms), ms)
            for v, ms in best.items():
                rows.append({"model": "ffn", "method": f"{kind}-lt-graph candidates{v[0]}-iters{v[1]}",
                             "setting": f"r={ratio:g} d={d} T={T}", "metric": "fwbw_speedup",
                             "value": round(base / ms, 3), "ms": round(ms, 4), "ratio": round(real, 4)})
                print(rows[-1], flush=True)
            del steps
    notes = [
        "bf16, one GPU; CUDA events, L2 flushed before each call, median of "
        f"{args.reps}, fastest of {args.rounds} interleaved rounds. 'candidatesC-itersI': the epilogue plans made "
        "with epilogue.CANDIDATES = C algorithms from cuBLASLt's heuristic, each timed TUNE_ITERS = I times on the "
        "first call (slimkit's default: 8 x 3). 'gpu_ms': the piece alone; 'fwbw_speedup': one graphed "
        "forward+backward step through fused_ffn(matmul='cublaslt'), value = the dense step's graphed time / this "
        "one's.",
    ]
    write_results("structured_ffn_candidates_probe", str(dev), rows, notes,
                  columns=("model", "method", "setting", "metric", "value", "ms", "ratio"))


if __name__ == "__main__":
    main()
