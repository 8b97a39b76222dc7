"""Two changes to the '-lt' FFN backward, GPU only: one kept, one measured and left out.

- Bias gradients from a ones column with no copy (epilogue.ones_buffer, kept): where fc1 has a head (low-rank,
  BlockDense), the head's matmul writes h into a buffer whose next column is ones, so dpre^T @ [h, 1, 0...]
  carries fc1's bias gradient; likewise fc2's first factor writes its output z beside a ones column for fc2's
  closing dense factor (low-rank, BlockDense). Before, with_ones copied h, only at ranks where the column stayed
  in the last tile, and otherwise (and always for fc2) a separate sum over the output gradient.
- Split-K for small block-diagonal weight gradients (split_bmm below, not in slimkit): BlockDense's first factor
  at d_model 2048 and 25% is 4 blocks of 128 x 512 summed over 16384 tokens, 16 output tiles of 128 x 128 for an
  H100's 132 SMs. split_bmm cuts the tokens into S chunks (one bmm per block with fp32 outputs, one fp32 sum).

Rows, in one run on one GPU:
- 'gpu_ms' (model ffn-fc1-blocks): that weight gradient alone, plain torch.bmm ('bmm') against split_bmm at S
  chunks ('splitS'); errors against fp32;
- 'fwbw_speedup' (model ffn): one forward+backward step captured as a CUDA graph and replayed (GPU time alone),
  through fused_ffn(matmul='cublaslt'), over the dense step graphed likewise: '-lt' as slimkit runs it,
  '-lt-noones' with both bias gradients as separate sums. The two alternate over --rounds rounds and each keeps
  its fastest median.

    python bench/structured_ffn_splitk_probe.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_results  # noqa: E402
from structured_ffn_speed import lt_probe_parser, build, events_ms, lt_device, lt_step_rows, patched  # noqa: E402

from slimkit.structured import epilogue as EP  # noqa: E402


def split_bmm(a: torch.Tensor, b: torch.Tensor, s: int) -> torch.Tensor:
    """torch.bmm(a, b) for a (n, q, T), b (n, T, p), the T tokens cut into s chunks: per block one bmm of the
    chunks with fp32 outputs, summed in fp32, rounded once."""
    n, q, t = a.shape
    parts = torch.empty(n, s, q, b.shape[2], device=a.device, dtype=torch.float32)
    for k in range(n):
        torch.bmm(a[k].unflatten(1, (s, t // s)).transpose(0, 1), b[k].unflatten(0, (s, t // s)),
                  out_dtype=torch.float32, out=parts[k])
    return parts.sum(1).to(a.dtype)


def no_ones(shape, like):
    """The bias gradients as separate sums: no ones column beside the linears' inputs."""
    return None, like.new_empty(shape)


def main() -> None:
    ap = lt_probe_parser(__doc__)
    args = ap.parse_args()
    dev = lt_device()
    torch.manual_seed(0)
    d, T, dt = args.d, args.tokens, torch.bfloat16
    rows = []

    # the piece: BlockDense's first-factor weight gradient at each ratio
    for ratio in map(float, args.ratios.split(",")):
        ffn, _ = build("blockdense", d, ratio, dev, dt, args.align)
        nb, q, p = ffn.fc1.blocks.shape
        dh = torch.randn(T, nb, q, device=dev, dtype=dt)
        x = torch.randn(T, nb, p, device=dev, dtype=dt)
        a, b = dh.transpose(0, 1).transpose(1, 2), x.transpose(0, 1)
        ref = torch.bmm(a.float(), b.float())
        setting = f"r={ratio:g} d={d} T={T} blocks {nb}x{q}x{p}"
        for s in (1, 2, 4, 8, 16, 32):
            fn = (lambda: torch.bmm(a, b)) if s == 1 else (lambda s=s: split_bmm(a, b, s))
            err = ((fn().float() - ref).norm() / ref.norm()).item()
            ms = min(events_ms(fn, dev, args.reps) for _ in range(args.rounds))
            rows.append({"model": "ffn-fc1-blocks", "method": "bmm" if s == 1 else f"split{s}", "setting": setting,
                         "metric": "gpu_ms", "value": round(ms, 4), "rel_err": round(err, 5)})
            print(rows[-1], flush=True)

    # the whole step, graphed
    rows += lt_step_rows(d, T, map(float, args.ratios.split(",")), args.kinds.split(","), args.align,
                         {"-lt": patched(EP), "-lt-noones": patched(EP, ones_buffer=no_ones)}, args.reps,
                         args.rounds, dev, extra=lambda ffn, name: {"rank": ffn.fc1.rank})
    notes = [
        "bf16, one GPU. 'gpu_ms' rows: BlockDense's first-factor weight gradient alone, CUDA events, L2 flushed "
        f"before each call, median of {args.reps}, fastest of {args.rounds} rounds; 'bmm' the plain torch.bmm, "
        "'splitS' this probe's split_bmm cut into S token chunks; rel_err against fp32.",
        "'fwbw_speedup' rows: the FFN d -> 4d -> GELU(tanh) -> d with bias, one forward+backward step through "
        "fused_ffn(matmul='cublaslt') captured as a CUDA graph and replayed (GPU time alone), value = the dense "
        "step's graphed time (dense-graph) / this one's. '-lt': as slimkit runs it (the copy-free ones column); "
        "'-lt-noones': both bias gradients as separate sums (no ones_buffer). 'rank': fc1's.",
    ]
    write_results("structured_ffn_splitk_probe", str(dev), rows, notes,
                  columns=("model", "method", "setting", "metric", "value", "ms", "paired", "ratio", "rank", "rel_err"))


if __name__ == "__main__":
    main()
