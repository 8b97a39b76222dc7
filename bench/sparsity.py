"""Sparsity benchmark: FP, uniform magnitude, global magnitude, ERK and FCPTS at several global sparsities.

Models: the shipped Fashion-MNIST ResNet (top-1 accuracy on the full 10k test split), the pretrained
EfficientNet-Lite0 (top-1 agreement with fp32 on views of the natural photos that scikit-image and scikit-learn
bundle), and the transformers SmolLM2-135M (perplexity on held-out Python docs) and MiniLM-L6 (embedding cosine
to fp32), which also get the one-shot LLM baselines Wanda, OWL and SparseGPT. Every method counts the same
layers (CNNs: all Conv2d/Linear; transformers: the block linears), and every row's achieved global sparsity is
recorded. Writes bench/results/<name>.json and .md, and the per-layer rates FCPTS learned as
<name>_rates_<model>.png (the highest sparsity run). `--methods fcpts-blockkd` adds FCPTS with block-output
distillation (block_kd=True) as rows of its own, `fcpts-1600` FCPTS with 1600 rate-learning steps, `fcpts-t4`
FCPTS distilling at the public run script's temperature 4 (slimkit's default is 1); those three at T=4.
`fcpts-sparsegpt` (transformers): FCPTS's learned rates, then SparseGPT's update instead of the fine-tuning. On
EfficientNet-Lite0, 'classes' rows count the distinct top-1 classes over the evaluation views (fp32: 30): a
network that collapsed to one class agrees with fp32 only where that class is the fp32 answer.

    python bench/sparsity.py                                   # CPU: Fashion-MNIST ResNet
    python bench/sparsity.py --models minilm-l6,smollm2-135m --append
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
from common import CNN_MODELS, RESULTS, cnn_setup, lm_setup, write_results  # noqa: E402
from slimkit.eval import evaluate, predict  # noqa: E402
from slimkit.sparsify import NEEDS_DATA, plot_rates  # noqa: E402

METHODS = ("uniform", "global_magnitude", "erk", "fcpts")
LM_METHODS = ("wanda", "owl", "sparsegpt")     # the one-shot LLM baselines, run on the transformers only
# row name -> (method, its extra options); the block_kd and 1600-step rows were measured at the public code's T=4
VARIANTS = {"fcpts-t4": ("fcpts", {"temperature": 4.0}),                       # the public run script's DistillKL
            "fcpts-blockkd": ("fcpts", {"block_kd": True, "temperature": 4.0}),
            "fcpts-1600": ("fcpts", {"iters": 1600, "temperature": 4.0}),     # the public code's ~1600 steps
            "fcpts-sparsegpt": ("fcpts", {"reconstruct": "sparsegpt"})}       # FCPTS's rates, SparseGPT's update



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--name", default="sparsity")
    ap.add_argument("--models", default="fmnist-resnet")
    ap.add_argument("--sparsities", default="0.5,0.7,0.8,0.9")
    ap.add_argument("--methods", default=None, help="methods (and variants) to run; default: "
                    f"{', '.join(METHODS)}, plus {', '.join(LM_METHODS)} on the transformers")
    ap.add_argument("--iters", type=int, default=400, help="FCPTS rate-learning steps")
    ap.add_argument("--finetune-iters", type=int, default=100, help="FCPTS steps with the masks fixed")
    ap.add_argument("--num-samples", type=int, default=1024, help="FCPTS calibration samples")
    ap.add_argument("--lm-sparsities", default="0.5,0.7", help="sparsities for the transformers")
    ap.add_argument("--lm-samples", type=int, default=32, help="transformers: calibration sequences")
    ap.add_argument("--seq-len", type=int, default=256, help="causal LMs: calibration tokens per sequence")
    ap.add_argument("--eval-tokens", type=int, default=20000, help="causal LMs: perplexity tokens")
    ap.add_argument("--lm-iters", type=int, default=100, help="FCPTS rate-learning steps on transformers")
    ap.add_argument("--lm-finetune-iters", type=int, default=50, help="FCPTS fixed-mask steps on transformers")
    ap.add_argument("--lm-lr", type=float, default=1e-3, help="FCPTS weight learning rate on transformers")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--append", action="store_true", help="keep the rows of an earlier run that this one does not redo")
    args = ap.parse_args()
    rows = []

    def save():
        write_results(args.name, args.device, rows, notes=[
            "Counted layers: every Conv2d and Linear (first and last included, as FCPTS's code counts them). "
            "'achieved' is the global sparsity over them; 'seconds' is the sparsify call (FCPTS: rate learning, "
            "fine-tuning and the exact projection).",
            f"FCPTS: {args.iters} rate-learning steps then {args.finetune_iters} with the masks fixed, batch 64, "
            f"{args.num_samples} calibration samples, distillation from the dense model (KL of logits, T=1; "
            "'fcpts-t4' rows T=4); "
            "the magnitude baselines prune in one shot without touching the remaining weights or BatchNorm.",
            "fmnist-resnet: top-1 accuracy on the Fashion-MNIST test split (10k); efficientnet-lite0: top-1 "
            "agreement with the fp32 model on views of natural photos (no ImageNet offline).",
            f"Transformers: counted layers are the block linears (embeddings and output head stay dense). "
            f"Calibration: {args.lm_samples} blocks of {args.seq_len} tokens (SmolLM2) or {4 * args.lm_samples} "
            f"128-token windows (MiniLM) of the Python docs' calibration split. FCPTS there: {args.lm_iters} + "
            f"{args.lm_finetune_iters} steps of batch 4, weight lr {args.lm_lr:g}, distilling logits (SmolLM2) "
            f"or the last hidden state (MiniLM). SmolLM2: perplexity over {args.eval_tokens} held-out tokens "
            "(window 512, stride 256); MiniLM: mean-pooled embedding cosine to fp32 on 256 held-out sentences. "
            "wanda / owl: one-shot, no weight update; sparsegpt: one-shot with the OBS update of the surviving "
            "weights, block by block.",
        ], append=args.append, columns=("model", "method", "setting", "metric", "value", "seconds", "achieved"))

    for model_name in args.models.split(","):
        lm = model_name not in CNN_MODELS
        measure_all = None
        if lm:
            model, tok, calib_x, measure, metric, _ = lm_setup(model_name, args.device, args.lm_samples,
                                                               args.seq_len, args.eval_tokens)
            methods = args.methods.split(",") if args.methods else list(METHODS + LM_METHODS)
            targets = [float(v) for v in args.lm_sparsities.split(",")]
            fcpts_kw = dict(iters=args.lm_iters, finetune_iters=args.lm_finetune_iters, batch_size=4, lr=args.lm_lr)
        else:
            model, calib_x, eval_x, eval_y, ref, fp, _ = cnn_setup(model_name, args.device)
            metric = CNN_MODELS[model_name]["metric"]
            def cnn_measure(m, eval_x=eval_x, eval_y=eval_y, ref=ref, metric=metric):
                out = evaluate(m, eval_x, eval_y, reference=ref, device=args.device)
                if metric == "agreement":   # how many classes the views still spread over (collapse shows as 1)
                    out["classes"] = predict(m, eval_x, device=args.device).argmax(-1).unique().numel()
                return out
            measure_all = cnn_measure
            measure = lambda m: measure_all(m)[metric]  # noqa: E731
            methods = [m for m in (args.methods.split(",") if args.methods else METHODS) if m not in LM_METHODS]
            targets = [float(v) for v in args.sparsities.split(",")]
            fcpts_kw = dict(iters=args.iters, finetune_iters=args.finetune_iters, num_samples=args.num_samples)
        fp_values = measure_all(model) if measure_all else {metric: measure(model)}
        fp_value = fp_values[metric]
        for name in [metric] + (["classes"] if "classes" in fp_values else []):
            rows.append({"model": model_name, "method": "fp", "setting": "sparsity=0", "metric": name,
                         "value": round(fp_values[name], 4), "seconds": 0.0, "achieved": 0.0})
        print(f"{model_name} FP {metric}={fp_value:.4f}", flush=True)
        for target in targets:
            for method in methods:
                t0 = time.perf_counter()
                kw = dict(device=args.device, progress=False)
                base, extra = VARIANTS.get(method, (method, {}))
                if base == "fcpts":
                    kw.update(fcpts_kw, seed=args.seed, **extra)
                sparse = slimkit.sparsify(model, calib_x if base in NEEDS_DATA else None, method=base,
                                          sparsity=target, **kw)
                seconds = time.perf_counter() - t0
                values = measure_all(sparse) if measure_all else {metric: measure(sparse)}
                value = values[metric]
                info = sparse.slimkit_info["sparsity"]
                for name in [metric] + (["kl", "classes"] if metric == "agreement" else []):   # where top-1 collapses
                    rows.append({"model": model_name, "method": method, "setting": f"sparsity={target:g}",
                                 "metric": name, "value": round(values[name], 4 if name == metric else 5),
                                 "seconds": round(seconds, 1), "achieved": round(info["achieved"], 6)})
                print(f"  {target:g} {method}: {metric}={value:.4f} (achieved {info['achieved']:.5f}, "
                      f"{seconds:.0f} s)", flush=True)
                if method == "fcpts" and target == max(targets):
                    plot_rates(sparse.slimkit_info, RESULTS / f"{args.name}_rates_{model_name}.png")
                save()

if __name__ == "__main__":
    main()
