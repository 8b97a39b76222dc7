"""A randomly initialised 7B Llama-shaped model quantized with OS+ W8A8 on one GPU, one block at a time.

The model lives in CPU memory (fp32, 27 GB); each transformer block visits the GPU for its statistics,
OS+ search, calibration and quantized outputs, then goes back. Reports peak GPU memory and time per block.

    python bench/transformer_big.py                     # on the GPU machine (device tool)
    python bench/transformer_big.py --layers 4 --append                  # 4 blocks of the same width (GPU)
    python bench/transformer_big.py --layers 2 --hidden 256 --intermediate 688 --heads 4 --sequences 4 \
        --seq-len 128 --search-steps 10 --device cpu --name transformer_big_smoke     # a small CPU smoke run

The OS+ threshold search scores every grid point with the configured weight observer (MSE by default), which
dominates a block's time; --search-steps shortens the grid (slimkit's default otherwise).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import slimkit  # noqa: E402
from common import write_results  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--sequences", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--name", default="transformer_big")
    ap.add_argument("--search-steps", type=int, default=None, help="OS+ grid points (default: slimkit's)")
    ap.add_argument("--append", action="store_true", help="keep the rows of an earlier run that this one does not redo")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("transformer_big: no CUDA GPU here (see the docstring's --device cpu smoke run)")
    import transformers as T

    torch.manual_seed(0)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 storage, TF32 matmuls (as PyTorch's default on Ampere+)
    cfg = T.LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.intermediate,
                        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                        max_position_embeddings=4096)
    t0 = time.perf_counter()
    model = T.LlamaForCausalLM(cfg).eval()
    t_build = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    print(f"built {params / 1e9:.2f}B parameters in {t_build:.0f} s", flush=True)
    ids = torch.randint(0, cfg.vocab_size, (args.sequences, args.seq_len), generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    opts = {} if args.search_steps is None else {"search_steps": args.search_steps}
    q = slimkit.quantize(model, ids, method="os_plus", w_bits=8, a_bits=8, device=args.device, inplace=True,
                         lm_batch_size=4, **opts)
    seconds = time.perf_counter() - t0
    blocks = q.slimkit_info["blocks"]
    peak = max((b.get("peak_gpu_mb", 0.0) for b in blocks.values()), default=0.0)
    per_block = [b["seconds"] for b in blocks.values()]
    setting = (f"W8A8 {params / 1e9:.2f}B layers={args.layers} tokens={args.sequences}x{args.seq_len}"
               + ("" if args.search_steps is None else f" search_steps={args.search_steps}"))
    rows = [
        {"model": f"llama-random-{params / 1e9:.1f}b", "method": "os_plus", "setting": setting, "metric": "peak_gpu_mb",
         "value": round(peak, 1), "seconds": round(seconds, 1)},
        {"model": f"llama-random-{params / 1e9:.1f}b", "method": "os_plus", "setting": setting,
         "metric": "seconds_per_block", "value": round(sum(per_block) / len(per_block), 2), "seconds": round(seconds, 1),
         "max_block_seconds": round(max(per_block), 2), "build_seconds": round(t_build, 1),
         "model_fp32_gb": round(params * 4 / 2**30, 1)},
    ]
    print(rows, flush=True)
    write_results(args.name, args.device, rows, notes=[
        "Randomly initialised Llama-2-7B shape; the model stays in CPU memory and one block at a time is on the GPU.",
        "peak_gpu_mb: the largest torch.cuda.max_memory_allocated over blocks (block weights, calibration "
        "hidden states of both streams, OS+ search activations).",
    ], append=args.append)


if __name__ == "__main__":
    main()
