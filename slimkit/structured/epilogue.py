"""The FFN's GELU work in cuBLASLt matmul epilogues, through nvmath-python's cuBLASLt bindings (optional, GPU only).

An FFN y = fc2(gelu(fc1 x)) spends, besides its matmuls, several memory-bound passes over the (tokens x hidden)
activations: bias + GELU forward, GELU' backward and the bias-gradient sum. cuBLASLt can do the first two inside
the matmuls that touch those activations anyway:

- forward, fc1's last dense factor w (N, K) on h (T, K): epilogue GELU_AUX_BIAS (GELU_AUX without a bias) writes
  act = gelu(h w^T + b) and, as its auxiliary output, the pre-activation that the backward needs;
- backward, where fc2 starts with a dense factor u (k, N) (nn.Linear, LowRankLinear): the input gradient of that
  factor, dz u, goes through epilogue DGELU, which multiplies it by gelu'(pre) read from the auxiliary output.
  The bias gradient is one torch sum: the fused DGELU_BGRAD epilogue is far slower (H100, T 16384, 528 -> 8192:
  1.37 ms against 0.33 ms for DGELU plus 0.10 ms for the sum), and so is BGRADB on the weight-gradient matmul
  dpre^T @ h, which cuBLASLt 13.1 runs as the matmul plus its own reduction kernel (T 16384, 480 -> 8192: 0.314 ms
  against 0.277 ms for torch's matmul plus the sum; the whole FFN no faster: bench/structured_ffn_bgrad_probe.py
  at commit 3816c43).
  Where fc2 starts block-diagonal (BlockDense, BlockShuffle), the same DGELU runs once per block on token-major
  views (dgelu_block_diag). DGELU is the slow piece: every algorithm cuBLASLt 13.1 proposes for it (8, with
  either operand order) takes 343-432 us at T 16384, 528 -> 8192 on an H100, where the plain matmul takes
  190-250 us; it still beats the matmul plus torch's separate GELU' pass (about 0.26 ms more).

Two BlockShuffle layers (ShuffleGeluFFN) keep the hidden activations feature-major between them, as the eager
kernels.blockshuffle_ffn does; there each block of fc1's second factor is one GELU_AUX matmul on strided views,
with fc1's bias carried by rows of ones beside the middle activations (cuBLASLt's epilogue bias is per row of its
column-major output, i.e. per token in that layout), and each block of fc2's first factor's input gradient one
DGELU matmul. On an H100 (bf16, 16384 tokens, graphed step) it about ties the eager FFN at d_model 2048 and 25%
(8 blocks a factor: the per-block calls are small), beats it by 3-4% at 32% and 50% (5-15% when timed without
a warm-up, which favoured it as the first variant of each round; see the next paragraph) and by 3-8% at d_model
4096 and 25%, and ties at 1024 (bench/results/structured_ffn_shuffle_lt_probe.md, structured_ffn_speed.md); a variant
with the backward's GELU' as a matmul plus the eager GELU' pass measured no faster anywhere and slower at 32-50%
(timed second, before that warm-up).

Running the backward's weight-gradient matmuls on a side stream beside its chain of input gradients (forked
where their operands are ready, joined before the backward returns) measured no faster on an H100 at d_model 2048
and 16384 tokens, within 2% either way for low-rank, BlockDense and BlockShuffle at 25% and 32% once each variant
was timed at sustained clocks (commit f7e4db9, bench/structured_ffn_overlap_probe.py there; reverted after it).
Timed without that warm-up, whichever variant ran first after an idle moment gained 5-10%, which first passed for
a gain of the side stream.

cuBLASLt's GELU is the tanh approximation, so only F.gelu(approximate="tanh") is fused.

The calls go straight to cuBLASLt (nvmath.bindings.cublasLt, a thin Cython layer over the C API): each matmul
signature (epilogue, shapes, strides, dtype, pointer alignments, device, thread) gets a plan once (descriptors,
layouts, the heuristic's candidate algorithms timed on the first operands, the fastest kept); afterwards a call
sets the epilogue's pointers and enqueues the matmul: 26 us of host time per call on the device tool's H100 host,
where a torch.mm call takes 14 us. nvmath's high-level Matmul
object was the first version: its per-call bookkeeping (operand wrapping, stream objects, events, result
allocation) cost about 0.5 ms of host time per call, which at d_model 2048 made the fused FFN host-bound (kernels
1.78 ms, step 2.83 ms: bench/ffn_kernel_profile.py). At most MAX_PLANS plans are kept (least recently used
dropped first); plans are per thread, as a cuBLASLt matmul descriptor is not thread-safe.

Used through `slimkit.structured.kernels.fused_ffn(..., matmul="cublaslt")`; `available(x)` says whether it runs
(nvmath-python importable, x on CUDA, SLIMKIT_FUSED_FFN not 0). Install: pip install slimkit[cublaslt]
(nvmath-python 1.0.0).
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F

from . import hopper
from .interleave import grad_blocks, token_major_blocks
from .layers import _monarch_reference, block_diag_product, block_diag_reference, linear_cast_bias, regrad

try:
    from nvmath import CudaDataType
    from nvmath.bindings import cublasLt as lt
    from nvmath.bindings.cublas import ComputeType
except Exception:        # not installed, or no CUDA runtime: the module reports itself unavailable
    lt = ComputeType = CudaDataType = None

ENABLED = os.environ.get("SLIMKIT_FUSED_FFN", "1") != "0"
CANDIDATES = 8           # algorithms the heuristic proposes per plan; each timed on the first call
TUNE_ITERS = 3
WORKSPACE = 32 << 20     # bytes of cuBLASLt workspace per device and stream
MAX_PLANS = 32           # plans kept: training reuses a handful of shapes
EPILOGUES = ("GELU_AUX", "GELU_AUX_BIAS", "DGELU", "GELU", "GELU_BIAS")
AUX_EPILOGUES = ("GELU_AUX", "GELU_AUX_BIAS", "DGELU")     # the others (inference) take no auxiliary matrix
_PLANS: OrderedDict = OrderedDict()
_LOCK = threading.Lock()          # guards _PLANS, _HANDLES and _WORKSPACES (plans themselves are per thread)
_HANDLES: dict = {}
_WORKSPACES: dict = {}
_DTYPE = {torch.bfloat16: "CUDA_R_16BF", torch.float16: "CUDA_R_16F", torch.float32: "CUDA_R_32F"}


def available(x: torch.Tensor) -> bool:
    """Whether the cuBLASLt path runs for x: nvmath-python present, not disabled, x on CUDA."""
    return lt is not None and ENABLED and x.is_cuda


def applies(hidden: int, dtype: torch.dtype) -> bool:
    """Whether the epilogues take an FFN of this hidden width and dtype: the auxiliary output's leading
    dimension must be a multiple of 8, and the dtype one cuBLASLt's GELU epilogues accept."""
    return hidden % 8 == 0 and dtype in _DTYPE


def _alignment(t: torch.Tensor | None) -> int:
    """The largest power of two (up to 256) dividing t's address: the plan's algorithms may rely on it."""
    if t is None:
        return 256
    p = t.data_ptr()
    return min(256, p & -p) if p else 256


def _set(setter, dtype_of, obj, attr, value) -> np.ndarray:
    buf = np.array([value], dtype=dtype_of(attr))
    setter(obj, attr, buf.ctypes.data, buf.itemsize)
    return buf


class _Plan:
    """One cuBLASLt matmul D = epilogue(op(A) op(B)), column-major, for fixed shapes and strides: out (T, N) with
    unit column stride is D (N x T, ld out.stride(0)); x (T, K) is B, op(B) = N with a unit column stride
    (K x T, ld x.stride(0)), else T (x = y^T for a row-major y (K, T)); wt (K, N) is A, op(A) = N if wt's rows are
    contiguous (N x K), else T (wt = w^T for w (N, K)); aux is laid out like out, with its own leading dimension
    (None for the epilogues without one)."""

    def __init__(self, epilogue: str, x: torch.Tensor, wt: torch.Tensor, out: torch.Tensor, aux: torch.Tensor,
                 bias: torch.Tensor | None, aligns: tuple):
        (t, k), n = x.shape, wt.shape[1]
        dt = getattr(CudaDataType, _DTYPE[x.dtype])
        desc_attr, pref_attr = lt.MatmulDescAttribute, lt.MatmulPreferenceAttribute
        self.device = x.device
        self.handle = _handle(x.device)
        self.desc = lt.matmul_desc_create(ComputeType.COMPUTE_32F, CudaDataType.CUDA_R_32F)
        self._layouts, self._pref = [], None
        sd = lt.matmul_desc_set_attribute
        dtype_of = lt.get_matmul_desc_attribute_dtype
        trans_a, lda = _a_op(wt)
        trans_b, ldb = _b_op(x)
        _set(sd, dtype_of, self.desc, desc_attr.TRANSA, 1 if trans_a else 0)     # CUBLAS_OP_T / CUBLAS_OP_N
        _set(sd, dtype_of, self.desc, desc_attr.TRANSB, 1 if trans_b else 0)
        _set(sd, dtype_of, self.desc, desc_attr.EPILOGUE, int(getattr(lt.Epilogue, epilogue)))
        self._aux_attr, self._bias_attr = desc_attr.EPILOGUE_AUX_POINTER, desc_attr.BIAS_POINTER
        self._ptr = np.zeros(1, dtype=dtype_of(desc_attr.EPILOGUE_AUX_POINTER))
        self._aux = aux is not None
        if self._aux:
            _set(sd, dtype_of, self.desc, desc_attr.EPILOGUE_AUX_LD, aux.stride(0) if t > 1 else n)
            self._set_ptr(self._aux_attr, aux.data_ptr())       # the heuristic checks the epilogue's pointers
        self._bias = bias is not None
        if self._bias:
            _set(sd, dtype_of, self.desc, desc_attr.BIAS_DATA_TYPE, int(dt))
            self._set_ptr(self._bias_attr, bias.data_ptr())
        self.a = self._layout(dt, k, n, lda) if trans_a else self._layout(dt, n, k, lda)
        self.b = self._layout(dt, t, k, ldb) if trans_b else self._layout(dt, k, t, ldb)
        self.d = self._layout(dt, n, t, out.stride(0) if t > 1 else n)
        self._pref = lt.matmul_preference_create()
        sp, pdtype = lt.matmul_preference_set_attribute, lt.get_matmul_preference_attribute_dtype
        _set(sp, pdtype, self._pref, pref_attr.MAX_WORKSPACE_BYTES, WORKSPACE)
        for name, align in zip(("MIN_ALIGNMENT_A_BYTES", "MIN_ALIGNMENT_B_BYTES", "MIN_ALIGNMENT_C_BYTES",
                                "MIN_ALIGNMENT_D_BYTES"), aligns):
            _set(sp, pdtype, self._pref, getattr(pref_attr, name), align)
        results = np.zeros(CANDIDATES, dtype=lt.matmul_heuristic_result_dtype)
        count = np.zeros(1, dtype=np.int32)
        lt.matmul_algo_get_heuristic(self.handle, self.desc, self.a, self.b, self.d, self.d, self._pref,
                                     CANDIDATES, results.ctypes.data, count.ctypes.data)
        if int(count[0]) == 0:
            raise RuntimeError(f"cuBLASLt has no algorithm for {epilogue} at T={t} K={k} N={n} {x.dtype}")
        self._algos = np.ascontiguousarray(results["algo"][: int(count[0])])     # owns the structs
        self.algos = [self._algos.ctypes.data + i * self._algos.itemsize for i in range(len(self._algos))]
        self.algo = self.algos[0]
        self.alpha, self.beta = np.ones(1, dtype=np.float32), np.zeros(1, dtype=np.float32)

    def _layout(self, dt, rows: int, cols: int, ld: int):
        layout = lt.matrix_layout_create(dt, rows=rows, cols=cols, ld=ld)
        self._layouts.append(layout)
        return layout

    def _set_ptr(self, attr, ptr: int) -> None:
        self._ptr[0] = ptr
        lt.matmul_desc_set_attribute(self.desc, attr, self._ptr.ctypes.data, self._ptr.itemsize)

    def run(self, x, wt, out, aux, bias, algo=None) -> None:
        if self._aux:
            self._set_ptr(self._aux_attr, aux.data_ptr())
        if self._bias:
            self._set_ptr(self._bias_attr, bias.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        ws = _workspace(self.device, stream)
        algo = self.algo if algo is None else algo
        lt.matmul(self.handle, self.desc, self.alpha.ctypes.data, wt.data_ptr(), self.a, x.data_ptr(), self.b,
                  self.beta.ctypes.data, out.data_ptr(), self.d, out.data_ptr(), self.d, algo,
                  ws.data_ptr(), WORKSPACE, stream.cuda_stream)

    def tune(self, x, wt, out, aux, bias) -> None:
        """Time each candidate algorithm on these operands (CUDA events) and keep the fastest. The outputs are
        overwritten by the call that follows. The device is synchronised first, so that no work queued on other
        streams shares the GPU while the candidates are timed; under CUDA graph capture (a plan first needed
        inside a capture), where neither synchronising nor timing is allowed, the heuristic's first choice stays."""
        if len(self.algos) < 2 or torch.cuda.is_current_stream_capturing():
            return
        torch.cuda.synchronize(self.device)
        best = None
        for algo in self.algos:
            self.run(x, wt, out, aux, bias, algo)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(TUNE_ITERS):
                self.run(x, wt, out, aux, bias, algo)
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
            if best is None or ms < best[0]:
                best = (ms, algo)
        self.algo = best[1]

    def __del__(self):
        try:
            for layout in self._layouts:
                lt.matrix_layout_destroy(layout)
            if self._pref is not None:
                lt.matmul_preference_destroy(self._pref)
            lt.matmul_desc_destroy(self.desc)
        except Exception:      # interpreter shutdown: the library may already be gone
            pass


def _handle(device: torch.device):
    key = device.index if device.index is not None else torch.cuda.current_device()
    with _LOCK:
        if key not in _HANDLES:
            with torch.cuda.device(key):
                _HANDLES[key] = lt.create()
        return _HANDLES[key]


def _workspace(device: torch.device, stream) -> torch.Tensor:
    key = (device.index, stream.cuda_stream)
    ws = _WORKSPACES.get(key)
    if ws is None:
        with _LOCK:
            ws = _WORKSPACES.get(key)
            if ws is None:
                ws = _WORKSPACES[key] = torch.empty(WORKSPACE, dtype=torch.uint8, device=device)
    return ws


def _a_op(wt: torch.Tensor) -> tuple[bool, int] | None:
    """How cuBLASLt reads wt (K, N) as operand A: (transposed, leading dimension), or None if neither
    orientation has a unit stride and a large enough leading dimension."""
    (k, n), (s0, s1) = wt.shape, wt.stride()
    if s1 == 1 and s0 >= max(1, n):
        return False, max(1, n) if k == 1 else s0
    if s0 == 1 and s1 >= max(1, k):
        return True, max(1, k) if n == 1 else s1
    return None


def _b_op(x: torch.Tensor) -> tuple[bool, int] | None:
    """How cuBLASLt reads x (T, K) as operand B: (transposed, leading dimension), or None if neither orientation
    has a unit stride and a large enough leading dimension (_matmul copies it then)."""
    (t, k), (s0, s1) = x.shape, x.stride()
    if s1 == 1 and (s0 >= max(1, k) or t == 1):
        return False, max(1, k) if t == 1 else s0
    if s0 == 1 and (s1 >= max(1, t) or k == 1):
        return True, max(1, t) if k == 1 else s1
    return None


def _matmul(epilogue: str, x: torch.Tensor, wt: torch.Tensor, out: torch.Tensor, aux: torch.Tensor | None,
            bias: torch.Tensor | None = None) -> None:
    """out = epilogue(x @ wt) in place, for x (T, K), wt (K, N), out and aux (T, N), any of them strided views (a
    block of a token-major block-diagonal product). GELU_AUX(_BIAS) writes aux, DGELU reads it (see
    reference_matmul); GELU(_BIAS), for inference, take no aux (None). x and wt are copied if cuBLASLt cannot read
    them as they are; out and aux need unit column strides, row strides of at least N, and one shape."""
    if epilogue not in EPILOGUES:
        raise ValueError(f"epilogue must be one of {EPILOGUES}, got {epilogue!r}")
    if (aux is None) != (epilogue not in AUX_EPILOGUES):
        raise ValueError(f"epilogue {epilogue} takes {'an' if epilogue in AUX_EPILOGUES else 'no'} aux matrix")
    mats = (out,) if aux is None else (out, aux)
    if (aux is not None and out.shape != aux.shape) or any(u.stride(1) != 1 or u.stride(0) < u.shape[1] for u in mats):
        raise ValueError("out and aux need one shape, unit column strides and row strides of at least N")
    if any(t.dtype != x.dtype for t in (wt,) + mats + (() if bias is None else (bias,))):
        raise ValueError("x, wt, out, aux and bias must share one dtype")
    if bias is not None and (bias.dim() != 1 or bias.stride(0) != 1 or bias.numel() != out.shape[1]):
        raise ValueError("bias must be a contiguous vector of N values")
    if _a_op(wt) is None:
        wt = wt.contiguous()
    if _b_op(x) is None:
        x = x.contiguous()
    aligns = (_alignment(wt), _alignment(x), _alignment(out), _alignment(out), _alignment(aux), _alignment(bias))
    key = (epilogue, threading.get_ident(), x.device, x.dtype, tuple(x.shape), x.stride(), tuple(wt.shape),
           wt.stride(), out.stride(), None if aux is None else aux.stride(), bias is not None, aligns)
    with _LOCK:
        plan = _PLANS.get(key)
        if plan is not None:
            _PLANS.move_to_end(key)
    if plan is None:                         # built outside the lock: the key is this thread's own
        plan = _Plan(epilogue, x, wt, out, aux, bias, aligns)
        plan.tune(x, wt, out, aux, bias)
        with _LOCK:
            _PLANS[key] = plan
            while len(_PLANS) > MAX_PLANS:   # least recently used first
                _PLANS.popitem(last=False)
    plan.run(x, wt, out, aux, bias)


def reference_matmul(epilogue: str, x: torch.Tensor, wt: torch.Tensor, out: torch.Tensor, aux: torch.Tensor | None,
                     bias: torch.Tensor | None = None) -> None:
    """What `_matmul` computes, in PyTorch (for tests on any device): the epilogues' definitions.
    GELU_AUX(_BIAS): aux = x @ wt (+ bias per column), out = gelu_tanh(aux); GELU(_BIAS) the same without aux;
    DGELU: out = (x @ wt) * gelu_tanh'(aux)."""
    z = x @ wt
    if epilogue in ("GELU", "GELU_BIAS"):
        out.copy_(F.gelu(z + bias if epilogue == "GELU_BIAS" else z, approximate="tanh"))
    elif epilogue in ("GELU_AUX", "GELU_AUX_BIAS"):
        pre = z + bias if epilogue == "GELU_AUX_BIAS" else z
        aux.copy_(pre)
        out.copy_(F.gelu(pre, approximate="tanh"))
    elif epilogue == "DGELU":
        out.copy_(torch.ops.aten.gelu_backward(z, aux, approximate="tanh"))
    else:
        raise ValueError(f"no reference for epilogue {epilogue!r}")


def _grad_like(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b laid out as w is (row- or column-major), so that autograd stores it as w's gradient without a copy
    (as torch's own matmul backward does: a parameter may be column-major, e.g. from an SVD init)."""
    if w.dim() == 2 and w.stride(0) == 1 and w.stride(1) != 1:
        return (b.t() @ a.t()).t()
    return a @ b


ONES_PAD = 8      # columns appended to h for the bias gradient: one of ones, the rest zeros (16-byte rows in bf16)
TILE = 128        # the width of the matmul tiles the appended columns must not spill out of


def ones_fits(k: int) -> bool:
    """Whether the weight gradient dpre^T @ h of a layer with input width k takes its bias gradient as one more
    column of h (all ones) for free: when k is not a multiple of TILE and the ONES_PAD columns still fit in its
    last tile, the matmul's tiles cover them already (k 480: 4 tiles of 128 either way)."""
    return k % TILE != 0 and k % TILE + ONES_PAD <= TILE


def with_ones(h: torch.Tensor) -> torch.Tensor | None:
    """h (T, k) with ONES_PAD columns appended, the first of them ones and the rest zeros, when ones_fits(k); else
    None. dpre^T @ with_ones(h) is then [dw, db, 0...]: the bias gradient comes out of the weight-gradient matmul,
    which reads dpre anyway, instead of one more pass over dpre (a sum: 0.09 ms at 16384 x 8192 on an H100)."""
    t, k = h.shape
    if not ones_fits(k):
        return None
    pad = h.new_zeros(t, ONES_PAD)
    pad[:, 0] = 1
    return torch.cat([h, pad], 1)


def bias_sum(dpre: torch.Tensor) -> torch.Tensor:
    """sum_t dpre[t] for dpre (T, N) as cuBLAS's matrix-vector product dpre^T @ ones: it reads dpre once at close to
    copy bandwidth, where torch's column reduction took 10-20 us more at T 16384, N 1024-4096 on an H100
    (bench/results/structured_ffn_bias_grad_probe.md, 'mm+mv' against 'mm+sum')."""
    return torch.mv(dpre.t(), dpre.new_ones(dpre.shape[0]))


def weight_bias_grads(w: torch.Tensor, dpre: torch.Tensor, h: torch.Tensor, h1: torch.Tensor | None,
                      has_bias: bool) -> tuple:
    """(dw, db) of the linear h @ w^T (+ b) for its output gradient dpre, dw laid out as w is; db None without a
    bias. h1 = with_ones(h) (or None): the bias gradient is then a column of one matmul (see with_ones)."""
    if not has_bias:
        return _grad_like(w, dpre.t(), h), None
    if h1 is None:
        return _grad_like(w, dpre.t(), h), bias_sum(dpre)
    k = h.shape[1]
    if w.dim() == 2 and w.stride(0) == 1 and w.stride(1) != 1:      # column-major w: its gradient too
        g = h1.t() @ dpre                                           # (k + pad, N)
        return g[:k].t(), g[k]
    g = dpre.t() @ h1                                               # (N, k + pad)
    return g[:, :k].contiguous(), g[:, k].contiguous()


def linear_gelu(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, aux: bool = True):
    """(act, pre), both (T, N) row-major: act = gelu_tanh(h @ w^T + b) and the pre-activation; with aux=False
    (inference: no backward to feed) pre is None and the matmul writes act alone (epilogue GELU(_BIAS))."""
    act = h.new_empty(h.shape[0], w.shape[0])
    if not aux:
        _matmul("GELU_BIAS" if b is not None else "GELU", h, w.t(), act, None, b)
        return act, None
    pre = torch.empty_like(act)
    _matmul("GELU_AUX_BIAS" if b is not None else "GELU_AUX", h, w.t(), act, pre, b)
    return act, pre


def dgelu_linear(dz: torch.Tensor, u: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """dpre = (dz @ u) * gelu_tanh'(pre), (T, N), for dz (T, k), u (k, N) and pre from linear_gelu."""
    dpre = torch.empty_like(pre)
    _matmul("DGELU", dz, u, dpre, pre)
    return dpre


def dgelu_block_diag(dz: torch.Tensor, blocks: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """dpre = (dz @ blockdiag(blocks)) * gelu_tanh'(pre), (T, b*p): the input gradient of the block-diagonal
    product z = block_diag_mm(act.view(T, b, p), blocks) (dz (T, b, q), blocks (b, q, p)) through GELU, one DGELU
    matmul per block on token-major strided views. (One strided-batched call computes the same, but cuBLASLt 13.1
    runs a batched DGELU as a matmul plus a separate epilogue kernel: 1.08 ms against 0.35 ms for the four
    per-block calls at T 16384, b 4, q 256, p 2048 on an H100.)"""
    t, nb, _ = dz.shape
    p = blocks.shape[2]
    if hopper.applies(dz.view(t, -1), blocks, pre, feature_major=False):       # one Gluon kernel for every block
        dpre = hopper.dgelu_blocks(dz.view(t, -1), blocks, pre, False)
        if dpre is not None:
            return dpre
    dpre = torch.empty_like(pre)
    out, aux = dpre.view(t, nb, p), pre.view(t, nb, p)
    for k in range(nb):
        _matmul("DGELU", dz[:, k], blocks[k], out[:, k], aux[:, k])
    return dpre


def ones_buffer(h_shape: tuple, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hp, h): hp (T, k + pad) with its columns after the first k set to [1, 0, ...] (pad >= 1, k + pad a
    multiple of ONES_PAD, so rows stay 16-byte aligned in bf16), h = hp[:, :k] the view a matmul writes a linear's
    input into. dpre^T @ hp is then [dw, db, 0...] (see with_ones) with no copy of h."""
    t, k = h_shape
    width = (k // ONES_PAD + 1) * ONES_PAD
    hp = like.new_empty(t, width)
    hp[:, k:].zero_()
    hp[:, k].fill_(1)          # fills, no host-to-device copy: a CUDA graph can capture it
    return hp, hp[:, :k]


def close_ones(width: int) -> bool:
    """Whether fc2's closing dense factor (input width `width`) takes its bias gradient from a ones column beside
    its input (GeluFFN): where the appended columns stay in the matmul's last tile (ones_fits). Elsewhere it is
    hit and miss: on an H100 at T 16384 and N 2048 (d_model) the column gains 15-40 us at widths 384-768 but
    loses 20 us at 1024, where cuBLAS takes a poor tile for 2048 x 1032 (bench/results/
    structured_ffn_bias_grad_probe.md); fc1's last factor (N = 4 d_model) gains at every width up to 1024 there,
    so GeluFFN always gives it the column after a head."""
    return ones_fits(width)


def _buffer(shape: tuple, like: torch.Tensor, ones: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    return ones_buffer(shape, like) if ones else (None, like.new_empty(shape))


def _head_reference(head: str, x: torch.Tensor, first: torch.Tensor | None) -> torch.Tensor:
    if head == "dense":
        return x
    if head == "lowrank":
        return x @ first.t()
    return block_diag_reference(x.view(x.shape[0], first.shape[0], -1), first).reshape(x.shape[0], -1)


def _tail_reference(tail: str, act: torch.Tensor, tail_w: torch.Tensor | None, v2, b2) -> torch.Tensor:
    if tail == "none":
        return act
    z = act @ tail_w.t() if tail == "dense" else block_diag_reference(act.view(act.shape[0], tail_w.shape[0], -1),
                                                                      tail_w)
    return z if v2 is None else linear_cast_bias(z.reshape(z.shape[0], -1), v2, b2)


def ffn_reference(x, first, w, b, tail_w, v2=None, b2=None, head: str = "dense", tail: str = "none") -> torch.Tensor:
    """What GeluFFN computes, in differentiable torch ops: close(tail(gelu_tanh(head(x) @ w^T + b)))."""
    pre = linear_cast_bias(_head_reference(head, x, first), w, b)
    return _tail_reference(tail, F.gelu(pre, approximate="tanh"), tail_w, v2, b2)


def ffn_infer(x, first, w, b, tail_w, v2, b2, head: str, tail: str) -> torch.Tensor:
    """What GeluFFN computes, for inference (no gradient wanted): the same matmuls, fc1's GELU in a GELU(_BIAS)
    epilogue that writes no pre-activation, and no ones columns. At 16 tokens (decoding) these few kernels are the
    FFN's whole cost."""
    t = x.shape[0]
    if head == "dense":
        h = x
    elif head == "lowrank":
        h = x @ first.t()
    else:
        nb = first.shape[0]
        h = block_diag_product(x.view(t, nb, -1), first).view(t, -1)
    act, _ = linear_gelu(h, w, b, aux=False)
    if tail == "none":
        return act
    if tail == "dense":
        z = act @ tail_w.t()
    else:
        z = block_diag_product(act.view(t, tail_w.shape[0], -1), tail_w)
    if v2 is not None:
        return F.linear(z.view(t, -1), v2, b2)
    return z


class GeluFFN(torch.autograd.Function):
    """The FFN around fc1's last dense factor w (N, K), for x (T, in):

        out = close(z),  z = tail(act),  act = gelu_tanh(h @ w^T + b),  h = head(x)

    head: "dense" (h = x; fc1 an nn.Linear), "lowrank" (h = x @ first^T, first = fc1.u), "blockdense" (h the
    block-diagonal product with first = fc1.blocks); tail: "none" (z = act), "dense" (z = act @ tail_w^T, fc2's
    first dense factor), "block" (z (T, nb, q) = the block-diagonal product with tail_w, fc2's first factor);
    close: with v2 (fc2's closing dense factor: LowRankLinear.v, BlockDenseLinear.v) out = z @ v2^T + b2, else
    out = z.
    The forward's GELU and the backward's GELU' are cuBLASLt epilogues (GELU_AUX(_BIAS); DGELU where a tail
    follows). Where a linear with a bias reads an input this Function computes (fc1's last factor after a head,
    fc2's closing factor), that input is written beside a ones column (ones_buffer), so the bias gradient comes out
    of the weight-gradient matmul with no extra pass over the output gradient and no copy; a dense head takes
    the copy where it is free (with_ones)."""

    @staticmethod
    def forward(ctx, x, first, w, b, tail_w, v2, b2, head: str, tail: str):
        t = x.shape[0]
        if head == "dense":
            h, hp = x, (None if b is None else with_ones(x))
        else:
            hp, h = _buffer((t, w.shape[1]), x, b is not None)
            if head == "lowrank":
                torch.mm(x, first.t(), out=h)
            else:
                nb = first.shape[0]
                block_diag_product(x.view(t, nb, -1), first, out=h.view(t, nb, -1))
        act, pre = linear_gelu(h, w, b)
        zp = None
        if tail == "none":
            z = act
        else:
            width = tail_w.shape[0] * (tail_w.shape[1] if tail == "block" else 1)
            zp, z = _buffer((t, width), act, v2 is not None and b2 is not None and close_ones(width))
            if tail == "dense":
                torch.mm(act, tail_w.t(), out=z)
            else:
                block_diag_product(act.view(t, tail_w.shape[0], -1), tail_w, out=z.view(t, tail_w.shape[0], -1))
        if v2 is not None:
            out = F.linear(z, v2, b2)
        else:           # a block tail hands on (T, nb, q), what BlockShuffle's after_first takes
            out = z.view(t, tail_w.shape[0], -1) if tail == "block" else z
        ctx.save_for_backward(x, first, h, hp, w, b, tail_w, None if tail == "none" else act, pre, v2, b2,
                              None if v2 is None else z, zp)
        ctx.head, ctx.tail, ctx.has_bias, ctx.has_b2 = head, tail, b is not None, b2 is not None
        return out

    @staticmethod
    def backward(ctx, dout):
        x, first, h, hp, w, b, tail_w, act, pre, v2, b2, z, zp = ctx.saved_tensors
        head, tail, needs = ctx.head, ctx.tail, ctx.needs_input_grad
        if torch.is_grad_enabled():          # a double backward: differentiate the reference instead
            ref = lambda x, first, w, b, tail_w, v2, b2: ffn_reference(   # noqa: E731
                x, first, w, b, tail_w, v2, b2, head, tail)
            return regrad(ref, (x, first, w, b, tail_w, v2, b2), needs[:7], dout) + (None, None)
        t = x.shape[0]
        dtail = dv2 = db2 = None
        if v2 is not None:
            dout = dout.contiguous()
            if needs[5] or needs[6]:
                dv2, db2 = weight_bias_grads(v2, dout, z, zp, ctx.has_b2)
            dout = dout @ v2                                         # dz, (T, width)
        if tail == "none":
            dpre = torch.ops.aten.gelu_backward(dout, pre, approximate="tanh")
        elif tail == "dense":
            dout = dout.contiguous()
            dpre = dgelu_linear(dout, tail_w, pre)
            dtail = _grad_like(tail_w, dout.t(), act) if needs[4] else None
        else:
            dout = dout.contiguous().view(t, tail_w.shape[0], -1)
            dpre = dgelu_block_diag(dout, tail_w, pre)
            if needs[4]:
                dtail = torch.bmm(dout.transpose(0, 1).transpose(1, 2), act.view(t, tail_w.shape[0], -1).transpose(0, 1))
        dw, db = weight_bias_grads(w, dpre, h, hp, ctx.has_bias) if needs[2] or needs[3] else (None, None)
        dx = dfirst = None
        if head == "dense":
            dx = dpre @ w if needs[0] else None
        elif needs[0] or needs[1]:
            dh = dpre @ w
            if head == "lowrank":
                dx = dh @ first if needs[0] else None
                dfirst = _grad_like(first, dh.t(), x) if needs[1] else None
            else:
                nb = first.shape[0]
                dhb = dh.view(t, nb, -1)
                if needs[0]:
                    dx = x.new_empty(x.shape)
                    torch.bmm(dhb.transpose(0, 1), first, out=dx.view(t, nb, -1).transpose(0, 1))
                if needs[1]:
                    dfirst = torch.bmm(dhb.transpose(0, 1).transpose(1, 2), x.view(t, nb, -1).transpose(0, 1))
        return dx, dfirst, dw, db, dtail, dv2, db2, None, None


def _shuffle_pad(r: int, bias: bool) -> int:
    """The input width of BlockShuffle fc1's second factor as ShuffleGeluFFN feeds it: r, or with a bias r plus
    rows of ones up to the next multiple of ONES_PAD (at least one; the weight's rows stay 16-byte aligned in bf16),
    which meet the bias column and then zero columns of the padded weight."""
    return (r // ONES_PAD + 1) * ONES_PAD if bias else r


def _bias_rows(h: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return h if b is None else h + b.to(h.dtype)[:, None]


def shuffle_ffn_reference(x, a1, a2, b1, c1, c2, b2) -> torch.Tensor:
    """What ShuffleGeluFFN computes, in differentiable torch ops: fc2(gelu_tanh(fc1 x)) for BlockShuffle fc1
    (w1 a1, w2 a2, bias b1) and fc2 (c1, c2, b2), token-major in and out."""
    act = F.gelu(_bias_rows(_monarch_reference(x, a1, a2, out_fm=True), b1), approximate="tanh")
    y = _monarch_reference(act, c1, c2, in_fm=True)
    return y if b2 is None else y + b2.to(y.dtype)


def shuffle_applies(fc1, fc2, tokens: int, dtype: torch.dtype) -> bool:
    """Whether ShuffleGeluFFN takes this pair of BlockShuffle layers (fc1's w2 (l, s, r), fc2's w1 (k2, q2, p2)):
    the hidden width fc1 -> fc2 matches, the dtype is one cuBLASLt's GELU epilogues take, and the epilogues'
    strided feature-major views keep every leading dimension and block a multiple of 8 elements (fc1's second
    factor goes to cuBLASLt as it is without a bias, so r too; with one it is padded to a multiple of 8)."""
    (s, r), (q2, p2) = fc1.w2.shape[1:], fc2.w1.shape[1:]
    return (fc1.out_features == fc2.in_features and dtype in _DTYPE and tokens % 8 == 0
            and s % 8 == 0 and q2 % 8 == 0 and p2 % 8 == 0 and (fc1.bias is not None or r % 8 == 0))


def _shuffle_up(h: torch.Tensor, w2p: torch.Tensor, t: int, aux: bool):
    """fc1's second factor w2p (l, s, rp) on the feature-major middle h (rp * l rows, T) through GELU: act (and
    pre), (s * l, T) feature-major, block j's row i at row i * l + j; one GELU_AUX (GELU without aux) epilogue
    matmul per block, each on strided views."""
    l, s, rp = w2p.shape
    act = h.new_empty(s * l, t)
    pre = torch.empty_like(act) if aux else None
    hv, av = h.view(rp, l, t), act.view(s, l, t)
    pv = pre.view(s, l, t) if aux else None
    for j in range(l):
        _matmul("GELU_AUX" if aux else "GELU", w2p[j], hv[:, j], av[:, j], pv[:, j] if aux else None)
    return act, pre


class ShuffleGeluFFN(torch.autograd.Function):
    """fc2(gelu_tanh(fc1 x)) for two BlockShuffle layers, fc1's bias and GELU in cuBLASLt epilogues.

    The hidden activations stay feature-major (hidden x tokens) between the layers, as in kernels.blockshuffle_ffn:
    every block of a factor is a strided view that a matmul reads or writes as it is. In that layout cuBLASLt's
    epilogue bias (one value per row of its column-major D: per token) cannot carry fc1's per-feature bias, so the
    bias rides in the matmul instead: the middle activations get rows of ones after them (ONES_PAD per block of
    fc1's second factor) and each block's weight a column holding its bias (then zeros). Then:
    - forward: each block of fc1's second factor is one GELU_AUX matmul writing act and the pre-activation;
    - backward: each block of fc2's first factor's input gradient is one DGELU matmul, dpre = (c1^T dz) gelu'(pre),
      and fc1's bias gradient is the bias column of its second factor's weight gradient (the ones rows' product);
    so no separate bias + GELU pass runs over the hidden activations either way (kernels.bias_gelu_rows).
    x (T, in) and the result (T, out) are token-major; a1, a2 / c1, c2: fc1's / fc2's w1, w2; b1 / b2 their biases
    (or None). grad=False (inference) writes no pre-activation (GELU epilogues) and saves nothing."""

    @staticmethod
    def forward(ctx, x, a1, a2, b1, c1, c2, b2, grad: bool = True):
        (k, q, p), (l, s, r) = a1.shape, a2.shape
        k2, q2, p2 = c1.shape
        t = x.shape[0]
        rp = _shuffle_pad(r, b1 is not None)
        h = x.new_empty(rp * l, t)                               # the middle, feature-major, then the ones rows
        torch.bmm(a1, x.view(t, k, p).permute(1, 2, 0), out=h[: k * q].view(k, q, t))
        if b1 is not None:
            h[k * q:].fill_(1)                                   # read by the backward's weight gradient
        up = hopper.gelu_blocks_interleaved(h, a2, b1, t, store_pre=grad) if hopper.up_applies(h, a2, t) else None
        if up is not None:                                       # one Gluon kernel, the bias in its epilogue
            act, pre = up
        else:
            w2p = a2
            if b1 is not None:
                w2p = torch.cat([a2, b1.view(s, l).t().unsqueeze(2), a2.new_zeros(l, s, rp - r - 1)], 2)
            act, pre = _shuffle_up(h, w2p.contiguous(), t, grad)
        h2 = x.new_empty(k2 * q2, t)
        torch.bmm(c1, act.view(k2, p2, t), out=h2.view(k2, q2, t))
        if grad:
            ctx.save_for_backward(x, a1, a2, b1, c1, c2, b2, h, act, pre, h2)
        return token_major_blocks(h2, c2, b2)

    @staticmethod
    def backward(ctx, dout):
        x, a1, a2, b1, c1, c2, b2, h, act, pre, h2 = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():          # a double backward: differentiate the reference instead
            return regrad(shuffle_ffn_reference, (x, a1, a2, b1, c1, c2, b2), needs[:7], dout) + (None,)
        (k, q, p), (l, s, r) = a1.shape, a2.shape
        (k2, q2, p2), (l2, _, r2) = c1.shape, c2.shape
        t, rp = x.shape[0], h.shape[0] // l
        dyv, db2 = grad_blocks(dout, c2.shape, b2 is not None and needs[6])
        h2v = h2.view(r2, l2, t).transpose(0, 1)
        dc2 = torch.bmm(dyv, h2v.transpose(1, 2)) if needs[5] else None
        dh2 = x.new_empty(k2 * q2, t)
        torch.bmm(c2.transpose(1, 2), dyv, out=dh2.view(r2, l2, t).transpose(0, 1))
        dh2b = dh2.view(k2, q2, t)
        dc1 = torch.bmm(dh2b, act.view(k2, p2, t).transpose(1, 2)) if needs[4] else None
        dpre = torch.empty_like(pre)
        if not (hopper.applies(dh2, c1, pre, feature_major=True)   # one Gluon kernel for every block
                and hopper.dgelu_blocks(dh2, c1, pre, True, out=dpre) is not None):
            dv, pv = dpre.view(k2, p2, t), pre.view(k2, p2, t)
            for i in range(k2):
                _matmul("DGELU", c1[i].t(), dh2b[i], dv[i], pv[i])      # c1[i]^T read transposed, not copied
        dpv = dpre.view(s, l, t).transpose(0, 1)                 # fc1's second factor, block j: rows j, j + l, ...
        da2 = db1 = None
        if needs[2] or needs[3]:
            g = torch.bmm(dpv, h.view(rp, l, t).transpose(0, 1).transpose(1, 2))      # (l, s, rp): [dw2, db1, 0...]
            da2 = g[:, :, :r].contiguous() if needs[2] else None
            db1 = g[:, :, r].t().reshape(-1) if b1 is not None and needs[3] else None
        da1 = dx = None
        if needs[0] or needs[1]:
            dh = x.new_empty(k * q, t)
            torch.bmm(a2.transpose(1, 2), dpv, out=dh.view(r, l, t).transpose(0, 1))
            dhb = dh.view(k, q, t)
            if needs[1]:
                da1 = torch.bmm(dhb, x.view(t, k, p).permute(1, 0, 2))
            if needs[0]:
                dx = x.new_empty(t, k * p)
                torch.bmm(dhb.transpose(1, 2), a1, out=dx.view(t, k, p).transpose(0, 1))
        return dx, da1, da2, db1, dc1, dc2, db2, None
