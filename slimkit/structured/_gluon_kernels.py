"""The Gluon kernels behind slimkit.structured.hopper (see its docstring): imported there inside a try, so that a
Triton whose Gluon differs from the one these were written against (Triton 3.6-3.8) leaves the kernels off instead
of breaking the import of the FFN paths."""
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_wait)

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
def _k_origin(r0, c0, s, BK: gl.constexpr, K_ROWS: gl.constexpr):
    """The origin of k step s of an operand tile at (r0, c0): k runs down the rows (K_ROWS) or along the columns."""
    if K_ROWS:
        return [r0 + s * BK, c0]
    else:
        return [r0, c0 + s * BK]


@gluon.jit
def _load_stationary(desc, bar, bufs, r0, c0, pred, KSTEPS: gl.constexpr, BK: gl.constexpr, K_ROWS: gl.constexpr):
    """An item's stationary operand, all k steps, on one barrier."""
    mbarrier.expect(bar, KSTEPS * desc.block_type.nbytes, pred=pred)
    for s in gl.static_range(KSTEPS):
        tma.async_copy_global_to_shared(desc, _k_origin(r0, c0, s, BK, K_ROWS), bar, bufs.index(s), pred)


@gluon.jit
def _load_streamed(desc, bars, bufs, r0, c0, pred, KSTEPS: gl.constexpr, BK: gl.constexpr, K_ROWS: gl.constexpr):
    """A tile's streamed operand, k step s on barrier s (the matmul starts on the first step that lands)."""
    for s in gl.static_range(KSTEPS):
        mbarrier.expect(bars.index(s), desc.block_type.nbytes, pred=pred)
        tma.async_copy_global_to_shared(desc, _k_origin(r0, c0, s, BK, K_ROWS), bars.index(s), bufs.index(s), pred)


@gluon.jit
def dgelu_blocks_kernel(stat_desc, strm_desc, pre_desc, out_desc, n_items, NB, Q: gl.constexpr,
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
    _load_streamed(strm_desc, bars, v_bufs, v0, v1, True, KSTEPS, BK, True)
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
        _load_streamed(strm_desc, bars, v_bufs, v0, v1, more, KSTEPS, BK, True)
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
    _load_stationary(h_desc, sbar, h_bufs, 0, col, pred & (sub == 0), KSTEPS, BK, True)
    _load_streamed(w_desc, bars, w_bufs, blk * S + row, 0, pred, KSTEPS, BK, False)
    return blk, row, col


@gluon.jit
def gelu_up_kernel(w_desc, h_desc, pre_desc, act_desc, bias_ptr, n_items, NB, S, T, R: gl.constexpr,
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


def mma_layout(bm: int, bn: int, num_warps: int):
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
