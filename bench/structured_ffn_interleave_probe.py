"""BlockShuffle's second factor written token-major in one pass (slimkit.structured.interleave), GPU only.

A BlockShuffle FFN's output comes from its fc2's second factor, whose block j writes every L-th output feature.
The matmuls write it feature-major and a transpose (with the bias) makes it token-major; the backward transposes
the output gradient back. interleave.token_major_blocks writes it token-major directly (cuBLAS at L = 1, a Triton
kernel interleaving the blocks' accumulators at L = 2), and interleave.grad_blocks reads the gradient as it is
at L = 1. This probe, in one run on one GPU:

- the pieces: fc2's second factor at the shapes BlockShuffle takes at --ratios for d_model 1024 / 2048 / 4096,
  'bmm+transpose' (the matmul and the transpose with the bias) against 'token-major' (token_major_blocks), and
  'bmm' (the matmul alone, the floor a one-pass version would reach at cuBLAS's speed), rel_err against fp32;
- one graphed training step of the '-lt' BlockShuffle FFN ('-lt-hopper-il': token-major output; '-lt-hopper':
  SLIMKIT_INTERLEAVE=0, the matmul and transposes) over the dense step graphed likewise, in --rounds rounds.

    python bench/structured_ffn_interleave_probe.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_results  # noqa: E402
from structured_ffn_speed import WARM_S, build, events_ms, lt_device, lt_probe_parser, lt_step_rows, patched  # noqa: E402

from slimkit.structured import interleave as IL  # noqa: E402
from slimkit.structured.kernels import transpose  # noqa: E402

ROUNDS = 2     # each piece keeps the fastest of this many timings


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def piece_rows(d: int, ratio: float, t: int, reps: int, dev) -> list[dict]:
    ffn, _ = build("blockshuffle", d, ratio, dev, torch.bfloat16)
    w = ffn.fc2.w2.detach()
    L, S, R = w.shape
    h = torch.randn(R * L, t, device=dev).to(w.dtype)
    b = torch.randn(S * L, device=dev).to(w.dtype)
    want = IL.token_major_blocks_reference(h.float(), w.float(), b.float())

    def bmm():
        return IL.feature_major_blocks(h, w)
    variants = {"bmm+transpose": lambda: transpose(bmm(), b), "token-major": lambda: IL.token_major_blocks(h, w, b),
                "bmm": bmm}
    rows = []
    for method, fn in variants.items():
        got = fn()
        torch.cuda.synchronize()
        ms = min(events_ms(fn, dev, reps) for _ in range(ROUNDS))
        path = ("cublas" if L == 1 else "kernel" if IL.kernel_applies(h, w) else "fallback") \
            if method == "token-major" else ""
        row = {"model": "ffn-output", "method": method + (f" ({path})" if path else ""),
               "setting": f"r={ratio:g} d={d} T={t} blocks={L}x{S}x{R}", "metric": "gpu_ms", "value": round(ms, 4),
               "ms": round(ms, 4)}
        if method != "bmm":
            row["rel_err"] = round(rel(got, want), 5)
        rows.append(row)
        print(row, flush=True)
    return rows


def main() -> None:
    ap = lt_probe_parser(__doc__)
    ap.set_defaults(kinds="blockshuffle", ratios="0.25,0.32,0.5")
    ap.add_argument("--pieces-only", action="store_true", help="time the output pieces alone, not the FFN step")
    ap.add_argument("--name", default="structured_ffn_interleave_probe", help="results name under bench/results")
    args = ap.parse_args()
    dev = lt_device()
    torch.manual_seed(0)
    ratios = [float(r) for r in args.ratios.split(",")]
    rows = []
    for d in (1024, 2048, 4096):
        for ratio in ratios:
            rows += piece_rows(d, ratio, args.tokens, args.reps, dev)
    if not args.pieces_only:
        variants = {"-lt-hopper-il": patched(IL, ENABLED=True), "-lt-hopper": patched(IL, ENABLED=False)}
        rows += lt_step_rows(args.d, args.tokens, ratios, args.kinds.split(","), args.align, variants, args.reps,
                             args.rounds, dev)
    notes = [
        f"bf16, one GPU; CUDA events, L2 flushed before each call, median of {args.reps} after {WARM_S} s of "
        f"warm-up calls, the pieces the faster of {ROUNDS} such timings; the step rows keep the fastest of "
        f"{args.rounds} interleaved rounds.",
        "'ffn-output' rows: fc2's second factor (blocks L x S x R) on the feature-major middle, bias added, "
        "token-major out: 'bmm+transpose' the batched matmul then kernels.transpose with the bias (the path "
        "before), 'token-major (kernel | cublas | fallback)' interleave.token_major_blocks, 'bmm' the matmul alone "
        "(no transpose, no bias: the floor). rel_err against the fp32 reference.",
        "Step rows: 'fwbw_speedup' = the dense step's graphed time (timed first) / this one's (the fastest of the "
        "rounds); 'paired' = the median over the rounds of the dense step's time in that round over this one's. "
        "'blockshuffle-lt-hopper-il-graph': epilogue.ShuffleGeluFFN with both Gluon kernels and the token-major "
        "output (and, at L = 1, the gradient read as it is); 'blockshuffle-lt-hopper-graph': the same with "
        "SLIMKIT_INTERLEAVE=0.",
    ]
    write_results(args.name, str(dev), rows, notes,
                  columns=("model", "method", "setting", "metric", "value", "ms", "paired", "rel_err", "ratio"))


if __name__ == "__main__":
    main()
