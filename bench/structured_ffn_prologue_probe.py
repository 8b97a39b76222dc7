"""Can GELU ride in the *prologue* of fc2's first matmul in the feature-major BlockShuffle FFN? A probe (GPU only).

The epilogue probe (structured_ffn_epilogue_probe) fused GELU into fc1's last matmul, which then writes both the
pre-activation and the activation. Fusing it into the consumer instead moves less: fc2's first block-diagonal
factor reads the pre-activation, adds fc1's bias and applies GELU to each tile as it loads it, so the activation
is never written (forward), and the backward recomputes it the same way inside fc2's weight-gradient matmul. At
d_model 2048, 25% and 16384 tokens the forward bias + GELU pass (read pre, write act: 0.5 GB) would go away.

Kernels (Triton, pointer loads, one program per tile, fp32 accumulation), for the 8 blocks of fc2's first factor
(256 x 1024 each) on feature-major (hidden x tokens) activations:
- fwd-B: out = W @ gelu(pre + b), the transformed tile the right-hand operand;
- fwd-A: out^T = gelu(pre + b)^T @ W^T, the transformed tile the left-hand operand (Hopper's wgmma reads only the
  left one from registers), stored transposed;
- dW: dW = dh @ gelu(pre + b)^T.
Each is checked against PyTorch and timed with and without the GELU (the 'plain' rows load the tile as it is),
against cuBLAS's bmm alone and after slimkit's bias + GELU pass (bias_gelu_rows). The best of a few tile configs
is reported. Writes bench/results/structured_ffn_prologue_probe.{json,md}:

    python bench/structured_ffn_prologue_probe.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from common import write_results  # noqa: E402
from slimkit.structured.kernels import _gelu, bias_gelu_rows  # noqa: E402

NB, S, K, T = 8, 256, 1024, 16384


@triton.jit
def _prologue(x, GELU: tl.constexpr):
    """GELU 0: the tile as loaded (the 'plain' timing); 1: erf GELU; 2: tanh GELU."""
    if GELU == 0:
        return x
    else:
        return _gelu(x, GELU - 1)


@triton.jit
def _block_tile(n_m, n_n, GROUP_M: tl.constexpr):
    """(block, row tile, column tile) of this program: blocks one after another, tiles in grouped order within
    each (GROUP_M row tiles share their column tiles in L2)."""
    pid = tl.program_id(0)
    blk, t = pid // (n_m * n_n), pid % (n_m * n_n)
    per_group = GROUP_M * n_n
    first = (t // per_group) * GROUP_M
    size = tl.minimum(n_m - first, GROUP_M)
    return blk, first + (t % per_group) % size, (t % per_group) // size


@triton.jit
def _fwd_b(w_ptr, pre_ptr, b_ptr, out_ptr, S, K, T, n_m, n_n,
           BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, GELU: tl.constexpr):
    # out[blk] (S, T) = W[blk] (S, K) @ gelu(pre[blk] (K, T) + b[blk])
    blk, pid_m, pid_n = _block_tile(n_m, n_n, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    w = w_ptr + blk * S * K
    p = pre_ptr + blk * K * T
    bb = b_ptr + blk * K
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        a = tl.load(w + rm[:, None] * K + kk[None, :])
        x = tl.load(p + kk[:, None] * T + rn[None, :]).to(tl.float32)
        if GELU:
            x += tl.load(bb + kk).to(tl.float32)[:, None]
        acc = tl.dot(a, _prologue(x, GELU).to(a.dtype), acc)
    tl.store(out_ptr + blk * S * T + rm[:, None] * T + rn[None, :], acc.to(out_ptr.dtype.element_ty))


@triton.jit
def _fwd_a(w_ptr, pre_ptr, b_ptr, out_ptr, S, K, T, n_m, n_n,
           BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, GELU: tl.constexpr):
    # out[blk]^T (T, S) = gelu(pre[blk] + b)^T (T, K) @ W[blk]^T (K, S): the transformed operand is A
    blk, pid_m, pid_n = _block_tile(n_m, n_n, GROUP_M)      # pid_m: token tiles, pid_n: S tiles
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    w = w_ptr + blk * S * K
    p = pre_ptr + blk * K * T
    bb = b_ptr + blk * K
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        x = tl.load(p + kk[None, :] * T + rm[:, None]).to(tl.float32)
        if GELU:
            x += tl.load(bb + kk).to(tl.float32)[None, :]
        wt = tl.load(w + rn[None, :] * K + kk[:, None])
        acc = tl.dot(_prologue(x, GELU).to(wt.dtype), wt, acc)
    tl.store(out_ptr + blk * S * T + rn[None, :] * T + rm[:, None], acc.to(out_ptr.dtype.element_ty))


@triton.jit
def _dw(dh_ptr, pre_ptr, b_ptr, dw_ptr, S, K, T, n_m, n_n,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, GELU: tl.constexpr):
    # dW[blk] (S, K) = dh[blk] (S, T) @ gelu(pre[blk] + b)^T (T, K)
    blk, pid_m, pid_n = _block_tile(n_m, n_n, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    d = dh_ptr + blk * S * T
    p = pre_ptr + blk * K * T
    bias = tl.load(b_ptr + blk * K + rn).to(tl.float32)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, T, BK):
        kk = k0 + rk
        a = tl.load(d + rm[:, None] * T + kk[None, :])
        x = tl.load(p + rn[None, :] * T + kk[:, None]).to(tl.float32)
        if GELU:
            x += bias[None, :]
        acc = tl.dot(a, _prologue(x, GELU).to(a.dtype), acc)
    tl.store(dw_ptr + blk * S * K + rm[:, None] * K + rn[None, :], acc.to(dw_ptr.dtype.element_ty))


FWD_CONFIGS = [(128, 256, 64, 3, 8), (128, 128, 64, 4, 4), (128, 128, 64, 4, 8), (256, 128, 64, 3, 8),
               (64, 256, 64, 4, 4), (128, 256, 32, 4, 8), (128, 64, 64, 4, 4)]
DW_CONFIGS = [(128, 128, 64, 4, 8), (128, 128, 64, 3, 4), (256, 128, 64, 3, 8), (128, 128, 128, 3, 8),
              (64, 128, 64, 4, 4)]


def launch(kernel, cfg, args, M, N, gelu):
    bm, bn, bk, st, wp = cfg
    n_m, n_n = M // bm, N // bn
    kernel[(NB * n_m * n_n,)](*args, n_m, n_n, BM=bm, BN=bn, BK=bk, GROUP_M=8, GELU=gelu, num_stages=st,
                              num_warps=wp)


def bench(fn):
    """Median ms (triton.testing.do_bench: L2 cleared before each call)."""
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def best(kernel, cfgs, args, M, N, gelu, out, ref):
    """(ms, config, relative error) of the fastest config that runs; configs that fail to compile are skipped."""
    found = None
    for cfg in cfgs:
        if M % cfg[0] or N % cfg[1]:
            continue
        try:
            out.zero_()
            launch(kernel, cfg, args, M, N, gelu)
            err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            ms = bench(lambda: launch(kernel, cfg, args, M, N, gelu))
        except Exception as e:   # noqa: BLE001 (out of shared memory and the like)
            print(f"  {kernel.__name__} {cfg}: skipped ({type(e).__name__})")
            continue
        print(f"  {kernel.__name__} gelu={gelu} {cfg}: {ms:.4f} ms, rel err {err:.1e}", flush=True)
        if found is None or ms < found[0]:
            found = (ms, cfg, err)
    return found


def main():
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    if not torch.cuda.is_available():
        sys.exit("structured_ffn_prologue_probe times CUDA kernels: run it on a GPU machine (device tool)")
    torch.manual_seed(0)
    dt, dev = torch.bfloat16, "cuda"
    w = torch.randn(NB, S, K, device=dev, dtype=dt) / 32
    pre = torch.randn(NB * K, T, device=dev, dtype=dt)
    b = torch.randn(NB * K, device=dev, dtype=dt) / 4
    dh = torch.randn(NB * S, T, device=dev, dtype=dt)
    out = torch.empty(NB * S, T, device=dev, dtype=dt)
    dw = torch.empty(NB, S, K, device=dev, dtype=dt)
    setting = f"r=0.25 d=2048 T={T}"
    rows = []

    def row(method, what, metric, value, cfg=None):
        rows.append({"model": "ffn-middle", "method": method, "setting": f"{what} {setting}", "metric": metric,
                     "value": round(value, 4) if metric.endswith("_ms") else float(f"{value:.2g}"),
                     "config": "" if cfg is None else "x".join(map(str, cfg))})

    act = bias_gelu_rows(pre, b)
    plain_ref = torch.bmm(w, pre.view(NB, K, T)).view(NB * S, T)
    ref = torch.bmm(w, act.view(NB, K, T)).view(NB * S, T)
    act_tanh = bias_gelu_rows(pre, b, "tanh")
    ref_tanh = torch.bmm(w, act_tanh.view(NB, K, T)).view(NB * S, T)
    row("cublas", "gelu-pass", "time_ms", bench(lambda: bias_gelu_rows(pre, b)))
    row("cublas", "fc2-first", "plain_ms", bench(lambda: torch.bmm(w, act.view(NB, K, T))))
    row("cublas", "fc2-first", "fused_ms", bench(lambda: torch.bmm(w, bias_gelu_rows(pre, b).view(NB, K, T))))
    row("cublas", "fc2-first-dW", "plain_ms",
        bench(lambda: torch.bmm(dh.view(NB, S, T), act.view(NB, K, T).transpose(1, 2))))
    for name, kern, M, N in (("triton-B", _fwd_b, S, T), ("triton-A", _fwd_a, T, S)):
        for gelu, metric in ((0, "plain_ms"), (1, "fused_ms"), (2, "fused_tanh_ms")):
            want = (plain_ref, ref, ref_tanh)[gelu]
            got = best(kern, FWD_CONFIGS, (w, pre, b, out, S, K, T), M, N, gelu, out, want)
            if got:
                row(name, "fc2-first", metric, got[0], got[1])
                row(name, "fc2-first", ("rel_err" + metric[len("fused"):-3]) if gelu else "rel_err_plain", got[2],
                    got[1])
    dw_plain = torch.bmm(dh.view(NB, S, T), pre.view(NB, K, T).transpose(1, 2))
    dw_ref = torch.bmm(dh.view(NB, S, T), act.view(NB, K, T).transpose(1, 2))
    for gelu, metric in ((0, "plain_ms"), (1, "fused_ms"), (2, "fused_tanh_ms")):
        if gelu == 2:
            dw_ref = torch.bmm(dh.view(NB, S, T), act_tanh.view(NB, K, T).transpose(1, 2))
        got = best(_dw, DW_CONFIGS, (dh, pre, b, dw, S, K, T), S, K, gelu, dw, dw_ref if gelu else dw_plain)
        if got:
            row("triton-B", "fc2-first-dW", metric, got[0], got[1])
            row("triton-B", "fc2-first-dW", ("rel_err" + metric[len("fused"):-3]) if gelu else "rel_err_plain",
                got[2], got[1])
    for r in rows:
        print(r)
    notes = [
        "Timing: triton.testing.do_bench, L2 cleared before each call, median. 'plain_ms': the matmul alone (for "
        "Triton the same kernel without bias and GELU, the tile still passing through fp32 registers); 'fused_ms': for cuBLAS its bmm after slimkit's bias + GELU pass, for Triton the one kernel "
        "that applies bias + GELU (erf) to each tile it loads; 'fused_tanh_ms': the same with tanh GELU. 'config': BM x BN x BK x stages x warps, the fastest "
        "of the sweep (FWD_CONFIGS / DW_CONFIGS). 'rel_err': max |error| / max |reference| against torch.bmm on "
        "the same bf16 inputs.",
    ]
    write_results("structured_ffn_prologue_probe", "cuda", rows, notes,
                  columns=("model", "method", "setting", "metric", "value", "config"))


if __name__ == "__main__":
    main()
