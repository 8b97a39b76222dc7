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

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_results  # noqa: E402
from structured_ffn_speed import lt_probe_parser, fastest, lt_device, lt_step_rows, patched  # noqa: E402

from slimkit.structured import epilogue as EP  # noqa: E402


def main() -> None:
    ap = lt_probe_parser(__doc__, rounds=2)
    ap.add_argument("--ns", default="1024,2048,4096,8192,16384")
    ap.add_argument("--ks", default="256,384,512,640,768,1024,1536")
    args = ap.parse_args()
    dev = lt_device()
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
            best = fastest(fns, dev, args.reps, args.rounds)
            for name, fn in fns.items():
                db = fn()[1].float()
                rows.append({"model": "linear-grad", "method": name, "setting": f"T={T} N={n} k={k}",
                             "metric": "gpu_ms", "value": round(best[name], 4),
                             "rel_err_db": round(((db - ref_b).norm() / ref_b.norm()).item(), 5),
                             "fits": EP.ones_fits(k)})
                print(rows[-1], flush=True)

    # the whole FFN, graphed, by fc2's ones policy
    rule = EP.close_ones
    rows += lt_step_rows(args.d, T, map(float, args.ratios.split(",")), args.kinds.split(","), args.align,
                         {"-lt": patched(EP), "-lt-fc2ones": patched(EP, close_ones=lambda width: True),
                          "-lt-fc2sum": patched(EP, close_ones=lambda width: False)}, args.reps, args.rounds + 1, dev,
                         extra=lambda ffn, name: {"rank2": ffn.fc2.rank, "fits": rule(ffn.fc2.rank)})
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
                  columns=("model", "method", "setting", "metric", "value", "ms", "paired", "ratio", "rank2", "fits",
                           "rel_err_db"))


if __name__ == "__main__":
    main()
