"""Where a linear's bias gradient should come from, GPU only: a ones column of its weight-gradient matmul, or a
separate reduction over the output gradient.

For a linear y = h @ w^T + b with output gradient dpre (T, N) and input h (T, k), the backward needs dw = dpre^T h
and db = sum_t dpre. This probe times, per shape, in one run on one GPU:

- 'mm+sum': torch's matmul, then dpre.sum(0) (a reduction over T x N);
- 'mm+mv': torch's matmul, then db = dpre^T @ ones (cuBLAS's matrix-vector product reads dpre once);
- 'ones': one matmul dpre^T @ [h, 1, 0...] (epilogue.ones_buffer; the input already laid out beside its ones
  column, as GeluFFN's heads and tails write it), dw and db sliced out of it.

over N (the linear's output width: fc2's closing factor has N = d_model, fc1's last factor N = 4 d_model) and k (its
input width, a rank). Then the whole FFN forward+backward at d_model 2048, graphed, with fc2's closing factor
(low-rank, BlockDense) taking its ones column always, never, or by epilogue.close_ones (as slimkit runs it).

    python bench/structured_ffn_bias_grad_probe.py
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
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--ns", default="1024,2048,4096,8192,16384")
    ap.add_argument("--ks", default="256,384,512,640,768,1024,1536")
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--ratios", default="0.25,0.32")
    ap.add_argument("--kinds", default="blockdense,lowrank")
    ap.add_argument("--align", type=int, default=64)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    dev = torch.device("cuda")
    if not torch.cuda.is_available() or not EP.available(torch.empty(1, device=dev)):
        sys.exit("needs a CUDA GPU and nvmath-python (pip install slimkit[cublaslt])")
    torch.manual_seed(0)
    T, dt = args.tokens, torch.bfloat16
    rows = []
    ones_t = torch.ones(T, device=dev, dtype=dt)
    for n in map(int, args.ns.split(",")):
        dpre = torch.randn(T, n, device=dev, dtype=dt)
        ref_b = dpre.float().sum(0)
        for k in map(int, args.ks.split(",")):
            hp, h = EP.ones_buffer((T, k), dpre)
            h.copy_(torch.randn(T, k, device=dev, dtype=dt))
            w = torch.empty(n, k, device=dev, dtype=dt)
            fns = {"mm+sum": lambda: (dpre.t() @ h, dpre.sum(0)),
                   "mm+mv": lambda: (dpre.t() @ h, torch.mv(dpre.t(), ones_t)),
                   "ones": lambda: EP.weight_bias_grads(w, dpre, h, hp, True)}
            best = {}
            for _ in range(args.rounds):
                for name, fn in fns.items():
                    ms = events_ms(fn, dev, args.reps)
                    best[name] = min(best.get(name, ms), ms)
            for name, fn in fns.items():
                db = fn()[1].float()
                rows.append({"model": "linear-grad", "method": name, "setting": f"T={T} N={n} k={k}",
                             "metric": "gpu_ms", "value": round(best[name], 4),
                             "rel_err_db": round(((db - ref_b).norm() / ref_b.norm()).item(), 5),
                             "fits": EP.ones_fits(k)})
                print(rows[-1], flush=True)

    # the whole FFN, graphed, by fc2's ones policy
    d = args.d
    x = torch.randn(T, d, device=dev, dtype=dt)
    grad = torch.randn_like(x)
    dense, _ = build("dense", d, 1.0, dev, dt)
    dense_step = graphed_step(dense, x, grad)
    base = min(events_ms(dense_step, dev, args.reps) for _ in range(args.rounds))
    rows.append({"model": "ffn", "method": "dense-graph", "setting": f"r=1 d={d} T={T}", "metric": "fwbw_ms",
                 "value": round(base, 4)})
    rule = EP.close_ones
    policies = {"-lt": rule, "-lt-fc2ones": lambda width: True, "-lt-fc2sum": lambda width: False}
    for ratio in map(float, args.ratios.split(",")):
        for kind in args.kinds.split(","):
            ffn, real = build(kind, d, ratio, dev, dt, args.align)
            lt = LtFFN(ffn.fc1, ffn.fc2)
            steps = {}
            for name, policy in policies.items():
                EP.close_ones = policy
                try:
                    steps[name] = graphed_step(lt, x, grad)
                finally:
                    EP.close_ones = rule
            best = {}
            for _ in range(args.rounds + 1):
                for name, step in steps.items():
                    ms = events_ms(step, dev, args.reps)
                    best[name] = min(best.get(name, ms), ms)
            for name, ms in best.items():
                rows.append({"model": "ffn", "method": kind + name + "-graph", "setting": f"r={ratio:g} d={d} T={T}",
                             "metric": "fwbw_speedup", "value": round(base / ms, 3), "ms": round(ms, 4),
                             "ratio": round(real, 4), "rank2": ffn.fc2.rank, "fits": rule(ffn.fc2.rank)})
                print(rows[-1], flush=True)
            del steps
    again = min(events_ms(dense_step, dev, args.reps) for _ in range(args.rounds))
    rows.append({"model": "ffn", "method": "dense-graph-again", "setting": f"r=1 d={d} T={T}", "metric": "fwbw_ms",
                 "value": round(again, 4)})
    notes = [
        "bf16, one GPU. 'gpu_ms' rows (model linear-grad): a linear's weight and bias gradients for output gradient "
        "dpre (T, N) and input h (T, k); CUDA events, L2 flushed before each call, median of "
        f"{args.reps}, the fastest of {args.rounds} interleaved rounds. 'mm+sum': dpre^T @ h then dpre.sum(0); "
        "'mm+mv': dpre^T @ h then torch.mv(dpre^T, ones); 'ones': dpre^T @ [h, 1, 0...] with h already beside its "
        "ones column (epilogue.ones_buffer), dw and db copied out (epilogue.weight_bias_grads). rel_err_db: the "
        "bias gradient against fp32; 'fits': epilogue.ones_fits(k).",
        "'fwbw_speedup' rows (model ffn): the FFN d -> 4d -> GELU(tanh) -> d with bias through "
        "fused_ffn(matmul='cublaslt'), one forward+backward step captured as a CUDA graph and replayed, value = the "
        "dense step's graphed time / this one's. fc1's bias gradient always takes the ones column after a head; "
        "fc2's closing factor (input width rank2): '-lt' by epilogue.close_ones (slimkit's rule; 'fits' says what "
        "it chose), '-lt-fc2ones' always, '-lt-fc2sum' never (a separate sum).",
    ]
    write_results("structured_ffn_bias_grad_probe", str(dev), rows, notes,
                  columns=("model", "method", "setting", "metric", "value", "ms", "ratio", "rank2", "fits",
                           "rel_err_db"))


if __name__ == "__main__":
    main()
