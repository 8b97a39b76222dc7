"""Where a structured FFN's forward+backward spends its time (GPU only): every CUDA kernel of one training step of
the FFN d -> 4d -> GELU -> d at --d and --tokens, from torch.profiler, with its time per step and, for matmuls, the
TFLOP/s it reached. Prints its figures; writes nothing.

    python bench/ffn_kernel_profile.py                         # dense, lowrank, blockshuffle, blockdense at r=0.32
    python bench/ffn_kernel_profile.py --kinds lowrank --ratio 0.25 --no-bias
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from structured_ffn_speed import LtFFN, build, loop_ms, median_ms  # noqa: E402


def step_kernels(ffn, x, grad, steps: int, sync: bool = False) -> list:
    def step():
        ffn.zero_grad(set_to_none=True)
        x.grad = None
        ffn(x).backward(grad)
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
            if sync:
                torch.cuda.synchronize()
        torch.cuda.synchronize()
    evs = sorted((ev for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CUDA),
                 key=lambda ev: ev.time_range.start)
    return evs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--ratio", type=float, default=0.32)
    ap.add_argument("--kinds", default="dense,lowrank,blockshuffle,blockdense")
    ap.add_argument("--no-bias", action="store_true")
    ap.add_argument("--align", type=int, default=64, help="rank alignment, as bench/structured_ffn_speed.py's")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--lt", action="store_true", help="through fused_ffn(matmul='cublaslt') (nvmath-python)")
    ap.add_argument("--sync", action="store_true", help="synchronise after each profiled step (as the speed bench "
                    "times), and print the GPU's idle time before each kernel")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("ffn_kernel_profile needs a CUDA GPU")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    x = torch.randn(args.tokens, args.d, device=dev, dtype=torch.bfloat16).requires_grad_(True)
    grad = torch.randn_like(x)
    print(f"{torch.cuda.get_device_name()}  d {args.d}  T {args.tokens}  r {args.ratio}  bias {not args.no_bias}")
    for kind in args.kinds.split(","):
        ffn, real = build(kind, args.d, 1.0 if kind == "dense" else args.ratio, dev, torch.bfloat16,
                          args.align, bias=not args.no_bias)
        if args.lt:
            ffn = LtFFN(ffn.fc1, ffn.fc2)

        def step():
            ffn.zero_grad(set_to_none=True)
            x.grad = None
            ffn(x).backward(grad)
        wall = median_ms(step, dev, 20)
        back_to_back = loop_ms(step, iters=20, loops=5)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(3):          # a short burst: the GPU queue never fills, so this is the host's own time
            step()
        host = (time.perf_counter() - t0) / 3 * 1e3
        torch.cuda.synchronize()
        evs = step_kernels(ffn, x, grad, args.steps, args.sync)
        n = len(evs) // args.steps           # kernels per step; the step's sequence, times averaged over steps
        total = sum(ev.device_time for ev in evs) / args.steps
        print(f"\n{kind}{'-lt' if args.lt else ''} (ratio {real:.3f}): {total / 1000:.3f} ms of kernels per step, "
              f"{n} kernels; {wall:.3f} ms wall (synchronised per step), {back_to_back:.3f} ms back to back, "
              f"{host:.3f} ms of host time")
        for i in range(n):
            us = sum(evs[j * n + i].device_time for j in range(args.steps)) / args.steps
            gap = "" if i == 0 else "  idle before %6.1f us" % (sum(
                evs[j * n + i].time_range.start - evs[j * n + i - 1].time_range.end for j in range(args.steps))
                / args.steps)
            print(f"  {us:8.1f} us{gap}  {evs[i].name[:100]}")


if __name__ == "__main__":
    main()
