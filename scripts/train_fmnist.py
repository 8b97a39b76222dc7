"""Train the shipped Fashion-MNIST ResNet on the CPU, reproducibly, and write the files slimkit ships:
slimkit/assets/fmnist_resnet.safetensors (weights), fmnist_resnet.json (how they were made, what they score)
and fmnist_subsets.safetensors (1024 calibration images from the train split, 2000 held-out test images).

    .venv/bin/python scripts/train_fmnist.py            # the shipped run (see fmnist_resnet.json for its settings)
    .venv/bin/python scripts/train_fmnist.py --epochs 1 --out-dir /tmp/fmnist   # a quick try

The shipped run: 5 epochs of about 165 s each on 2 otherwise idle CPU cores, 93.1% on the 10000 test images.
Same seed, same thread count and same torch version give the same weights, bit for bit.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # only matters with --device cuda (deterministic GEMMs)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from slimkit.models.fmnist import FashionResNet, balanced_indices, load_fashion_mnist, to_float  # noqa: E402

ASSETS = Path(__file__).resolve().parent.parent / "slimkit" / "assets"
CALIB_N, EVAL_N = 1024, 2000


def augment(images: torch.Tensor, g: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Per image: random crop after zero padding by `pad`, random horizontal flip; uint8 (B, 28, 28) in and out."""
    b, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    flip = torch.rand(b, generator=g) < 0.5
    rows = (oy[:, None] + torch.arange(h))[:, :, None]
    cols = ox[:, None] + torch.arange(w)
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, :]
    return padded[torch.arange(b)[:, None, None], rows, cols]


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up to `peak`, then cosine decay to zero."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, device: str, fmt,
             batch: int = 500) -> float:
    """Top-1 accuracy on uint8 images, in eval mode."""
    model.eval()
    correct = 0
    for i in range(0, len(images), batch):
        x = to_float(images[i:i + batch]).to(device).contiguous(memory_format=fmt)
        correct += (model(x).argmax(1).cpu() == labels[i:i + batch]).sum().item()
    return correct / len(images)


def save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file under a temporary name, then rename it into place."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.chmod(tmp, 0o644)  # safetensors creates it owner-only; these files ship
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--out-dir", type=Path, default=ASSETS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--warmup-epochs", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--device", default="cpu", help="cpu (the shipped run) or cuda")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=args.device != "cpu")  # CUDA lacks some deterministic kernels
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")

    model = FashionResNet().to(args.device).to(memory_format=fmt)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(train_x) / args.batch_size)
    total, warmup = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(args.seed)  # data order and augmentation, separate from init
    print(f"FashionResNet, {n_params} parameters; {args.epochs} epochs of {steps_per_epoch} steps on {args.device} "
          f"({args.threads} threads, channels_last={args.channels_last}), torch {torch.__version__}", flush=True)

    step, epoch_times, t_start = 0, [], time.time()
    for epoch in range(args.epochs):
        model.train()
        t0, loss_sum, correct = time.time(), 0.0, 0
        for idx in torch.randperm(len(train_x), generator=g).split(args.batch_size):
            x = to_float(augment(train_x[idx], g)).to(args.device).contiguous(memory_format=fmt)
            y = train_y[idx].to(args.device)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, args.lr, warmup)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(1) == y).sum().item()
        epoch_times.append(time.time() - t0)
        print(f"epoch {epoch + 1}/{args.epochs}  loss {loss_sum / len(train_x):.4f}  "
              f"train acc {correct / len(train_x):.4f}  {epoch_times[-1]:.0f}s", flush=True)
    train_seconds = time.time() - t_start

    calib_idx = balanced_indices(train_y, CALIB_N, args.seed)
    eval_idx = balanced_indices(test_y, EVAL_N, args.seed + 1)
    test_acc = accuracy(model, test_x, test_y, args.device, fmt)
    eval_acc = accuracy(model, test_x[eval_idx], test_y[eval_idx], args.device, fmt)
    print(f"test accuracy {test_acc:.4f} (10000 images), eval subset accuracy {eval_acc:.4f} ({EVAL_N} images); "
          f"training took {train_seconds / 60:.1f} min", flush=True)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    model = model.cpu().to(memory_format=torch.contiguous_format)
    save_atomic(model.state_dict(), args.out_dir / "fmnist_resnet.safetensors", {"format": "pt"})
    save_atomic({"calib_x": train_x[calib_idx], "calib_y": train_y[calib_idx], "calib_idx": calib_idx,
                 "eval_x": test_x[eval_idx], "eval_y": test_y[eval_idx], "eval_idx": eval_idx},
                args.out_dir / "fmnist_subsets.safetensors",
                {"calib": f"{CALIB_N} class-balanced images of the train split (calib_idx: their indices)",
                 "eval": f"{EVAL_N} class-balanced images of the test split, held out (eval_idx: their indices)"})
    info = {
        "model": "FashionResNet(block='basic', widths=(32, 64, 128), blocks_per_stage=2)",
        "parameters": n_params,
        "data": "Fashion-MNIST train split (60000), Debian package dataset-fashion-mnist",
        "augmentation": "random crop 28 after zero padding 2, horizontal flip p=0.5",
        "optimizer": {"name": "SGD", "momentum": 0.9, "nesterov": True, "lr": args.lr,
                      "weight_decay": args.weight_decay, "batch_size": args.batch_size, "label_smoothing": 0.0},
        "schedule": f"linear warm-up {args.warmup_epochs} epochs, then cosine to 0, per step",
        "seed": args.seed,
        "epochs": args.epochs,
        "test_accuracy": test_acc,
        "eval_subset_accuracy": eval_acc,
        "eval_subset_size": EVAL_N,
        "calib_subset_size": CALIB_N,
        "epoch_seconds": [round(t, 1) for t in epoch_times],
        "train_seconds": round(train_seconds, 1),
        "device": args.device if args.device != "cpu" else
        f"cpu ({platform.processor() or platform.machine()}), {args.threads} threads",
        "channels_last": args.channels_last,
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
    }
    tmp = args.out_dir / "fmnist_resnet.json.tmp"
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, args.out_dir / "fmnist_resnet.json")
    print(f"wrote {args.out_dir}/fmnist_resnet.safetensors, fmnist_resnet.json, fmnist_subsets.safetensors")


if __name__ == "__main__":
    main()
