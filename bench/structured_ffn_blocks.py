"""Which block count makes BlockDense's FFN fastest? Forward and forward+backward time over the dense FFN (d -> 4d ->
GELU -> d, bf16, one GPU) for BlockDense at one parameter ratio and several block counts, the dense FFN timed twice in
the same run (the faster kept). BlockDense's default (blockdense_shape: 4 blocks where the width allows) is the
one this should favour; 1 block is low-rank.

    python bench/structured_ffn_blocks.py --device cuda                 # d_model 2048, 25%, 16384 tokens
    python bench/structured_ffn_blocks.py --device cuda --ratio 0.32 --dims 2048,4096

Rows (bench/results/structured_ffn_blocks.json): method "blockdense-b<k>" (plus "-lt" for the cuBLASLt epilogue
path when nvmath-python is installed), setting "r=0.25 d=2048 T=16384", metric fw_speedup / fwbw_speedup.
Timing: CUDA events around each call, L2 flushed before it (structured_ffn_speed --timing events).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_results  # noqa: E402
from structured_ffn_speed import FFN, LtFFN, events_ms, measure  # noqa: E402
from slimkit.errors import SlimkitError  # noqa: E402
from slimkit.structured import epilogue  # noqa: E402
from slimkit.structured.layers import BlockDenseLinear  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dims", default="2048")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--nblocks", default="1,2,4,8,16")
    ap.add_argument("--align", type=int, default=64, help="rank alignment (raised to 8*nblocks where that is larger)")
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("structured_ffn_blocks: no CUDA GPU here (--device cpu for a CPU smoke run)")
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    lt = dev.type == "cuda" and epilogue.lt is not None
    torch.manual_seed(0)
    rows = []
    for d in map(int, args.dims.split(",")):
        x = torch.randn(args.tokens, d, device=dev, dtype=dt)
        setting = f"r={args.ratio:g} d={d} T={args.tokens}"

        def run(ffn: nn.Module) -> dict:
            return measure(ffn.to(dev, dt), x, args.reps, timer=events_ms)
        dense = [run(FFN(nn.Linear(d, 4 * d), nn.Linear(4 * d, d))) for _ in range(2)]
        base = {k: min(r[k] for r in dense) for k in ("fw_ms", "fwbw_ms")}
        for k in ("fw", "fwbw"):
            rows.append({"model": "ffn", "method": "dense", "setting": setting, "metric": f"{k}_speedup", "value": 1.0,
                         "ms": round(base[f"{k}_ms"], 4), "ratio": 1.0})
        for b in map(int, args.nblocks.split(",")):
            align = max(args.align, 8 * b)
            try:
                fc1 = BlockDenseLinear.from_ratio(d, 4 * d, args.ratio, nblocks=b, align=align)
                fc2 = BlockDenseLinear.from_ratio(4 * d, d, args.ratio, nblocks=b, align=align)
            except SlimkitError as e:
                print(f"skip nblocks={b}: {e}")
                continue
            ratio = (sum(p.numel() for p in (fc1.blocks, fc1.v, fc2.blocks, fc2.v))) / (8 * d * d)
            for cls, tag in ((FFN, ""), (LtFFN, "-lt")) if lt else ((FFN, ""),):
                got = run(cls(fc1, fc2))
                for k in ("fw", "fwbw"):
                    rows.append({"model": "ffn", "method": f"blockdense-b{b}{tag}", "setting": setting,
                                 "metric": f"{k}_speedup", "value": round(base[f"{k}_ms"] / got[f"{k}_ms"], 3),
                                 "ms": round(got[f"{k}_ms"], 4), "ratio": round(ratio, 4)})
                print(rows[-1], f"ranks {fc1.rank}/{fc2.rank}", flush=True)
    notes = [
        "Timing: CUDA events around each call with the L2 flushed before it, median of --reps; the dense FFN timed "
        "twice, the faster kept. 'ratio': the FFN's weights over the dense FFN's (ranks rounded to a multiple of "
        "--align, or of 8 x nblocks where larger). '-lt': GELU and GELU' in cuBLASLt epilogues (nvmath-python).",
    ]
    write_results("structured_ffn_blocks" + ("" if dev.type == "cuda" else "_cpu"), dev.type, rows, notes,
                  columns=("model", "method", "setting", "metric", "value", "ms", "ratio"))


if __name__ == "__main__":
    main()
