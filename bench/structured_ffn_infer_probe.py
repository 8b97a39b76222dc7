"""Inference (no gradient) through the cuBLASLt FFN path against the plain one, by token count, GPU only.

fused_ffn(matmul="cublaslt") under no_grad runs epilogue.ffn_infer: fc1's bias and GELU in a GELU(_BIAS) matmul
epilogue (no pre-activation written), against cuBLAS's matmul with bias plus torch's GELU pass (the eager FFN).
This probe times both as CUDA graphs (slimkit.structured.graphed, replayed in a loop: GPU time, no host launches)
for the FFN d -> 4d -> GELU(tanh) -> d with bias at one d_model over token counts, to find the token count from
which the epilogue path pays: 'lt-infer' (fused_ffn forced to ffn_infer at every token count) over 'eager'
(eager_ffn), both for each kind at each ratio, and the dense FFN.

    python bench/structured_ffn_infer_probe.py
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_results  # noqa: E402
from structured_ffn_speed import FFN, LtFFN, build, loop_ms, lt_device  # noqa: E402

from slimkit.structured import graphed  # noqa: E402
from slimkit.structured import kernels as K  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--tokens", default="16,64,256,1024,4096,16384")
    ap.add_argument("--ratios", default="0.32,0.25")
    ap.add_argument("--kinds", default="dense,lowrank,blockdense")
    ap.add_argument("--align", type=int, default=64)
    args = ap.parse_args()
    dev = lt_device()
    torch.manual_seed(0)
    d, dt = args.d, torch.bfloat16
    rows = []
    threshold = getattr(K, "INFER_MIN_TOKENS", None)
    if threshold is not None:
        K.INFER_MIN_TOKENS = 0          # force ffn_infer at every token count
    try:
        for T in map(int, args.tokens.split(",")):
            x = torch.randn(T, d, device=dev, dtype=dt)
            for kind in args.kinds.split(","):
                for ratio in ([1.0] if kind == "dense" else map(float, args.ratios.split(","))):
                    ffn, real = build(kind, d, ratio, dev, dt, args.align)
                    ms = {}
                    for name, mod in (("eager", FFN(ffn.fc1, ffn.fc2)), ("lt-infer", LtFFN(ffn.fc1, ffn.fc2))):
                        replay = graphed(mod.eval(), x, clone_output=False)
                        ms[name] = loop_ms(lambda: replay(x), iters=50)
                    rows.append({"model": "ffn", "method": kind + "-lt-infer", "setting": f"r={ratio:g} d={d} T={T}",
                                 "metric": "fw_speedup_over_eager", "value": round(ms["eager"] / ms["lt-infer"], 3),
                                 "ms": round(ms["lt-infer"], 4), "eager_ms": round(ms["eager"], 4),
                                 "ratio": round(real, 4)})
                    print(rows[-1], flush=True)
    finally:
        if threshold is not None:
            K.INFER_MIN_TOKENS = threshold
    notes = [
        "bf16, one GPU. Each FFN's no-grad forward captured as a CUDA graph (slimkit.structured.graphed) and replayed "
        "in loops of 50 (median of 7 loops): GPU time. value = the eager FFN's time (cuBLAS matmul with bias, "
        "torch's GELU) / the cuBLASLt inference path's (epilogue.ffn_infer: GELU_BIAS epilogue, no pre-activation "
        "written), same layers, same token count. 'ratio': the parameter ratio reached.",
    ]
    write_results("structured_ffn_infer_probe", str(dev), rows, notes,
                  columns=("model", "method", "setting", "metric", "value", "ms", "eager_ms", "ratio"))


if __name__ == "__main__":
    main()
