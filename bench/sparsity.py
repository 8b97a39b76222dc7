"""Sparsity benchmark: FP, uniform magnitude, global magnitude, ERK and FCPTS at several global sparsities.

Models so far: the shipped Fashion-MNIST ResNet (top-1 accuracy on the full 10k test split) and the pretrained
EfficientNet-Lite0 (top-1 agreement with fp32 on views of the natural photos that scikit-image and scikit-learn
bundle). Every method counts the same layers (all Conv2d/Linear), and every row's achieved global sparsity is
recorded next to its target. Writes bench/results/<name>.json and .md, and the per-layer rates FCPTS learned
as <name>_rates_<model>.png (the highest sparsity run).

    python bench/sparsity.py                                   # CPU: Fashion-MNIST ResNet
    python bench/sparsity.py --device cuda --name sparsity_gpu --models fmnist-resnet,efficientnet-lite0
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import slimkit  # noqa: E402
from common import CNN_MODELS, RESULTS, cnn_setup, merge_rows, write_results  # noqa: E402
from slimkit.eval import evaluate  # noqa: E402
from slimkit.sparsify import plot_rates  # noqa: E402

METHODS = ("uniform", "global_magnitude", "erk", "fcpts")



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--name", default="sparsity")
    ap.add_argument("--models", default="fmnist-resnet")
    ap.add_argument("--sparsities", default="0.5,0.7,0.8,0.9")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--iters", type=int, default=400, help="FCPTS rate-learning steps")
    ap.add_argument("--finetune-iters", type=int, default=100, help="FCPTS steps with the masks fixed")
    ap.add_argument("--num-samples", type=int, default=1024, help="FCPTS calibration samples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--append", action="store_true", help="keep the rows of an earlier run that this one does not redo")
    args = ap.parse_args()
    rows = []

    def save():
        write_results(args.name, args.device, merge_rows(args.name, rows) if args.append else rows, notes=[
            "Counted layers: every Conv2d and Linear (first and last included, as FCPTS's code counts them). "
            "'achieved' is the global sparsity over them; 'seconds' is the sparsify call (FCPTS: rate learning, "
            "fine-tuning and the exact projection).",
            f"FCPTS: {args.iters} rate-learning steps then {args.finetune_iters} with the masks fixed, batch 64, "
            f"{args.num_samples} calibration samples, distillation from the dense model (KL of logits, T=4); "
            "the magnitude baselines prune in one shot without touching the remaining weights or BatchNorm.",
            "fmnist-resnet: top-1 accuracy on the Fashion-MNIST test split (10k); efficientnet-lite0: top-1 "
            "agreement with the fp32 model on views of natural photos (no ImageNet offline).",
        ])

    for model_name in args.models.split(","):
        model, calib_x, eval_x, eval_y, ref, fp, _ = cnn_setup(model_name, args.device)
        spec = CNN_MODELS[model_name]
        rows.append({"model": model_name, "method": "fp", "setting": "sparsity=0", "metric": spec["metric"],
                     "value": round(fp[spec["metric"]], 4), "seconds": 0.0, "achieved": 0.0})
        print(f"{model_name} FP {spec['metric']}={fp[spec['metric']]:.4f}", flush=True)
        for target in (float(v) for v in args.sparsities.split(",")):
            for method in args.methods.split(","):
                t0 = time.perf_counter()
                kw = dict(iters=args.iters, finetune_iters=args.finetune_iters, seed=args.seed, progress=False,
                          device=args.device, num_samples=args.num_samples) if method == "fcpts" else {}
                sparse = slimkit.sparsify(model, calib_x if method == "fcpts" else None, method=method,
                                          sparsity=target, **kw)
                seconds = time.perf_counter() - t0
                res = evaluate(sparse, eval_x, eval_y, reference=ref, device=args.device)
                info = sparse.slimkit_info["sparsity"]
                rows.append({"model": model_name, "method": method, "setting": f"sparsity={target:g}",
                             "metric": spec["metric"], "value": round(res[spec["metric"]], 4),
                             "seconds": round(seconds, 1), "achieved": round(info["achieved"], 6)})
                print(f"  {target:g} {method}: {spec['metric']}={res[spec['metric']]:.4f} "
                      f"(achieved {info['achieved']:.5f}, {seconds:.0f} s)", flush=True)
                if method == "fcpts" and target == max(float(v) for v in args.sparsities.split(",")):
                    plot_rates(sparse.slimkit_info, RESULTS / f"{args.name}_rates_{model_name}.png")
                save()


if __name__ == "__main__":
    main()
