"""Where BlockShuffle and BlockDense lose time (GPU only): the block-diagonal products of a d_model 2048 FFN at
16384 tokens, timed one by one through several implementations, each with its TFLOP/s, next to a dense matmul of
the same FLOPs. What it answers: do the batched matmuls of slimkit.structured.layers.block_diag_mm (torch.bmm
reading and writing token-major tensors through strided views) run below cuBLAS's dense rate, and would another
layout or a per-block loop do better. Prints its figures; writes nothing.

    python bench/blockdiag_probe.py                # bf16, d 2048, T 16384
    python bench/blockdiag_probe.py --d 4096

Implementations, for x (T, b, p) and w (b, q, p) -> y (T, b, q):
  strided  block_diag_mm as the layers run it (forward; forward+backward through its autograd Function);
  copied   x made block-major (b, T, p) by a copy, a plain contiguous bmm, the result copied back token-major;
  loop     one F.linear per block on the strided (T, p) slice, the results concatenated;
  einsum   torch.einsum("tbp,bqp->tbq");
  dense    one (T, b*p) @ (b*p, q) matmul: the same FLOPs as the block product, the rate to compare with.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from slimkit.structured.layers import BlockDenseLinear, BlockShuffleLinear, block_diag_mm  # noqa: E402
from structured_ffn_speed import loop_ms  # noqa: E402


def impls(x: torch.Tensor, w: torch.Tensor) -> dict:
    b, q, p = w.shape
    wd = w.permute(1, 0, 2).reshape(q, b * p)      # (q, b*p): the dense matmul of the same FLOPs

    def copied():
        xb = x.transpose(0, 1).contiguous()
        return torch.bmm(xb, w.transpose(1, 2)).transpose(0, 1).contiguous()

    return {
        "strided": lambda: block_diag_mm(x, w),
        "copied": copied,
        "loop": lambda: torch.stack([F.linear(x[:, k], w[k]) for k in range(b)], 1),
        "einsum": lambda: torch.einsum("tbp,bqp->tbq", x, w),
        "dense": lambda: F.linear(x.reshape(x.shape[0], b * p), wd),
    }


def shapes(d: int) -> list[tuple[str, int, int, int]]:
    """(what, b, q, p) of every block-diagonal product in a d -> 4d -> d FFN of each kind at ratio ~0.25-0.32."""
    out = []
    for kind, i, o in (("fc1", d, 4 * d), ("fc2", 4 * d, d)):
        bs = BlockShuffleLinear.from_ratio(i, o, 0.32, init=False)
        out.append((f"blockshuffle {kind} w1", *bs.w1.shape))
        out.append((f"blockshuffle {kind} w2", *bs.w2.shape))
        bd = BlockDenseLinear.from_ratio(i, o, 0.25, align=64, init=False)     # as the speed bench aligns
        out.append((f"blockdense {kind} blocks", *bd.blocks.shape))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=16384)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("blockdiag_probe times GPU kernels: run it on a CUDA machine (bench/README.md, device tool)")
    torch.manual_seed(0)
    dev, dt, T = torch.device("cuda"), torch.bfloat16, args.tokens
    print(f"{torch.cuda.get_device_name()}  d {args.d}  T {T}  bf16; ms and TFLOP/s (2*T*b*q*p per product)")
    for what, b, q, p in shapes(args.d):
        x = torch.randn(T, b, p, device=dev, dtype=dt)
        w = torch.randn(b, q, p, device=dev, dtype=dt) * p ** -0.5
        flop = 2 * T * b * q * p
        cells = []
        for name, fn in impls(x, w).items():
            ms = loop_ms(fn, iters=20, loops=5)
            cells.append(f"{name} {ms:.3f} ({flop / ms / 1e9:.0f})")
        xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        gy = torch.randn(T, b, q, device=dev, dtype=dt)

        def fwbw():
            xg.grad = wg.grad = None
            block_diag_mm(xg, wg).backward(gy)
        ms = loop_ms(fwbw, iters=20, loops=5)
        cells.append(f"strided fwbw {ms:.3f} ({3 * flop / ms / 1e9:.0f})")
        print(f"{what:26s} b={b} q={q} p={p}: " + ", ".join(cells), flush=True)


if __name__ == "__main__":
    main()
