"""BlockShuffle's FFN with fc1's bias + GELU and the backward's GELU' in cuBLASLt epilogues, GPU only.

kernels.blockshuffle_ffn keeps the hidden activations feature-major between two BlockShuffle layers and runs bias +
GELU (forward) and GELU' + the bias-gradient sum (backward) as separate passes over them (kernels.bias_gelu_rows).
epilogue.ShuffleGeluFFN puts both in cuBLASLt epilogues instead: one GELU_AUX matmul per block of fc1's second
factor, fc1's bias carried in the matmul by rows of ones beside the middle activations, and one DGELU matmul per
block of fc2's first factor's input gradient. This probe, in one run on one GPU:

- checks it against the eager FFN in bf16 (relative error of the output and of every gradient against fp32);
- times one training step (forward+backward, bias, GELU tanh, bf16), captured as a CUDA graph, through
  fused_ffn(matmul='cublaslt') with the epilogue path ('-lt') and without it (eager, ''), over the dense step
  graphed likewise; variants alternate over --rounds rounds, each keeping its fastest median.

    python bench/structured_ffn_shuffle_lt_probe.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_results  # noqa: E402
from structured_ffn_speed import WARM_S, LtFFN, build, lt_device, lt_probe_parser, lt_step_rows, patched  # noqa: E402

from slimkit.structured import epilogue as EP  # noqa: E402


def errors(d: int, T: int, ratio: float, dev) -> list[dict]:
    """The '-lt' FFN's output and gradients in bf16 against the same FFN in fp32 (eager), and eager bf16's."""
    ffn, real = build("blockshuffle", d, ratio, dev, torch.float32)
    for m in (ffn.fc1, ffn.fc2):
        torch.nn.init.normal_(m.bias, std=0.5)
    x = torch.randn(T, d, device=dev)
    g = torch.randn(T, d, device=dev)

    def run(mod, dt):
        mod = mod.to(dt)
        xi = x.to(dt).requires_grad_(True)
        y = mod(xi)
        y.backward(g.to(dt))
        out = [y.float(), xi.grad.float()] + [p.grad.float() for p in mod.parameters()]
        mod.zero_grad(set_to_none=True)
        return out

    want = run(ffn, torch.float64)
    rows = []
    for name, mod in (("blockshuffle", ffn), ("blockshuffle-lt", LtFFN(ffn.fc1, ffn.fc2))):
        got = run(mod, torch.bfloat16)
        err = max(((a - b.float()).norm() / b.float().norm()).item() for a, b in zip(got, want))
        rows.append({"model": "ffn", "method": name, "setting": f"r={ratio:g} d={d} T={T}",
                     "metric": "max_rel_err_bf16", "value": round(err, 5), "ratio": round(real, 4)})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = lt_probe_parser(__doc__)
    ap.set_defaults(kinds="blockshuffle", ratios="0.25,0.32,0.5")
    args = ap.parse_args()
    dev = lt_device()
    torch.manual_seed(0)
    rows = errors(1024, 2048, 0.25, dev)
    variants = {"-lt": patched(EP), "": patched(EP, available=lambda x: False)}
    rows += lt_step_rows(args.d, args.tokens, map(float, args.ratios.split(",")), args.kinds.split(","), args.align,
                         variants, args.reps, args.rounds, dev)
    notes = [
        "bf16, one GPU; CUDA events, L2 flushed before each call, median of "
        f"{args.reps} after {WARM_S} s of warm-up calls, fastest of {args.rounds} interleaved rounds. "
        "'fwbw_speedup': one graphed forward+backward step through fused_ffn(matmul='cublaslt'), value = the dense step's graphed time / this one's; "
        "'blockshuffle-lt-graph' runs epilogue.ShuffleGeluFFN, 'blockshuffle-graph' the eager feature-major FFN "
        "(kernels.blockshuffle_ffn) that fused_ffn falls back to without nvmath-python.",
        "'max_rel_err_bf16': the largest ||got - want|| / ||want|| over the output and every gradient, bf16 against "
        "the same FFN in fp64 (biases drawn with std 0.5 so that their gradients are exercised).",
    ]
    write_results("structured_ffn_shuffle_lt_probe", str(dev), rows, notes,
                  columns=("model", "method", "setting", "metric", "value", "ms", "paired", "ratio"))


if __name__ == "__main__":
    main()
