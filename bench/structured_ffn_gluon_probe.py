"""Can hand-scheduled Hopper kernels (Gluon: TMA + wgmma, written here) fuse the FFN's GELU work at memory speed?

The block kinds' FFN at d_model 2048, 25%, 16384 tokens misses 3x by about 0.2 ms, spent in memory-bound passes
over the (tokens x 8192) hidden activations. The probe times, for BlockDense's backward piece
dpre = (dz @ blockdiag(blocks)) * gelu_tanh'(pre) plus the bias gradient sum(dpre, 0):
- cuBLASLt's DGELU epilogue per block + torch's sum (slimkit's '-lt' path, when nvmath-python is installed);
- cuBLAS bmm + torch's GELU backward + sum (the eager path);
- Gluon kernels written here (Triton's lower-level language: explicit TMA, mbarriers and asynchronous wgmma):
  'tile' (one output tile a program), 'rows' (persistent, dz rows stationary), 'ring' (persistent, two programs
  an SM, a load ring across tiles) and 'cols' (persistent, column-stationary), each writing the bias gradient's
  column sums (NOTES below says more);
and, for fc1's last factor with bias + GELU (h (16384, 480) @ w^T -> pre, act), cuBLASLt's GELU_AUX_BIAS against
cuBLAS + torch's GELU and a Gluon kernel ('up'); then where a Gluon call's host time goes. Every result is
checked against fp32 PyTorch. Needs a Hopper GPU and a Triton with Gluon (3.6 on the device tool).

    python bench/structured_ffn_gluon_probe.py
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import triton  # noqa: E402
from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.language.nvidia.hopper import (  # noqa: E402
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor  # noqa: E402

from common import write_results  # noqa: E402

from slimkit.structured._gluon_kernels import mma_layout  # noqa: E402
from slimkit.structured.decode import capture  # noqa: E402

T, NB, Q, P = 16384, 4, 256, 2048          # tokens, blocks, block rows (K), block columns (N)
REPS, WARM = 30, 5
C0 = gl.constexpr(0.7978845608028654)     # sqrt(2 / pi)
A0 = gl.constexpr(0.044715)


@gluon.jit
def _tanh_approx(u):
    """The hardware tanh (MUFU.TANH, about 2^-11 relative error)."""
    return gl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [u], dtype=gl.float32, is_pure=True, pack=1)


@gluon.jit
def _gelu_tanh_grad(x, FAST: gl.constexpr = False):
    x2 = x * x
    u = C0 * x * (1.0 + A0 * x2)
    if FAST:
        t = _tanh_approx(u)
    else:
        t = 1.0 - 2.0 / (1.0 + gl.exp2(u * 2.885390081777927))     # tanh(u) = 1 - 2 / (1 + e^{2u})
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * C0 * (1.0 + 3.0 * A0 * x2)


@gluon.jit
def _load_k(a_desc, b_desc, bar, a_buf, b_buf, off_m, ka, kb, off_nl, pred):
    mbarrier.expect(bar, a_desc.block_type.nbytes + b_desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(a_desc, [off_m, ka], bar, a_buf, pred)
    tma.async_copy_global_to_shared(b_desc, [kb, off_nl], bar, b_buf, pred)


@gluon.jit
def _epilogue(acc, c_buf, out_desc, part_ptr, off_m, off_n, pid_m, N, BN: gl.constexpr, layout: gl.constexpr,
              EPI: gl.constexpr = 2, FAST: gl.constexpr = False):
    if EPI == 0:
        dq = acc.to(gl.bfloat16)
    else:
        pre = c_buf.load(layout).to(gl.float32)
        dpre = acc * _gelu_tanh_grad(pre, FAST)
        dq = dpre.to(gl.bfloat16)
    if EPI == 2:
        cols = off_n + gl.arange(0, BN, layout=gl.SliceLayout(0, layout))
        gl.store(part_ptr + pid_m * N + cols, gl.sum(dq.to(gl.float32), axis=0))
    c_buf.store(dq)
    fence_async_shared()
    tma.async_copy_shared_to_global(out_desc, [off_m, off_n], c_buf)


@gluon.jit
def dgelu_bd_tile_kernel(a_desc, b_desc, pre_desc, out_desc, part_ptr, N, QB: gl.constexpr, PB: gl.constexpr,
                         STAGES: gl.constexpr, layout: gl.constexpr, num_warps: gl.constexpr):
    """One (BM, BN) tile a program: dpre = (dz[:, j q:(j+1) q] @ blocks[j]) * gelu'(pre), j the tile's block."""
    BM: gl.constexpr = out_desc.block_type.shape[0]
    BN: gl.constexpr = out_desc.block_type.shape[1]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    KSTEPS: gl.constexpr = QB // BK
    num_n = N // BN
    pid = gl.program_id(0)
    pid_m = pid // num_n
    pid_n = pid % num_n
    off_m = pid_m * BM
    off_n = pid_n * BN
    j = off_n // PB
    off_nl = off_n - j * PB

    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES] + a_desc.block_type.shape, a_desc.layout)
    b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES] + b_desc.block_type.shape, b_desc.layout)
    c_buf = gl.allocate_shared_memory(pre_desc.dtype, pre_desc.block_type.shape, pre_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES + 1, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES + 1):
        mbarrier.init(bars.index(s), count=1)
    cbar = bars.index(STAGES)
    mbarrier.expect(cbar, pre_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(pre_desc, [off_m, off_n], cbar, c_buf)
    for s in gl.static_range(STAGES):
        _load_k(a_desc, b_desc, bars.index(s), a_bufs.index(s), b_bufs.index(s), off_m, j * QB + s * BK,
                j * QB + s * BK, off_nl, True)
    acc = gl.zeros((BM, BN), dtype=gl.float32, layout=layout)
    for ks in gl.static_range(KSTEPS):
        mbarrier.wait(bars.index(ks % STAGES), (ks // STAGES) & 1)
        acc = warpgroup_mma(a_bufs.index(ks % STAGES), b_bufs.index(ks % STAGES), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        if ks + STAGES < KSTEPS:
            s2 = ks % STAGES
            _load_k(a_desc, b_desc, bars.index(s2), a_bufs.index(s2), b_bufs.index(s2), off_m,
                    j * QB + (ks + STAGES) * BK, j * QB + (ks + STAGES) * BK, off_nl, True)
    mbarrier.wait(cbar, 0)
    _epilogue(acc, c_buf, out_desc, part_ptr, off_m, off_n, pid_m, N, BN, layout)
    tma.store_wait(pendings=0)


@gluon.jit
def _b_coord(t, pid, nprog, nblk, NT: gl.constexpr):
    """(row tile m, block j, column tile n within the block) of this program's t-th tile."""
    item = pid + (t // NT) * nprog
    return item // nblk, item % nblk, t % NT


@gluon.jit
def _item_schedule(M, N, BM: gl.constexpr, PB: gl.constexpr, NT: gl.constexpr):
    """The A-stationary kernels' static schedule: (blocks, program id, programs, this program's tile count), items
    being (row tile, block) pairs of NT column tiles each, dealt round-robin."""
    nblk = N // PB
    pid = gl.program_id(0)
    nprog = gl.num_programs(0)
    return nblk, pid, nprog, gl.cdiv(gl.cdiv(M, BM) * nblk - pid, nprog) * NT


@gluon.jit
def dgelu_bd_rows_kernel(a_desc, b_desc, pre_desc, out_desc, part_ptr, M, N, QB: gl.constexpr, PB: gl.constexpr,
                         EPI: gl.constexpr, FAST: gl.constexpr, layout: gl.constexpr, num_warps: gl.constexpr):
    """Persistent, A-stationary: a program takes (row tile, block) items; it loads the item's dz rows (BM, q)
    once and sweeps the block's p / BN column tiles, streaming blocks[j]'s column tiles (2 MB in all: L2-resident)
    and the pre-activation. After each tile's matmul the next tile's loads go out before this tile's epilogue."""
    BM: gl.constexpr = out_desc.block_type.shape[0]
    BN: gl.constexpr = out_desc.block_type.shape[1]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    KSTEPS: gl.constexpr = QB // BK
    NT: gl.constexpr = PB // BN
    nblk, pid, nprog, total = _item_schedule(M, N, BM, PB, NT)

    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [KSTEPS] + a_desc.block_type.shape, a_desc.layout)
    b_bufs = gl.allocate_shared_memory(b_desc.dtype, [KSTEPS] + b_desc.block_type.shape, b_desc.layout)
    c_bufs = gl.allocate_shared_memory(pre_desc.dtype, [2] + pre_desc.block_type.shape, pre_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [KSTEPS + 3, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(KSTEPS + 3):
        mbarrier.init(bars.index(s), count=1)
    abar = bars.index(KSTEPS)

    m, j, _ = _b_coord(0, pid, nprog, nblk, NT)
    mbarrier.expect(abar, KSTEPS * a_desc.block_type.nbytes)
    for s in gl.static_range(KSTEPS):
        tma.async_copy_global_to_shared(a_desc, [m * BM, j * QB + s * BK], abar, a_bufs.index(s))
    for s in gl.static_range(KSTEPS):
        mbarrier.expect(bars.index(s), b_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(b_desc, [j * QB + s * BK, 0], bars.index(s), b_bufs.index(s))
    if EPI > 0:
        mbarrier.expect(bars.index(KSTEPS + 1), pre_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(pre_desc, [m * BM, j * PB], bars.index(KSTEPS + 1), c_bufs.index(0))
    for i in range(total):
        n = i % NT
        if n == 0:
            mbarrier.wait(abar, (i // NT) & 1)
        acc = gl.zeros((BM, BN), dtype=gl.float32, layout=layout)
        for s in gl.static_range(KSTEPS):
            mbarrier.wait(bars.index(s), i & 1)
            acc = warpgroup_mma(a_bufs.index(s), b_bufs.index(s), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        cur_m = m * BM
        cur_n = j * PB + n * BN
        # the next tile's loads, before this tile's epilogue
        i2 = i + 1
        more = i2 < total
        m, j, n2 = _b_coord(i2, pid, nprog, nblk, NT)
        new_a = more & (n2 == 0)
        mbarrier.expect(abar, KSTEPS * a_desc.block_type.nbytes, pred=new_a)
        for s in gl.static_range(KSTEPS):
            tma.async_copy_global_to_shared(a_desc, [m * BM, j * QB + s * BK], abar, a_bufs.index(s), new_a)
        for s in gl.static_range(KSTEPS):
            mbarrier.expect(bars.index(s), b_desc.block_type.nbytes, pred=more)
            tma.async_copy_global_to_shared(b_desc, [j * QB + s * BK, n2 * BN], bars.index(s), b_bufs.index(s),
                                            more)
        c = i % 2
        if EPI > 0:
            tma.store_wait(pendings=0)
            mbarrier.expect(bars.index(KSTEPS + 1 + (i2 % 2)), pre_desc.block_type.nbytes, pred=more)
            tma.async_copy_global_to_shared(pre_desc, [m * BM, j * PB + n2 * BN], bars.index(KSTEPS + 1 + (i2 % 2)),
                                            c_bufs.index(i2 % 2), more)
            mbarrier.wait(bars.index(KSTEPS + 1 + c), (i // 2) & 1)
        else:
            tma.store_wait(pendings=1)
        _epilogue(acc, c_bufs.index(c), out_desc, part_ptr, cur_m, cur_n, cur_m // BM, N, BN, layout, EPI, FAST)
    tma.store_wait(pendings=0)


@gluon.jit
def dgelu_bd_ring_kernel(a_desc, b_desc, out_desc, pre_ptr, part_ptr, M, N, QB: gl.constexpr, PB: gl.constexpr,
                         STAGES: gl.constexpr, FAST: gl.constexpr, layout: gl.constexpr, SUM_MMA: gl.constexpr,
                         sum_layout: gl.constexpr, ones_layout: gl.constexpr, num_warps: gl.constexpr):
    """Persistent, A-stationary, small enough for two programs an SM: the item's dz rows (BM, q) stay in shared
    memory; blocks[j]'s (BK, BN) pieces stream through a STAGES-deep ring that runs across tile boundaries (the
    next tile's pieces load while this tile multiplies); the pre-activation comes straight to registers by
    pointer loads issued before the tile's matmul; dpre leaves by a TMA store."""
    BM: gl.constexpr = out_desc.block_type.shape[0]
    BN: gl.constexpr = out_desc.block_type.shape[1]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    KSTEPS: gl.constexpr = QB // BK
    NT: gl.constexpr = PB // BN
    nblk, pid, nprog, total = _item_schedule(M, N, BM, PB, NT)
    total_k = total * KSTEPS

    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [KSTEPS] + a_desc.block_type.shape, a_desc.layout)
    b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES] + b_desc.block_type.shape, b_desc.layout)
    c_buf = gl.allocate_shared_memory(out_desc.dtype, out_desc.block_type.shape, out_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES + 1, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES + 1):
        mbarrier.init(bars.index(s), count=1)
    abar = bars.index(STAGES)
    rows_l: gl.constexpr = gl.SliceLayout(1, layout)
    cols_l: gl.constexpr = gl.SliceLayout(0, layout)
    if SUM_MMA:     # column sums as ones(64, BM) @ dpre tile on the tensor cores, asynchronously
        ones_smem = gl.allocate_shared_memory(out_desc.dtype, [64, BM], ones_layout)
        ones_smem.store(gl.full([64, BM], 1.0, out_desc.dtype, layout=gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1],
                                                                                         [1, 0])))
        fence_async_shared()

    for g0 in gl.static_range(STAGES - 1):            # the ring's first pieces
        m, j, n = _b_coord(g0 // KSTEPS, pid, nprog, nblk, NT)
        more = g0 < total_k
        mbarrier.expect(bars.index(g0), b_desc.block_type.nbytes, pred=more)
        tma.async_copy_global_to_shared(b_desc, [j * QB + (g0 % KSTEPS) * BK, n * BN], bars.index(g0),
                                        b_bufs.index(g0), more)
    for t in range(total):
        m, j, n = _b_coord(t, pid, nprog, nblk, NT)
        off_m = m * BM
        off_n = j * PB + n * BN
        if n == 0:                                    # a new item: its dz rows (every earlier matmul is done)
            mbarrier.expect(abar, KSTEPS * a_desc.block_type.nbytes)
            for s in gl.static_range(KSTEPS):
                tma.async_copy_global_to_shared(a_desc, [off_m, j * QB + s * BK], abar, a_bufs.index(s))
        rows = off_m + gl.arange(0, BM, layout=rows_l)
        cols = off_n + gl.arange(0, BN, layout=cols_l)
        ptrs = pre_ptr + rows[:, None].to(gl.int64) * N + cols[None, :]
        pre = gl.load(ptrs, mask=(rows < M)[:, None], other=0.0)
        if n == 0:
            mbarrier.wait(abar, (t // NT) & 1)
        acc = gl.zeros((BM, BN), dtype=gl.float32, layout=layout)
        for ks in gl.static_range(KSTEPS):
            g = t * KSTEPS + ks
            mbarrier.wait(bars.index(g % STAGES), (g // STAGES) & 1)
            acc = warpgroup_mma(a_bufs.index(ks), b_bufs.index(g % STAGES), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
            g2 = g + STAGES - 1                       # its slot held piece g - 1, now retired
            m2, j2, n2 = _b_coord(g2 // KSTEPS, pid, nprog, nblk, NT)
            more = g2 < total_k
            mbarrier.expect(bars.index(g2 % STAGES), b_desc.block_type.nbytes, pred=more)
            tma.async_copy_global_to_shared(b_desc, [j2 * QB + (g2 % KSTEPS) * BK, n2 * BN], bars.index(g2 % STAGES),
                                            b_bufs.index(g2 % STAGES), more)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        dq = (acc * _gelu_tanh_grad(pre.to(gl.float32), FAST)).to(gl.bfloat16)
        if not SUM_MMA:
            gl.store(part_ptr + m * N + cols, gl.sum(dq.to(gl.float32), axis=0))
        tma.store_wait(pendings=0)
        c_buf.store(dq)
        fence_async_shared()
        tma.async_copy_shared_to_global(out_desc, [off_m, off_n], c_buf)
        if SUM_MMA:
            csum = warpgroup_mma(ones_smem, c_buf, gl.zeros((64, BN), dtype=gl.float32, layout=sum_layout),
                                 is_async=True)
            csum = warpgroup_mma_wait(num_outstanding=0, deps=(csum, ))
            srow = gl.arange(0, 64, layout=gl.SliceLayout(1, sum_layout))
            scol = off_n + gl.arange(0, BN, layout=gl.SliceLayout(0, sum_layout))
            gl.store(part_ptr + m * N + scol[None, :] + srow[:, None] * 0, csum, mask=(srow == 0)[:, None])
    tma.store_wait(pendings=0)


@gluon.jit
def dgelu_bd_cols_kernel(a_desc, b_desc, out_desc, pre_ptr, part_ptr, M, N, QB: gl.constexpr, PB: gl.constexpr,
                         STAGES: gl.constexpr, SPLIT: gl.constexpr, FAST: gl.constexpr, layout: gl.constexpr,
                         num_warps: gl.constexpr):
    """Persistent, B-stationary: a program owns one (q, BN) column tile of blocks[j] and sweeps 1/SPLIT of the row
    tiles, dz's (BM, BK) pieces streaming through a STAGES-deep ring across tile boundaries (every program walks
    the rows in step, so each dz piece is read from DRAM about once and from L2 by the rest). The bias gradient's
    column sums accumulate in registers over the sweep and are reduced once at its end."""
    BM: gl.constexpr = out_desc.block_type.shape[0]
    BN: gl.constexpr = out_desc.block_type.shape[1]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    KSTEPS: gl.constexpr = QB // BK
    pid = gl.program_id(0)
    ncol = N // BN
    col = pid % ncol
    split = pid // ncol
    num_m = gl.cdiv(M, BM)
    per = gl.cdiv(num_m, SPLIT)
    m0 = split * per
    total = gl.minimum(num_m - m0, per)
    total_k = total * KSTEPS
    off_n = col * BN
    j = off_n // PB

    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES] + a_desc.block_type.shape, a_desc.layout)
    b_bufs = gl.allocate_shared_memory(b_desc.dtype, [KSTEPS] + b_desc.block_type.shape, b_desc.layout)
    c_buf = gl.allocate_shared_memory(out_desc.dtype, out_desc.block_type.shape, out_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES + 1, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES + 1):
        mbarrier.init(bars.index(s), count=1)
    bbar = bars.index(STAGES)
    rows_l: gl.constexpr = gl.SliceLayout(1, layout)
    cols_l: gl.constexpr = gl.SliceLayout(0, layout)
    cols = off_n + gl.arange(0, BN, layout=cols_l)

    mbarrier.expect(bbar, KSTEPS * b_desc.block_type.nbytes)
    for s in gl.static_range(KSTEPS):
        tma.async_copy_global_to_shared(b_desc, [j * QB + s * BK, off_n - j * PB], bbar, b_bufs.index(s))
    for g0 in gl.static_range(STAGES - 1):
        more = g0 < total_k
        mbarrier.expect(bars.index(g0), a_desc.block_type.nbytes, pred=more)
        tma.async_copy_global_to_shared(a_desc, [(m0 + g0 // KSTEPS) * BM, j * QB + (g0 % KSTEPS) * BK],
                                        bars.index(g0), a_bufs.index(g0), more)
    mbarrier.wait(bbar, 0)
    colacc = gl.zeros((BM, BN), dtype=gl.float32, layout=layout)
    for t in range(total):
        off_m = (m0 + t) * BM
        rows = off_m + gl.arange(0, BM, layout=rows_l)
        pre = gl.load(pre_ptr + rows[:, None].to(gl.int64) * N + cols[None, :], mask=(rows < M)[:, None], other=0.0)
        acc = gl.zeros((BM, BN), dtype=gl.float32, layout=layout)
        for ks in gl.static_range(KSTEPS):
            g = t * KSTEPS + ks
            mbarrier.wait(bars.index(g % STAGES), (g // STAGES) & 1)
            acc = warpgroup_mma(a_bufs.index(g % STAGES), b_bufs.index(ks), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
            g2 = g + STAGES - 1
            more = g2 < total_k
            mbarrier.expect(bars.index(g2 % STAGES), a_desc.block_type.nbytes, pred=more)
            tma.async_copy_global_to_shared(a_desc, [(m0 + g2 // KSTEPS) * BM, j * QB + (g2 % KSTEPS) * BK],
                                            bars.index(g2 % STAGES), a_bufs.index(g2 % STAGES), more)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        dq = (acc * _gelu_tanh_grad(pre.to(gl.float32), FAST)).to(gl.bfloat16)
        colacc += dq.to(gl.float32)
        tma.store_wait(pendings=0)
        c_buf.store(dq)
        fence_async_shared()
        tma.async_copy_shared_to_global(out_desc, [off_m, off_n], c_buf)
    gl.store(part_ptr + split * N + cols, gl.sum(colacc, axis=0))
    tma.store_wait(pendings=0)


@gluon.jit
def _gelu_tanh(x):
    u = C0 * x * (1.0 + A0 * x * x)
    return 0.5 * x * (1.0 + _tanh_approx(u))


@gluon.jit
def _up_load(a_desc, b_desc, bars, a_bufs, b_bufs, g, pid, nprog, num_n, KT, total_k, STAGES: gl.constexpr):
    """Issue the loads of this program's g-th (tile, k) piece into ring slot g % STAGES."""
    BM: gl.constexpr = a_desc.block_type.shape[0]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    BN: gl.constexpr = b_desc.block_type.shape[0]
    tile = pid + (g // KT) * nprog
    k = (g % KT) * BK
    more = g < total_k
    slot = g % STAGES
    mbarrier.expect(bars.index(slot), a_desc.block_type.nbytes + b_desc.block_type.nbytes, pred=more)
    tma.async_copy_global_to_shared(a_desc, [(tile // num_n) * BM, k], bars.index(slot), a_bufs.index(slot), more)
    tma.async_copy_global_to_shared(b_desc, [(tile % num_n) * BN, k], bars.index(slot), b_bufs.index(slot), more)


@gluon.jit
def linear_gelu_kernel(a_desc, b_desc, pre_desc, act_desc, bias_ptr, M, N, K, STAGES: gl.constexpr,
                       HAS_BIAS: gl.constexpr, layout: gl.constexpr, num_warps: gl.constexpr):
    """act = gelu_tanh(h @ w^T + b) and pre = h @ w^T + b for h (M, K), w (N, K): persistent over output tiles,
    the (tile, k) pieces streaming through one STAGES-deep ring across tile boundaries, the epilogue's two tiles
    leaving by TMA stores that run while the next tile multiplies."""
    BM: gl.constexpr = pre_desc.block_type.shape[0]
    BN: gl.constexpr = pre_desc.block_type.shape[1]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    num_n = gl.cdiv(N, BN)
    num_tiles = gl.cdiv(M, BM) * num_n
    KT = gl.cdiv(K, BK)
    pid = gl.program_id(0)
    nprog = gl.num_programs(0)
    total = gl.cdiv(num_tiles - pid, nprog)
    total_k = total * KT

    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES] + a_desc.block_type.shape, a_desc.layout)
    b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES] + b_desc.block_type.shape, b_desc.layout)
    o_bufs = gl.allocate_shared_memory(pre_desc.dtype, [2] + pre_desc.block_type.shape, pre_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(bars.index(s), count=1)
    cols_l: gl.constexpr = gl.SliceLayout(0, layout)
    for g0 in gl.static_range(STAGES - 1):
        _up_load(a_desc, b_desc, bars, a_bufs, b_bufs, g0, pid, nprog, num_n, KT, total_k, STAGES)
    g = 0
    for t in range(total):
        tile = pid + t * nprog
        off_m = (tile // num_n) * BM
        off_n = (tile % num_n) * BN
        acc = gl.zeros((BM, BN), dtype=gl.float32, layout=layout)
        for kk in range(KT):
            slot = g % STAGES
            mbarrier.wait(bars.index(slot), (g // STAGES) & 1)
            acc = warpgroup_mma(a_bufs.index(slot), b_bufs.index(slot).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
            _up_load(a_desc, b_desc, bars, a_bufs, b_bufs, g + STAGES - 1, pid, nprog, num_n, KT, total_k, STAGES)
            g += 1
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        if HAS_BIAS:
            cols = off_n + gl.arange(0, BN, layout=cols_l)
            acc = acc + gl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(gl.float32)[None, :]
        act = _gelu_tanh(acc)
        tma.store_wait(pendings=0)
        o_bufs.index(0).store(acc.to(gl.bfloat16))
        o_bufs.index(1).store(act.to(gl.bfloat16))
        fence_async_shared()
        tma.async_copy_shared_to_global(pre_desc, [off_m, off_n], o_bufs.index(0))
        tma.async_copy_shared_to_global(act_desc, [off_m, off_n], o_bufs.index(1))
    tma.store_wait(pendings=0)


def linear_gelu_gluon(h, w, b, cfg):
    """(act, pre) = (gelu_tanh(h @ w^T + b), h @ w^T + b), bf16."""
    BM, BN, BK, stages, occ, warps = cfg
    m, k = h.shape
    n = w.shape[0]
    act = h.new_empty(m, n)
    pre = torch.empty_like(act)
    bf = gl.bfloat16
    a = TensorDescriptor.from_tensor(h, [BM, BK], gl.NVMMASharedLayout.get_default_for([BM, BK], bf))
    bd = TensorDescriptor.from_tensor(w, [BN, BK], gl.NVMMASharedLayout.get_default_for([BN, BK], bf))
    lay = gl.NVMMASharedLayout.get_default_for([BM, BN], bf)
    pd, ad = TensorDescriptor.from_tensor(pre, [BM, BN], lay), TensorDescriptor.from_tensor(act, [BM, BN], lay)
    sms = torch.cuda.get_device_properties(h.device).multi_processor_count
    grid = (min(sms * occ, triton.cdiv(m, BM) * triton.cdiv(n, BN)), )
    linear_gelu_kernel[grid](a, bd, pd, ad, b if b is not None else pre, m, n, k, stages, b is not None,
                             mma_layout(BM, BN, warps), num_warps=warps)
    return act, pre


def _descs(dz2, blocks2, pre, out, BM, BN, BK):
    bf = gl.bfloat16
    a = TensorDescriptor.from_tensor(dz2, [BM, BK], gl.NVMMASharedLayout.get_default_for([BM, BK], bf))
    b = TensorDescriptor.from_tensor(blocks2, [BK, BN], gl.NVMMASharedLayout.get_default_for([BK, BN], bf))
    lay = gl.NVMMASharedLayout.get_default_for([BM, BN], bf)
    return a, b, TensorDescriptor.from_tensor(pre, [BM, BN], lay), TensorDescriptor.from_tensor(out, [BM, BN], lay)


def dgelu_bd_gluon(dz, blocks, pre, cfg):
    """dz (T, nb, q), blocks (nb, q, p), pre (T, nb p) -> dpre (T, nb p), db (nb p,)."""
    t, nb, q = dz.shape
    p = blocks.shape[2]
    BM, BN, BK, kind, extra, warps = cfg
    out = torch.empty_like(pre)
    num_m = triton.cdiv(t, BM)
    rows = extra[1] if kind == "cols" else num_m       # 'cols' writes one row of sums per split
    part = torch.empty(rows, nb * p, device=dz.device, dtype=torch.float32)
    a, b, c, o = _descs(dz.reshape(t, nb * q), blocks.reshape(nb * q, p), pre, out, BM, BN, BK)
    if kind == "tile":
        grid = (num_m * (nb * p // BN), )
        dgelu_bd_tile_kernel[grid](a, b, c, o, part, nb * p, q, p, extra, mma_layout(BM, BN, warps), num_warps=warps)
    elif kind == "cols":
        st, split = extra
        grid = (split * (nb * p // BN), )
        dgelu_bd_cols_kernel[grid](a, b, o, pre, part, t, nb * p, q, p, st, split, True, mma_layout(BM, BN, warps),
                                   num_warps=warps)
    elif kind == "ring":
        sms = torch.cuda.get_device_properties(dz.device).multi_processor_count
        grid = (min(sms * extra[1], num_m * nb), )
        sum_mma = len(extra) > 3 and extra[3]
        dgelu_bd_ring_kernel[grid](a, b, o, pre, part, t, nb * p, q, p, extra[0], extra[2], mma_layout(BM, BN, warps),
                                   sum_mma, mma_layout(64, BN, warps),
                                   gl.NVMMASharedLayout.get_default_for([64, BM], gl.bfloat16), num_warps=warps)
    elif kind == "rows":
        sms = torch.cuda.get_device_properties(dz.device).multi_processor_count
        grid = (min(sms, num_m * nb), )
        dgelu_bd_rows_kernel[grid](a, b, c, o, part, t, nb * p, q, p, extra[0], extra[1], mma_layout(BM, BN, warps),
                                   num_warps=warps)
    return out, part.sum(0)


def reference(dz, blocks, pre):
    t, nb, q = dz.shape
    dh = torch.einsum("tbq,bqp->tbp", dz.float(), blocks.float()).reshape(t, -1)
    x = pre.float()
    dpre = torch.ops.aten.gelu_backward(dh, x, approximate="tanh")
    return dpre, dpre.sum(0)


SETTING = "dgrad+gelu'+bias-grad blockdense r=0.25 d=2048 T=16384"
# (BM, BN, BK, kernel, its options, warps): rows (EPI, FAST); ring (STAGES, programs per SM, FAST);
# cols (STAGES, SPLIT); tile STAGES
CFGS = [(128, 128, 64, "tile", 2, 8),
        (128, 128, 64, "rows", (0, False), 8), (128, 128, 64, "rows", (1, True), 8),
        (128, 128, 64, "rows", (2, False), 8), (128, 128, 64, "rows", (2, True), 8),
        (128, 64, 64, "ring", (3, 2, True), 4), (128, 128, 64, "ring", (4, 1, True), 8),
        (128, 64, 64, "ring", (3, 2, True, True), 4), (128, 128, 64, "ring", (4, 1, True, True), 8),
        (128, 64, 64, "ring", (2, 2, True, True), 4), (128, 128, 64, "ring", (3, 1, True, True), 8),
        (128, 64, 64, "cols", (6, 1), 8), (128, 128, 64, "cols", (6, 2), 8)]
NAMES = {("rows", 0): "gluon-rows-matmul-only", ("rows", 1): "gluon-rows-no-bias-grad"}
NOTES = [
    "Timing: each variant captured once in a CUDA graph, every replay timed by CUDA events after a 256 MB L2 "
    "flush, median of 30 ('value', GPU ms); 'host_us': host time per call, 50 calls enqueued back to back (noisy: "
    "the same call read 24 and 212 us in two runs). Errors against fp32 PyTorch; for the dgrad rows rel_err_dpre / "
    "rel_err_db are those of dpre and the bias gradient, for the 'up' rows those of act and pre. The "
    "'matmul-only' and 'no-bias-grad' rows leave out work on purpose.",
    "Pieces (BlockDense at 25%, d_model 2048, 16384 tokens, bf16): 'dgrad': the backward through fc2's "
    "block-diagonal factor and the GELU, dpre = (dz @ blockdiag(blocks)) * gelu_tanh'(pre), dz (16384, 4, 256), "
    "blocks (4, 256, 2048), plus the bias gradient sum(dpre, 0); slimkit's '-lt' path does it as four cuBLASLt "
    "DGELU matmuls and a torch sum. 'up': fc1's last factor with bias and GELU, h (16384, 480) @ w^T (480, 8192), "
    "writing pre and act; the '-lt' path uses cuBLASLt's GELU_AUX_BIAS.",
    "Gluon (triton.experimental.gluon, in the Triton that torch brings) gives explicit TMA loads, mbarriers and "
    "asynchronous wgmma on Hopper. Kernels written here: 'tile' (one output tile a program); 'rows' (persistent; "
    "a program keeps its item's dz rows in shared memory and sweeps the block's column tiles, the next tile's "
    "loads going out before this tile's epilogue); 'ring' (persistent, small enough for two programs an SM, the "
    "blocks' pieces streaming through a ring that runs across tiles, the pre-activation loaded to registers "
    "before the matmul; a fourth option True takes the column sums on the tensor cores as ones(64, BM) @ dpre); "
    "'cols' (column-stationary, bias sums kept in registers over the sweep); 'up' (persistent, one load ring "
    "across tiles, bias + GELU epilogue with two TMA stores). FAST / the 'up' kernel use the hardware tanh "
    "(tanh.approx.f32); without it, tanh from exp2 and a division.",
    "Reading, dgrad: the best Gluon kernels ('ring' (3, 2), 'rows' with the hardware tanh) take 0.34-0.37 ms of "
    "GPU time against 0.47 ms for cuBLASLt's DGELU plus the sum: 0.13 ms less, bias gradient included. Where the "
    "time goes ('rows'): matmul and store 0.19 ms (cuBLAS's bare bmm: 0.13 ms), + 0.08 ms for reading the "
    "pre-activation and GELU' (about what 268 MB at copy bandwidth costs), + 0.08 ms for the per-tile column sums "
    "(a cross-warp reduction each tile). Neither keeping the sums in registers ('cols', which re-reads dz) nor "
    "taking them on the tensor cores (it waits on one more wgmma a tile, and its shared memory leaves one "
    "program an SM) got under 0.34 ms.",
    "Reading, up: cuBLASLt's GELU_AUX_BIAS (0.32 ms) beats the Gluon kernel (0.40 ms) and cuBLAS + torch's GELU "
    "(0.41 ms).",
    "Host cost of a Gluon call: building the four TMA descriptors 32-48 us, the launch 38-50 us with them prebuilt, "
    "the whole call (outputs, descriptors, launch, the bias sum) 150-230 us. An ncu run first showed it: the 'rows' "
    "matmul-only kernel took 176 us under ncu while CUDA events around Python calls had read 0.40 ms.",
    "What it says about 3x: BlockDense-lt needs 0.19 ms less per FFN step (1.88 -> 1.69 ms). The dgrad kernel "
    "gives 0.13 ms of GPU time and the forward nothing, so these single-partition kernels reach about 2.9x at "
    "best, before their host cost. The rest needs what the 'rows' figures point at: the epilogue (GELU', column "
    "sums, stores) overlapped with the next tile's matmul, i.e. warp-specialised partitions, which these kernels "
    "do not have.",
]


def event_ms(fn, reps=REPS, warm=WARM):
    """GPU time of fn: captured once in a CUDA graph, each replay timed by CUDA events after an L2 flush (so host
    work, such as building TMA descriptors, is not counted)."""
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    graph, _ = capture(fn, warmup=warm)
    times = []
    for _ in range(reps):
        flush.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def host_us(fn, n=50):
    """Host time per call: n calls enqueued back to back (the GPU queue absorbs them), then one sync."""
    fn()
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def rel(got, want):
    return ((got.float() - want).norm() / want.norm()).item()


UP_SETTING = "up+bias+gelu blockdense r=0.25 d=2048 T=16384"
# BM, BN, BK, stages, programs per SM, warps
UP_CFGS = [(128, 128, 64, 4, 1, 8), (128, 64, 64, 3, 2, 4), (128, 128, 64, 3, 1, 8)]


def up_rows():
    """fc1's last factor of BlockDense at 25% (rank 480 -> 8192) with bias and GELU: cuBLASLt's GELU_AUX_BIAS,
    cuBLAS + torch's GELU, and the Gluon kernel; errors of act ('rel_err_dpre' column) and pre ('rel_err_db')."""
    g = torch.Generator(device="cuda").manual_seed(1)
    h = torch.randn(T, 480, device="cuda", generator=g).bfloat16()
    w = (torch.randn(NB * P, 480, device="cuda", generator=g) / 480 ** 0.5).bfloat16()
    b = (torch.randn(NB * P, device="cuda", generator=g) * 0.1).bfloat16()
    want_pre = h.float() @ w.float().t() + b.float()
    want_act = torch.nn.functional.gelu(want_pre, approximate="tanh")
    rows = []

    def add(name, cfg, fn):
        act, pre = fn()
        torch.cuda.synchronize()
        rows.append((name, cfg, event_ms(fn), host_us(fn), rel(act, want_act), rel(pre, want_pre), UP_SETTING))
        print(rows[-1], flush=True)
    try:
        from slimkit.structured import epilogue
        if epilogue.lt is not None:
            add("cublaslt-gelu_aux_bias", "", lambda: epilogue.linear_gelu(h, w, b))
    except Exception:
        traceback.print_exc()

    def eager():
        pre = torch.addmm(b, h, w.t())
        return torch.nn.functional.gelu(pre, approximate="tanh"), pre
    add("cublas-addmm+gelu", "", eager)
    for cfg in UP_CFGS:
        try:
            add("gluon-up", str(cfg), lambda cfg=cfg: linear_gelu_gluon(h, w, b, cfg))
        except Exception as e:
            print("FAILED", cfg, type(e).__name__, str(e)[:3000])
    return rows


def host_rows(dz, blocks, pre):
    """Where a Gluon call's host time goes ('rows' kernel): building the four TMA descriptors, the launch with
    descriptors built beforehand, and the whole call (outputs, descriptors, launch, the bias sum)."""
    BM, BN, BK = 128, 128, 64
    t = dz.shape[0]
    out = torch.empty_like(pre)
    part = torch.empty(triton.cdiv(t, BM), NB * P, device="cuda", dtype=torch.float32)
    dz2, bl2 = dz.reshape(t, -1), blocks.reshape(-1, P)
    lay = mma_layout(BM, BN, 8)
    descs = _descs(dz2, bl2, pre, out, BM, BN, BK)
    grid = (min(torch.cuda.get_device_properties(0).multi_processor_count, triton.cdiv(t, BM) * NB), )

    def launch():
        dgelu_bd_rows_kernel[grid](*descs, part, t, NB * P, Q, P, 2, True, lay, num_warps=8)
    nan = float("nan")
    return [("host-descriptors", "4 TMA descriptors", nan, host_us(lambda: _descs(dz2, bl2, pre, out, BM, BN, BK)),
             nan, nan, SETTING),
            ("host-launch", "rows kernel, descriptors prebuilt", nan, host_us(launch), nan, nan, SETTING),
            ("host-call", "dgelu_bd_gluon, rows kernel", nan,
             host_us(lambda: dgelu_bd_gluon(dz, blocks, pre, (BM, BN, BK, "rows", (2, True), 8))), nan, nan, SETTING)]


def main():
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    if not torch.cuda.is_available():
        sys.exit("structured_ffn_gluon_probe times CUDA kernels: run it on a GPU machine (device tool)")
    print("triton", triton.__version__, "torch", torch.__version__, torch.cuda.get_device_name())
    g = torch.Generator(device="cuda").manual_seed(0)
    dz = torch.randn(T, NB, Q, device="cuda", generator=g).bfloat16() * 0.1
    blocks = (torch.randn(NB, Q, P, device="cuda", generator=g) / Q ** 0.5).bfloat16()
    pre = torch.randn(T, NB * P, device="cuda", generator=g).bfloat16()
    want, want_db = reference(dz, blocks, pre)
    rows = []
    try:
        from slimkit.structured import epilogue
        if epilogue.lt is not None:
            def lt():
                d = epilogue.dgelu_block_diag(dz, blocks, pre)
                return d, d.sum(0)
            d, db = lt()
            rows.append(("cublaslt-dgelu+sum", "", event_ms(lt), host_us(lt), rel(d, want), rel(db, want_db)))
    except Exception:
        traceback.print_exc()

    def eager():
        dh = torch.bmm(dz.transpose(0, 1), blocks).transpose(0, 1).reshape(T, -1)
        d = torch.ops.aten.gelu_backward(dh, pre, approximate="tanh")
        return d, d.sum(0)
    d, db = eager()
    rows.append(("cublas-bmm+gelu_backward+sum", "", event_ms(eager), host_us(eager), rel(d, want), rel(db, want_db)))

    def mm_only():
        return torch.bmm(dz.transpose(0, 1), blocks)
    rows.append(("cublas-bmm-only", "", event_ms(mm_only), host_us(mm_only), float("nan"), float("nan")))

    for cfg in CFGS:
        try:
            fn = lambda cfg=cfg: dgelu_bd_gluon(dz, blocks, pre, cfg)  # noqa: E731
            d, db = fn()
            torch.cuda.synchronize()
            kind, extra = cfg[3], cfg[4]
            name = NAMES.get((kind, extra[0]), f"gluon-{kind}") if kind == "rows" else f"gluon-{kind}"
            rows.append((name, str(cfg), event_ms(fn), host_us(fn), rel(d, want), rel(db, want_db)))
        except Exception as e:
            print("FAILED", cfg, type(e).__name__, str(e)[:3000])
        print(rows[-1], flush=True)
    rows = [r + (SETTING, ) for r in rows] + up_rows() + host_rows(dz, blocks, pre)
    def num(x, fmt):
        return None if x != x else float(format(x, fmt))
    out = [{"model": "ffn-middle", "method": name, "setting": setting, "metric": "gpu_ms" if ms == ms else "host_us",
            "value": num(ms, ".4g") if ms == ms else round(hu), "seconds": num(ms / 1e3, ".4g"), "config": cfg,
            "host_us": round(hu), "rel_err_dpre": num(e1, ".3g"), "rel_err_db": num(e2, ".3g")}
           for name, cfg, ms, hu, e1, e2, setting in rows]
    path = write_results("structured_ffn_gluon_probe", "cuda", out, NOTES,
                         columns=("model", "method", "setting", "config", "metric", "value", "host_us",
                                  "rel_err_dpre", "rel_err_db"))
    print(path.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
