"""BlockShuffle's second factor written token-major, its output interleave done in the matmul's epilogue.

A BlockShuffle layer's second factor w (L blocks, S rows, R columns) reads the feature-major middle h (R L, T),
block j its rows j, j + L, ..., and gives block j's row s to output feature s L + j. Computed as L batched
matmuls, the result comes out feature-major (out, T) and one more pass over the output (kernels.transpose, about
48 us for 16384 x 2048 bf16 on an H100) turns it token-major: cuBLAS cannot write it token-major itself, since
block j's columns of the token-major output are L elements apart and a cuBLAS matrix needs one unit stride.

`token_major_blocks(h, w, bias)` writes y (T, S L) = that result, transposed, plus the bias, without the extra pass:
- L = 1: nothing is interleaved, and cuBLAS writes y = h^T w[0]^T + bias token-major (h read transposed, free);
- L = 2 (Hopper, fp16 / bf16): one persistent Triton kernel whose (BT tokens, BS rows) tile keeps one accumulator
  a block, fed through TMA, and interleaves the two in registers (tl.join) into a contiguous (BT, 2 BS) output tile;
- otherwise (or with SLIMKIT_INTERLEAVE=0) the batched matmul and the transpose.
`token_major_blocks_reference` is the PyTorch computation the kernel is tested against. The kernel, measured on an
H100 and an H200 (bench/results/structured_ffn_interleave_probe.md), takes longer than cuBLAS's matmul alone but
less than the matmul and the transpose at d_model 1024 and 2048 (about as long at 4096). `grad_blocks` is the
backward's side: the output gradient as the second factor's blocks, transposed (and its column sums, the bias
gradient) where L > 1, read as it is where L = 1.
"""
from __future__ import annotations

import contextlib
import os

import torch

from ..errors import brief, warn

try:
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:      # the CPU build of torch brings no Triton
    triton = tl = TensorDescriptor = None

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
ENABLED = os.environ.get("SLIMKIT_INTERLEAVE", "1") != "0"     # 0: always the matmul and a transpose (both ways)
FAILED: str | None = None        # the first build or launch failure; the kernel stays off after one
KERNEL_BLOCKS = 2                 # the block count the kernel interleaves (four accumulators of 128 x 64, with two
                                  # pipeline stages for the shared memory, measured slower than the matmul + transpose)
_DTYPES = (torch.float16, torch.bfloat16)


def _bmm_t01(a: torch.Tensor, b: torch.Tensor, shape: list, vshape: list) -> torch.Tensor:
    y = a.new_empty(shape)
    torch.bmm(a, b, out=y.view(vshape).transpose(0, 1))
    return y


# torch.compile does not trace a matmul into a strided out= view (it breaks the graph there, once per call site,
# and the autograd Functions that hold them run as their own graphs): as a custom op it is one opaque node, run as
# eagerly, and the graph around it stays whole (Inductor fuses the bias, GELU and reductions beside it).
_bmm_t01_op = torch.library.custom_op("slimkit::bmm_t01", _bmm_t01, mutates_args=(),
                                      schema="(Tensor a, Tensor b, SymInt[] shape, SymInt[] vshape) -> Tensor")
_bmm_t01_op.register_fake(lambda a, b, shape, vshape: a.new_empty(shape))


def bmm_t01(a: torch.Tensor, b: torch.Tensor, shape, vshape) -> torch.Tensor:
    """torch.bmm(a, b) (n, r, c) written into a fresh contiguous tensor of `shape` through its view(vshape) with
    dims 0 and 1 swapped (vshape = (r, n, c)): a batched matmul that lands token-major or interleaved with no copy
    (cuBLAS's strided-batched output). Under torch.compile, the custom op slimkit::bmm_t01 (the same call)."""
    if torch.compiler.is_compiling():
        return torch.ops.slimkit.bmm_t01(a, b, list(shape), list(vshape))
    return _bmm_t01(a, b, shape, vshape)


def token_major_blocks_reference(h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y (T, S L): y[t, s L + j] = sum_r w[j, s, r] h[r L + j, t] (+ bias[s L + j]), in h's dtype."""
    L, S, R = w.shape
    t = h.shape[1]
    y = torch.bmm(w, h.view(R, L, t).transpose(0, 1))           # (L, S, T)
    y = y.permute(2, 1, 0).reshape(t, S * L)
    return y if bias is None else y + bias.to(y.dtype)


if triton is not None:
    @triton.jit
    def _interleave_kernel(h_desc, w_desc, y_desc, b_ptr, T, S, R, HAS_BIAS: tl.constexpr, BT: tl.constexpr,
                           BS: tl.constexpr, BK: tl.constexpr, PROGRAMS: tl.constexpr):
        """Persistent: tile (token tile t0, row tile s0) is y[t0:t0+BT, 2 s0:2 (s0+BS)]. h_desc is over h viewed
        (R, 2 T) (block j's rows are its columns j T ..), w_desc over w viewed (2 S, R), y_desc over y (T, 2 S) in
        halves of the tile; block j's part accumulates in acc_j (fp32), and the two interleave in registers."""
        n_s = tl.cdiv(S, BS)
        for tile in tl.range(tl.program_id(0), tl.cdiv(T, BT) * n_s, PROGRAMS):
            t0 = (tile // n_s) * BT    # a token tile's row tiles run side by side: its h columns come from L2
            s0 = (tile % n_s) * BS
            acc0 = tl.zeros((BT, BS), dtype=tl.float32)
            acc1 = tl.zeros((BT, BS), dtype=tl.float32)
            for k in range(0, R, BK):
                acc0 = tl.dot(h_desc.load([k, t0]).T, w_desc.load([s0, k]).T, acc0)
                acc1 = tl.dot(h_desc.load([k, T + t0]).T, w_desc.load([S + s0, k]).T, acc1)
            y = tl.join(acc0, acc1).reshape(BT, 2 * BS)         # [.., s, j] -> column 2 s + j
            if HAS_BIAS:
                cols = s0 * 2 + tl.arange(0, 2 * BS)
                y += tl.load(b_ptr + cols, mask=cols < S * 2, other=0.0).to(tl.float32)[None, :]
            first, second = y.to(y_desc.dtype).reshape(BT, 2, BS).permute(0, 2, 1).split()
            y_desc.store([t0, s0 * 2], first)           # two half-width stores: half the staging memory
            y_desc.store([t0, s0 * 2 + BS], second)


def _config() -> tuple[int, int, int, int, int]:
    """(BT, BS, BK, stages, warps): two (BT, BS) fp32 accumulators. Measured on an H100 and an H200 against
    persistent / not, sequential blocks (spilled) and 64-wide tiles (bench/results/structured_ffn_interleave_probe.md)."""
    if INTERPRET:
        return 16, 16, 16, 1, 4
    return 128, 128, 64, 3, 8


def _programs(device: torch.device, tiles: int) -> int:
    return tiles if INTERPRET else min(tiles, torch.cuda.get_device_properties(device).multi_processor_count)


def kernel_applies(h: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the Triton kernel takes (h, w): Triton with TMA (a Hopper or later NVIDIA GPU), fp16 / bf16, L = 2,
    and the 16-byte alignment TMA needs of every row (T and R multiples of 8; S too, for the output's); not
    while torch.compile traces. Interpreted (the CPU tests), fp16 only: Triton's interpreter misreads bf16 through TMA descriptors."""
    if triton is None or not ENABLED or FAILED or h.dtype not in _DTYPES or w.dtype != h.dtype or h.dim() != 2:
        return False
    if torch.compiler.is_compiling():    # traced by torch.compile (the FFN is one graph since fa8c1aa): the matmul
        return False                     # (slimkit::bmm_t01) and the transpose, which Inductor takes in
    if INTERPRET:
        if h.dtype != torch.float16:
            return False
    elif not (h.is_cuda and torch.version.hip is None and torch.cuda.get_device_capability(h.device)[0] >= 9):
        return False
    L, S, R = w.shape
    t = h.shape[1]
    return (L == KERNEL_BLOCKS and h.shape[0] == R * L and t > 0 and t % 8 == 0 and R % 8 == 0 and S % 8 == 0
            and (not h.is_contiguous() or h.data_ptr() % 16 == 0))


def _kernel(h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, config: tuple | None = None):
    """y by the Triton kernel, or None where it failed to build or launch (then it stays off, with a warning)."""
    global FAILED
    L, S, R = w.shape
    t = h.shape[1]
    bt, bs, bk, stages, warps = config or _config()
    h, w = h.contiguous(), w.contiguous()
    if w.data_ptr() % 16:             # TMA reads from 16-byte aligned addresses (a view into a flat buffer may not be)
        w = w.clone()
    y = h.new_empty(t, S * L)
    b = y if bias is None else bias.to(h.dtype).contiguous()
    tiles = triton.cdiv(t, bt) * triton.cdiv(S, bs)
    programs = _programs(h.device, tiles)
    try:
        h_desc = TensorDescriptor.from_tensor(h.view(R, L * t), [bk, bt])
        w_desc = TensorDescriptor.from_tensor(w.view(L * S, R), [bs, bk])
        y_desc = TensorDescriptor.from_tensor(y, [bt, bs])
        with torch.cuda.device(h.device) if h.is_cuda else contextlib.nullcontext():
            _interleave_kernel[(programs, )](h_desc, w_desc, y_desc, b, t, S, R, HAS_BIAS=bias is not None, BT=bt,
                                             BS=bs, BK=bk, PROGRAMS=programs, num_stages=stages, num_warps=warps)
    except Exception as e:
        if h.is_cuda and torch.cuda.is_current_stream_capturing():
            raise
        FAILED = brief(e)
        warn(f"slimkit's kernel for BlockShuffle's token-major output failed to build or launch ({FAILED}); "
             "a batched matmul and a transpose take its place for the rest of this process "
             "(SLIMKIT_INTERLEAVE=0 skips the attempt)")
        return None
    return y


def token_major_blocks(h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y (T, S L) = BlockShuffle's second factor w (L, S, R) on the feature-major middle h (R L, T), token-major,
    plus bias (one per output feature), in h's dtype with autocast off (as its callers run it: under autocast the
    L = 1 matmul would take autocast's dtype): see the module docstring for which way it runs."""
    L, S, R = w.shape
    if L == 1 and ENABLED:
        return torch.mm(h.t(), w[0].t()) if bias is None else torch.addmm(bias.to(h.dtype), h.t(), w[0].t())
    if kernel_applies(h, w):
        y = _kernel(h, w, bias)
        if y is not None:
            return y
    from .kernels import transpose      # kernels imports layers, which imports this module's users
    return transpose(feature_major_blocks(h, w), bias)


def feature_major_blocks(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The second factor w (L, S, R) on the feature-major middle h (R L, T), feature-major: (S L, T), block j's
    row s at row s L + j; one batched matmul on strided views, no copy."""
    L, S, R = w.shape
    t = h.shape[1]
    return bmm_t01(w, h.view(R, L, t).transpose(0, 1), (S * L, t), (S, L, t))


def grad_blocks(dout: torch.Tensor, w_shape: torch.Size, bias_grad: bool):
    """The token-major output gradient dout (T, S L) as the (L, S, T) block views the second factor's gradients
    read (block j's row s is dout's column s L + j), and sum_t dout (the bias gradient) when bias_grad. L = 1
    reads dout transposed, as it is (cuBLAS takes either order); otherwise one transpose (with the column sums)."""
    from .kernels import transpose, transpose_colsum
    L, S, _ = w_shape
    dout = dout.contiguous()
    if L == 1 and ENABLED:
        return dout.t().unsqueeze(0), (dout.sum(0) if bias_grad else None)
    dy, db = transpose_colsum(dout) if bias_grad else (transpose(dout), None)
    return dy.view(S, L, -1).transpose(0, 1), db
