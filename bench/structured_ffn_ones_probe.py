"""The bias gradient as a ones column of the weight-gradient matmul against a separate sum, GPU only.

The '-lt' FFN path (slimkit.structured.epilogue) took fc1's bias gradient as dpre.sum(0): one more pass over the
(tokens x hidden) gradient, 268 MB at d_model 2048 and 16384 tokens. With epilogue.with_ones the weight gradient
dpre^T @ [h, 1, 0...] carries it as one more output column, free where the appended columns stay in the matmul's
last tile (epilogue.ones_fits). This probe times, in one run on one GPU:

- the piece alone: dpre^T @ h plus dpre.sum(0) against dpre^T @ with_ones(h) ('wgrad+bgrad' rows, GPU ms), over
  ranks in and out of the rule (for k a multiple of 128 the ones column costs a tile: the rule leaves it out);
- the whole FFN, forward+backward, through fused_ffn(matmul="cublaslt") with ('-lt') and without ('-lt-sum') the
  ones column, over the dense FFN of the same run, at rank alignments 64 and 32 (32 puts BlockDense at 25% on
  0.249 of the parameters, rank 480, instead of 0.258, rank 512). The two variants alternate over --rounds
  rounds and each keeps its fastest median, so that drift between moments does not pass for a difference.

    python bench/structured_ffn_ones_probe.py --device cuda
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


def no_ones(h):
    """The former path: no ones column, so weight_bias_grads takes a separate sum."""
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--ratios", default="0.25,0.32")
    ap.add_argument("--aligns", default="32,64")
    ap.add_argument("--kinds", default="lowrank,blockdense")
    ap.add_argument("--ks", default="384,416,448,480,496,512,608,640")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type != "cuda" or not torch.cuda.is_available() or not EP.available(torch.empty(1, device=dev)):
        sys.exit("needs a CUDA GPU and nvmath-python (pip install slimkit[cublaslt])")
    torch.manual_seed(0)
    d, T, dt = args.d, args.tokens, torch.bfloat16
    rows = []

    # the piece alone (the ones column forced on for every k, to show where the rule's line falls)
    dpre = torch.randn(T, 4 * d, device=dev, dtype=dt)
    ref_b = dpre.float().sum(0)
    for k in map(int, args.ks.split(",")):
        h = torch.randn(T, k, device=dev, dtype=dt)
        w = torch.randn(4 * d, k, device=dev, dtype=dt)
        ref_w = dpre.float().t() @ h.float()
        h1 = torch.cat([h, torch.zeros(T, EP.ONES_PAD, device=dev, dtype=dt)], 1)
        h1[:, k] = 1
        for name, fn in (("mm+sum", lambda: EP.weight_bias_grads(w, dpre, h, None, True)),
                         ("mm-ones-column", lambda: EP.weight_bias_grads(w, dpre, h, h1, True)),
                         ("with_ones-copy", lambda: torch.cat([h, h1[:, k:]], 1))):
            out = fn()
            errs = {}
            if name != "with_ones-copy":
                errs = {"rel_err_dw": round(((out[0].float() - ref_w).norm() / ref_w.norm()).item(), 5),
                        "rel_err_db": round(((out[1].float() - ref_b).norm() / ref_b.norm()).item(), 5)}
            ms = min(events_ms(fn, dev, args.reps) for _ in range(args.rounds))
            rows.append({"model": "ffn-fc1-last", "method": name, "setting": f"T={T} N={4 * d} K={k}",
                         "metric": "gpu_ms", "value": round(ms, 4), "fits": EP.ones_fits(k), **errs})
            print(rows[-1], flush=True)

    # the whole FFN
    x = torch.randn(T, d, device=dev, dtype=dt)
    dense, _ = build("dense", d, 1.0, dev, dt)
    base = min(measure(dense, x, args.reps, timer=events_ms)["fwbw_ms"] for _ in range(args.rounds))
    rows.append({"model": "ffn", "method": "dense", "setting": f"r=1 d={d} T={T}", "metric": "fwbw_speedup",
                 "value": 1.0, "ms": round(base, 4), "ratio": 1.0})
    ones = EP.with_ones
    for align in map(int, args.aligns.split(",")):
        for ratio in map(float, args.ratios.split(",")):
            for kind in args.kinds.split(","):
                ffn, real = build(kind, d, ratio, dev, dt, align)
                lt = LtFFN(ffn.fc1, ffn.fc2)
                best = {}
                for _ in range(args.rounds):
                    for variant, fn in (("-lt-sum", no_ones), ("-lt", ones)):
                        EP.with_ones = fn
                        try:
                            ms = measure(lt, x, args.reps, timer=events_ms)["fwbw_ms"]
                        finally:
                            EP.with_ones = ones
                        best[variant] = min(best.get(variant, ms), ms)
                for variant, ms in best.items():
                    rows.append({"model": "ffn", "method": kind + variant, "setting": f"r={ratio:g} d={d} T={T}",
                                 "metric": "fwbw_speedup", "value": round(base / ms, 3), "ms": round(ms, 4),
                                 "ratio": round(real, 4), "align": align, "rank": ffn.fc1.rank})
                    print(rows[-1], flush=True)
    again = min(measure(dense, x, args.reps, timer=events_ms)["fwbw_ms"] for _ in range(args.rounds))
    rows.append({"model": "ffn", "method": "dense-again", "setting": f"r=1 d={d} T={T}", "metric": "fwbw_ms",
                 "value": round(again, 4), "ms": round(again, 4), "ratio": 1.0})
    notes = [
        "fc1's bias gradient as a ones column of the weight-gradient matmul (epilogue.with_ones / weight_bias_grads) "
        "against torch's matmul plus a separate sum. bf16; GPU time by CUDA events, L2 flushed before each call, "
        f"median of {args.reps}, the fastest of {args.rounds} rounds. 'gpu_ms' rows: the piece alone (dw = dpre^T @ h, "
        "db = dpre.sum(0)) with the ones column forced on for every k ('fits': whether epilogue.ones_fits takes it), "
        "errors against fp32; 'with_ones-copy': building [h, 1, 0...]. 'fwbw_speedup' rows: the FFN d -> 4d -> "
        "GELU(tanh) -> d with bias, forward+backward through fused_ffn(matmul='cublaslt'); '-lt-sum' without the "
        "ones column, '-lt' with it where the rule takes it; value = dense time / this time, dense measured in the "
        "same run (and again at the end: 'dense-again'). 'align': the rank alignment given to the shape rules, "
        "'ratio' the parameter ratio they reach, 'rank' fc1's.",
    ]
    write_results("structured_ffn_ones_probe", str(dev), rows, notes,
                  columns=("model", "method", "setting", "metric", "value", "ms", "ratio", "align", "rank", "fits",
                           "rel_err_dw", "rel_err_db"))


if __name__ == "__main__":
    main()
