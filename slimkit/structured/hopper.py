"""Block-diagonal matmuls through GELU' as hand-scheduled Hopper kernels (Gluon: TMA, mbarriers, wgmma).

The backward of a structured FFN whose fc2 starts block-diagonal (BlockShuffle, BlockDense) computes, per block,

    dpre = (dz_block @ W_block) * gelu_tanh'(pre)

over the (tokens x hidden) activations: a matmul with a small contraction (K = q, 256 at d_model 2048 and 25% of
the parameters) whose output and auxiliary input (pre) are the FFN's largest tensors, so its cost is memory, not
FLOPs. cuBLASLt's DGELU epilogue (epilogue.py), one call per block, runs it at 2-2.7x the bytes floor on an H100.
The kernel here is persistent, one program an SM: a program takes (block, tile) items, loads the item's
activation operand once into shared memory (stationary) and sweeps the block's tiles of the other side, streaming
the block's weight tiles (L2-resident) and the pre-activation through TMA; after each tile's matmul the next tile's
loads go out before this tile's epilogue (GELU' in fp32, with the hardware tanh, then a TMA store).

Two layouts, one kernel:
- feature-major (BlockShuffle's ShuffleGeluFFN keeps the hidden activations hidden x tokens): out (nb*p, T),
  block i's rows i*p.. = w[i]^T (p, q) @ dz[i*q:(i+1)*q] (q, T); the stationary operand is dz's (q, BN) column
  tile, and w[i]'s (BK, BM) tiles go to the tensor cores transposed as they lie in shared memory (no copy of w);
- token-major (BlockDense's GeluFFN): out (T, nb*p), block j's columns j*p.. = dz[:, j*q:(j+1)*q] @ blocks[j]
  (q, p); the stationary operand is dz's (BM, q) row tile.

On an H100 (bf16, 16384 tokens, BlockShuffle at 25% of d_model 2048: 8 blocks 256 -> 1024) it takes 0.25 ms where
the eight DGELU calls take 0.40-0.44 (bench/results/structured_ffn_hopper_probe.md). What bounds it is the
epilogue's instruction issue (ncu: 2 warps a scheduler, 0.4 instructions issued a cycle, DRAM at about 60% of its
peak): folding GELU' to ten instructions a value and reading the tile's pre-activation while its matmul runs took
it from 0.27 to 0.25 ms. Tried and measured no faster: smaller tiles, two programs an SM (64 x 64: 0.31 ms at the
time), 16 warps (0.27), a third pre-activation buffer (0.275), and a software pipeline that keeps the next tile's
matmul running during this tile's epilogue (two accumulators, the streamed operand double-buffered; shared memory
then holds 64-row or 64-column tiles only: 0.34-0.53 ms).

`gelu_blocks_interleaved` is the forward's counterpart for BlockShuffle's fc1: its second factor through bias and
GELU, writing act and the pre-activation (0.27 ms against 0.33-0.40 for one cuBLASLt GELU_AUX call a block plus the
weight-with-bias-column concat those need); its 537 MB of writes bound it.

`dgelu_blocks` runs it where `applies` says it can (a Hopper GPU, a Triton with Gluon, bf16/fp16, shapes the tiles
divide, a stationary operand that fits in shared memory); `dgelu_blocks_reference` is the PyTorch computation it
is tested against. SLIMKIT_HOPPER_KERNELS=0 turns it off.
"""
from __future__ import annotations

import os
from collections import namedtuple

import torch
import torch.nn.functional as F

from ..errors import warn

try:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                   warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except Exception:        # no Triton, or one without Gluon: the module reports itself unavailable
    gluon = gl = None

ENABLED = os.environ.get("SLIMKIT_HOPPER_KERNELS", "1") != "0"
FAILED: str | None = None        # the first build or launch failure; the kernels stay off after one
SMEM_BUDGET = 200 << 10          # bytes of shared memory a program may take (an H100 SM has 227 KB)
Tile = namedtuple("Tile", "bm bn warps per_sm", defaults=(1, ))
TILES = (Tile(128, 128, 8), )    # dgelu_blocks' tile configs, the first that fits taken (128 x 64 tiles measured
                                 # slower than cuBLASLt's DGELU calls at k = 256 and 512 on an H100)
_GL_DTYPES = {} if gl is None else {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


def dgelu_blocks_reference(dz: torch.Tensor, w: torch.Tensor, pre: torch.Tensor, feature_major: bool) -> torch.Tensor:
    """What dgelu_blocks computes, in torch ops at fp32 or wider, returned in pre's dtype. w (nb, q, p) the blocks;
    feature_major: dz (nb*q, T), pre (nb*p, T); else dz (T, nb*q), pre (T, nb*p)."""
    nb, ct = w.shape[0], torch.promote_types(dz.dtype, torch.float32)
    dz, w = dz.to(ct), w.to(ct)
    if feature_major:
        t = dz.shape[1]
        dh = torch.bmm(w.transpose(1, 2), dz.view(nb, -1, t)).reshape(-1, t)
    else:
        t = dz.shape[0]
        dh = torch.bmm(dz.view(t, nb, -1).transpose(0, 1), w).transpose(0, 1).reshape(t, -1)
    return torch.ops.aten.gelu_backward(dh, pre.to(ct), approximate="tanh").to(pre.dtype)


def _fits(q: int, p: int, feature_major: bool, tile: Tile, budget: int | None = None) -> bool:
    bm, bn = tile.bm, tile.bn
    swept = bm if feature_major else bn                # the tile dimension a block's width p is cut into
    smem = 2 * (q * bn + q * bm + 2 * bm * bn)         # stationary + streamed operands (all k steps), two pre tiles
    return p % swept == 0 and smem * tile.per_sm <= (budget or SMEM_BUDGET)


def _pick(nb: int, q: int, p: int, feature_major: bool, tiles=None):
    """(BK, Tile) for these blocks, or None where no tile config divides them or fits."""
    bk = next((b for b in (64, 32, 16) if q % b == 0), None)
    if bk is None:
        return None
    for tile in tiles or TILES:
        if _fits(q, p, feature_major, Tile(*tile), None if tiles is None else 226 << 10):
            return bk, Tile(*tile)
    return None


def applies(dz: torch.Tensor, w: torch.Tensor, pre: torch.Tensor, feature_major: bool) -> bool:
    """Whether dgelu_blocks runs the Gluon kernel for these operands (else the caller takes another path)."""
    if gl is None or not ENABLED or FAILED or not dz.is_cuda or dz.dtype not in _GL_DTYPES:
        return False
    if not (dz.dtype == w.dtype == pre.dtype) or not _hopper(dz.device) or not (dz.device == w.device == pre.device):
        return False
    nb, q, p = w.shape
    t = dz.shape[1] if feature_major else dz.shape[0]
    shapes = ((nb * q, t), (nb * p, t)) if feature_major else ((t, nb * q), (t, nb * p))
    if t == 0 or (tuple(dz.shape), tuple(pre.shape)) != shapes or not _aligned(dz, w, pre):
        return False                                   # (no tokens: TMA descriptors take no empty dimension)
    if (feature_major and t % 8) or (nb * p) % 8 or (nb * q) % 8:     # TMA: 16-byte aligned row strides (the
        return False                                   # token count is one only feature-major)
    return _pick(nb, q, p, feature_major) is not None


def _hopper(device: torch.device) -> bool:
    """An NVIDIA Hopper GPU (ROCm reports gfx90a / gfx942 as capability 9.x too)."""
    return torch.version.hip is None and torch.cuda.get_device_capability(device)[0] == 9


def _aligned(*ts: torch.Tensor) -> bool:
    """TMA needs 16-byte aligned addresses: a contiguous operand is taken as it is (a copy would be aligned)."""
    return all(not x.is_contiguous() or x.data_ptr() % 16 == 0 for x in ts)


if gl is not None:
    # gelu_tanh(x) = x (1 + t) / 2, t = tanh(u), u = c0 x (1 + a x^2), c0 = sqrt(2 / pi), a = 0.044715, with the
    # hardware tanh (MUFU.TANH, about 2^-11 relative error in t). Where 1 + t cancels (x below -2) that is an
    # absolute error of about |x| 2^-12 (gelu(-3) = -0.004 comes out within 1e-3), below bf16's resolution at unit
    # scale and the accuracy of cuBLASLt's GELU epilogues, whose error these kernels match (the probe's rel_err).
    # The exact sigmoid form x / (1 + 2^(-2 log2(e) u)) was measured: 3x smaller overall error, but 0.27 -> 0.33 ms
    # forward and 0.25 -> 0.27 ms backward (a division and a second MUFU op a value).
    _C0 = gl.constexpr(0.7978845608028654)
    _C1 = gl.constexpr(0.7978845608028654 * 0.044715)
    _K1 = gl.constexpr(0.5 * 0.7978845608028654)
    _K3 = gl.constexpr(1.5 * 0.7978845608028654 * 0.044715)

    @gluon.jit
    def _tanh_approx(u):
        return gl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [u], dtype=gl.float32, is_pure=True,
                                         pack=1)

    @gluon.jit
    def _gelu_tanh_grad(x):
        """gelu_tanh'(x) = (1 + t) / 2 + x (1 - t^2) c0 (1 + 3 a x^2) / 2, the constants folded so that it is ten
        instructions a value (the epilogue's instruction issue bounds the kernel)."""
        x2 = x * x
        t = _tanh_approx(x * (_C0 + _C1 * x2))
        return (0.5 + 0.5 * t) + x * (1.0 - t * t) * (_K1 + _K3 * x2)

    @gluon.jit
    def _schedule(n_items, NT: gl.constexpr):
        """(program id, programs, this program's tile count): items dealt round-robin, NT tiles each."""
        pid = gl.program_id(0)
        nprog = gl.num_programs(0)
        return pid, nprog, gl.cdiv(n_items - pid, nprog) * NT

    @gluon.jit
    def _tile(t, pid, nprog, NB, NT: gl.constexpr, Q: gl.constexpr, P: gl.constexpr, BM: gl.constexpr,
              BN: gl.constexpr, FM: gl.constexpr):
        """This program's t-th tile: (stationary operand's origin, streamed operand's origin, output origin) as
        (row, column) pairs, and whether it starts a new item. Items are dealt round-robin, NT tiles each."""
        item = pid + (t // NT) * nprog
        sub = t % NT
        if FM:       # item (block i, token tile n); tiles down the block's p rows
            blk = item % NB
            s0 = blk * Q
            s1 = (item // NB) * BN
            v0 = blk * Q
            v1 = sub * BM
            o0 = blk * P + sub * BM
            o1 = s1
        else:        # item (token tile m, block j); tiles across the block's p columns
            blk = item % NB
            s0 = (item // NB) * BM
            s1 = blk * Q
            v0 = s1
            v1 = sub * BN
            o0 = s0
            o1 = blk * P + sub * BN
        return sub == 0, s0, s1, v0, v1, o0, o1

    @gluon.jit
    def _load_stationary(desc, bar, bufs, r0, c0, pred, KSTEPS: gl.constexpr, BK: gl.constexpr, FM: gl.constexpr):
        mbarrier.expect(bar, KSTEPS * desc.block_type.nbytes, pred=pred)
        for s in gl.static_range(KSTEPS):
            if FM:   # dz (nb q, T): k runs down the rows
                tma.async_copy_global_to_shared(desc, [r0 + s * BK, c0], bar, bufs.index(s), pred)
            else:    # dz (T, nb q): k runs along the columns
                tma.async_copy_global_to_shared(desc, [r0, c0 + s * BK], bar, bufs.index(s), pred)

    @gluon.jit
    def _load_streamed(desc, bars, bufs, r0, c0, pred, KSTEPS: gl.constexpr, BK: gl.constexpr, FM: gl.constexpr):
        for s in gl.static_range(KSTEPS):
            mbarrier.expect(bars.index(s), desc.block_type.nbytes, pred=pred)
            tma.async_copy_global_to_shared(desc, [r0 + s * BK, c0], bars.index(s), bufs.index(s), pred)

    @gluon.jit
    def _dgelu_blocks_kernel(stat_desc, strm_desc, pre_desc, out_desc, n_items, NB, Q: gl.constexpr,
                             P: gl.constexpr, BK: gl.constexpr, NT: gl.constexpr, FM: gl.constexpr,
                             layout: gl.constexpr, num_warps: gl.constexpr):
        BM: gl.constexpr = out_desc.block_type.shape[0]
        BN: gl.constexpr = out_desc.block_type.shape[1]
        KSTEPS: gl.constexpr = Q // BK
        pid, nprog, total = _schedule(n_items, NT)

        s_bufs = gl.allocate_shared_memory(stat_desc.dtype, [KSTEPS] + stat_desc.block_type.shape, stat_desc.layout)
        v_bufs = gl.allocate_shared_memory(strm_desc.dtype, [KSTEPS] + strm_desc.block_type.shape, strm_desc.layout)
        c_bufs = gl.allocate_shared_memory(pre_desc.dtype, [2] + pre_desc.block_type.shape, pre_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [KSTEPS + 3, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(KSTEPS + 3):
            mbarrier.init(bars.index(s), count=1)
        sbar = bars.index(KSTEPS)

        new, s0, s1, v0, v1, o0, o1 = _tile(0, pid, nprog, NB, NT, Q, P, BM, BN, FM)
        _load_stationary(stat_desc, sbar, s_bufs, s0, s1, True, KSTEPS, BK, FM)
        _load_streamed(strm_desc, bars, v_bufs, v0, v1, True, KSTEPS, BK, FM)
        mbarrier.expect(bars.index(KSTEPS + 1), pre_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(pre_desc, [o0, o1], bars.index(KSTEPS + 1), c_bufs.index(0))
        for t in range(total):
            if t % NT == 0:
                mbarrier.wait(sbar, (t // NT) & 1)
            acc = gl.zeros((BM, BN), dtype=gl.float32, layout=layout)
            for s in gl.static_range(KSTEPS):
                mbarrier.wait(bars.index(s), t & 1)
                if FM:     # w's (BK, BM) tile, transposed
                    acc = warpgroup_mma(v_bufs.index(s).permute((1, 0)), s_bufs.index(s), acc, is_async=True)
                else:
                    acc = warpgroup_mma(s_bufs.index(s), v_bufs.index(s), acc, is_async=True)
            c_buf = c_bufs.index(t % 2)        # this tile's pre-activation, read while the matmul runs
            mbarrier.wait(bars.index(KSTEPS + 1 + (t % 2)), (t // 2) & 1)
            pre = c_buf.load(layout)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            cur0 = o0
            cur1 = o1
            # the next tile's loads go out before this tile's epilogue
            t2 = t + 1
            more = t2 < total
            new, s0, s1, v0, v1, o0, o1 = _tile(t2, pid, nprog, NB, NT, Q, P, BM, BN, FM)
            _load_stationary(stat_desc, sbar, s_bufs, s0, s1, more & new, KSTEPS, BK, FM)
            _load_streamed(strm_desc, bars, v_bufs, v0, v1, more, KSTEPS, BK, FM)
            tma.store_wait(pendings=0)         # the store that used the next tile's pre buffer is done
            nbar = bars.index(KSTEPS + 1 + (t2 % 2))
            mbarrier.expect(nbar, pre_desc.block_type.nbytes, pred=more)
            tma.async_copy_global_to_shared(pre_desc, [o0, o1], nbar, c_bufs.index(t2 % 2), more)
            c_buf.store((acc * _gelu_tanh_grad(pre.to(gl.float32))).to(pre_desc.dtype))
            fence_async_shared()
            tma.async_copy_shared_to_global(out_desc, [cur0, cur1], c_buf)
        tma.store_wait(pendings=0)

    @gluon.jit
    def _gelu_tanh(x):
        h = 0.5 * x
        return h + h * _tanh_approx(x * (_C0 + _C1 * x * x))

    @gluon.jit
    def _up_loads(w_desc, h_desc, bars, sbar, w_bufs, h_bufs, t, pid, nprog, NB, S, T, pred,
                  NT: gl.constexpr, KSTEPS: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr):
        """Issue tile t's loads: the item's h columns (stationary, at an item's first tile) and block j's weight rows.
        Returns the tile's (block, output row, output column)."""
        item = pid + (t // NT) * nprog
        sub = t % NT
        blk = item % NB
        col = blk * T + (item // NB) * BN
        row = sub * BM
        new = pred & (sub == 0)
        mbarrier.expect(sbar, KSTEPS * h_desc.block_type.nbytes, pred=new)
        for s in gl.static_range(KSTEPS):
            tma.async_copy_global_to_shared(h_desc, [s * BK, col], sbar, h_bufs.index(s), new)
        for s in gl.static_range(KSTEPS):
            mbarrier.expect(bars.index(s), w_desc.block_type.nbytes, pred=pred)
            tma.async_copy_global_to_shared(w_desc, [blk * S + row, s * BK], bars.index(s), w_bufs.index(s), pred)
        return blk, row, col

    @gluon.jit
    def _gelu_up_kernel(w_desc, h_desc, pre_desc, act_desc, bias_ptr, n_items, NB, S, T, R: gl.constexpr,
                        NT: gl.constexpr, HAS_BIAS: gl.constexpr, STORE_PRE: gl.constexpr, layout: gl.constexpr,
                        num_warps: gl.constexpr):
        """act = gelu_tanh(pre), pre = w[j] h_j + b: see gelu_blocks_interleaved. Persistent, items (block, token
        tile), the item's h tile stationary, the block's weight rows streamed, the next tile's loads issued before
        this tile's epilogue."""
        BM: gl.constexpr = act_desc.block_type.shape[0]
        BN: gl.constexpr = act_desc.block_type.shape[1]
        BK: gl.constexpr = w_desc.block_type.shape[1]
        KSTEPS: gl.constexpr = R // BK
        pid, nprog, total = _schedule(n_items, NT)

        h_bufs = gl.allocate_shared_memory(h_desc.dtype, [KSTEPS] + h_desc.block_type.shape, h_desc.layout)
        w_bufs = gl.allocate_shared_memory(w_desc.dtype, [KSTEPS] + w_desc.block_type.shape, w_desc.layout)
        a_buf = gl.allocate_shared_memory(act_desc.dtype, act_desc.block_type.shape, act_desc.layout)
        p_buf = gl.allocate_shared_memory(act_desc.dtype, act_desc.block_type.shape, act_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [KSTEPS + 1, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(KSTEPS + 1):
            mbarrier.init(bars.index(s), count=1)
        sbar = bars.index(KSTEPS)
        blk, row, col = _up_loads(w_desc, h_desc, bars, sbar, w_bufs, h_bufs, 0, pid, nprog, NB, S, T, True,
                                  NT, KSTEPS, BM, BN, BK)
        for t in range(total):
            if t % NT == 0:
                mbarrier.wait(sbar, (t // NT) & 1)
            acc = gl.zeros((BM, BN), dtype=gl.float32, layout=layout)
            for s in gl.static_range(KSTEPS):
                mbarrier.wait(bars.index(s), t & 1)
                acc = warpgroup_mma(w_bufs.index(s), h_bufs.index(s), acc, is_async=True)
            if HAS_BIAS:     # loaded while the matmul runs; block j's row i is hidden channel i * NB + j
                rows = row + gl.arange(0, BM, layout=gl.SliceLayout(1, layout))
                bias = gl.load(bias_ptr + rows * NB + blk)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            cur_row = row
            cur_col = col
            blk, row, col = _up_loads(w_desc, h_desc, bars, sbar, w_bufs, h_bufs, t + 1, pid, nprog, NB, S, T,
                                      t + 1 < total, NT, KSTEPS, BM, BN, BK)
            if HAS_BIAS:
                acc = acc + bias.to(gl.float32)[:, None]
            pre = acc.to(act_desc.dtype)
            tma.store_wait(pendings=0)         # the last tile's stores have left the buffers
            a_buf.store(_gelu_tanh(acc).to(act_desc.dtype))
            if STORE_PRE:
                p_buf.store(pre)
            fence_async_shared()
            tma.async_copy_shared_to_global(act_desc, [cur_row, cur_col], a_buf)
            if STORE_PRE:
                tma.async_copy_shared_to_global(pre_desc, [cur_row, cur_col], p_buf)
        tma.store_wait(pendings=0)

    def _mma_layout(bm: int, bn: int, num_warps: int):
        """The wgmma accumulator layout of a (bm, bn) tile over num_warps warps (16-bit operands)."""
        warps = [4, 1]
        while warps[0] * warps[1] != num_warps:
            if bm > 16 * warps[0]:
                warps[0] *= 2
            else:
                warps[1] *= 2
        n = 256
        maxn = max(bn // triton.cdiv(num_warps, triton.cdiv(bm, 16)), 8)
        while n > maxn or bn % n:
            n -= 8
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=warps, instr_shape=[16, n, 16])


def _guarded(what: str, launch, device: torch.device) -> bool:
    """Run launch(); where building or launching the kernel fails (a Triton whose Gluon differs from the one this
    was written for, a GPU short of shared memory), switch the kernels off for the process with a warning and
    return False, so that the caller takes its cuBLASLt path. Inside a CUDA graph capture the error is raised."""
    global FAILED
    try:
        with torch.cuda.device(device):       # Triton launches on the current device
            launch()
        return True
    except Exception as e:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise
        msg = str(e).strip()            # Triton's compile errors end with the cause (source excerpt first)
        FAILED = f"{type(e).__name__}: {msg if len(msg) <= 300 else msg[:100] + ' ... ' + msg[-200:]}"
        warn(f"slimkit's Hopper kernel for {what} failed to build or launch ({FAILED}); the structured FFNs use "
             "cuBLASLt's per-block epilogue matmuls for the rest of this process (SLIMKIT_HOPPER_KERNELS=0 skips "
             "the attempt)")
        return False


def _desc(x: torch.Tensor, block: list[int]):
    gdt = _GL_DTYPES[x.dtype]
    return TensorDescriptor.from_tensor(x, block, gl.NVMMASharedLayout.get_default_for(block, gdt))


def dgelu_blocks(dz: torch.Tensor, w: torch.Tensor, pre: torch.Tensor, feature_major: bool,
                 out: torch.Tensor | None = None, tiles=None) -> torch.Tensor:
    """dpre = (block-diagonal matmul of dz with w's blocks) * gelu_tanh'(pre), one Gluon kernel (see the module's
    docstring for the two layouts; dgelu_blocks_reference says the same in torch). Only where applies() holds;
    None where the kernel fails to build or launch (_guarded), for the caller to take its other path."""
    nb, q, p = w.shape
    t = dz.shape[1] if feature_major else dz.shape[0]
    bk, tile = _pick(nb, q, p, feature_major, tiles)
    bm, bn, warps = tile.bm, tile.bn, tile.warps
    dz, w, pre = dz.contiguous(), w.contiguous(), pre.contiguous()
    given = out
    if out is None or not (out.is_contiguous() and out.shape == pre.shape and out.dtype == pre.dtype
                           and out.device == pre.device and out.data_ptr() % 16 == 0):
        out = torch.empty_like(pre)     # row-major and aligned (empty_like(pre) of a strided pre need not be);
                                        # a bad `out` must not reach TensorDescriptor and switch the kernels off
    if feature_major:       # items (block, token tile): stationary dz (bk, bn) tiles, streamed w (bk, bm) tiles
        n_items, nt = nb * triton.cdiv(t, bn), p // bm
    else:                   # items (token tile, block): stationary dz (bm, bk) tiles, streamed w (bk, bn) tiles
        n_items, nt = triton.cdiv(t, bm) * nb, p // bn

    def launch():
        stat = _desc(dz, [bk, bn] if feature_major else [bm, bk])
        strm = _desc(w.view(nb * q, p), [bk, bm] if feature_major else [bk, bn])
        pre_d, out_d = _desc(pre, [bm, bn]), _desc(out, [bm, bn])
        sms = torch.cuda.get_device_properties(dz.device).multi_processor_count
        grid = (min(sms * tile.per_sm, n_items), )
        _dgelu_blocks_kernel[grid](stat, strm, pre_d, out_d, n_items, nb, q, p, bk, nt, feature_major,
                                   _mma_layout(bm, bn, warps), num_warps=warps)
    if not _guarded("the backward through GELU'", launch, dz.device):
        return None
    return out if given is None or given is out else given.copy_(out)


UP_TILES = ((128, 128, 8), )      # (BM, BN, warps) of gelu_blocks_interleaved (128 x 64 measured slower than
                                  # cuBLASLt's GELU_AUX calls at r = 256 and 512 on an H100)


def _pick_up(s: int, r: int, t: int):
    bk = next((b for b in (64, 32, 16) if r % b == 0), None)
    for bm, bn, warps in UP_TILES:
        if bk and s % bm == 0 and t % bn == 0 and 2 * (r * bn + r * bm + 2 * bm * bn) <= SMEM_BUDGET:
            return bm, bn, bk, warps
    return None


def up_applies(h: torch.Tensor, w: torch.Tensor, t: int) -> bool:
    """Whether gelu_blocks_interleaved runs for the middle h and weights w (l, s, r)."""
    if gl is None or not ENABLED or FAILED or not h.is_cuda or h.dtype not in _GL_DTYPES or h.dtype != w.dtype:
        return False
    l, s, r = w.shape
    if not _hopper(h.device) or h.device != w.device or h.dim() != 2 or h.shape[1] != t or t == 0:
        return False
    if not h.is_contiguous() or h.shape[0] % l or h.shape[0] // l < r or not _aligned(h, w):
        return False
    return _pick_up(s, r, t) is not None


def gelu_blocks_interleaved_reference(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, t: int):
    """What gelu_blocks_interleaved computes, in torch ops at fp32 or wider: (act, pre) in h's dtype."""
    l, s, r = w.shape
    ct = torch.promote_types(h.dtype, torch.float32)
    hv = h.to(ct).view(-1, l, t)[:r].transpose(0, 1)                  # block j: rows j, j + l, ... (r of them)
    pre = torch.bmm(w.to(ct), hv).transpose(0, 1).reshape(s * l, t)     # block j's row i: hidden row i * l + j
    if b is not None:
        pre = pre + b.to(ct)[:, None]
    return F.gelu(pre, approximate="tanh").to(h.dtype), pre.to(h.dtype)


def gelu_blocks_interleaved(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, t: int,
                            store_pre: bool = True, tiles=None):
    """BlockShuffle fc1's second factor through bias + GELU, feature-major: w (l, s, r), h (rp * l, T) the middle
    (block j reads rows j, j + l, ... of its first r * l rows; rows past them, such as ShuffleGeluFFN's ones rows,
    are not read), b (s * l,) or None. Returns act = gelu_tanh(pre) and pre (None unless store_pre), each
    (s * l, T) with block j's row i at row i * l + j: what one GELU_AUX matmul a block computes, in one kernel.
    Only where up_applies() holds; None where the kernel fails to build or launch (_guarded)."""
    l, s, r = w.shape
    bm, bn, bk, warps = tiles or _pick_up(s, r, t)
    if s % bm or t % bn or r % bk:      # a token tile off T would read and write the next block's columns
        raise ValueError(f"gelu_blocks_interleaved: tiles {(bm, bn, bk)} do not divide (s, T, r) = {(s, t, r)}")
    if b is not None:                   # the kernel indexes the bias as a dense (s * l,) vector
        if b.numel() != s * l:
            raise ValueError(f"gelu_blocks_interleaved: bias of {b.numel()} values for {s * l} hidden channels")
        b = b.contiguous()
    w = w.contiguous()
    act = h.new_empty(s * l, t)
    pre = torch.empty_like(act) if store_pre else act
    h2 = h.view(-1, l * t)                        # row k, column j T + t: middle row k l + j
    n_items = l * (t // bn)

    def launch():
        wd, hd = _desc(w.view(l * s, r), [bm, bk]), _desc(h2, [bk, bn])
        ad, pd = _desc(act.view(s, l * t), [bm, bn]), _desc(pre.view(s, l * t), [bm, bn])
        sms = torch.cuda.get_device_properties(h.device).multi_processor_count
        _gelu_up_kernel[(min(sms, n_items), )](wd, hd, pd, ad, b if b is not None else act, n_items, l, s, t, r,
                                              s // bm, b is not None, store_pre, _mma_layout(bm, bn, warps),
                                              num_warps=warps)
    if not _guarded("fc1's bias + GELU", launch, h.device):
        return None
    return act, (pre if store_pre else None)
