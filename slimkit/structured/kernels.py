"""Fused GPU kernels for the FFN's middle (Triton), each with the PyTorch reference it is tested against.

An FFN computes y = fc2(gelu(fc1 x)). Whatever fc1 and fc2 are, plain PyTorch spends the same elementwise
passes over the (tokens x hidden) activations: bias + GELU forward, GELU backward, the bias-gradient reduction.
At d_model 2048 and 16384 tokens these are about 0.55 ms against 1.4 ms of low-rank matmuls, and bound the
structured FFN's forward+backward speed-up well below its FLOP ratio (bench/results/structured_ffn_speed.md).
Here they ride in the epilogues of the matmuls that touch the hidden activations anyway:

- `linear_gelu(h, w, b)`: pre = h @ w^T + b and act = gelu(pre), one matmul writing both (fc1's last factor).
- `gelu_linear_backward(g, u, pre)`: dpre = (g @ u) * gelu'(pre) and the bias gradient sum_t dpre, one matmul
  (fc2's first factor's input gradient), when fc2 starts with a dense factor (nn.Linear, low-rank).
- `gelu_backward(dact, pre)`: the same epilogue alone, for an fc2 that starts block-diagonal.

`fused_ffn(fc1, fc2, x)` puts them together for fc1 in nn.Linear / LowRankLinear / BlockDenseLinear (their last
factor is dense) and any fc2, with cuBLAS for every other matmul. The bias gradient is summed per row tile and
the tiles added by torch, so results are deterministic (no atomics). GELU is taken on the fp32 accumulator, not
on a bf16-rounded pre-activation, so in bf16 it differs from F.gelu by rounding only.

For decoding, `structured_ffn_small(fc1, fc2, x)` runs two structured layers (any kinds) at up to SMALL_TOKENS
tokens without gradients as one small-token kernel a factor, bias and GELU in the epilogues and K split for a
short, deep factor; eager_ffn (slimkit's GPT) takes it in CUDA graphs (graph_warmup: decode.graphed's warm-up and
capture), where only the GPU's time counts, and eagerly only with SLIMKIT_SMALL_FFN_EAGER=1 (eagerly the host's
launches bound an FFN at these token counts). SLIMKIT_SMALL_FFN=0 turns it off.

Triton runs these on CUDA; `available(x)` says whether they apply. Tests run the kernels on the CPU through
Triton's interpreter (TRITON_INTERPRET=1 when this module is imported). SLIMKIT_FUSED_FFN=0 turns them off.

Status, measured (bench/results/structured_ffn_speed.md, '-fused' rows, one H100): these pointer-based Triton
matmuls run below cuBLAS, so the fused FFN is slower than the eager one (low-rank 0.32 at d 2048: 2.32 ms against
2.17 ms). `fused_ffn(..., matmul="cublas")` keeps cuBLAS for every matmul and fuses only the backward's GELU'
and bias-gradient passes into one; that pass is memory-bound like the two it replaces, and measured no faster
(2.24 ms against 2.11 ms, bench/structured_ffn_probe.py). `fused_ffn` is therefore opt-in; nothing in slimkit
calls it by default. A Hopper-specific matmul (TMA descriptors, warp specialisation) is what would make the
epilogue savings (about 0.3 ms there) a net gain; `fused_ffn(..., matmul="cublaslt")` takes cuBLASLt's own
GELU / DGELU epilogues for that (slimkit.structured.epilogue, nvmath-python): low-rank 0.3125 at d 2048 1.91 ms
against 2.17 ms eager on an H100 ('-lt' rows of bench/results/structured_ffn_speed.md), and it is what
slimkit's GPT runs with `set_ffn_kernel(model, "cublaslt")` (train-lm --ffn-kernel cublaslt).
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import warn
from . import epilogue
from .layers import (BlockDenseLinear, BlockShuffleLinear, LowRankLinear, autocasts, block_diag_mm, linear_cast_bias,
                     monarch_product, regrad)
from .self_guided import SelfGuided

try:
    import triton
    import triton.language as tl
except ImportError:      # the CPU build of torch brings no Triton: the references below are all there is
    triton = tl = None

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
ENABLED = os.environ.get("SLIMKIT_FUSED_FFN", "1") != "0"
SMALL_FFN = os.environ.get("SLIMKIT_SMALL_FFN", "1") != "0"    # structured_ffn_small at decoding token counts
APPROXIMATE = {"none": 0, "tanh": 1}
MAX_GRID_Y = 65535      # CUDA's limit on a grid's second dimension (the 2-D kernels' token tiles)
FAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32)    # what the kernels compute in fp32 without loss


def available(x: torch.Tensor) -> bool:
    """Whether the Triton kernels run for x: Triton present, not disabled, x on CUDA (or interpreted, for tests), and
    not while torch.compile traces (Inductor fuses the same elementwise passes into its own kernels there)."""
    return triton is not None and ENABLED and (x.is_cuda or INTERPRET) and not torch.compiler.is_compiling()


# ---------- PyTorch references ----------

def gelu_grad_ref(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """d gelu(x) / dx, in x's dtype (computed in fp32, or fp64 for fp64 x)."""
    x32 = x if x.dtype == torch.float64 else x.float()
    if approximate == "tanh":
        k0, k1 = 0.7978845608028654, 0.044715
        t = torch.tanh(k0 * (x32 + k1 * x32 ** 3))
        g = 0.5 * (1 + t) + 0.5 * x32 * (1 - t * t) * k0 * (1 + 3 * k1 * x32 * x32)
    else:
        g = 0.5 * (1 + torch.erf(x32 * 0.7071067811865476)) + x32 * torch.exp(-0.5 * x32 * x32) * 0.3989422804014327
    return g.to(x.dtype)


def linear_gelu_ref(h, w, b, approximate="none"):
    pre = F.linear(h.float(), w.float(), None if b is None else b.float())
    return F.gelu(pre, approximate=approximate).to(h.dtype), pre.to(h.dtype)


def gelu_linear_backward_ref(g, u, pre, approximate="none", bias=True):
    dpre = (g.float() @ u.float()) * gelu_grad_ref(pre.float(), approximate)
    return dpre.to(g.dtype), (dpre.sum(0) if bias else None)


def gelu_backward_ref(dact, pre, approximate="none", bias=True):
    dpre = dact.float() * gelu_grad_ref(pre.float(), approximate)
    return dpre.to(dact.dtype), (dpre.sum(0) if bias else None)


# ---------- Triton kernels ----------

if triton is not None:
    if INTERPRET:
        _CONFIGS = [triton.Config({"BM": 16, "BN": 16, "BK": 16, "GROUP_M": 2})]
    else:
        _CONFIGS = [triton.Config({"BM": bm, "BN": bn, "BK": 64, "GROUP_M": 8}, num_stages=s, num_warps=w)
                    for bm, bn, s, w in ((128, 256, 3, 8), (256, 128, 3, 8), (128, 128, 4, 8), (128, 128, 3, 4),
                                         (64, 128, 4, 4))]
    _MIN_BM = min(c.kwargs["BM"] for c in _CONFIGS)

    @triton.jit
    def _gelu(x, APPROX: tl.constexpr):
        if APPROX == 1:
            t = 2.0 * tl.sigmoid(2.0 * 0.7978845608028654 * (x + 0.044715 * x * x * x)) - 1.0
            return 0.5 * x * (1.0 + t)
        else:
            return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))

    @triton.jit
    def _gelu_grad(x, APPROX: tl.constexpr):
        if APPROX == 1:
            t = 2.0 * tl.sigmoid(2.0 * 0.7978845608028654 * (x + 0.044715 * x * x * x)) - 1.0
            return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x)
        else:
            return (0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
                    + x * tl.exp(-0.5 * x * x) * 0.3989422804014327)

    @triton.jit
    def _tile(M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
        """Grouped tile order (GROUP_M row tiles share their column tiles in L2)."""
        pid = tl.program_id(0)
        n_m, n_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
        per_group = GROUP_M * n_n
        first = (pid // per_group) * GROUP_M
        size = tl.minimum(n_m - first, GROUP_M)
        return first + (pid % per_group) % size, (pid % per_group) // size

    @triton.jit
    def _matmul(a_ptr, b_ptr, M, N, K, sam, sak, sbk, sbn, pid_m, pid_n,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr):
        """fp32 (BM, BN) tile of A (M, K) @ B (K, N), any strides."""
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + rk
            a = tl.load(a_ptr + rm[:, None] * sam + kk[None, :] * sak, mask=(rm[:, None] < M) & (kk[None, :] < K),
                        other=0.0)
            b = tl.load(b_ptr + kk[:, None] * sbk + rn[None, :] * sbn, mask=(kk[:, None] < K) & (rn[None, :] < N),
                        other=0.0)
            if IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        return acc, rm, rn

    @triton.autotune(configs=_CONFIGS, key=["M", "N", "K"])
    @triton.jit
    def _linear_gelu_kernel(a_ptr, w_ptr, bias_ptr, pre_ptr, act_ptr, M, N, K, sam, sak, swn, swk, som, son,
                            HAS_BIAS: tl.constexpr, APPROX: tl.constexpr, IEEE: tl.constexpr,
                            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
        pid_m, pid_n = _tile(M, N, BM, BN, GROUP_M)
        acc, rm, rn = _matmul(a_ptr, w_ptr, M, N, K, sam, sak, swk, swn, pid_m, pid_n, BM, BN, BK, IEEE)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        offs = rm[:, None] * som + rn[None, :] * son
        tl.store(pre_ptr + offs, acc.to(pre_ptr.dtype.element_ty), mask=mask)
        tl.store(act_ptr + offs, _gelu(acc, APPROX).to(act_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _gelu_grad_epilogue(acc, rm, rn, pre_ptr, dpre_ptr, dbias_ptr, M, N, som, son, pid_m,
                            HAS_BIAS: tl.constexpr, APPROX: tl.constexpr):
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        offs = rm[:, None] * som + rn[None, :] * son
        pre = tl.load(pre_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dpre = acc * _gelu_grad(pre, APPROX)
        tl.store(dpre_ptr + offs, dpre.to(dpre_ptr.dtype.element_ty), mask=mask)
        if HAS_BIAS:   # this row tile's column sums; torch adds the tiles (deterministic, no atomics)
            tl.store(dbias_ptr + pid_m * N + rn, tl.sum(tl.where(mask, dpre, 0.0), axis=0), mask=rn < N)

    @triton.autotune(configs=_CONFIGS, key=["M", "N", "K"])
    @triton.jit
    def _gelu_linear_bwd_kernel(g_ptr, u_ptr, pre_ptr, dpre_ptr, dbias_ptr, M, N, K, sgm, sgk, suk, sun, som, son,
                                HAS_BIAS: tl.constexpr, APPROX: tl.constexpr, IEEE: tl.constexpr,
                                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
        pid_m, pid_n = _tile(M, N, BM, BN, GROUP_M)
        acc, rm, rn = _matmul(g_ptr, u_ptr, M, N, K, sgm, sgk, suk, sun, pid_m, pid_n, BM, BN, BK, IEEE)
        _gelu_grad_epilogue(acc, rm, rn, pre_ptr, dpre_ptr, dbias_ptr, M, N, som, son, pid_m, HAS_BIAS, APPROX)

    @triton.jit
    def _gelu_bwd_kernel(dact_ptr, pre_ptr, dpre_ptr, dbias_ptr, M, N, som, son,
                         HAS_BIAS: tl.constexpr, APPROX: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        dact = tl.load(dact_ptr + rm[:, None] * som + rn[None, :] * son, mask=mask, other=0.0).to(tl.float32)
        _gelu_grad_epilogue(dact, rm, rn, pre_ptr, dpre_ptr, dbias_ptr, M, N, som, son, pid_m, HAS_BIAS, APPROX)

    @triton.jit
    def _tile2d(R, C, BR: tl.constexpr, BC: tl.constexpr):
        """Row and column indices (int64) of this program's (BR, BC) tile of an (R, C) array, and its mask."""
        rr = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)
        cc = (tl.program_id(1) * BC + tl.arange(0, BC)).to(tl.int64)
        return rr, cc, (rr[:, None] < R) & (cc[None, :] < C)

    @triton.jit
    def _biased_rows(h_ptr, b_ptr, rr, offs, mask, R):
        """h + b[row] in fp32 on a tile of feature-major h."""
        return (tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                + tl.load(b_ptr + rr, mask=rr < R, other=0.0).to(tl.float32)[:, None])

    @triton.jit
    def _transpose_kernel(x_ptr, y_ptr, b_ptr, s_ptr, R, C, HAS_BIAS: tl.constexpr, COLSUM: tl.constexpr,
                          BR: tl.constexpr, BC: tl.constexpr):
        """y (C, R) = x (R, C)^T (+ b[r] on y's column r), both contiguous: one tile read along C, written along
        R; with COLSUM also this row tile's column sums of x into s[tile, c]."""
        rr, cc, mask = _tile2d(R, C, BR, BC)
        tile = tl.load(x_ptr + rr[:, None] * C + cc[None, :], mask=mask, other=0.0)
        if COLSUM:
            tl.store(s_ptr + tl.program_id(0) * C + cc, tl.sum(tile.to(tl.float32), axis=0), mask=cc < C)
        if HAS_BIAS:
            bias = tl.load(b_ptr + rr, mask=rr < R, other=0.0).to(tl.float32)
            tile = (tile.to(tl.float32) + bias[:, None]).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + cc[None, :] * R + rr[:, None], tile, mask=mask)

    @triton.jit
    def _blocks_small_kernel(x_ptr, w_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr, T, K, F, KS, sxb, sxk, sxt, syb, syf, syt,
                             sbb, sbf, HAS_BIAS: tl.constexpr, GELU: tl.constexpr, APPROX: tl.constexpr,
                             BF: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, SPLIT: tl.constexpr,
                             IEEE: tl.constexpr):
        """y_b = act(w[b] x_b + bias_b) for a few tokens (all T in one tile of BT): block b = program_id(0), w
        (nb, F, K) contiguous, x's element (b, k, t) at x_ptr + b sxb + k sxk + t sxt and y's (b, f, t) likewise,
        bias (b, f) at b_ptr + b sbb + f sbf; the strides say the layout (token-major, feature-major, interleaved).
        SPLIT > 1 splits K into KS-long parts, program_id(2) each (more programs reading the weights when F is
        short and K long): each part stores its fp32 tile in ws and counts itself in cnt (zeroed by the caller);
        the part that counts last adds the parts in order (deterministic) and runs the epilogue."""
        blk = tl.program_id(0).to(tl.int64)
        k0 = tl.program_id(2) * KS
        acc, ff, tt = _matmul(w_ptr + blk * F * K + k0, x_ptr + blk * sxb + k0 * sxk, F, T, tl.minimum(KS, K - k0),
                              K, 1, sxk, sxt, tl.program_id(1), 0, BF, BT, BK, IEEE)
        last = True
        if SPLIT > 1:
            tile = blk * tl.num_programs(1) + tl.program_id(1)
            part = ws_ptr + tile * SPLIT * BF * BT + tl.arange(0, BF)[:, None] * BT + tl.arange(0, BT)[None, :]
            tl.store(part + tl.program_id(2) * BF * BT, acc)
            tl.debug_barrier()          # every thread's share of the tile stored before the one atomic releases it
            last = tl.atomic_add(cnt_ptr + tile, 1) == SPLIT - 1      # acq_rel: the other parts' stores are seen
            if last:
                acc = tl.load(part, cache_modifier=".cg")
                for i in range(1, SPLIT):
                    acc += tl.load(part + i * BF * BT, cache_modifier=".cg")
        if last:
            if HAS_BIAS:
                acc += tl.load(b_ptr + blk * sbb + ff * sbf, mask=ff < F, other=0.0).to(tl.float32)[:, None]
            if GELU:
                acc = _gelu(acc, APPROX)
            tl.store(y_ptr + blk * syb + ff[:, None] * syf + tt[None, :] * syt, acc.to(y_ptr.dtype.element_ty),
                     mask=(ff[:, None] < F) & (tt[None, :] < T))

    @triton.jit
    def _sum_rows_kernel(s_ptr, out_ptr, N, C, BN: tl.constexpr, BC: tl.constexpr):
        """out[c] = sum over i of s[i, c] (s fp32, (N, C) contiguous), added in fp32 in row order (the same
        result every run), stored in out's dtype: the per-tile partial sums of the kernels above, finished."""
        cc = (tl.program_id(0) * BC + tl.arange(0, BC)).to(tl.int64)
        acc = tl.zeros((BC, ), dtype=tl.float32)
        for i0 in range(0, N, BN):
            rr = (i0 + tl.arange(0, BN)).to(tl.int64)
            tile = tl.load(s_ptr + rr[:, None] * C + cc[None, :], mask=(rr[:, None] < N) & (cc[None, :] < C),
                           other=0.0)
            acc += tl.sum(tile, axis=0)
        tl.store(out_ptr + cc, acc.to(out_ptr.dtype.element_ty), mask=cc < C)

    @triton.jit
    def _bias_gelu_rows_kernel(h_ptr, b_ptr, act_ptr, R, C, APPROX: tl.constexpr, BR: tl.constexpr,
                               BC: tl.constexpr):
        """act = gelu(h + b[row]) on feature-major h (R features, C tokens), the sum kept in fp32."""
        rr, cc, mask = _tile2d(R, C, BR, BC)
        offs = rr[:, None] * C + cc[None, :]
        pre = _biased_rows(h_ptr, b_ptr, rr, offs, mask, R)
        tl.store(act_ptr + offs, _gelu(pre, APPROX).to(act_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _bias_gelu_rows_bwd_kernel(dact_ptr, h_ptr, b_ptr, dh_ptr, db_ptr, R, C, APPROX: tl.constexpr,
                                   BR: tl.constexpr, BC: tl.constexpr):
        """dh = dact * gelu'(h + b[row]); this token tile's row sums of dh into db[tile, row] (torch adds the
        tiles: deterministic, no atomics)."""
        rr, cc, mask = _tile2d(R, C, BR, BC)
        offs = rr[:, None] * C + cc[None, :]
        pre = _biased_rows(h_ptr, b_ptr, rr, offs, mask, R)
        dh = tl.load(dact_ptr + offs, mask=mask, other=0.0).to(tl.float32) * _gelu_grad(pre, APPROX)
        tl.store(dh_ptr + offs, dh.to(dh_ptr.dtype.element_ty), mask=mask)
        tl.store(db_ptr + tl.program_id(1) * R + rr, tl.sum(tl.where(mask, dh, 0.0), axis=1), mask=rr < R)


def _grid(M, N):
    return lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)


def _bias_tiles(M: int, N: int, bias: bool, bm: int, device) -> torch.Tensor:
    rows = triton.cdiv(M, bm) if bias else 1
    return torch.zeros(rows, N if bias else 1, device=device, dtype=torch.float32)


def linear_gelu(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, approximate: str = "none"):
    """(act, pre) for pre = h @ w^T + b, act = gelu(pre); h (M, K), w (N, K). One kernel where available."""
    if not available(h):
        return linear_gelu_ref(h, w, b, approximate)
    M, K = h.shape
    N = w.shape[0]
    pre = h.new_empty(M, N)
    act = torch.empty_like(pre)
    _linear_gelu_kernel[_grid(M, N)](h, w, b if b is not None else h, pre, act, M, N, K, h.stride(0), h.stride(1),
                                     w.stride(0), w.stride(1), pre.stride(0), pre.stride(1), HAS_BIAS=b is not None,
                                     APPROX=APPROXIMATE[approximate], IEEE=h.dtype == torch.float32)
    return act, pre


def gelu_linear_backward(g: torch.Tensor, u: torch.Tensor, pre: torch.Tensor, approximate: str = "none",
                         bias: bool = True):
    """(dpre, dbias) for dpre = (g @ u) * gelu'(pre), dbias = sum over rows of dpre (fp32; None without bias);
    g (M, K), u (K, N), pre (M, N). One kernel where available."""
    if not available(g):
        return gelu_linear_backward_ref(g, u, pre, approximate, bias)
    M, K = g.shape
    N = u.shape[1]
    dpre = torch.empty_like(pre)
    tiles = _bias_tiles(M, N, bias, _MIN_BM, g.device)
    _gelu_linear_bwd_kernel[_grid(M, N)](g, u, pre, dpre, tiles, M, N, K, g.stride(0), g.stride(1), u.stride(0),
                                         u.stride(1), pre.stride(0), pre.stride(1), HAS_BIAS=bias,
                                         APPROX=APPROXIMATE[approximate], IEEE=g.dtype == torch.float32)
    # rows written by the chosen config (autotuning trials of smaller tiles may leave stale rows past them)
    rows = triton.cdiv(M, _gelu_linear_bwd_kernel.best_config.kwargs["BM"])
    return dpre, (tiles[:rows].sum(0) if bias else None)


def gelu_backward(dact: torch.Tensor, pre: torch.Tensor, approximate: str = "none", bias: bool = True):
    """(dpre, dbias) for dpre = dact * gelu'(pre); dact and pre (M, N) of the same strides. One kernel."""
    if not available(dact):
        return gelu_backward_ref(dact, pre, approximate, bias)
    dact, pre = dact.contiguous(), pre.contiguous()
    M, N = pre.shape
    bm, bn = (16, 16) if INTERPRET else (64, 128)
    dpre = torch.empty_like(pre)
    tiles = _bias_tiles(M, N, bias, bm, pre.device)
    _gelu_bwd_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](dact, pre, dpre, tiles, M, N, pre.stride(0),
                                                               pre.stride(1), HAS_BIAS=bias,
                                                               APPROX=APPROXIMATE[approximate], BM=bm, BN=bn)
    return dpre, (tiles.sum(0) if bias else None)


# ---------- autograd ----------

class _GeluUp(torch.autograd.Function):
    """act = gelu(h @ w^T + b): fused forward, fused GELU-backward + bias-gradient."""

    @staticmethod
    def forward(ctx, h, w, b, approximate, cublas=False):
        if cublas:   # cuBLAS matmul (bias in its epilogue), then GELU; only the backward is fused
            pre = F.linear(h, w, b)
            act = F.gelu(pre, approximate=approximate)
        else:
            act, pre = linear_gelu(h, w, b, approximate)
        ctx.save_for_backward(h, w, pre, b)
        ctx.has_bias, ctx.approximate = b is not None, approximate
        ctx.bias_dtype = None if b is None else b.dtype
        return act

    @staticmethod
    def backward(ctx, dact):
        h, w, pre, b = ctx.saved_tensors
        if torch.is_grad_enabled():          # a double backward: differentiate the reference instead
            ref = lambda h, w, b: F.gelu(linear_cast_bias(h, w, b), approximate=ctx.approximate)   # noqa: E731
            return regrad(ref, (h, w, b), ctx.needs_input_grad[:3], dact) + (None, None)
        dpre, db = gelu_backward(dact, pre, ctx.approximate, ctx.has_bias)
        db = None if db is None else db.to(ctx.bias_dtype)
        return dpre @ w, dpre.t() @ h, db, None, None


class _GeluUpDown(torch.autograd.Function):
    """z = gelu(h @ w^T + b) @ w2^T: fused forward; backward fuses dact = dz @ w2 with GELU' and the bias sum."""

    @staticmethod
    def forward(ctx, h, w, b, w2, approximate):
        act, pre = linear_gelu(h, w, b, approximate)
        ctx.save_for_backward(h, w, w2, pre, act, b)
        ctx.has_bias, ctx.approximate = b is not None, approximate
        ctx.bias_dtype = None if b is None else b.dtype
        return act @ w2.t()

    @staticmethod
    def backward(ctx, dz):
        h, w, w2, pre, act, b = ctx.saved_tensors
        if torch.is_grad_enabled():          # a double backward: differentiate the reference instead
            ref = lambda h, w, b, w2: F.gelu(linear_cast_bias(h, w, b), approximate=ctx.approximate) @ w2.t()  # noqa: E731
            return regrad(ref, (h, w, b, w2), ctx.needs_input_grad[:4], dz) + (None,)
        dz = dz.contiguous()
        dpre, db = gelu_linear_backward(dz, w2, pre, ctx.approximate, ctx.has_bias)
        db = None if db is None else db.to(ctx.bias_dtype)
        return dpre @ w, dpre.t() @ h, db, dz.t() @ act, None


# ---------- the FFN ----------

def _head(fc1: nn.Module, x: torch.Tensor):
    """fc1 as (inner(x), last dense weight (N, K), bias), or None when its last factor is not dense."""
    if type(fc1) is nn.Linear:
        return x, fc1.weight, fc1.bias
    if isinstance(fc1, LowRankLinear):
        return F.linear(x, fc1.u), fc1.v, fc1.bias
    if isinstance(fc1, BlockDenseLinear):
        b = fc1.nblocks
        return block_diag_mm(x.reshape(-1, b, fc1.in_features // b), fc1.blocks).reshape(x.shape[0], -1), fc1.v, fc1.bias
    return None


def _unguided(m: nn.Module) -> nn.Module:
    """A self-guided layer whose dense guide is gone (or has no share left) computes its structured layer alone:
    that layer, so the fused paths see it; any other module as it is."""
    return m.layer if isinstance(m, SelfGuided) and not m.guide_active else m


def _block_tail(fc2: nn.Module):
    """fc2 as (first block-diagonal factor (b, q, N_hidden/b), finish(z (T, b, q))) for a layer that starts
    block-diagonal (BlockDense, BlockShuffle), else None."""
    if isinstance(fc2, BlockDenseLinear):
        return fc2.blocks, (lambda z: fc2.after_first(z, fc2.bias))
    if isinstance(fc2, BlockShuffleLinear):
        return fc2.w1, (lambda z: fc2.after_first(z, fc2.bias))
    return None


def _tail(fc2: nn.Module):
    """fc2 as (first dense weight (K, N_hidden), finish(z)), or None when it does not start with a dense factor."""
    if type(fc2) is nn.Linear:
        return fc2.weight, (lambda z: z if fc2.bias is None else z + fc2.bias.to(z.dtype))
    if isinstance(fc2, LowRankLinear):
        return fc2.u, (lambda z: F.linear(z, fc2.v, fc2.bias))
    return None


def _tiled(x: torch.Tensor) -> bool:
    return (x.dim() == 2 and x.numel() > 0 and available(x) and x.dtype in FAST_DTYPES
            and triton.cdiv(x.shape[1], 64) <= MAX_GRID_Y)


def transpose(x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x.t().contiguous() (+ bias, one value per row of x, i.e. per column of the result) for a 2-D x: a tiled
    Triton kernel where the kernels run (torch's strided copy moved a 16384 x 2048 bf16 transpose at about a fifth
    of an H100's bandwidth), torch elsewhere. Bit-exact either way without bias; with it, the sum is rounded once
    from fp32, as torch's is."""
    if not _tiled(x):
        y = x.t().contiguous()
        return y if bias is None else y + bias.to(y.dtype)
    x = x.contiguous()
    r, c = x.shape
    y = x.new_empty(c, r)
    b = x if bias is None else bias.to(x.dtype).contiguous()
    _transpose_kernel[(triton.cdiv(r, 64), triton.cdiv(c, 64))](x, y, b, y, r, c, HAS_BIAS=bias is not None,
                                                                 COLSUM=False, BR=64, BC=64)
    return y


def _sum_rows(partial: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """partial.sum(0) in `dtype` for the kernels' fp32 per-tile partial sums (tiles, n): one small kernel where
    torch took a reduction and a cast (15 us for 256 x 2048 partials on an H100, in BlockShuffle's backward)."""
    n, c = partial.shape
    out = torch.empty(c, device=partial.device, dtype=dtype)
    _sum_rows_kernel[(triton.cdiv(c, 16), )](partial, out, n, c, BN=64, BC=16)     # a program an SM at c = 2048
    return out


def transpose_colsum(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x.t().contiguous(), x.sum(0)) in one pass where the kernels run (the column sums are added per row tile
    in fp32, deterministically): the gradient of y = x'^T + bias gives both the transposed gradient and the
    bias's."""
    if not _tiled(x):
        return x.t().contiguous(), x.sum(0)
    x = x.contiguous()
    r, c = x.shape
    y = x.new_empty(c, r)
    sums = torch.empty(triton.cdiv(r, 64), c, device=x.device, dtype=torch.float32)
    _transpose_kernel[(triton.cdiv(r, 64), triton.cdiv(c, 64))](x, y, x, sums, r, c, HAS_BIAS=False, COLSUM=True,
                                                                 BR=64, BC=64)
    return y, _sum_rows(sums, x.dtype)


class _BiasGeluRows(torch.autograd.Function):
    """gelu(h + b[:, None]) for feature-major h: one pass each way (torch would add the broadcast bias in a
    separate, unvectorised pass and reduce its gradient in another)."""

    @staticmethod
    def forward(ctx, h, b, approximate):
        r, c = h.shape
        act = torch.empty_like(h)
        grid = (triton.cdiv(r, 32), triton.cdiv(c, 128))
        _bias_gelu_rows_kernel[grid](h, b, act, r, c, APPROXIMATE[approximate], BR=32, BC=128)
        ctx.save_for_backward(h, b)
        ctx.approximate = approximate
        return act

    @staticmethod
    def backward(ctx, dact):
        h, b = ctx.saved_tensors
        if torch.is_grad_enabled():          # a double backward: differentiate the reference instead
            ref = lambda h, b: F.gelu(h + b[:, None], approximate=ctx.approximate)   # noqa: E731
            return regrad(ref, (h, b), ctx.needs_input_grad[:2], dact) + (None,)
        r, c = h.shape
        dact = dact.contiguous()
        dh = torch.empty_like(h)
        grid = (triton.cdiv(r, 32), triton.cdiv(c, 128))
        db = torch.empty(grid[1], r, device=h.device, dtype=torch.float32)
        _bias_gelu_rows_bwd_kernel[grid](dact, h, b, dh, db, r, c, APPROXIMATE[ctx.approximate], BR=32, BC=128)
        return dh, _sum_rows(db, b.dtype), None


def bias_gelu_rows(h: torch.Tensor, b: torch.Tensor | None, approximate: str = "none") -> torch.Tensor:
    """gelu(h + b[:, None]) on feature-major (features, tokens) activations; the Triton kernels where they run
    (fp16 / bf16 / fp32), the PyTorch expression elsewhere, float64 included (the kernels keep the sum in fp32,
    so in bf16 the two differ by rounding)."""
    if b is None:
        return F.gelu(h, approximate=approximate)
    b = b.to(h.dtype)
    if h.dim() == 2 and h.numel() and available(h) and h.dtype in FAST_DTYPES and \
            triton.cdiv(h.shape[1], 128) <= MAX_GRID_Y:
        return _BiasGeluRows.apply(h.contiguous(), b.contiguous(), approximate)
    return F.gelu(h + b[:, None], approximate=approximate)


SMALL_TOKENS = 64        # eager_ffn's inference at up to this many tokens: one small-token kernel per factor
SPLIT_MIN_K = 2048       # the least K a factor's small-token kernel splits (below it the parts cost more than they gain)
SPLIT_PART = 256         # a split-K part's least share of K
SMALL_KINDS = (LowRankLinear, BlockShuffleLinear, BlockDenseLinear)     # the layers _small_factors takes apart


def _small_factors(layer: nn.Module) -> list[tuple[torch.Tensor, bool]]:
    """A structured layer as block-diagonal factors (w (blocks, out_b, in_b), interleaved) applied in turn: block
    b of a contiguous factor reads features b in_b .. and writes b out_b ..; an interleaved one (BlockShuffle's
    second) reads and writes every blocks-th feature from b (its row i is feature i blocks + b)."""
    if isinstance(layer, BlockShuffleLinear):
        return [(layer.w1, False), (layer.w2, True)]
    first = layer.u.unsqueeze(0) if isinstance(layer, LowRankLinear) else layer.blocks
    return [(first, False), (layer.v.unsqueeze(0), False)]


def _small_strides(token_major: bool, interleaved: bool, nb: int, size: int, t: int) -> tuple[int, int, int]:
    """(block, row, token) element strides of a factor's input or output (`size` rows a block): token-major
    (t, nb size) as x and y are, or feature-major (nb size, t) as the hidden activations are kept."""
    if token_major:
        return (1, nb, nb * size) if interleaved else (size, 1, nb * size)
    return (t, nb * t, 1) if interleaved else (size * t, t, 1)


@functools.lru_cache(maxsize=None)
def _sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (4 for the interpreter: small enough that tests split)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _small_plan(nb: int, f: int, k: int, sms: int) -> tuple[int, int, int, int]:
    """(BF, BK, SPLIT, KS) of a factor's small-token kernel, fitted to a sweep over the factors of the speed
    bench's grid on an H100 (bench/results/structured_ffn_small_probe.md: 2.6% above each factor's fastest tile
    on geometric mean, 10% at worst): 64-row tiles (each program streams its rows of w: the kernel is bound by
    reading the weights); K split into parts of at least SPLIT_PART only from SPLIT_MIN_K on and while the row
    tiles leave SMs idle, up to about 3/4 of a program an SM (low-rank's U on the hidden width, 512 x 8192: 8 row
    tiles, 13 parts); 256-deep K steps for parts of 1024 and more."""
    bf = min(64, max(16, triton.next_power_of_2(f)))
    programs = nb * triton.cdiv(f, bf)
    split = 1
    if k >= SPLIT_MIN_K and programs < sms:
        split = max(1, min(triton.cdiv(3 * sms // 4, programs), k // SPLIT_PART))
    part = triton.cdiv(k, split)
    bk = 256 if part >= 1024 else 128 if part >= 128 else max(16, triton.next_power_of_2(part))
    ks = triton.cdiv(part, bk) * bk
    return bf, bk, triton.cdiv(k, ks), ks


def small_applies(fc1: nn.Module, fc2: nn.Module, x: torch.Tensor) -> bool:
    """Whether structured_ffn_small runs: two structured layers (low-rank, BlockShuffle, BlockDense, any mix),
    inference (no gradient wanted), at most SMALL_TOKENS tokens, the kernels available, one dtype throughout."""
    # the kernels trust the shapes (an fc2 narrower than fc1's output would read part of it, silently), and an
    # argument error raised inside them would be taken for a kernel that fails to build: checked here instead
    if not (isinstance(fc1, SMALL_KINDS) and isinstance(fc2, SMALL_KINDS)):
        return False
    fits = x.dim() > 0 and x.shape[-1] == fc1.in_features and fc1.out_features == fc2.in_features
    t = x.numel() // x.shape[-1] if fits else 0
    params = list(fc1.parameters()) + list(fc2.parameters())
    wants_grad = torch.is_grad_enabled() and (x.requires_grad or any(q.requires_grad for q in params))
    return (SMALL_FFN and not wants_grad and 0 < t <= SMALL_TOKENS and available(x) and x.dtype in FAST_DTYPES
            and all(q.dtype == x.dtype and q.device == x.device for q in params) and not _autocast_casts(x))


def _autocast_casts(x: torch.Tensor) -> bool:
    """Whether autocast would cast x and the layers (they compute in its dtype): the small-token kernels cast
    nothing, so they run under autocast only where everything is in its dtype already."""
    return autocasts(x) and torch.get_autocast_dtype(x.device.type) != x.dtype


def structured_ffn_small(fc1: nn.Module, fc2: nn.Module, x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """fc2(gelu(fc1(x))) for two structured layers and a few tokens, inference only, one _blocks_small_kernel
    launch per factor (four; plus one zeroing of split-K counters where a factor splits): fc1's bias and GELU in
    its last factor's epilogue, fc2's bias in its last; the hidden activations feature-major between them, every
    layout (token-major in and out, BlockShuffle's interleave) in the strides. At decoding token counts the FFN's
    time is its launches and its weights' reads; the layers' own paths launch five kernels (six for BlockShuffle),
    and cuBLAS reads a short, deep factor (low-rank's U) with few programs, where this kernel splits K. Decoding
    8 FFN blocks at d_model 2048 and 32% on an H100 as one CUDA graph: 1.49-1.62x over dense, against 1.28-1.57x
    without these kernels (bench/results/structured_ffn_speed.md, '-decode' rows)."""
    x2 = x.reshape(-1, fc1.in_features).contiguous()
    t = x2.shape[0]
    steps = []                  # (w, interleaved, bias, GELU) a factor: each layer's bias (and fc1's GELU) on its last
    for layer, act in ((fc1, approximate), (fc2, None)):
        factors = _small_factors(layer)
        steps += [(w, inter, None, None) for w, inter in factors[:-1]] + [(*factors[-1], layer.bias, act)]
    sms = _sms(x2.device)
    plans = [_small_plan(*w.shape, sms) for w, *_ in steps]
    bt = max(16, triton.next_power_of_2(t))               # tl.dot takes 16 and up
    tiles = [w.shape[0] * triton.cdiv(w.shape[1], bf) if split > 1 else 0
             for (w, *_), (bf, _, split, _) in zip(steps, plans)]
    # the parts' fp32 tiles: one buffer, the factors run one after another; the counters: one zeroing for all
    ws = x2.new_empty(max(n * p[0] * p[2] * bt for n, p in zip(tiles, plans)), dtype=torch.float32) \
        if any(tiles) else None
    cnt = torch.zeros(sum(tiles), device=x2.device, dtype=torch.int32) if any(tiles) else None
    cur, at = x2, 0
    for i, ((w, inter, bias, gelu), (bf, bk, split, ks)) in enumerate(zip(steps, plans)):
        w = w.contiguous()
        nb, f, k = w.shape
        end = i == len(steps) - 1
        y = x2.new_empty(t, nb * f) if end else x2.new_empty(nb * f, t)
        _blocks_small_kernel[(nb, triton.cdiv(f, bf), split)](
            cur, w, w if bias is None else bias.contiguous(), y, w if ws is None else ws,
            w if cnt is None else cnt[at:], t, k, f, ks, *_small_strides(i == 0, inter, nb, k, t),
            *_small_strides(end, inter, nb, f, t), *((1, nb) if inter else (f, 1)), HAS_BIAS=bias is not None,
            GELU=gelu is not None, APPROX=APPROXIMATE[gelu or "none"], BF=bf, BK=bk, BT=bt, SPLIT=split,
            IEEE=x2.dtype == torch.float32)
        at += tiles[i]
        cur = y
    return cur.view(*x.shape[:-1], fc2.out_features)


SMALL_EAGER = INTERPRET or os.environ.get("SLIMKIT_SMALL_FFN_EAGER", "0") == "1"
_GRAPH_WARMUP = [0]             # graph_warmup() depth: graphed's warm-up and capture
_SMALL_SEEN: set = set()        # the FFN calls the small-token kernels have run for outside a capture (compiled)


class graph_warmup:
    """Context for a CUDA-graph warm-up and capture (decode.graphed enters it): inside it the small-token FFN
    kernels run, outside it only where SMALL_EAGER says so. Called eagerly, at decoding token counts, an FFN is
    bound by the host's launches, and four Triton launches cost the host more than the layers' cuBLAS calls; in a
    graph only the GPU's time counts, and there they gain (bench/results/structured_ffn_speed.md)."""

    def __enter__(self):
        _GRAPH_WARMUP[0] += 1

    def __exit__(self, *exc):
        _GRAPH_WARMUP[0] -= 1


def _small_key(fc1: nn.Module, fc2: nn.Module, x: torch.Tensor, approximate: str) -> tuple:
    factors = tuple(tuple(w.shape) for layer in (fc1, fc2) for w, _ in _small_factors(layer))
    return (x.device, x.dtype, x.numel() // x.shape[-1], factors, fc1.bias is None, fc2.bias is None, approximate)


def _capturing(x: torch.Tensor) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def _small_ffn(fc1: nn.Module, fc2: nn.Module, x: torch.Tensor, approximate: str) -> torch.Tensor | None:
    """structured_ffn_small's result where it applies and is wanted, else None. Wanted: in graph_warmup() or with
    SMALL_EAGER, and in any CUDA-graph capture only for an FFN call it already ran for outside one (a capture is no
    place to compile a kernel, nor to find that it does not build). A kernel that fails to build warns once and
    turns the small-token kernels off for the rest of the process."""
    if torch.compiler.is_compiling():    # traced: the layers' path, whose ops torch.compile takes in
        return None
    capturing = _capturing(x)
    if not (capturing or SMALL_EAGER or _GRAPH_WARMUP[0]):     # an eager call: the layers' path, nothing checked
        return None
    if not (approximate in APPROXIMATE and small_applies(fc1, fc2, x)) \
            or capturing and _small_key(fc1, fc2, x, approximate) not in _SMALL_SEEN:
        return None
    try:
        y = structured_ffn_small(fc1, fc2, x, approximate)
    except Exception as e:              # a Triton or GPU these kernels do not build on: the general path, once
        if capturing:
            raise
        global SMALL_FFN
        SMALL_FFN = False
        warn(f"slimkit's small-token FFN kernels failed ({type(e).__name__}: {str(e)[:200]}); the FFN takes its "
             "general path for the rest of this process (SLIMKIT_SMALL_FFN=0 skips them)")
        return None
    if not capturing:
        _SMALL_SEEN.add(_small_key(fc1, fc2, x, approximate))
    return y


def blockshuffle_ffn(fc1: BlockShuffleLinear, fc2: BlockShuffleLinear, x: torch.Tensor,
                     approximate: str = "none") -> torch.Tensor:
    """fc2(gelu(fc1(x))) for two BlockShuffle layers, the hidden activations kept feature-major between them
    (layers._Monarch): the only activation copies are the output's transpose and its gradient's (neither at one
    second-factor block, and no output transpose where interleave's kernel runs), fc1's bias rides in the GELU pass
    (bias_gelu_rows) and fc2's where the output is written token-major (its gradient in the gradient's transpose,
    or one column sum)."""
    y = _small_ffn(fc1, fc2, x, approximate)
    if y is not None:
        return y
    x2 = x.reshape(-1, fc1.in_features)
    h = monarch_product(x2, fc1.w1, fc1.w2, out_fm=True)
    y = monarch_product(bias_gelu_rows(h, fc1.bias, approximate), fc2.w1, fc2.w2, in_fm=True, bias=fc2.bias)
    return y.view(*x.shape[:-1], fc2.out_features)


_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


def _hooked(*modules: nn.Module) -> bool:
    """Whether a hook would run on a call of any of the modules: a forward, forward-pre, backward or backward-pre
    hook of its own, or one registered for every module (nn.modules.module.register_module_forward_hook and the
    like). The fused and feature-major paths do not call the modules, so hooked layers run layer by layer."""
    from torch.nn.modules import module as M
    if any(getattr(M, name, None) for name in _GLOBAL_HOOKS):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
               for m in modules)


def eager_ffn(fc1: nn.Module, fc2: nn.Module, x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """fc2(gelu(fc1(x))) through PyTorch ops. Two BlockShuffle layers (self-guided ones whose guide is gone
    included) keep the hidden activations feature-major between them (blockshuffle_ffn), which saves their
    transposes; two structured layers of any kinds run as small-token kernels for inference at decoding token
    counts in CUDA graphs (structured_ffn_small, _small_ffn); neither where a forward hook is registered on
    them. Anything else runs layer by layer."""
    a, b = _unguided(fc1), _unguided(fc2)
    if isinstance(a, SMALL_KINDS) and isinstance(b, SMALL_KINDS) and not _hooked(fc1, fc2, a, b):
        if isinstance(a, BlockShuffleLinear) and isinstance(b, BlockShuffleLinear):
            return blockshuffle_ffn(a, b, x, approximate)
        y = _small_ffn(a, b, x, approximate)
        if y is not None:
            return y
    return fc2(F.gelu(fc1(x), approximate=approximate))


def supported(fc1: nn.Module, act: str = "gelu") -> bool:
    """Whether fused_ffn fuses anything for this fc1 (nn.Linear, LowRankLinear, BlockDenseLinear) and activation."""
    return act == "gelu" and (type(fc1) is nn.Linear or isinstance(fc1, (LowRankLinear, BlockDenseLinear)))


def lt_supported(fc1: nn.Module, fc2: nn.Module, act: str = "gelu") -> bool:
    """Whether fused_ffn(matmul="cublaslt") fuses anything for this pair (self-guided layers whose guide is gone
    included): an fc1 that `supported` takes, or two BlockShuffle layers (epilogue.ShuffleGeluFFN)."""
    fc1, fc2 = _unguided(fc1), _unguided(fc2)
    return supported(fc1, act) or (act == "gelu" and isinstance(fc1, BlockShuffleLinear)
                                   and isinstance(fc2, BlockShuffleLinear))


# Inference (no gradient wanted) takes epilogue.ffn_infer (fc1's GELU in a GELU_BIAS epilogue, no pre-activation
# written) only from this many tokens on, and only after a structured fc1; below, and for a dense fc1, the eager FFN
# (cuBLAS with bias + torch's GELU) measured as fast or faster: on an H100 at d_model 2048, structured FFNs gain
# 4-10% from 4096 tokens on, lose 9-13% at 1024 and tie at 16-256 (bench/results/structured_ffn_infer_probe.md);
# a dense FFN loses 3-8% at 1024-16384 tokens.
INFER_MIN_TOKENS = 4096


def _lt_parts(fc1: nn.Module):
    """fc1 as GeluFFN's (head, first factor, last dense weight, bias)."""
    if type(fc1) is nn.Linear:
        return "dense", None, fc1.weight, fc1.bias
    if isinstance(fc1, LowRankLinear):
        return "lowrank", fc1.u, fc1.v, fc1.bias
    return "blockdense", fc1.blocks, fc1.v, fc1.bias


def _lt_ffn(fc1: nn.Module, fc2: nn.Module, x: torch.Tensor, dt: torch.dtype, grad: bool) -> torch.Tensor:
    """fused_ffn's cuBLASLt path on 2-D x: fc1 and fc2 (BlockShuffle's shuffle and second factor, an nn.Linear's
    bias or an fc2 of another kind aside) in one epilogue.GeluFFN, in dtype dt (the autocast dtype, if on)."""
    head, first, w, b = _lt_parts(fc1)
    v2 = b2 = None
    finish = lambda z: z    # noqa: E731
    if type(fc2) is nn.Linear:
        tail, tail_w, finish = "dense", *_tail(fc2)
    elif isinstance(fc2, (LowRankLinear, BlockDenseLinear)):
        tail = "dense" if isinstance(fc2, LowRankLinear) else "block"
        tail_w, v2, b2 = (fc2.u if tail == "dense" else fc2.blocks), fc2.v, fc2.bias
    elif isinstance(fc2, BlockShuffleLinear):
        tail, (tail_w, finish) = "block", _block_tail(fc2)
    else:
        tail, tail_w, finish = "none", None, fc2
    cast = lambda t: None if t is None else t.to(dt)    # noqa: E731
    args = (x.to(dt).contiguous(), cast(first), cast(w), cast(b), cast(tail_w), cast(v2), cast(b2), head, tail)
    with torch.autocast(x.device.type, enabled=False):
        out = epilogue.GeluFFN.apply(*args) if grad else epilogue.ffn_infer(*args)
    return finish(out)


def fused_ffn(fc1: nn.Module, fc2: nn.Module, x: torch.Tensor, approximate: str = "none",
              matmul: str = "triton") -> torch.Tensor:
    """fc2(gelu(fc1(x))) with the GELU and bias work fused into fc1's last matmul and, where fc2 starts with a
    dense factor, into its first matmul's backward. Equal to the eager expression up to rounding; falls back to
    it where the kernels do not apply (no Triton/CUDA, fc1 ending block-diagonal). Follows autocast.
    matmul="cublas" keeps every matmul in cuBLAS and fuses only the backward's elementwise work (GELU' and the
    bias-gradient sum in one pass over the hidden activations, `gelu_backward`). matmul="cublaslt" puts GELU
    (forward) and GELU' (backward) in cuBLASLt matmul epilogues through nvmath-python (slimkit.structured.epilogue;
    approximate="tanh" only, the GELU cuBLASLt has), with no Triton involved; there two BlockShuffle layers take
    epilogue.ShuffleGeluFFN (see lt_supported)."""
    if matmul not in ("triton", "cublas", "cublaslt"):
        raise ValueError(f"fused_ffn: matmul must be 'triton', 'cublas' or 'cublaslt', got {matmul!r}")
    if _hooked(fc1, fc2, _unguided(fc1), _unguided(fc2)) or x.numel() == 0:
        return eager_ffn(fc1, fc2, x, approximate)     # hooks must run (weight_norm's too); nothing to fuse
    outer = (fc1, fc2)
    fc1, fc2 = _unguided(fc1), _unguided(fc2)
    runs = epilogue.available(x) and approximate == "tanh" if matmul == "cublaslt" else available(x)
    shuffle = matmul == "cublaslt" and not supported(fc1) and lt_supported(fc1, fc2)
    if not runs or not (supported(fc1) or shuffle):
        return eager_ffn(*outer, x, approximate)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    dev = x.device.type
    amp = autocasts(x)
    dt = torch.get_autocast_dtype(dev) if amp else x.dtype
    if not amp and any(p.dtype != dt for m in (fc1, fc2) for p in m.parameters()):
        return eager_ffn(*outer, x, approximate)        # mixed dtypes: eager's own error, not a silent cast
    if matmul == "cublaslt" and not shuffle and not epilogue.applies(fc1.out_features, dt):
        return eager_ffn(fc1, fc2, x, approximate)
    cast = lambda t: None if t is None else t.to(dt)    # noqa: E731  (as autocast casts a linear's bias)
    if matmul == "cublaslt":
        grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for m in (fc1, fc2)
                                                                   for p in m.parameters()))
        if shuffle:
            small = not grad and x2.shape[0] < INFER_MIN_TOKENS
            if small or not epilogue.shuffle_applies(fc1, fc2, x2.shape[0], dt):
                return eager_ffn(*outer, x, approximate)
            args = [cast(t) for t in (fc1.w1, fc1.w2, fc1.bias, fc2.w1, fc2.w2, fc2.bias)]
            with torch.autocast(dev, enabled=False):
                y = epilogue.ShuffleGeluFFN.apply(x2.to(dt).contiguous(), *args, grad)
            return y.reshape(*lead, y.shape[-1])
        if not grad and (x2.shape[0] < INFER_MIN_TOKENS or type(fc1) is nn.Linear):
            return eager_ffn(fc1, fc2, x, approximate)
        y = _lt_ffn(fc1, fc2, x2, dt, grad)
        return y.reshape(*lead, y.shape[-1])
    h, w, b = _head(fc1, x2.to(dt) if amp else x2)
    tail = _tail(fc2)
    with torch.autocast(dev, enabled=False):
        h, w = h.to(dt), w.to(dt)
        if tail is None or matmul == "cublas":
            tail = None
            hidden = _GeluUp.apply(h.contiguous(), w, cast(b), approximate, matmul == "cublas")
        else:
            hidden = _GeluUpDown.apply(h.contiguous(), w, cast(b), tail[0].to(dt), approximate)
    y = fc2(hidden) if tail is None else tail[1](hidden)
    return y.reshape(*lead, y.shape[-1])
