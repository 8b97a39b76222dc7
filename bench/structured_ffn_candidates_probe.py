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

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_results  # noqa: E402
from structured_ffn_speed import lt_probe_parser, build, events_ms, lt_device, lt_step_rows  # noqa: E402

from slimkit.structured import epilogue as EP  # noqa: E402


def main() -> None:
    ap = lt_probe_parser(__doc__)
    ap.add_argument("--variants", default="8x3,32x3,32x10", help="CANDIDATESxTUNE_ITERS list")
    args = ap.parse_args()
    dev = lt_device()
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
    rows += lt_step_rows(d, T, map(float, args.ratios.split(",")), args.kinds.split(","), args.align,
                         {v: (lambda capture, v=v: planned(v, capture)) for v in variants}, args.reps, args.rounds, dev,
                         method=lambda kind, v: f"{kind}-lt-graph candidates{v[0]}-iters{v[1]}")
    notes = [
        "bf16, one GPU; CUDA events, L2 flushed before each call, median of "
        f"{args.reps}, fastest of {args.rounds} interleaved rounds. 'candidatesC-itersI': the epilogue plans made "
        "with epilogue.CANDIDATES = C algorithms from cuBLASLt's heuristic, each timed TUNE_ITERS = I times on the "
        "first call (slimkit's default: 8 x 3). 'gpu_ms': the piece alone; 'fwbw_speedup': one graphed "
        "forward+backward step through fused_ffn(matmul='cublaslt'), value = the dense step's graphed time / this "
        "one's.",
    ]
    write_results("structured_ffn_candidates_probe", str(dev), rows, notes,
                  columns=("model", "method", "setting", "metric", "value", "ms", "paired", "ratio"))


if __name__ == "__main__":
    main()
