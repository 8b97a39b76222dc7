"""Where QDrop's reconstruction time goes: per block, iterations per second and peak memory, against the
cost of one plain forward + backward of the same float block on a batch (the floor an iteration can reach).

    python bench/qdrop_speed.py                         # CPU
    python bench/qdrop_speed.py --device cuda --name qdrop_speed_gpu
Rows: metric "its_per_s" (value) with "fwbw_ms" (plain block), "iter_ms" (reconstruction), "overhead" (their
ratio) and "peak_mem_mb". A torch.profiler table of one block is written to bench/results/<name>_profile.txt.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, write_results  # noqa: E402
from slimkit.config import QuantConfig  # noqa: E402
from slimkit.core.adapters import find_blocks  # noqa: E402
from slimkit.core.data import calibration_tensor  # noqa: E402
from slimkit.core.reconstruct import capture, reconstruct_block  # noqa: E402
from slimkit.methods.common import recon_config  # noqa: E402
from slimkit.models.registry import get_dataset, get_model  # noqa: E402
from slimkit.quantize import prepare  # noqa: E402

CALIB = {"fmnist-resnet": "fmnist-calib", "efficientnet-lite0": "natural-calib"}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_fwbw(block, x, args, kwargs, device, reps: int) -> float:
    """Median ms of a plain float forward + backward (weight gradients) of the block on one batch."""
    for p in block.parameters():
        p.requires_grad_(True)
    times = []
    for i in range(reps + 3):
        sync(device)
        t0 = time.perf_counter()
        out = block(x, *args, **kwargs)
        out.pow(2).mean().backward()
        sync(device)
        if i >= 3:
            times.append((time.perf_counter() - t0) * 1e3)
    block.zero_grad(set_to_none=True)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--name", default="qdrop_speed")
    ap.add_argument("--models", default="fmnist-resnet,efficientnet-lite0")
    ap.add_argument("--iters", type=int, default=100, help="timed reconstruction iterations per block")
    ap.add_argument("--num-samples", type=int, default=256)
    args = ap.parse_args()
    device = torch.device(args.device)
    rows, profile_text = [], ""
    for model_name in args.models.split(","):
        cfg = QuantConfig.build(method="qdrop", w_bits=4, a_bits=4, num_samples=args.num_samples, iters=args.iters,
                                act_calib_samples=64, progress=False)
        calib = get_dataset(CALIB[model_name])
        data = calibration_tensor(calib[0] if isinstance(calib, tuple) else calib, cfg.num_samples)
        fp_model, q_model, _ = prepare(get_model(model_name), data, cfg, device)
        blocks, _ = find_blocks(q_model, data[:1].to(device))
        rc = recon_config(cfg, adaround=True, learn_act=True, act_in_recon=True, quant_prob=cfg.drop_prob, mix_inputs=True)
        rc.progress = False
        for i, blk in enumerate(blocks):
            fp_block, q_block = fp_model.get_submodule(blk.name), q_model.get_submodule(blk.name)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            fp_in, fp_out, bargs, bkw = capture(fp_model, fp_block, data, 64, device, True, device)
            q_in, _, _, _ = capture(q_model, q_block, data, 64, device, False, device)
            fwbw = time_fwbw(fp_block, fp_in[: cfg.batch_size], bargs, bkw, device, reps=20)
            # warm-up iterations, then the timed run (reconstruct_block freezes the block: time a fresh copy)
            import copy

            warm = copy.deepcopy(q_block)
            rc.iters = 5
            reconstruct_block(warm, q_in, fp_in, fp_out, rc, device, bargs, bkw)
            rc.iters = args.iters
            timed = copy.deepcopy(q_block)
            sync(device)
            t0 = time.perf_counter()
            reconstruct_block(timed, q_in, fp_in, fp_out, rc, device, bargs, bkw)
            sync(device)
            iter_ms = (time.perf_counter() - t0) * 1e3 / args.iters
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated() / 2**20
            else:
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            if i == (1 if model_name == "fmnist-resnet" else 3):
                from torch.profiler import ProfilerActivity, profile as torch_profile

                acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
                profiled, rc.iters = copy.deepcopy(q_block), 50
                with torch_profile(activities=acts) as prof:  # a separate run: profiling slows what it watches
                    reconstruct_block(profiled, q_in, fp_in, fp_out, rc, device, bargs, bkw)
                rc.iters = args.iters
                sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
                profile_text += f"## {model_name} block {blk.name} (50 iterations)\n"
                profile_text += prof.key_averages().table(sort_by=sort, row_limit=20) + "\n\n"
            cache_mb = sum(t.numel() * t.element_size() for t in (fp_in, fp_out, q_in)) / 2**20
            rows.append({"model": model_name, "method": "qdrop", "setting": f"W4A4 block={blk.name} batch={cfg.batch_size}",
                         "metric": "its_per_s", "value": round(1e3 / iter_ms, 2), "seconds": round(iter_ms * args.iters / 1e3, 3),
                         "fwbw_ms": round(fwbw, 3), "iter_ms": round(iter_ms, 3), "overhead": round(iter_ms / fwbw, 2),
                         "peak_mem_mb": round(peak, 1), "cache_mb": round(cache_mb, 1),
                         "peak_mem_kind": "cuda max allocated" if device.type == "cuda" else "process max RSS"})
            print(f"{model_name} {blk.name}: {1e3 / iter_ms:.1f} it/s, iter {iter_ms:.2f} ms vs fw+bw {fwbw:.2f} ms "
                  f"(x{iter_ms / fwbw:.2f}), peak {peak:.0f} MB", flush=True)
            del fp_in, fp_out, q_in
    write_results(args.name, args.device, rows, notes=[
        "iter_ms: one QDrop reconstruction iteration (batch 32: sample, drop, forward, loss + rounding regulariser, "
        "backward, two Adam steps); fwbw_ms: a plain float forward + backward of the same block on the same batch; "
        "overhead = iter_ms / fwbw_ms.",
        "peak_mem_mb: CUDA max allocated during the block (caches included) on the GPU; the process max RSS on the CPU.",
        f"Profile of one block: {args.name}_profile.txt."],
        columns=("model", "setting", "value", "iter_ms", "fwbw_ms", "overhead", "peak_mem_mb", "cache_mb"))
    (RESULTS / f"{args.name}_profile.txt").write_text(profile_text)


if __name__ == "__main__":
    main()
