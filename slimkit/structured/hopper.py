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

from ..errors import brief, warn

try:
    import triton
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from . import _gluon_kernels as _K
except Exception:        # no Triton, one without Gluon, or one whose Gluon these kernels do not fit: unavailable
    gl = _K = None

ENABLED = os.environ.get("SLIMKIT_HOPPER_KERNELS", "1") != "0"
FAILED: str | None = None        # the first build or launch failure; the kernels stay off after one
SMEM_BUDGET = 200 << 10          # bytes of shared memory a program may take by default
SMEM_SM = 226 << 10              # what an H100 SM has (227 KB less the barriers): the bound for tiles given explicitly
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


def k_step(k: int) -> int | None:
    """The k step (BK) of a contraction of length k: the largest of 64, 32, 16 that divides it (wgmma takes 16)."""
    return next((b for b in (64, 32, 16) if k % b == 0), None)


def smem_bytes(k: int, bm: int, bn: int) -> int:
    """Shared memory of either kernel's (bm, bn) tile over a k-long contraction in 16-bit: the stationary and the
    streamed operand (all k steps) and two (bm, bn) epilogue tiles."""
    return 2 * (k * bn + k * bm + 2 * bm * bn)


def _fits(q: int, p: int, feature_major: bool, tile: Tile, budget: int | None = None) -> bool:
    swept = tile.bm if feature_major else tile.bn      # the tile dimension a block's width p is cut into
    return p % swept == 0 and smem_bytes(q, tile.bm, tile.bn) * tile.per_sm <= (budget or SMEM_BUDGET)


def _pick(nb: int, q: int, p: int, feature_major: bool, tiles=None):
    """(BK, Tile) for these blocks, or None where no tile config divides them or fits."""
    bk = k_step(q)
    if bk is None:
        return None
    for tile in tiles or TILES:
        if _fits(q, p, feature_major, Tile(*tile), None if tiles is None else SMEM_SM):
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
        FAILED = brief(e)
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
        _K.dgelu_blocks_kernel[grid](stat, strm, pre_d, out_d, n_items, nb, q, p, bk, nt, feature_major,
                                   _K.mma_layout(bm, bn, warps), num_warps=warps)
    if not _guarded("the backward through GELU'", launch, dz.device):
        return None
    return out if given is None or given is out else given.copy_(out)


UP_TILES = ((128, 128, 8), )      # (BM, BN, warps) of gelu_blocks_interleaved (128 x 64 measured slower than
                                  # cuBLASLt's GELU_AUX calls at r = 256 and 512 on an H100)


def _pick_up(s: int, r: int, t: int):
    bk = k_step(r)
    for bm, bn, warps in UP_TILES:
        if bk and s % bm == 0 and t % bn == 0 and smem_bytes(r, bm, bn) <= SMEM_BUDGET:
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
        _K.gelu_up_kernel[(min(sms, n_items), )](wd, hd, pd, ad, b if b is not None else act, n_items, l, s, t, r,
                                              s // bm, b is not None, store_pre, _K.mma_layout(bm, bn, warps),
                                              num_warps=warps)
    if not _guarded("fc1's bias + GELU", launch, h.device):
        return None
    return act, (pre if store_pre else None)
