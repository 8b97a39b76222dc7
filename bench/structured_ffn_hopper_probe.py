"""The backward's block-diagonal matmul through GELU' as one Gluon kernel (slimkit.structured.hopper), GPU only.

Where fc2 starts block-diagonal, the FFN's backward computes dpre = (dz @ blockdiag(W)) * gelu_tanh'(pre) over the
(tokens x hidden) activations: cuBLASLt's DGELU epilogue, one call per block, in the '-lt' path. This probe, in one
run on one Hopper GPU:

- the pieces alone: hopper.gelu_blocks_interleaved (fc1's second factor through bias + GELU) against cuBLASLt's
  GELU_AUX a block, and hopper.dgelu_blocks against the cuBLASLt DGELU calls, at the shapes of the FFNs being timed
  (BlockShuffle's feature-major layout) and at one token-major shape (BlockDense's layout), each result checked
  against hopper.dgelu_blocks_reference in fp32;
- the FFN's bf16 output and gradients with the kernel, against fp64 (blockshuffle-lt at d_model 1024);
- one graphed training step of the '-lt' FFN with the kernel ('-lt-hopper') and without it ('-lt'), over the
  dense step graphed likewise, variants alternating over --rounds rounds.

    python bench/structured_ffn_hopper_probe.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_results  # noqa: E402
from structured_ffn_shuffle_lt_probe import errors  # noqa: E402
from structured_ffn_speed import WARM_S, build, events_ms, lt_device, lt_probe_parser, lt_step_rows, patched  # noqa: E402

from slimkit.structured import epilogue as EP  # noqa: E402
from slimkit.structured import hopper as HP  # noqa: E402


ROUNDS = 2     # each piece keeps the fastest of this many timings (the first timing of a run can read slow)
SWEEP = [HP.Tile(128, 64, 8), HP.Tile(64, 64, 4, per_sm=2)]   # tile configs timed beside the default


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def piece_rows(name: str, setting: str, dz, w, pre, feature_major: bool, reps: int, dev) -> list[dict]:
    """The kernel against cuBLASLt's per-block DGELU calls on the same operands."""
    nb = w.shape[0]
    want = HP.dgelu_blocks_reference(dz, w, pre, feature_major)
    if feature_major:
        t = dz.shape[1]
        p = w.shape[2]

        def lt():
            out = torch.empty_like(pre)
            ov, pv, dv = out.view(nb, p, t), pre.view(nb, p, t), dz.view(nb, -1, t)
            for i in range(nb):
                EP._matmul("DGELU", w[i].t(), dv[i], ov[i], pv[i])
            return out
    else:
        def lt():
            return patched(HP, ENABLED=False)(lambda: EP.dgelu_block_diag(dz.view(dz.shape[0], nb, -1), w, pre))
    variants = {"cublaslt-dgelu": lt}
    if HP.applies(dz, w, pre, feature_major):
        variants["gluon"] = lambda: HP.dgelu_blocks(dz, w, pre, feature_major)
    nb, q, p = w.shape
    for tile in SWEEP:       # other tiles, up to the 226 KB an H100 SM has (applies() keeps SMEM_BUDGET)
        if HP._pick(nb, q, p, feature_major, [tile]):
            variants[f"gluon {tuple(tile)}"] = lambda tile=tile: HP.dgelu_blocks(dz, w, pre, feature_major, tiles=[tile])
    rows = []
    for method, fn in variants.items():
        got = fn()
        torch.cuda.synchronize()
        ms = min(events_ms(fn, dev, reps) for _ in range(ROUNDS))
        rows.append({"model": "ffn-middle", "method": method, "setting": f"{name} {setting}", "metric": "gpu_ms",
                     "value": round(ms, 4), "ms": round(ms, 4), "rel_err": round(rel(got, want), 5)})
        print(rows[-1], flush=True)
    return rows


def up_rows(ffn, t: int, reps: int, dev) -> list[dict]:
    """fc1's second factor through bias + GELU (writing act and pre): cuBLASLt's GELU_AUX a block (after the weight
    with its bias column is assembled, as ShuffleGeluFFN does) against hopper.gelu_blocks_interleaved."""
    a2, b1 = ffn.fc1.w2.detach(), (torch.randn(ffn.fc1.out_features, device=dev) * 0.5).to(ffn.fc1.w2.dtype)
    l, s, r = a2.shape
    rp = EP._shuffle_pad(r, True)
    h = torch.randn(rp * l, t, device=dev).to(a2.dtype)
    h[r * l:] = 1
    want_act, want_pre = HP.gelu_blocks_interleaved_reference(h, a2, b1, t)

    def lt():
        w2p = torch.cat([a2, b1.view(s, l).t().unsqueeze(2), a2.new_zeros(l, s, rp - r - 1)], 2)
        return EP._shuffle_up(h, w2p.contiguous(), t, True)
    variants = {"cublaslt-gelu-aux": lt}
    if HP.up_applies(h, a2, t):
        variants["gluon"] = lambda: HP.gelu_blocks_interleaved(h, a2, b1, t)
    bk = HP.k_step(r)
    if HP.smem_bytes(r, 128, 64) <= HP.SMEM_SM:                   # 128 x 64 tiles, up to what an SM has
        variants["gluon (128, 64)"] = lambda: HP.gelu_blocks_interleaved(h, a2, b1, t, tiles=(128, 64, bk, 8))
    rows = []
    for method, fn in variants.items():
        act, pre = fn()
        torch.cuda.synchronize()
        ms = min(events_ms(fn, dev, reps) for _ in range(ROUNDS))
        rows.append({"model": "ffn-middle", "method": method, "setting": f"gelu up r={ffn.fc1.param_ratio:.3g} "
                     f"T={t} blocks={l}x{s}x{r}", "metric": "gpu_ms", "value": round(ms, 4), "ms": round(ms, 4),
                     "rel_err": round(max(rel(act, want_act), rel(pre, want_pre)), 5)})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = lt_probe_parser(__doc__)
    ap.set_defaults(kinds="blockshuffle,blockdense", ratios="0.25,0.32")
    ap.add_argument("--pieces-only", action="store_true", help="time the kernel alone, not the FFN step")
    args = ap.parse_args()
    dev = lt_device()
    torch.manual_seed(0)
    dt = torch.bfloat16
    t = args.tokens
    rows = []
    for ratio in map(float, args.ratios.split(",")):
        ffn, _ = build("blockshuffle", args.d, ratio, dev, dt)
        c1 = ffn.fc2.w1.detach()                              # (k2, q2, p2)
        k2, q2, p2 = c1.shape
        dz = (torch.randn(k2 * q2, t, device=dev) * 0.1).to(dt)
        pre = torch.randn(k2 * p2, t, device=dev).to(dt)
        rows += up_rows(ffn, t, args.reps, dev)
        rows += piece_rows("dgelu fm", f"r={ratio:g} d={args.d} T={t} blocks={k2}x{q2}x{p2}", dz, c1, pre, True,
                           args.reps, dev)
    nb, q, p = 4, 256, 2048
    dz = (torch.randn(t, nb * q, device=dev) * 0.1).to(dt)
    blocks = (torch.randn(nb, q, p, device=dev) / q ** 0.5).to(dt)
    pre = torch.randn(t, nb * p, device=dev).to(dt)
    rows += piece_rows("dgelu tm", f"d={args.d} T={t} blocks={nb}x{q}x{p}", dz, blocks, pre, False, args.reps, dev)
    del dz, blocks, pre
    if args.pieces_only:
        for r in rows:
            print(r["method"], r["setting"], r["value"], r["rel_err"])
        return
    rows += errors(1024, 2048, 0.25, dev)
    variants = {"-lt-hopper": patched(HP, ENABLED=True), "-lt-hopper-bwd": patched(HP, up_applies=lambda *a: False),
                "-lt": patched(HP, ENABLED=False)}
    rows += lt_step_rows(args.d, t, map(float, args.ratios.split(",")), args.kinds.split(","), args.align,
                         variants, args.reps, args.rounds, dev)
    notes = [
        f"bf16, one GPU; CUDA events, L2 flushed before each call, median of {args.reps} after {WARM_S} s of "
        f"warm-up calls, the pieces the faster of {ROUNDS} such timings; the step rows keep the fastest of "
        f"{args.rounds} interleaved rounds.",
        "'gelu up' rows: fc1's second factor (blocks l x s x r) through bias + GELU tanh, writing act and pre, "
        "feature-major with block j's rows interleaved: 'cublaslt-gelu-aux' one GELU_AUX matmul a block after "
        "assembling the weight with its bias column (ShuffleGeluFFN's path), 'gluon' hopper.gelu_blocks_interleaved; "
        "rel_err the larger of act's and pre's against the fp32 reference.",
        "'dgelu fm' rows: dpre (nb p, T) = blockdiag(W^T) dz * gelu_tanh'(pre), feature-major, at the shapes of "
        "BlockShuffle fc2's first factor (ShuffleGeluFFN's backward): 'cublaslt-dgelu' one DGELU epilogue matmul a "
        "block, 'gluon' hopper.dgelu_blocks; 'dgelu tm': the token-major layout (BlockDense's GeluFFN). rel_err "
        "against hopper.dgelu_blocks_reference (fp32).",
        "Step rows: 'fwbw_speedup' = the dense step's graphed time (timed first) / this one's (the fastest of "
        "the rounds); 'paired' = the median over the rounds of the dense step's time in that round over this "
        "one's, both under the same sustained load; 'blockshuffle-lt-hopper-graph' "
        "runs epilogue.ShuffleGeluFFN with both Gluon kernels, '-lt-hopper-bwd' with the backward's only, "
        "'blockshuffle-lt-graph' with cuBLASLt's GELU_AUX and DGELU (BlockDense: its backward's kernel or not).",
        "'max_rel_err_bf16' (blockshuffle-lt, kernel on): the largest ||got - want|| / ||want|| over the output and "
        "every gradient, bf16 against the same FFN in fp64.",
    ]
    write_results("structured_ffn_hopper_probe", str(dev), rows, notes,
                  columns=("model", "method", "setting", "metric", "value", "ms", "paired", "rel_err", "ratio"))


if __name__ == "__main__":
    main()
