"""The small-token FFN kernel's tile plan (slimkit.structured.kernels._small_plan) against a sweep: for every
factor of the structured FFNs of bench/structured_ffn_speed.py's grid (low-rank, BlockShuffle, BlockDense at
ratios 0.5 / 0.32 / 0.25, d_model 1024 / 2048 / 4096), one _blocks_small_kernel launch at --tokens tokens is timed
for each row tile BF, K step BK and split-K count SPLIT, and for the plan's own choice, and the matmul cuBLAS /
torch.bmm runs for the same factor alongside. GPU only.

Each time is the GPU's for one launch with its weights cold, as a decoded model reads them: a CUDA graph of one
launch for each of 16 copies of the factor (more weight bytes than the L2 holds), replayed, CUDA events around
the replays; every launch zeroes its split-K counters first (a memset node, as structured_ffn_small's one a
FFN), the unsplit ones too, so that the figures compare.

    python bench/structured_ffn_small_probe.py --device cuda

Rows: model "ffn-factor", setting "nb=4 f=320 k=2048 T=16" (the factor's blocks, rows and columns a block),
method "plan" (what _small_plan picks, its BF/BK/SPLIT alongside), "best" (the sweep's fastest), "cublas",
metric "us" (microseconds a launch) and "plan_over_best" (on the plan row).
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_results  # noqa: E402
from structured_ffn_speed import build  # noqa: E402
from slimkit.structured import kernels as K  # noqa: E402
from slimkit.structured.decode import capture  # noqa: E402
from slimkit.structured.layers import block_diag_mm  # noqa: E402

COPIES = 16


def graph_us(fn, reps: int = 20) -> float:
    g, _ = capture(fn, warmup=2)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(5):
            g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 5)
    return statistics.median(times) * 1e3


def factor_shapes(dims, ratios) -> list[tuple[int, int, int]]:
    seen = []
    for d, r, kind in itertools.product(dims, ratios, ("lowrank", "blockshuffle", "blockdense")):
        ffn, _ = build(kind, d, r, "meta", torch.bfloat16, 64, True)
        for layer in (ffn.fc1, ffn.fc2):
            for w, _ in K._small_factors(layer):
                if tuple(w.shape) not in seen:
                    seen.append(tuple(w.shape))
    return seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dims", default="1024,2048,4096")
    ap.add_argument("--ratios", default="0.5,0.32,0.25")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--name", default="structured_ffn_small_probe")
    ap.add_argument("--sweep-out", default=None, help="also write every timing of the sweep to this JSON file")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("structured_ffn_small_probe needs a CUDA GPU")
    dev, dt, t = torch.device(args.device), torch.bfloat16, args.tokens
    sms = K._sms(dev)
    bt = max(16, K.triton.next_power_of_2(t))
    shapes = factor_shapes([int(v) for v in args.dims.split(",")], [float(v) for v in args.ratios.split(",")])
    ws = torch.empty(1 << 24, device=dev, dtype=torch.float32)
    cnt = torch.zeros(1 << 16, device=dev, dtype=torch.int32)
    rows, everything = [], []
    for nb, f, k in shapes:
        t0 = time.perf_counter()
        setting = f"nb={nb} f={f} k={k} T={t}"
        weights = [torch.randn(nb, f, k, device=dev, dtype=dt) for _ in range(COPIES)]
        x = torch.randn(nb * k, t, device=dev, dtype=dt)
        y = torch.empty(nb * f, t, device=dev, dtype=dt)

        def launch(bf, bk, split):
            ks = K.triton.cdiv(K.triton.cdiv(k, split), bk) * bk
            split = K.triton.cdiv(k, ks)
            tiles = nb * K.triton.cdiv(f, bf)

            def run():
                for w in weights:
                    cnt[:tiles].zero_()
                    K._blocks_small_kernel[(nb, K.triton.cdiv(f, bf), split)](
                        x, w, w, y, ws, cnt, t, k, f, ks, k * t, t, 1, f * t, t, 1, 0, 0, HAS_BIAS=False,
                        GELU=False, APPROX=0, BF=bf, BK=bk, BT=bt, SPLIT=split, IEEE=False)
            return graph_us(run) / COPIES

        sweep = {}
        for bf, bk, split in itertools.product((16, 32, 64), (64, 128, 256), (1, 2, 4, 8, 16)):
            if k // split >= bk and bf <= max(16, K.triton.next_power_of_2(f)):
                sweep[(bf, bk, split)] = launch(bf, bk, split)
        everything += [{"nb": nb, "f": f, "k": k, "bf": c[0], "bk": c[1], "split": c[2], "us": us}
                       for c, us in sweep.items()]
        if args.sweep_out:
            Path(args.sweep_out).write_text(json.dumps(everything))
        bf, bk, split, _ = K._small_plan(nb, f, k, sms)
        plan = sweep.get((bf, bk, split)) or launch(bf, bk, split)
        best = min(sweep, key=sweep.get)
        xt = x.t().contiguous().view(t, nb, k)
        cub = graph_us(lambda: [block_diag_mm(xt, w) if nb > 1 else xt[:, 0] @ w[0].t() for w in weights]) / COPIES
        sec = round(time.perf_counter() - t0, 2)
        base = {"model": "ffn-factor", "setting": setting, "metric": "us", "seconds": sec}
        rows += [{**base, "method": "plan", "value": round(plan, 2), "bf": bf, "bk": bk, "split": split},
                 {**base, "method": "best", "value": round(sweep[best], 2), "bf": best[0], "bk": best[1],
                  "split": best[2]},
                 {**base, "method": "cublas", "value": round(cub, 2)},
                 {**base, "method": "plan", "metric": "plan_over_best", "value": round(plan / sweep[best], 3)}]
        print(f"{setting}: plan {plan:.2f} us {bf, bk, split}, best {sweep[best]:.2f} {best}, cuBLAS {cub:.2f}",
              flush=True)
        write_results(args.name, args.device, rows, notes=[__doc__.split("\n\n")[1].replace("\n", " ")],
                      columns=("model", "method", "setting", "metric", "value", "bf", "bk", "split", "seconds"))


if __name__ == "__main__":
    main()
