"""The bias gradient in the weight-gradient matmul (cuBLASLt's BGRADB epilogue) against a separate sum, GPU only.

The '-lt' FFN path (slimkit.structured.epilogue) used to take fc1's bias gradient as dpre.sum(0): one more pass over
the (tokens x hidden) gradient, 268 MB at d_model 2048 and 16384 tokens. epilogue.weight_bias_grad takes it in the
weight-gradient matmul dpre^T @ h, which reads dpre anyway. This probe times, in one run on one GPU:

- the piece alone: torch's dpre^T @ h plus dpre.sum(0) against weight_bias_grad, for fc1's last factor at the
  ranks of the 25% and 32% layers ('wgrad+bgrad' rows, GPU ms);
- the whole FFN, forward+backward, through fused_ffn(matmul="cublaslt") with and without the fused bias gradient,
  over the dense FFN measured in the same run ('fwbw_speedup' rows, as bench/structured_ffn_speed.py), at rank
  alignments 64 (that bench's default) and 32 (which puts BlockDense at 25% on 0.249 of the parameters instead of
  0.258).

    python bench/structured_ffn_bgrad_probe.py --device cuda
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_results  # noqa: E402
from structured_ffn_speed import LtFFN, build, events_ms, measure  # noqa: E402

from slimkit.structured import epilogue as EP  # noqa: E402


def separate_sum(w, dpre, h):
    """The former path: torch's weight gradient and a separate bias-gradient sum."""
    return EP._grad_like(w, dpre.t(), h), dpre.sum(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--ratios", default="0.25,0.32")
    ap.add_argument("--aligns", default="64,32")
    ap.add_argument("--kinds", default="lowrank,blockdense")
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type != "cuda" or not EP.available(torch.empty(1, device=dev)):
        sys.exit("needs a CUDA GPU and nvmath-python (pip install slimkit[cublaslt])")
    torch.manual_seed(0)
    d, T, dt = args.d, args.tokens, torch.bfloat16
    rows = []

    # the piece alone, and its accuracy against fp32
    for k in sorted({lay.rank for a in map(int, args.aligns.split(",")) for r in map(float, args.ratios.split(","))
                     for lay in [build("blockdense", d, r, dev, dt, a)[0].fc1]}):
        h = torch.randn(T, k, device=dev, dtype=dt)
        dpre = torch.randn(T, 4 * d, device=dev, dtype=dt)
        w = torch.randn(4 * d, k, device=dev, dtype=dt)
        ref_w, ref_b = dpre.float().t() @ h.float(), dpre.float().sum(0)
        for name, fn in (("torch-mm+sum", separate_sum), ("cublaslt-bgradb", EP.weight_bias_grad)):
            dw, db = fn(w, dpre, h)
            err_w = ((dw.float() - ref_w).norm() / ref_w.norm()).item()
            err_b = ((db.float() - ref_b).norm() / ref_b.norm()).item()
            ms = events_ms(lambda: fn(w, dpre, h), dev, args.reps)
            rows.append({"model": "ffn-fc1-last", "method": name, "setting": f"T={T} N={4 * d} K={k}",
                         "metric": "gpu_ms", "value": round(ms, 4), "rel_err_dw": round(err_w, 5),
                         "rel_err_db": round(err_b, 5)})
            print(rows[-1], flush=True)

    # the whole FFN
    x = torch.randn(T, d, device=dev, dtype=dt)
    dense, _ = build("dense", d, 1.0, dev, dt)
    base = measure(dense, x, args.reps, timer=events_ms)
    rows.append({"model": "ffn", "method": "dense", "setting": f"r=1 d={d} T={T}", "metric": "fwbw_speedup",
                 "value": 1.0, "ms": round(base["fwbw_ms"], 4), "ratio": 1.0, "align": None})
    fused = EP.weight_bias_grad
    for align in map(int, args.aligns.split(",")):
        for ratio in map(float, args.ratios.split(",")):
            for kind in args.kinds.split(","):
                ffn, real = build(kind, d, ratio, dev, dt, align)
                lt = LtFFN(ffn.fc1, ffn.fc2)
                for variant, fn in (("-lt-sum", separate_sum), ("-lt", fused)):
                    EP.weight_bias_grad = fn
                    try:
                        res = measure(lt, x, args.reps, timer=events_ms)
                    finally:
                        EP.weight_bias_grad = fused
                    rows.append({"model": "ffn", "method": kind + variant, "setting": f"r={ratio:g} d={d} T={T}",
                                 "metric": "fwbw_speedup", "value": round(base["fwbw_ms"] / res["fwbw_ms"], 3),
                                 "ms": round(res["fwbw_ms"], 4), "ratio": round(real, 4), "align": align})
                    print(rows[-1], flush=True)
    # dense again, last: a slow first measurement would flatter every ratio
    again = measure(dense, x, args.reps, timer=events_ms)["fwbw_ms"]
    rows.append({"model": "ffn", "method": "dense-again", "setting": f"r=1 d={d} T={T}", "metric": "fwbw_ms",
                 "value": round(again, 4), "ms": round(again, 4), "ratio": 1.0, "align": None})
    notes = [
        "fc1's bias gradient inside the weight-gradient matmul (cuBLASLt BGRADB, epilogue.weight_bias_grad) against "
        "torch's matmul plus a separate sum. bf16; GPU time by CUDA events, L2 flushed before each call, median of "
        f"{args.reps}. 'gpu_ms' rows: the piece alone (dw = dpre^T @ h, db = dpre.sum(0)), errors against fp32. "
        "'fwbw_speedup' rows: the FFN d -> 4d -> GELU(tanh) -> d with bias, forward+backward through "
        "fused_ffn(matmul='cublaslt'); '-lt-sum' is the former separate sum, '-lt' the fused bias gradient; value "
        "= dense time / this time, dense measured in the same run (and once more at the end: 'dense-again'). "
        "'align': the rank alignment given to the shape rules; 'ratio' the parameter ratio they reach.",
    ]
    write_results("structured_ffn_bgrad_probe", str(dev), rows, notes,
                  columns=("model", "method", "setting", "metric", "value", "ms", "ratio", "align", "rel_err_dw",
                           "rel_err_db"))


if __name__ == "__main__":
    main()
