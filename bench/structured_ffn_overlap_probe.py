"""Weight gradients on a side stream in the '-lt' FFNs' backward (layers.Beside), GPU only.

A structured FFN's backward is a chain of input gradients (dz -> dpre -> dh -> dx) with a weight-gradient matmul
hanging off each link. epilogue.GeluFFN and ShuffleGeluFFN (as the layers' own Functions and the Triton fused
FFN) enqueue those weight gradients on a side stream (layers.Beside) that forks from the chain where its operands
are ready and joins it before the backward returns, so a memory-bound link (the DGELU matmuls: K = 256 at
BlockShuffle 25%) can run beside a compute-bound weight gradient. This probe, in one run on one GPU:

- checks that the side stream changes no bit: the output and every gradient, overlapped against serial, eager and
  captured in a CUDA graph;
- times one training step (forward+backward, bias, GELU tanh, bf16) captured as a CUDA graph with the side
  stream ('-lt') and without it ('-lt-serial', layers.OVERLAP off), over the dense step graphed likewise;
  variants alternate over --rounds rounds, each keeping its fastest median.

    python bench/structured_ffn_overlap_probe.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_results  # noqa: E402
from structured_ffn_speed import LtFFN, build, graphed_step, lt_device, lt_probe_parser, lt_step_rows, patched  # noqa: E402,E501

from slimkit.structured import layers as L  # noqa: E402


def same_bits(kind: str, d: int, T: int, ratio: float, dev) -> dict:
    """Whether the overlapped backward gives bit-identical output and gradients to the serial one (eager and
    graphed)."""
    ffn, _ = build(kind, d, ratio, dev, torch.bfloat16, 64)
    lt = LtFFN(ffn.fc1, ffn.fc2)
    x = torch.randn(T, d, device=dev, dtype=torch.bfloat16)
    g = torch.randn_like(x)

    def eager():
        xg = x.detach().requires_grad_(True)
        lt.zero_grad(set_to_none=True)
        y = lt(xg)
        y.backward(g)
        torch.cuda.synchronize()
        return [y.detach().clone(), xg.grad.clone()] + [p.grad.clone() for p in lt.parameters()]

    def graphed():
        replay = graphed_step(lt, x, g)
        replay()
        torch.cuda.synchronize()
        return [p.grad.clone() for p in lt.parameters()]

    out = {}
    for name, fn in (("eager", eager), ("graph", graphed)):
        L.OVERLAP = False
        want = fn()
        L.OVERLAP = True
        got = fn()
        out[name] = all(torch.equal(a, b) for a, b in zip(got, want))
    return out


def main() -> None:
    ap = lt_probe_parser(__doc__)
    ap.set_defaults(kinds="blockshuffle,blockdense,lowrank", ratios="0.25,0.32")
    args = ap.parse_args()
    dev = lt_device()
    torch.manual_seed(0)
    rows = []
    for kind in args.kinds.split(","):
        bits = same_bits(kind, 1024, 2048, 0.25, dev)
        for name, ok in bits.items():
            rows.append({"model": "ffn", "method": f"{kind}-lt", "setting": f"r=0.25 d=1024 T=2048 {name}",
                         "metric": "bit_identical_to_serial", "value": int(ok)})
            print(rows[-1], flush=True)
    L.OVERLAP = True
    variants = {"-lt": patched(L), "-lt-serial": patched(L, OVERLAP=False)}
    rows += lt_step_rows(args.d, args.tokens, map(float, args.ratios.split(",")), args.kinds.split(","), args.align,
                         variants, args.reps, args.rounds, dev)
    notes = [
        "bf16, one GPU; CUDA events, L2 flushed before each call, median of "
        f"{args.reps}, fastest of {args.rounds} interleaved rounds. 'fwbw_speedup': one graphed forward+backward "
        "step through fused_ffn(matmul='cublaslt'), value = the dense step's graphed time / this one's; '-lt' with "
        "the weight gradients on a side stream (layers.Beside), '-lt-serial' with layers.OVERLAP off (all on "
        "one stream).",
        "'bit_identical_to_serial': 1 when the output and every gradient match the serial backward bit for bit "
        "(eager: output, input and parameter gradients; graph: parameter gradients after one replay).",
    ]
    write_results("structured_ffn_overlap_probe", str(dev), rows, notes,
                  columns=("model", "method", "setting", "metric", "value", "ms", "ratio"))


if __name__ == "__main__":
    main()
