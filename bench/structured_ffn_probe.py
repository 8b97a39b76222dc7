"""Structured FFN speed, the probe behind the notes of bench/results/structured_ffn_speed.md ("What was tried"):
at d_model 2048 and 16384 tokens, forward+backward of the dense, low-rank (0.32, 0.25) and BlockDense (0.25) FFNs
eager, through fused_ffn(matmul="cublas") (cuBLAS matmuls, one Triton pass for GELU' + bias gradient), and as a
CUDA-graphed training step (torch.cuda.make_graphed_callables); then a torch.profiler table of low-rank 0.32's
kernels, eager and fused. Prints its figures (GPU only):

    python bench/structured_ffn_probe.py
"""
import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from slimkit.structured.kernels import fused_ffn  # noqa: E402
from structured_ffn_speed import FFN, build, loop_ms, measure  # noqa: E402

D, T = 2048, 16384


class CublasFused(FFN):
    def forward(self, x):
        return fused_ffn(self.fc1, self.fc2, x, "tanh", matmul="cublas")


def fwbw_loop(ffn, x, graph: bool = False) -> float:
    """Forward+backward time in ms from a CUDA-event loop; graph=True replays the step as CUDA graphs."""
    xg, g = x.detach().requires_grad_(True), torch.randn_like(x)
    run = torch.cuda.make_graphed_callables(ffn, (xg,)) if graph else ffn

    def step():
        xg.grad = None
        for p in ffn.parameters():
            p.grad = None
        run(xg).backward(g)
    return loop_ms(step, iters=20, loops=5)


def main() -> None:
    dev, dt = torch.device("cuda"), torch.bfloat16
    x = torch.randn(T, D, device=dev, dtype=dt)
    for kind, r in [("dense", 1.0), ("lowrank", 0.32), ("blockdense", 0.25), ("lowrank", 0.25)]:
        torch.manual_seed(0)
        ffn, real = build(kind, D, r, dev, dt, 64)
        fused = CublasFused(ffn.fc1, ffn.fc2)
        res = {"eager": measure(ffn, x, 30)["fwbw_ms"], "eager_loop": fwbw_loop(ffn, x),
               "cublas_fusedbw": measure(fused, x, 30)["fwbw_ms"], "cublas_fusedbw_loop": fwbw_loop(fused, x),
               "graphed_loop": fwbw_loop(ffn, x, graph=True)}
        print(kind, r, round(real, 3), {k: round(v, 4) for k, v in res.items()}, flush=True)
        if kind == "lowrank" and r == 0.32:
            xg, g = x.detach().requires_grad_(True), torch.randn_like(x)
            for name, f in [("eager", ffn), ("cublas", fused)]:
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        f.zero_grad(set_to_none=True)
                        xg.grad = None
                        f(xg).backward(g)
                    torch.cuda.synchronize()
                print(name)
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    if not torch.cuda.is_available():
        sys.exit("structured_ffn_probe.py measures CUDA kernels: run it on a GPU machine (device tool)")
    main()
